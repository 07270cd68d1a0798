"""The intervention evaluation: targets, the success rule, the background score, readout guidance and
its control, and a short end-to-end run on the shipped toy model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.intervention import METHOD_DEFAULTS, make_editor
from ldm_scene.intervention_methods import ReadoutGuidanceEditor, guided_sample
from ldm_scene.toy.intervention_eval import (
    DRAWN_AREA, MIN_SHIFT, NUDGE_FRACTION, SUCCESS_DISTANCE, TARGET_KINDS, Original, background_psnr, bounding_box,
    centroid_distance, drawn_target, judge, make_target, nudge_target, render_table, shift_target, succeeded,
    summarise,
)
from ldm_scene.toy.quality import mask_centroid


def _box(shape=(64, 64), top=20, left=10, h=16, w=20) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + h, left : left + w] = True
    return m


def _disc(shape=(64, 64), cx=20.0, cy=30.0, r=9.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# -- targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_shifts_keep_the_whole_object_in_frame_and_move_it_far_enough(seed):
    rng = np.random.default_rng(seed)
    mask = _disc(cx=float(rng.uniform(12, 52)), cy=float(rng.uniform(12, 52)), r=float(rng.uniform(5, 11)))
    target, p = shift_target(mask, rng)
    assert target.sum() == mask.sum()  # nothing clipped: the shifted box lies in the frame
    assert np.array_equal(np.roll(mask, (p["dy"], p["dx"]), axis=(0, 1)), target)
    assert math.hypot(p["dx"], p["dy"]) >= MIN_SHIFT * 64


def test_shifts_take_both_signs_on_both_axes():
    mask = _disc(cx=32, cy=32, r=8)
    moves = [shift_target(mask, np.random.default_rng(s))[1] for s in range(40)]
    assert {np.sign(m["dx"]) for m in moves} >= {-1, 1} and {np.sign(m["dy"]) for m in moves} >= {-1, 1}


def test_nudges_move_by_a_tenth_of_the_width_and_clip_only_without_room():
    step = round(NUDGE_FRACTION * 64)
    seen = set()
    for s in range(30):
        target, p = nudge_target(_disc(cx=32, cy=32, r=8), np.random.default_rng(s))
        assert abs(p["dx"]) + abs(p["dy"]) == step and 0 in (p["dx"], p["dy"]) and not p["clipped"]
        assert target.sum() == _disc(cx=32, cy=32, r=8).sum()
        seen.add((p["dx"], p["dy"]))
    assert len(seen) == 4  # left, right, up and down all occur
    # At the left edge only moves that keep the box in frame are drawn.
    edge = _box(left=0, top=20)
    for s in range(10):
        _, p = nudge_target(edge, np.random.default_rng(s))
        assert p["dx"] >= 0
    # An object spanning the frame has no room: the nudge is clipped (pixels leaving the frame dropped).
    full = np.ones((64, 64), bool)
    full[:, 60:] = False
    full[60:, :] = False
    target, p = nudge_target(full, np.random.default_rng(0))
    assert p["clipped"] and 0 < target.sum() < full.sum()


@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
@pytest.mark.parametrize("seed", range(8))
def test_drawn_regions_have_the_asked_area_and_lie_in_frame(kind, seed):
    target, p = drawn_target(kind, _disc(), np.random.default_rng(seed))
    assert DRAWN_AREA[0] <= p["area"] <= DRAWN_AREA[1] and 0.5 <= p["aspect"] <= 2.0
    assert target.mean() == pytest.approx(p["area"], abs=0.012)  # the asked area, up to the pixel grid
    cx, cy = mask_centroid(target)
    assert (cx * 64, cy * 64) == pytest.approx(p["centre"], abs=0.75)  # wholly in frame: centroid = centre


@pytest.mark.parametrize("seed", range(8))
def test_scaled_targets_keep_the_object_shape_at_the_asked_scale_and_place(seed):
    mask = _disc(cx=20, cy=34, r=10)
    target, p = drawn_target("scaled", mask, np.random.default_rng(seed))
    assert 0.7 <= p["factor"] <= 1.4
    assert target.mean() == pytest.approx(p["area"], rel=0.1)
    top, bottom, left, right = bounding_box(target)
    assert (right - left + 1) == pytest.approx(20 * p["factor"], abs=2)  # a disc stays a disc of the scaled size
    cx, cy = mask_centroid(target)
    assert (cx * 64, cy * 64) == pytest.approx(p["centre"], abs=1.0)


def test_every_kind_is_drawn_and_refuses_unknown_kinds():
    for kind in TARGET_KINDS:
        target, _ = make_target(kind, _disc(), np.random.default_rng(1))
        assert target.dtype == bool and 0 < target.sum() < target.size
    with pytest.raises(ValueError, match="unknown drawn target"):
        drawn_target("star", _disc(), np.random.default_rng(0))


# -- judging -------------------------------------------------------------------------------------

class _Labeler:
    def __init__(self, mask):
        self.mask = mask

    def __call__(self, arr):
        return {"mask": self.mask[None]}


class _Classifier:
    def __init__(self, name):
        self._name = name

    def name(self, arr):
        return self._name


def _scene(mask, rgb=(220, 30, 30)) -> Image.Image:
    arr = np.full(mask.shape + (3,), 120, np.uint8)
    arr[mask] = rgb
    return Image.fromarray(arr)


@pytest.mark.parametrize("offset, ok", [(6, True), (8, False)])
def test_success_needs_the_centroid_within_seven_hundredths_of_the_image(offset, ok):
    """On a 100 px image a result 6 px (0.06) from the target succeeds; 8 px (0.08) fails."""
    shape = (100, 100)
    target = _box(shape, top=40, left=40, h=20, w=20)
    result = _box(shape, top=40, left=40 + offset, h=20, w=20)
    original_mask = _box(shape, top=10, left=5, h=20, w=20)
    original = Original(_scene(original_mask), original_mask, "cube", "red", 1.0)
    row, _ = judge(_scene(result), original, target, _Labeler(result), _Classifier("cube"))
    assert row["distance_px"] == pytest.approx(offset) and row["distance"] == pytest.approx(offset / 100)
    assert row["success"] is ok
    # the object landed off its target: its pixels outside the target count in the background
    # measure, and not once the result's own object is left out too (the ground is untouched here)
    assert math.isfinite(row["background_psnr"]) and row["background_psnr_outside_objects"] is None
    assert background_psnr(np.asarray(_scene(result)), np.asarray(original.image), original_mask, target, result) == math.inf
    # the same place with another shape, another colour or no object never succeeds
    close = _box(shape, top=40, left=43, h=20, w=20)
    assert judge(_scene(close), original, target, _Labeler(close), _Classifier("cube"))[0]["success"]
    assert not judge(_scene(close), original, target, _Labeler(close), _Classifier("torus"))[0]["success"]
    assert not judge(_scene(close, (30, 30, 220)), original, target, _Labeler(close), _Classifier("cube"))[0]["success"]
    empty = np.zeros(shape, bool)
    none, _ = judge(_scene(empty), original, target, _Labeler(empty), _Classifier("cube"))
    assert not none["success"] and not none["present"] and none["distance_px"] is None


def test_success_rule_and_centroid_distance():
    assert succeeded(True, SUCCESS_DISTANCE, True, True)
    assert not succeeded(True, SUCCESS_DISTANCE + 1e-9, True, True)
    assert not succeeded(False, 0.0, True, True) and not succeeded(True, None, True, True)
    a, b = _box(top=10, left=10), _box(top=13, left=14)
    assert centroid_distance(a, b) == pytest.approx(5.0)
    assert centroid_distance(a, np.zeros_like(a)) is None


def test_background_psnr_looks_only_outside_both_masks():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    obj, target = _box(top=5, left=5), _box(top=30, left=30)
    result = original.copy()
    result[obj] = 0
    result[target] = 255
    assert background_psnr(result, original, obj, target) == math.inf  # changes inside the masks do not count
    assert background_psnr(result, original, obj) < 20  # ... unless a mask is left out
    result[0, 63] = (original[0, 63].astype(int) + 10) % 256  # one pixel outside both masks
    keep = ~(obj | target)
    mse = np.mean((result[keep].astype(float) - original[keep]) ** 2)
    assert background_psnr(result, original, obj, target) == pytest.approx(10 * math.log10(255**2 / mse))
    assert math.isnan(background_psnr(result, original, np.ones((64, 64), bool)))


def test_grown_masks_reach_one_cell_further_in_every_direction():
    from ldm_scene.toy.intervention_eval import grown

    m = _box(top=10, left=10)
    g = grown(m, 4)
    rows, cols = np.nonzero(g)
    r0, c0 = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (r0.min() - 4, r0.max() + 4, c0.min() - 4, c0.max() + 4)
    assert g[m].all() and g.sum() == (16 + 8) * (20 + 8)  # a box grows into a box
    assert np.array_equal(grown(m, 0), m)


def test_summary_and_table_come_from_the_rows():
    def res(success, d, cost=1.2):
        return {"success": success, "present": d is not None, "distance_px": d, "distance": None if d is None else d / 64,
                "iou_target": 0.5 if success else 0.1, "iou_original": 0.2, "shape_kept": True, "colour_kept": success,
                "background_psnr": 25.0, "seconds": 1.0, "cost": cost}

    rows = [
        {"seed": 1, "prompt": "a red cube", "kind": "shift", "unedited": res(False, 20.0),
         "readout-guidance": res(True, 2.0, 1.3), "random-guidance": res(False, 18.0, 1.0), "plain_seconds": [1.0, 1.0]},
        {"seed": 2, "prompt": "a red cube", "kind": "nudge", "unedited": res(False, 6.4),
         "readout-guidance": res(False, None, 1.5), "random-guidance": res(False, 7.0, 1.1), "plain_seconds": [1.0, 1.2]},
        {"seed": 3, "prompt": "a red cube", "skipped": "no object"},
    ]
    s = summarise(rows, ("readout-guidance", "random-guidance"))
    assert s["n_trials"] == 3 and s["n_evaluated"] == 2 and s["kinds"]["shift"] == 1
    rg = s["methods"]["readout-guidance"]
    assert rg["success_rate"] == 0.5 and rg["distance_px"] == 2.0 and rg["object_present"] == 0.5  # distance over results with an object
    assert rg["cost_vs_plain"] == pytest.approx(1.4)
    assert s["by_kind"]["readout-guidance"] == {"shift": 1.0, "nudge": 0.0}
    assert s["controls"] == {"random-guidance": "readout-guidance"}
    text = render_table(s)
    line = next(x for x in text.splitlines() if x.startswith("| readout-guidance |"))
    assert "| 50% | 50% | 2.0 | 0.300 |" in line and line.endswith("| 25.0 | — | — | 1.40x |")  # rows without the other two PSNRs
    assert any(x.startswith("| random-guidance (control of readout-guidance) | 0% |") for x in text.splitlines())
    assert "+50% success" in text
    assert "move_chance" not in s  # only a move's control has the geometry's chance
    rows[0]["random-move"], rows[1]["random-move"] = res(False, 18.0), res(True, 3.0)
    s = summarise(rows, ("readout-guidance", "random-guidance", "random-move"))
    # the unedited distances 20 and 6.4 px of 64: a random direction lands within 0.07 in 14.3% and 71.8% of angles
    assert s["move_chance"] == pytest.approx((2 * np.arcsin(0.07 / (2 * 20 / 64)) + 2 * np.arcsin(0.07 / (2 * 0.1))) / np.pi / 2)
    assert "by geometry alone" in render_table(s).lower()


def test_the_chance_of_a_random_direction_landing_is_its_share_of_angles():
    from ldm_scene.toy.intervention_eval import landing_chance, move_chance

    # within half the radius every direction lands; at distance r / sqrt(2), 2 asin(1 / sqrt(2)) / pi = 1/2 of them
    assert landing_chance(0.03) == 1.0 and landing_chance(0.035) == 1.0
    assert landing_chance(0.07 / np.sqrt(2)) == pytest.approx(0.5)
    assert landing_chance(0.07) == pytest.approx(1 / 3)  # 2 asin(1/2) / pi
    # a Monte Carlo check of the closed form at the nudge's length (0.1 of the image)
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, 200_000)
    miss = np.hypot(0.1 * np.cos(angles) - 0.1, 0.1 * np.sin(angles))
    assert landing_chance(0.1) == pytest.approx((miss <= 0.07).mean(), abs=0.005)
    assert move_chance([0.07, None, 0.03]) == pytest.approx((1 / 3 + 1) / 2)


# -- readout guidance on the tiny model ----------------------------------------------------------

STEPS = 4


@pytest.fixture(scope="module")
def banks(tiny_model):
    from ldm_scene.testing import foreground_banks

    return foreground_banks(tiny_model, STEPS)


def _target(model) -> np.ndarray:
    h, w = model.image_size
    m = np.zeros((h, w), bool)
    m[h // 4 : h // 2, w // 2 :] = True
    return m


def _run_recording(model, config, editor):
    """Run ``editor`` and keep each shift it made of the noise prediction."""
    shifts = []
    original = editor._shift

    def spy(step, x, like):
        out = original(step, x, like)
        shifts.append(None if out is None else out.detach().clone())
        return out

    editor._shift = spy
    image = [s.image for s in guided_sample(model, config, [editor])][-1]
    return np.asarray(image), shifts


def test_readout_guidance_and_its_control_push_with_the_same_norm(tiny_model, banks):
    from ldm_scene.capture import attached_hooks
    from ldm_scene.sampler import GenerationConfig, sample

    config = GenerationConfig("a red cube", seed=5, steps=STEPS)
    target = _target(tiny_model)
    guided = make_editor("readout-guidance", banks, target, steps=(0, 1), seed=config.seed)
    control = make_editor("random-guidance", banks, target, steps=(0, 1), seed=config.seed)
    assert isinstance(guided, ReadoutGuidanceEditor) and guided.random_seed is None and control.random_seed is not None
    assert (guided.sites, guided.steps, guided.gain) == (control.sites, control.steps, control.gain)
    assert guided.gain == METHOD_DEFAULTS["readout-guidance"].gain
    plain = np.asarray([s.image for s in sample(tiny_model, config)][-1])
    image_g, shifts_g = _run_recording(tiny_model, config, guided)
    image_c, shifts_c = _run_recording(tiny_model, config, control)
    assert len(shifts_g) == len(shifts_c) == 2 and all(s is not None for s in shifts_g + shifts_c)
    for g, c in zip(shifts_g, shifts_c):
        # Both shifts have RMS = gain, so the same norm; their directions differ.
        assert g.pow(2).mean().sqrt() == pytest.approx(guided.gain, rel=1e-4)
        assert c.norm() == pytest.approx(float(g.norm()), rel=1e-4)
        assert abs(float(torch.nn.functional.cosine_similarity(g.flatten(), c.flatten(), dim=0))) < 0.9
        assert g.mean(dim=(-2, -1)).abs().max() < 1e-4  # no uniform tint
    assert [s for s, _ in guided.losses] == [0, 1] and all(math.isfinite(v) for _, v in guided.losses)
    assert not np.array_equal(plain, image_g) and not np.array_equal(plain, image_c)
    # hooks gone, grad mode back off (the sampler runs under no_grad; outside it, grad is on)
    assert attached_hooks(tiny_model.unet) == 0 and torch.is_grad_enabled()


def test_readout_guidance_cleans_up_when_the_stream_is_closed_mid_way(tiny_model, banks):
    from ldm_scene.capture import attached_hooks
    from ldm_scene.sampler import GenerationConfig

    config = GenerationConfig("a red cube", seed=5, steps=STEPS)
    editor = make_editor("readout-guidance", banks, _target(tiny_model), steps=(0, 1, 2), seed=config.seed)
    stream = guided_sample(tiny_model, config, [editor])
    next(stream)
    assert attached_hooks(tiny_model.unet) > 0
    stream.close()
    assert attached_hooks(tiny_model.unet) == 0 and torch.is_grad_enabled()
    assert editor._acts is None


# -- end to end on the shipped toy model ---------------------------------------------------------

def test_two_trials_write_json_table_and_figure_and_resume(tmp_path):
    from ldm_scene.models import TOY_MODEL_DIR
    from ldm_scene.toy.intervention_eval import Setting, run_trials
    from ldm_scene.toy.intervention_sweep import run_sweep

    if not (TOY_MODEL_DIR / "probes" / "foreground.safetensors").exists():
        pytest.skip("toy model or its probes not shipped")
    methods = ("readout-guidance", "random-guidance")
    summary = run_trials(TOY_MODEL_DIR, 2, tmp_path, methods=methods)
    data = json.loads((tmp_path / "intervention.json").read_text())
    assert data["summary"] == json.loads(json.dumps(summary)) and len(data["trials"]) == 2
    done = [t for t in data["trials"] if "skipped" not in t]
    assert summary["n_evaluated"] == len(done) and list(summary["methods"]) == ["unedited", *methods]
    assert summary["move_correct_after"] is None  # no move among the methods
    # a move's settings are those its trials' editors recorded; its rows say what it corrected
    from ldm_scene.latent_move import LatentMoveEditor
    from ldm_scene.seeds import TRIAL_SEED0

    moved = run_trials(TOY_MODEL_DIR, 1, tmp_path / "move", methods=("latent-move",))
    assert (moved["move_correct_after"], moved["move_vacated_margin"], moved["move_keep_margin"], moved["move_fill"]) == (
        LatentMoveEditor.correct_after, LatentMoveEditor.vacated_margin, 0, "rows")
    readme = (tmp_path / "move" / "README.md").read_text()
    assert "filled the object's old place in the x0 prediction along rows" in readme
    assert moved["paste_back"] and "took the unedited image's pixels outside those cells" in readme
    row = json.loads((tmp_path / "move" / "trials.jsonl").read_text().splitlines()[0])["latent-move"]
    assert isinstance(row["corrected_px"], list) and isinstance(row["background_psnr_beyond_cell"], float)
    # a rerun reuses its trials only under the same settings: the move editor's defaults are part of the resume key
    header, log = tmp_path / "move" / "run.json", tmp_path / "move" / "trials.jsonl"
    run = json.loads(header.read_text())
    assert run["move_defaults"]["fill"] == "rows" and run["move_defaults"]["vacated_margin"] == LatentMoveEditor.vacated_margin
    # so are the margins kept around the free regions and the paste-back's ramp, set outside the editors
    from ldm_scene.intervention import KEEP_MARGIN, MOVE_KEEP_MARGIN

    assert (run["keep_margin"], run["move_keep_margin"], run["paste_back_feather"]) == (KEEP_MARGIN, MOVE_KEEP_MARGIN, None)
    marker = json.dumps({"seed": TRIAL_SEED0 + 1, "skipped": "a trial kept from before"})
    log.write_text(log.read_text() + marker + "\n")
    run_trials(TOY_MODEL_DIR, 2, tmp_path / "move", methods=("latent-move",))  # same settings: both trials reused
    assert marker in log.read_text().splitlines()
    header.write_text(json.dumps({**run, "move_defaults": {**run["move_defaults"], "fill": "harmonic"}}))
    run_trials(TOY_MODEL_DIR, 1, tmp_path / "move", methods=("latent-move",))  # other settings: started over
    assert marker not in log.read_text() and len(log.read_text().splitlines()) == 1
    assert json.loads(header.read_text()) == run
    for m in methods:
        rows = [t[m] for t in done]
        s = summary["methods"][m]
        assert s["success_rate"] == pytest.approx(np.mean([r["success"] for r in rows]))
        assert s["iou_target"] == pytest.approx(np.mean([r["iou_target"] for r in rows]))
        for r in rows:
            assert r["success"] == succeeded(r["present"], r["distance"], r["shape_kept"], r["colour_kept"])
            assert r["cost"] > 0
        line = next(x for x in (tmp_path / "README.md").read_text().splitlines() if x.startswith(f"| {m}"))
        assert f"{s['iou_target']:.3f}" in line
    assert [t["kind"] for t in done] == list(TARGET_KINDS[: len(done)])
    assert (tmp_path / "examples.png").exists() and (tmp_path / "trials.jsonl").exists()
    # A rerun resumes: the finished trials are read back, not generated again.
    log = (tmp_path / "trials.jsonl").read_text()
    again = run_trials(TOY_MODEL_DIR, 2, tmp_path, methods=methods)
    assert (tmp_path / "trials.jsonl").read_text() == log and again["methods"] == summary["methods"]
    # Trials drawn under another guidance schedule are not reused: the run starts over under its own.
    header = json.loads((tmp_path / "run.json").read_text())
    assert header["guidance"] == summary["guidance"]
    (tmp_path / "run.json").write_text(json.dumps(header | {"guidance": "guidance 7.5, at most 2.5 from 67% of the steps"}))
    (tmp_path / "trials.jsonl").write_text(log.replace('"success": false', '"success": true'))
    run_trials(TOY_MODEL_DIR, 2, tmp_path, methods=methods)
    assert json.loads((tmp_path / "run.json").read_text()) == header

    def outcomes(text):  # what the trials found, without their timings
        rows = [json.loads(line) for line in text.splitlines()]
        return [[(t[m]["success"], t[m]["distance_px"]) for m in methods if m in t] for t in rows]

    assert outcomes((tmp_path / "trials.jsonl").read_text()) == outcomes(log)
    # The sweep runs the same trials' machinery on its own seeds and marks the shipped default.
    d = METHOD_DEFAULTS["readout-guidance"]
    rows = run_sweep(TOY_MODEL_DIR, 1, tmp_path / "sweep", grid=(Setting("readout-guidance", d.sites, d.steps_fraction, d.gain),))
    assert len(rows) == 1 and rows[0]["default"] and rows[0]["n"] <= 1
    assert "| readout-guidance * |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_intervene_streams_readout_guidance_with_previews_as_the_app_does(tiny_model, banks):
    from ldm_scene.capture import attached_hooks
    from ldm_scene.intervention import intervene
    from ldm_scene.sampler import GenerationConfig, sample

    config = GenerationConfig("a red cube", seed=5, steps=STEPS)
    plain = np.asarray([s.image for s in sample(tiny_model, config)][-1])
    states = list(intervene(tiny_model, config, _target(tiny_model), "readout-guidance", banks, previews=True))
    assert len(states) == STEPS and all(s.preview is not None for s in states)
    assert not np.array_equal(plain, np.asarray(states[-1].image))
    assert attached_hooks(tiny_model.unet) == 0 and torch.is_grad_enabled()


def test_sweep_table_marks_only_the_shipped_default_and_names_other_options():
    from ldm_scene.toy.intervention_eval import Setting
    from ldm_scene.toy.intervention_sweep import _is_default, render_sweep

    d = METHOD_DEFAULTS["readout-guidance"]
    default = Setting("readout-guidance", d.sites, d.steps_fraction, d.gain)
    other = Setting("readout-guidance", d.sites, d.steps_fraction, d.gain, options=(("layout_grid", 8),))
    assert _is_default(default) and not _is_default(other)
    stats = {"n": 4, "success_rate": 0.5, "distance_px": 3.25, "iou_target": 0.6, "shape_kept": 1.0, "colour_kept": 0.75,
             "background_psnr": 15.0}
    rows = [{**vars(s), "options": dict(s.options), "default": _is_default(s), **stats} for s in (default, other)]
    lines = [x for x in render_sweep(rows).splitlines() if x.startswith("| readout-guidance")]
    assert lines[0].startswith(f"| readout-guidance * | {d.sites} | first {d.steps_fraction:.2f} | {d.gain:g} | — | — | 4 | 50% | 3.2")
    assert lines[1].startswith("| readout-guidance | ") and "| layout_grid 8 |" in lines[1]


def test_sweep_table_names_the_step_a_move_happens_after():
    """latent-move edits once: its row says after which step (of 15), and the shipped one is its default."""
    from ldm_scene.toy.intervention_eval import Setting
    from ldm_scene.toy.intervention_sweep import SWEEP_GRID, _is_default, render_sweep

    moves = [s for s in SWEEP_GRID if s.method == "latent-move"]
    assert sum(_is_default(s) for s in moves) == 1  # the shipped setting is among those tried
    stats = {"n": 4, "success_rate": 0.75, "distance_px": 2.0, "iou_target": 0.6, "shape_kept": 1.0, "colour_kept": 1.0,
             "background_psnr": 24.0}
    rows = [{**vars(s), "options": dict(s.options), "default": _is_default(s), **stats}
            for s in (Setting("latent-move", "none", 0.6, 1.0), Setting("latent-move", "none", 0.2, 1.0))]
    lines = [x for x in render_sweep(rows, steps=15).splitlines() if x.startswith("| latent-move")]
    assert lines[0].startswith("| latent-move * | none | after step 9 | 1 |")
    assert lines[1].startswith("| latent-move | none | after step 3 | 1 |")


def test_a_settings_option_goes_through_the_editors_own_checks(banks):
    """A sweep row's options build the editor anew: a bad one is refused when the editor is built, not
    when the move is made, and a good one keeps the rest of the editor (its masks, its step)."""
    from ldm_scene.toy.intervention_eval import Setting, build_editor

    source, target = _box(), _disc(cx=44.0, cy=40.0)
    plain = build_editor(Setting("latent-move", "none"), banks, target, STEPS, 0, source)
    harmonic = build_editor(Setting("latent-move", "none", options=(("fill", "harmonic"),)), banks, target, STEPS, 0, source)
    assert (plain.fill, harmonic.fill) == ("rows", "harmonic")
    assert harmonic.at == plain.at and harmonic.displacement == plain.displacement
    assert np.array_equal(harmonic.source, source) and np.array_equal(harmonic.target, target)
    with pytest.raises(ValueError, match="fill"):
        build_editor(Setting("latent-move", "none", options=(("fill", "smear"),)), banks, target, STEPS, 0, source)
    with pytest.raises(ValueError, match="vacated_margin"):
        build_editor(Setting("latent-move", "none", options=(("vacated_margin", -1),)), banks, target, STEPS, 0, source)
    with pytest.raises(ValueError, match="no setting 'colour'"):
        build_editor(Setting("latent-move", "none", options=(("colour", 1),)), banks, target, STEPS, 0, source)
