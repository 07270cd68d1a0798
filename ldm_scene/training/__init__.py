"""Making probes: training data, labelers, probe fitting, evaluation, and the command line over them.

Only this subpackage (and ``ldm_scene.toy``) knows about datasets. Probes are fit without storing
activations: generation streams each (site, step) activation into per-probe sufficient statistics
(:class:`ldm_scene.training.fit.RidgeStats`) that give closed-form ridge probes in one pass, and a
second, seeded pass evaluates them. :func:`ldm_scene.training.adam.train_adam` is the paper's
trainer (Adam on a bias-free linear map) for comparison on data small enough to hold in memory.
:mod:`.evaluate` scores readouts (bilinear read-out), :mod:`.controls` makes the prompt-only,
same-prompt and grid-ceiling controls, :mod:`.report` writes ``metrics.json``, :mod:`.readme` the README, and
:mod:`.pipeline` strings the phases together: :mod:`.config` (the run's settings), :mod:`.context`
(what every phase shares), :mod:`.trace` (one image with its activations), :mod:`.fit_pass`,
:mod:`.solve`, :mod:`.calibrate`, :mod:`.adam`, :mod:`.eval_pass` and :mod:`.outputs`.
"""
