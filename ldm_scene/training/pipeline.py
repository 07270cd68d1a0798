"""Fit and evaluate linear probes for every (task, site, step) in one streamed pass per image.

This module strings the phases together (:func:`run`) and re-exports their public names; the
configuration is :class:`~.config.RunConfig`, the shared state :class:`~.context.RunContext`.

The run, for N seeded images split train / val / test (:mod:`.dataset`):

1. **Fit pass** (train and val images; :mod:`.fit_pass`, each image made by :mod:`.trace`). Each
   image is generated once with every site hooked. The conditional activations of that one image
   (16 sites x all steps) are kept until the image is done, because the labels come from the
   labeler applied to the *final* image (the paper's protocol); then each ``(site, step)`` activation ``[T, C]`` updates a
   :class:`~ldm_scene.training.fit.RidgeStats` against the labels area-averaged to the site's grid
   (for foreground: the fraction of the token's cell that is foreground, a soft target), and the
   activations are dropped. One accumulator per ``(site, step)`` holds all tasks' targets as
   columns (``X^T X`` is shared), so memory is ``O(sites x steps x C^2)`` whatever N is. The
   same image also feeds:
   - the *latent baseline*: the same fit on the 4-channel UNet input ``x_t`` at each step;
   - the *permuted control*: the same fit on the activations of a copy of the UNet whose every
     parameter tensor was shuffled with a seeded generator (the paper's control), run on the real
     trajectory's inputs ``(x_t, t, text)`` (a permuted UNet cannot denoise, so its own samples
     would have no labels); all steps go through it in one batched forward;
   - pixel statistics of the labels (for depth/shading normalisation) and their per-pixel mean
     maps (the layout prior);
   - for a few chosen ``(site, step)``s, the activations themselves (on disk) for the paper's Adam
     trainer, to compare it with ridge.
   Statistics are checkpointed every ``checkpoint_every`` images (one safetensors file with the
   progress in its metadata, replaced atomically), so an interrupted run resumes exactly.
   Under ``accelerate launch`` each process fits its own share of the images and rank 0 merges the
   shards' statistics (:meth:`RidgeStats.merge`).
2. **Solve** (:mod:`.solve`, then :mod:`.calibrate` for foreground thresholds and :mod:`.adam`
   for the Adam vs ridge comparison). Per ``(task, site, step)`` the ridge penalty is chosen on the validation images
   (:func:`~ldm_scene.training.fit.choose_penalty`) and the probe refit on train + val; depth and
   shading probes predict targets normalised by the fitting images' pixel mean and std. The best
   site per step is the one with the highest validation R^2. Banks are saved with full metadata.
3. **Evaluation pass** (:mod:`.eval_pass`; test images, regenerated from their seeds, never used for fitting): every
   probe, the latent and permuted probes, the labeler applied to each step's decoded x0 preview,
   and the layout prior are scored against the labels of the final image (:mod:`.evaluate`);
   per-image scores are written to disk, so this pass resumes too.
   Readouts are upsampled bilinearly to the labels' resolution before thresholding or ranking
   (:func:`~.evaluate.upsample`). The same pass scores the prompt-only baseline and each site
   grid's ceiling (:mod:`.controls`), and keeps the readouts and labels of every test image that
   shares its prompt with another test image.
4. **Same-prompt control** (:func:`control_pass`): each such image's readouts scored against the
   other same-prompt test images' labels.
5. **Report** (:mod:`.outputs`, :mod:`.report`, :mod:`.readme`): ``metrics.json``, figures and ``README.md`` in the output directory.

Every image is generated under the model's own guidance schedule (:func:`~ldm_scene.sampler.config_for`)
unless the run sets one; probe metadata and ``metrics.json`` record it.
"""
from __future__ import annotations

from typing import Any, Callable

from ..models import Model
from .adam import train_adam_probes
from .calibrate import THRESHOLD_GRID, calibrate_foreground
from .config import LATENT, PERMUTED, UNET, WORK_FORMAT, Layout, RunConfig, slice_stats
from .context import RunContext, labeler_for, prepare
from .dataset import Shard
from .eval_pass import control_pass, eval_pass
from .fit_pass import FitState, accumulate, fit_pass, load_fit_state, merge_fits, new_fit_state, save_fit_state
from .labelers import Labeler
from .outputs import report, timings
from .solve import Solution, load_solution, save_solution, solve
from .trace import ImageTrace, generate_trace, label_images, permuted_copy, site_targets

__all__ = [
    "THRESHOLD_GRID",
    "PERMUTED",
    "UNET",
    "WORK_FORMAT",
    "slice_stats",
    "labeler_for",
    "save_fit_state",
    "save_solution",
    "ImageTrace",
    "calibrate_foreground",
    "timings",
    "RunConfig",
    "RunContext",
    "Layout",
    "FitState",
    "LATENT",
    "prepare",
    "new_fit_state",
    "load_fit_state",
    "generate_trace",
    "label_images",
    "accumulate",
    "Solution",
    "load_solution",
    "permuted_copy",
    "site_targets",
    "fit_pass",
    "merge_fits",
    "solve",
    "train_adam_probes",
    "eval_pass",
    "control_pass",
    "report",
    "run",
]


def run(
    config: RunConfig,
    labeler: Labeler | None = None,
    model: Model | None = None,
    shard: Shard | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Fit, evaluate and report. With ``shard``/``barrier`` (from ``accelerate``) each process does
    its share of both passes and rank 0 merges, solves and reports. Returns the metrics on rank 0.
    """
    shard = shard or Shard()
    barrier = barrier or (lambda: None)
    ctx = prepare(config, labeler, model)
    fit_pass(ctx, shard, progress=progress)
    barrier()
    if shard.is_main:
        state = merge_fits(ctx, shard.world)
        solution = solve(ctx, state, progress=progress)
        calibrate_foreground(ctx, solution, progress=progress)
        train_adam_probes(ctx, solution, progress=progress)
    barrier()
    eval_pass(ctx, shard, progress=progress)
    barrier()
    control_pass(ctx, shard, progress=progress)
    barrier()
    if not shard.is_main:
        return None
    return report(ctx, extra={"timings": timings(ctx, shard.world)})
