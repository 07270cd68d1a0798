"""The app's service without Gradio: streaming generation with readouts, validation, scrubbing,
intervention, results, and how it explains a missing or mismatched model or probe set.

Unit tests run on the tiny random model with random probe banks built here (the right metadata,
random weights); end-to-end tests run on the shipped toy model when its weights are present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.capture import attached_hooks
from ldm_scene.probes import TASKS, ProbeBank, ProbeMeta
from ldm_scene.testing import APP_STEPS as STEPS, ColourClassifier, random_banks, write_probe_dir  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TOY_DIR = REPO / "weights" / "toy-scenes"
HAS_TOY = (TOY_DIR / "model_index.json").is_file()
HAS_TOY_PROBES = (TOY_DIR / "probes" / "foreground.safetensors").is_file()


@pytest.fixture(scope="module")
def probe_dir(tiny_model, tmp_path_factory):
    return write_probe_dir(tiny_model, tmp_path_factory.mktemp("probes"))


@pytest.fixture(scope="module")
def service(tiny_model, probe_dir):
    from ldm_scene.ui.service import Service

    svc = Service.load("tiny", probe_dir, device="cpu", classifier=ColourClassifier())
    # Share the session's tiny model (same weights) so the hook-leak check covers the service too.
    svc.model = tiny_model
    return svc


@pytest.fixture(scope="module")
def run(service):
    views = list(service.generate_stream("a red cube", seed=3, steps=STEPS, guidance=7.5))
    return views[-1].run


# -- loading and status ------------------------------------------------------------------------------

def test_load_reports_loaded_pieces(service):
    assert service.ready and not service.problems
    assert set(service.banks) == set(TASKS)
    assert set(service.intervention_banks) == {"foreground", "foreground_means"}
    assert service.probe_steps == STEPS and service.default_steps == STEPS
    status = service.status_markdown()
    assert "tiny" in status and "foreground" in status


def test_default_sites_come_from_metrics(service):
    assert service.default_site("foreground") == "up_blocks.3.attentions.0"
    assert service.default_site("depth") == "up_blocks.2.attentions.1"
    # no metrics entry for shading: the finest-grid decoder site
    assert service.default_site("shading").startswith("up_blocks.3")
    from ldm_scene.ui.service import BEST_PER_STEP

    assert service.site_choices("foreground")[0] == BEST_PER_STEP
    assert BEST_PER_STEP not in service.site_choices("depth")


def test_missing_model_is_a_message_not_a_traceback(tmp_path):
    from ldm_scene.ui.service import Service, ServiceError

    svc = Service.load(str(tmp_path / "nowhere"), device="cpu")
    assert not svc.ready
    text = svc.status_markdown()
    assert "could not be loaded" in text and "nowhere" in text and "--model toy" in text
    with pytest.raises(ServiceError, match="no model is loaded"):
        next(svc.generate_stream("a red cube"))


def test_missing_probe_dir_keeps_generation(tiny_model, tmp_path):
    from ldm_scene.ui.service import Service

    svc = Service.load("tiny", tmp_path / "absent", device="cpu", classifier=False)
    assert svc.ready and not svc.banks
    assert "does not exist" in svc.status_markdown()
    views = list(svc.generate_stream("a red cube", steps=2))
    assert len(views) == 2 and views[-1].overlays == {} and views[-1].image is not None


def test_probes_of_another_model_are_refused(tiny_model, tmp_path):
    from ldm_scene.ui.service import Service

    write_probe_dir(tiny_model, tmp_path / "p", model_id="some-other-model")
    svc = Service.load("tiny", tmp_path / "p", device="cpu", classifier=False)
    assert svc.ready and not svc.banks
    assert "some-other-model" in svc.status_markdown() and "not used" in svc.status_markdown()


def test_probes_fit_under_another_scheduler_are_refused(tiny_model, tmp_path):
    """A probe reads one sampler's trajectory: the tiny model samples with LMS, these were fit under Euler."""
    from ldm_scene.ui.service import Service

    write_probe_dir(tiny_model, tmp_path / "p", scheduler="EulerDiscreteScheduler")
    svc = Service.load("tiny", tmp_path / "p", device="cpu", classifier=False)
    assert svc.ready and not svc.banks and not svc.intervention_banks
    status = svc.status_markdown()
    assert "sampled with EulerDiscreteScheduler, the loaded model samples with LMSDiscreteScheduler" in status


def test_probes_with_wrong_channels_are_refused(tiny_model, tmp_path):
    from ldm_scene.ui.service import Service

    bank = random_banks(tiny_model)["depth"]
    site = bank.sites[0]
    c, h, w = bank.meta.sites[site]
    meta = ProbeMeta("depth", bank.meta.model_id, bank.meta.image_size, "LMSDiscreteScheduler", STEPS,
                     {site: (c + 1, h, w)})
    (tmp_path / "p").mkdir()
    ProbeBank(meta, {(site, 0): torch.zeros(1, c + 1)}).save(tmp_path / "p" / "depth.safetensors")
    svc = Service.load("tiny", tmp_path / "p", device="cpu", classifier=False)
    assert not svc.banks and "channels" in svc.status_markdown()


def test_pickle_in_place_of_probes_is_refused(tmp_path):
    from ldm_scene.ui.service import Service

    (tmp_path / "p").mkdir()
    torch.save({"dense1.weight": torch.zeros(2, 8)}, tmp_path / "p" / "foreground.safetensors")
    svc = Service.load("tiny", tmp_path / "p", device="cpu", classifier=False)
    assert svc.ready and not svc.banks and "pickle" in svc.status_markdown()


# -- generation ------------------------------------------------------------------------------------

def test_generate_streams_one_view_per_step(service, tiny_model):
    views = []
    for view in service.generate_stream("a blue sphere", seed=1, steps=STEPS):
        assert attached_hooks(tiny_model.unet) > 0  # hooks are live while streaming
        views.append(view)
    assert [v.step for v in views] == list(range(STEPS))
    d = service.display_size
    for v in views:
        assert v.preview.size == (d, d)
        assert set(v.overlays) == set(TASKS) and set(v.readouts) == set(TASKS)
        # foreground: an outline over the preview; depth and shading: a map with a colour bar beside it
        assert v.overlays["foreground"].size == (d, d)
        assert all(v.overlays[t].size[1] == d and v.overlays[t].size[0] > d for t in ("depth", "shading"))
        # the heat map (folded away on the page) is drawn live at the steps whose x0 was decoded
        assert (v.foreground_heat is not None) == v.decoded
        assert v.foreground_heat is None or v.foreground_heat.size[1] == d
        fg = v.readouts["foreground"]
        assert fg.dtype == np.float32 and 0 <= fg.min() and fg.max() <= 1
    assert [v.image is None for v in views] == [True] * (STEPS - 1) + [False]
    run = views[-1].run
    assert run.complete and run.num_steps == STEPS
    assert run.foreground.shape == tiny_model.image_size and run.foreground.dtype == bool
    assert set(run.emergence) == set(TASKS)
    assert all(len(c) == STEPS for c in run.emergence.values())
    assert run.emergence["foreground"][-1] == 1.0  # the last step agrees with itself


def test_readouts_use_the_chosen_site(service, tiny_model):
    site = "down_blocks.1.attentions.0"  # a 4x4 grid on the tiny model
    views = list(service.generate_stream("a red cube", seed=2, steps=STEPS, sites={"depth": site}))
    assert views[0].readouts["depth"].shape == (4, 4)
    assert views[0].readouts["foreground"].shape == (8, 8)  # the metrics' best, up_blocks.3 (8x8)


def test_best_site_per_step_reads_a_different_site_each_step(service):
    from ldm_scene.ui.service import BEST_PER_STEP

    views = list(service.generate_stream("a red cube", seed=2, steps=STEPS, sites={"foreground": BEST_PER_STEP}))
    grids = [v.readouts["foreground"].shape for v in views]
    assert grids[0] == (2, 2) and grids[3] == (4, 4)  # up_blocks.1.* (2x2) then up_blocks.2.0 (4x4)


def test_same_request_same_result(service):
    a = list(service.generate_stream("a red cube", seed=9, steps=STEPS))[-1]
    b = list(service.generate_stream("a red cube", seed=9, steps=STEPS))[-1]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.readouts["depth"], b.readouts["depth"])


def test_other_step_count_streams_without_readouts(service):
    views = list(service.generate_stream("a red cube", seed=2, steps=STEPS + 1))
    assert len(views) == STEPS + 1 and views[0].overlays == {}
    assert any("fit for 4-step runs" in n for n in views[-1].run.notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt=None), "prompt must be text"),
        (dict(prompt=42), "prompt must be text"),
        (dict(prompt="red " * 40), "prompt is too long"),
        (dict(seed=-1), "seed must be between"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(seed="abc"), "seed must be a whole number"),
        (dict(seed=None), "seed must be a whole number"),
        (dict(steps=0), "steps must be between 1 and"),
        (dict(steps=1000), "steps must be between 1 and"),
        (dict(guidance=-1.0), "guidance must be between 0 and 30"),
        (dict(guidance=float("nan")), "guidance must be between 0 and 30"),
        (dict(guidance="lots"), "guidance must be a number"),
        (dict(sites={"foreground": "nowhere"}), "no probe at site 'nowhere'"),
        (dict(sites={"colour": "up_blocks.1.attentions.0"}), "unknown task"),
    ],
)
def test_bad_generation_input_is_refused_before_model_work(service, tiny_model, kwargs, message):
    args = dict(prompt="a red cube", seed=0, steps=STEPS, guidance=7.5) | kwargs
    with pytest.raises(ValueError, match=message):
        next(service.generate_stream(**args))
    assert attached_hooks(tiny_model.unet) == 0
    assert not service._lock.locked()


def test_closing_the_stream_cancels_cleanly(service, tiny_model):
    stream = service.generate_stream("a red cube", seed=4, steps=STEPS)
    next(stream)
    assert service._lock.locked() and attached_hooks(tiny_model.unet) > 0
    stream.close()
    assert not service._lock.locked() and attached_hooks(tiny_model.unet) == 0
    # the next run is whole and equals a run that was never interrupted
    again = list(service.generate_stream("a red cube", seed=4, steps=STEPS))
    assert len(again) == STEPS and again[-1].image is not None


def test_scrub_redraws_stored_steps(service, run):
    from ldm_scene.ui.service import ServiceError

    view = service.view_of(run, 1)
    assert view.step == 1 and view.image is None and set(view.overlays) == set(TASKS)
    assert service.view_of(run, STEPS - 1).image is run.image
    # step is 0-based in the code, but the message is read by a person, who counts from 1
    with pytest.raises(ServiceError, match="there is no step 5: this run has steps 1 to 4"):
        service.view_of(run, STEPS)
    with pytest.raises(ServiceError, match="generate an image first"):
        service.view_of(None, 0)


def test_examples_are_filtered_by_what_the_model_can_read(service):
    rows = service.examples()
    assert rows, "examples/prompts.json should offer prompts the tiny model's vocabulary covers"
    tok = service.model.pipe.tokenizer
    for prompt, seed, steps, guidance in rows:
        assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in prompt.split())
        assert isinstance(seed, int) and steps == service.default_steps
        assert guidance == service.default_guidance  # the shipped examples run at the model's own guidance


# -- intervention ----------------------------------------------------------------------------------

def test_shift_target_moves_the_mask(service, run):
    from ldm_scene.ui.service import ServiceError

    if not run.foreground.any():
        run.foreground[8:16, 8:16] = True
    moved = service.shift_target(run, 4, -2)
    assert moved.dtype == bool and moved.shape == run.foreground.shape
    h, w = run.foreground.shape
    assert np.array_equal(moved[: h - 2, 4:], run.foreground[2:, : w - 4])
    with pytest.raises(ServiceError, match="too far"):
        service.shift_target(run, 1000, 0)
    with pytest.raises(ServiceError, match="generate an image first"):
        service.shift_target(None, 1, 1)


def test_drawn_target_from_editor_layers(service):
    from ldm_scene.intervention import InterventionError

    layer = np.zeros((256, 256, 4), np.uint8)
    layer[32:128, 128:224, 3] = 255
    mask = service.drawn_target([layer])
    h, w = service.model.image_size
    assert mask.shape == (h, w) and mask[h // 8 : h // 2, w // 2 : w * 7 // 8].all() and mask.sum() < h * w / 4
    with pytest.raises(InterventionError, match="empty"):
        service.drawn_target([np.zeros((256, 256, 4), np.uint8)])
    with pytest.raises(InterventionError, match="empty"):
        service.drawn_target([])
    with pytest.raises(InterventionError, match="whole image"):
        service.drawn_target([np.full((256, 256, 4), 255, np.uint8)])
    with pytest.raises(ValueError, match="expected an image"):
        service.drawn_target([np.zeros((2, 2, 2, 2))])


@pytest.mark.parametrize("method", ["steer", "random-control"])
def test_intervene_streams_and_compares(service, run, tiny_model, method):
    target = np.zeros(tiny_model.image_size, bool)
    target[4:16, 16:28] = True
    views = list(service.intervene_stream(run, target, method))
    assert [v.step for v in views] == list(range(STEPS))
    assert all(v.comparison is None for v in views[:-1])
    c = views[-1].comparison
    assert c is not None and c.method == method and 0.0 <= c.iou_target <= 1.0
    assert c.result_mask.shape == target.shape and "IoU" in c.summary()
    assert "foreground" in views[0].overlays
    # the edit changed the image (same prompt and seed)
    assert not np.array_equal(np.asarray(c.result), np.asarray(run.image))
    assert attached_hooks(tiny_model.unet) == 0 and not service._lock.locked()


def test_closing_an_intervention_cancels_cleanly(service, run, tiny_model):
    target = np.zeros(tiny_model.image_size, bool)
    target[4:16, 16:28] = True
    stream = service.intervene_stream(run, target, "probe-gradient", strength=0.1)
    next(stream)
    assert service._lock.locked() and attached_hooks(tiny_model.unet) > 0
    stream.close()
    assert not service._lock.locked() and attached_hooks(tiny_model.unet) == 0


def test_intervene_refuses_bad_requests(service, run, tiny_model):
    from ldm_scene.intervention import InterventionError
    from ldm_scene.ui.service import ServiceError

    good = np.zeros(tiny_model.image_size, bool)
    good[:8, :8] = True
    with pytest.raises(ServiceError, match="generate an image first"):
        next(service.intervene_stream(None, good))
    with pytest.raises(InterventionError, match="unknown method"):
        next(service.intervene_stream(run, good, "magic"))
    with pytest.raises(InterventionError, match="bool mask"):
        next(service.intervene_stream(run, good.astype(np.uint8)))
    with pytest.raises(ValueError, match="strength must be a number"):
        next(service.intervene_stream(run, good, "steer", strength="x"))
    assert attached_hooks(tiny_model.unet) == 0 and not service._lock.locked()


def test_intervene_without_class_means_says_so(tiny_model, tmp_path, run):
    from ldm_scene.intervention import InterventionError
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path / "p")
    (folder / "foreground_means.safetensors").unlink()
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    svc.model = tiny_model
    target = np.zeros(tiny_model.image_size, bool)
    target[:8, :8] = True
    with pytest.raises(InterventionError, match="foreground_means"):
        next(svc.intervene_stream(run, target, "steer"))


def test_methods_follow_the_probe_folder(tiny_model, tmp_path, run):
    """Every method with every bank; without class means, steer and its random control are not
    offered, and asking for one names the missing file. A means file of no known name (one an older
    version wrote) is neither loaded nor reported."""
    import shutil

    from ldm_scene.intervention import METHOD_BANKS, METHODS, InterventionError
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path / "p")
    shutil.copy(folder / "foreground_means.safetensors", folder / "old_means.safetensors")
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    assert svc.methods == METHODS and METHODS[:4] == ("latent-move", "readout-guidance", "steer", "probe-gradient")
    assert set(svc.intervention_banks) == {"foreground", "foreground_means"}
    assert not svc.problems and "old_means" not in svc.status_markdown()
    (folder / "foreground_means.safetensors").unlink()
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    svc.model = tiny_model
    # what needs only the foreground probe (or none: the moves) stays; steer and its control go
    assert svc.methods == tuple(m for m in METHODS if METHOD_BANKS[m] in ((), ("foreground",)))
    assert svc.methods[:2] == ("latent-move", "readout-guidance") and not {"steer", "random-control"} & set(svc.methods)
    target = np.zeros(tiny_model.image_size, bool)
    target[:8, :8] = True
    with pytest.raises(InterventionError, match="needs the foreground_means probes, which this model's probe folder "
                                                "lacks; choose one of latent-move, readout-guidance, probe-gradient"):
        next(svc.intervene_stream(run, target, "random-control"))
    assert attached_hooks(tiny_model.unet) == 0


# -- results ---------------------------------------------------------------------------------------

def test_results_show_tables_and_figures(service):
    res = service.results()
    assert "up_blocks.3.attentions.0" in res.markdown and "| 0.800 | 3 |" in res.markdown and "0.900" in res.markdown
    assert "# Probe results" in res.markdown and "emergence.png)" not in res.markdown
    assert [caption for _, caption in res.figures] == ["emergence"]


# -- classifier (when ldm_scene.classify exists) ----------------------------------------------------

def test_generation_tracks_classifier_curves_live(service):
    seen, views = [], []
    for view in service.generate_stream("a red cube", seed=3, steps=STEPS, preview_every=1):
        seen.append(view.run.curves.steps)  # the curves so far, updated every step
        views.append(view)
    assert seen == [tuple(range(s + 1)) for s in range(STEPS)]
    curves = views[-1].run.curves
    assert curves.classes == ("cube", "sphere") and curves.prompted_class == 0
    again = service.classify(views[-1].run)
    assert np.allclose(again.probabilities, curves.probabilities)


def test_stream_decodes_every_kth_step_and_the_rest_on_demand(service, tiny_model):
    """With ``preview_every=k`` the stream decodes (and classifies) the first step, every k-th and the
    last; a skipped step shows the latest decoded image and is decoded exactly when looked at."""
    from ldm_scene.sampler import decode

    views = list(service.generate_stream("a red cube", seed=3, steps=STEPS, preview_every=3))
    run = views[-1].run
    decoded = [s for s in range(STEPS) if run.previews[s] is not None]
    assert decoded == [0, 2, 3] and run.missing_previews() == [1]  # 4 steps: first, 3rd, last
    assert [v.preview_step for v in views] == [0, 0, 2, 3]
    assert "x0 image from step 1" in views[1].label and "x0 image" not in views[2].label
    assert views[1].attention is None and views[1].compare is None  # strips wait for a decoded step
    assert run.curves.steps == (0, 2, 3) and run.preview_labels[1] is None
    assert all(maps is not None for maps in run.attention)  # the probes and word maps are read every step
    assert all(set(r) == set(TASKS) for r in run.readouts)

    every = list(service.generate_stream("a red cube", seed=3, steps=STEPS, preview_every=1))[-1].run
    for s in decoded:  # the same pictures as decoding every step
        assert np.array_equal(np.asarray(run.previews[s]), np.asarray(every.previews[s]))
    view = service.view_of(run, 1)  # scrubbing to the skipped step decodes it
    assert view.decoded and run.missing_previews() == []
    assert np.array_equal(np.asarray(run.previews[1]), np.asarray(every.previews[1]))
    assert np.array_equal(np.asarray(run.previews[1]), np.asarray(decode(tiny_model, run.latents[1][None])[0]))
    curves = service.classify(run)  # every step, as with preview_every=1
    assert curves.steps == tuple(range(STEPS))
    assert np.allclose(curves.probabilities, every.curves.probabilities)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "often", 51])
def test_preview_cadence_is_checked(service, bad):
    from ldm_scene.ui.service import MAX_UI_STEPS

    assert bad != MAX_UI_STEPS  # 51: one past the UI's step limit
    with pytest.raises(ValueError, match="preview_every must be"):
        next(service.generate_stream("a red cube", seed=3, steps=STEPS, preview_every=bad))


def test_a_place_word_the_tokenizer_lacks_still_generates(service):
    """Toy prompts say what the object is, never where; a prompt that says where anyway (a word this
    tokenizer splits into letters) is generated as it stands, and the shape it names is still tracked."""
    tok = service.model.pipe.tokenizer
    assert len(tok("top", add_special_tokens=False).input_ids) > 1  # not a word of this vocabulary
    views = list(service.generate_stream("a red cube at the top", seed=3, steps=STEPS))
    assert [v.step for v in views] == list(range(STEPS)) and views[-1].image is not None
    assert views[-1].run.config.prompt == "a red cube at the top"
    assert views[-1].run.curves.prompted_class == 0  # cube


def test_classify_needs_a_run_and_a_classifier(service, run, tiny_model, tmp_path):
    from ldm_scene.ui.service import Service, ServiceError

    with pytest.raises(ServiceError, match="generate an image first"):
        service.classify(None)
    bare = Service(tiny_model)
    with pytest.raises(ServiceError, match="no classifier"):
        bare.classify(run)


def test_shipped_emergence_reads_numeric_best_per_step(service):
    from ldm_scene.ui.service import Service

    svc = Service(service.model, service.banks, metrics={"tasks": {"depth": {"metric": "spearman", "best_per_step": [0.1, None, 0.5]}}})
    metric, scores = svc.shipped_emergence()["depth"]
    assert metric == "spearman" and scores[0] == 0.1 and np.isnan(scores[1])
    assert svc.site_choices("depth")[0] != "best site at each step"  # numbers, not sites
    assert service.shipped_emergence()["foreground"][1][-1] == pytest.approx(0.8)


# -- the shipped toy model -------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TOY, reason="weights/toy-scenes/model_index.json is missing (the toy model is not trained yet)")
def test_toy_model_end_to_end(tmp_path, monkeypatch):
    from ldm_scene.ui.service import Service

    svc = Service.load("toy", device="cpu")
    assert svc.ready, svc.status_markdown()
    assert svc.classifier is not None and svc.classifier.name == "toy-shapes"
    if not HAS_TOY_PROBES:
        write_probe_dir(svc.model, tmp_path / "p", steps=15)
        svc = Service.load("toy", tmp_path / "p", device="cpu")
    steps = svc.default_steps
    views = list(svc.generate_stream("a red cube", seed=0, steps=steps))
    assert len(views) == steps and views[-1].image.size == (64, 64)
    run = views[-1].run
    assert set(views[-1].overlays) == set(svc.banks) and run.foreground is not None
    assert svc.labeler is not None and run.foreground_source == "the model's labeler"
    assert run.curves.prompted_class == svc.classifier.classes.index("cube")
    # the default cadence classifies the decoded steps (first, every 3rd, last); recompute reads them all
    assert run.curves.steps == tuple(s for s in range(steps) if s == 0 or s == steps - 1 or (s + 1) % 3 == 0)
    assert svc.classify(run).steps == tuple(range(steps))
    if run.foreground.any() and not run.foreground.all():
        target = svc.shift_target(run, 16, 0)
        last = list(svc.intervene_stream(run, target, "steer"))[-1]
        assert last.comparison is not None and 0 <= last.comparison.iou_target <= 1
        # the app's default method, with its correction (the labeler on the decoded x0, once per run),
        # puts the object on the shifted mask
        import ldm_scene.intervention as intervention

        real, calls = intervention.decoded_locator, []

        def counting(model, find):
            locate = real(model, find)
            return lambda x0: calls.append(tuple(x0.shape)) or locate(x0)

        monkeypatch.setattr(intervention, "decoded_locator", counting)
        moved = list(svc.intervene_stream(run, target, "latent-move"))[-1].comparison
        assert calls == [(1, 4, 16, 16)]
        # the success rule of the intervention evaluation: the centroid within 0.07 of the size of the target's
        from ldm_scene.ui.views import centroid

        (rx, ry), (tx, ty) = centroid(moved.result_mask), centroid(target)
        assert moved.iou_target > moved.iou_original_target and np.hypot(rx - tx, ry - ty) < 0.07 * 64


# -- what the page says about a run that is gone, stopped or still going ---------------------------

def test_run_ledger_tells_evicted_from_expired_from_never():
    from ldm_scene.ui.runs import RunLedger

    now = [1000.0]
    ledger = RunLedger(lambda: 200, ttl_s=3600, remember=3, clock=lambda: now[0])
    assert ledger.missing("a") is None and ledger.missing(None) is None  # never stored: "generate first"
    ledger.stored("a")
    now[0] += 60
    assert "evicted" in ledger.missing("a") and "200 most recent sessions" in ledger.missing("a")
    now[0] += 3600
    assert "expired" in ledger.missing("a") and "61 minutes ago" in ledger.missing("a")
    for s in "bcd":  # bounded: the oldest is forgotten
        ledger.stored(s)
    assert ledger.missing("a") is None and ledger.missing("d") is not None


def test_stop_says_where_it_stopped(service, run):
    """Steps in messages count from 1, as the page does."""
    import dataclasses

    from ldm_scene.ui.tab_generate import stopped_text

    before = run.started - 1
    partial = dataclasses.replace(run, previews=run.previews[:2], timesteps=run.timesteps[:2], image=None)
    assert "Stopped at step 2 of 4" in stopped_text(partial, before)
    assert "finished (step 4 of 4)" in stopped_text(run, before)
    assert "before the first step" in stopped_text(run, run.started + 1)  # the run shown is an older one
    assert "before the first step" in stopped_text(None, before)
    from ldm_scene.ui.service import ServiceError

    with pytest.raises(ServiceError, match="stopped at step 2 of 4"):
        service.shift_target(partial, 4, 0)


def test_target_pane_is_filled_when_a_run_finishes(service, run):
    from ldm_scene.ui.tab_intervene import DRAW, SHIFT, target_values

    picture, note = target_values(service, run, SHIFT, 8, 0)
    assert picture.size == (service.display_size, service.display_size) and note == ""
    # draw mode is left to the drawing, and without a finished run there is nothing to shift
    for values in (target_values(service, run, DRAW, 8, 0), target_values(service, None, SHIFT, 8, 0)):
        assert not any(isinstance(v, Image.Image) for v in values)


# -- vocabulary -----------------------------------------------------------------------------------------

def test_vocabulary_and_prompt_warnings_for_a_word_level_model(service):
    vocab = service.vocabulary()
    assert {"a", "red", "cube", "sphere"} <= set(vocab) and "photo" not in vocab
    assert service.prompt_warnings("a red cube") == []
    unknown, = service.prompt_warnings("a red truck")
    assert "'truck'" in unknown and "not in this model's vocabulary" in unknown
    place, = service.prompt_warnings("a red cube on the left")[:1]
    assert "'left'" in place and "never say where" in place
    assert service.prompt_warnings(42) == []  # refused elsewhere, not warned about


def test_an_open_vocabulary_model_lists_and_checks_no_words(service):
    """SD's CLIP BPE has ~49k tokens and reads any English: nothing is listed or warned about."""
    import types

    from ldm_scene.ui.service import Service

    class BigTokenizer:
        def __len__(self):
            return 49_408

    svc = Service(None)
    svc.model = types.SimpleNamespace(pipe=types.SimpleNamespace(tokenizer=BigTokenizer()))
    assert svc.vocabulary() == () and svc.prompt_warnings("a cat on the left") == []


# -- pictures ---------------------------------------------------------------------------------------------

def test_foreground_outline_is_smooth_and_leaves_the_image_untouched():
    from ldm_scene.viz import outline_picture

    image = Image.new("RGB", (32, 32), (90, 140, 200))
    prob = np.full((4, 4), 0.1, np.float32)
    prob[1:3, 1:3] = 0.9
    out = np.asarray(outline_picture(image, prob, 256)).astype(int)
    changed = np.any(out != (90, 140, 200), axis=-1)
    # only a thin line changes; inside and outside the object the picture is the clean image
    assert 0 < changed.mean() < 0.08
    assert not changed[128, 128] and not changed[5, 5]
    # bilinear, not blocks: the outline's corners are cut, so the box's corner pixels stay clean
    ys, xs = np.nonzero(changed)
    assert not changed[ys.min(), xs.min()]


def test_maps_have_a_colour_bar_and_are_upsampled_smoothly():
    from ldm_scene.viz import colour_bar_picture, upsample_smooth

    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    up = upsample_smooth(values, (64, 64))
    assert len(np.unique(up[32])) > 16  # nearest upsampling would give 4 values per row
    picture = colour_bar_picture(values, 0.0, 15.0, "magma_r", 128, "depth", "near", "far")
    assert picture.size[1] == 128 and picture.size[0] > 128
    bar = np.asarray(picture)[:, 128 + 8]  # a column of the colour bar: a ramp, top to bottom
    assert len({tuple(px) for px in bar[2:-2]}) > 32


def test_prefetched_stream_equals_the_plain_one(service, tiny_model):
    """With ``prefetch`` the model runs ahead in its own thread; the views are the same."""
    plain = list(service.generate_stream("a red cube", seed=5, steps=STEPS))
    ahead = list(service.generate_stream("a red cube", seed=5, steps=STEPS, prefetch=True))
    assert [v.step for v in ahead] == list(range(STEPS))
    for a, b in zip(plain, ahead):
        assert a.preview_step == b.preview_step
        assert np.array_equal(np.asarray(a.preview), np.asarray(b.preview))
        for task in TASKS:
            assert np.array_equal(a.readouts[task], b.readouts[task])
    assert np.array_equal(np.asarray(plain[-1].image), np.asarray(ahead[-1].image))
    assert ahead[-1].run.curves.steps == plain[-1].run.curves.steps
    assert attached_hooks(tiny_model.unet) == 0 and not service._lock.locked()


def test_closing_a_prefetched_stream_keeps_the_shown_steps(service, tiny_model):
    stream = service.generate_stream("a red cube", seed=6, steps=STEPS, prefetch=True)
    first = next(stream)
    stream.close()
    # the producer thread is joined: hooks gone, lock free, and the run holds only the step shown
    assert not service._lock.locked() and attached_hooks(tiny_model.unet) == 0
    run = first.run
    assert run.num_steps == 1 and len(run.previews) == len(run.readouts) == len(run.preview_labels) == 1
    assert not run.complete


@pytest.mark.parametrize("method", ["readout-guidance", "latent-move"])
def test_intervention_keeps_the_original_latents_outside_the_edit(service, run, tiny_model, method):
    """The edited run holds the original run's latent at every step outside the object's old mask and
    the target (grown by KEEP_MARGIN cells; a move: also where the object lands, grown by
    MOVE_KEEP_MARGIN, and its old place grown by the editor's vacated_margin); inside, the edit repaints."""
    from ldm_scene.intervention import KEEP_MARGIN, MOVE_KEEP_MARGIN, make_editor
    from ldm_scene.intervention_methods import free_cells

    h, w = tiny_model.image_size
    target = np.zeros((h, w), bool)
    target[: h // 4, : w // 4] = True
    assert run.foreground is not None and run.foreground.any()  # a move needs the object's mask
    views = list(service.intervene_stream(run, target, method, 1.0 if method == "latent-move" else 4.0))
    edited = views[-1].run
    assert len(edited.trajectory) == len(run.trajectory) == STEPS
    free, margin = run.foreground | target, KEEP_MARGIN
    grid = tuple(run.trajectory[0].shape[-2:])
    extra = torch.zeros(1, 1, *grid)
    if method == "latent-move":
        editor = make_editor(method, {}, target, steps=(1,), source=run.foreground)
        free, margin = free | editor.moved, MOVE_KEEP_MARGIN
        extra = free_cells(run.foreground, grid, editor.vacated_margin)  # the old place's ring
    cells = torch.maximum(free_cells(free, grid, margin), extra)[0, 0].bool()
    assert cells.any() and not cells.all()
    for mine, theirs in zip(edited.trajectory, run.trajectory):
        assert torch.equal(mine[..., ~cells], theirs[..., ~cells])
    assert not torch.equal(edited.trajectory[-1][..., cells], run.trajectory[-1][..., cells])
    # and the unedited image is pasted back on the edited one beyond the ramp around those cells
    size = (h // grid[0]) // 2
    near = torch.nn.functional.max_pool2d(torch.nn.functional.interpolate(cells[None, None].float(), size=(h, w)),
                                          4 * size + 3, stride=1, padding=2 * size + 1)[0, 0].bool().numpy()
    assert not near.all()
    assert np.array_equal(np.asarray(edited.image)[~near], np.asarray(run.image)[~near])


def test_a_move_without_an_object_says_so_and_names_the_other_methods(service, run, tiny_model):
    """latent-move carries the object the generated image shows; with none found it refuses before
    any model work, names what else can edit, and leaves no hooks."""
    import copy

    from ldm_scene.intervention import InterventionError

    empty = copy.copy(run)
    empty.foreground = np.zeros(tiny_model.image_size, bool)
    target = np.zeros(tiny_model.image_size, bool)
    target[:8, :8] = True
    with pytest.raises(InterventionError, match="none was found there: choose another method \\(readout-guidance"):
        next(service.intervene_stream(empty, target, "latent-move"))
    assert attached_hooks(tiny_model.unet) == 0
