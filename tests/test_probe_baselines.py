"""The controls beside every probe score: prompt-only baseline, same-prompt control, grid ceiling.

Unit tests on synthetic label maps, each with the reason its number must come out as it does,
and one run of the pipeline on the tiny model with labels that depend only on the prompt (where
the controls must equal the probe exactly).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_scene.probes import TASKS
from ldm_scene.training import controls as ctl
from ldm_scene.training import evaluate as ev

SIZE = (16, 16)


def _blob(cy: float, cx: float, r: float, size=SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).to(torch.float64)


def _dice(task_map: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> float:
    return float(ev.score_maps("foreground", task_map[None], label, threshold=threshold)["score"][0])


# --- prompt-only baseline and same-prompt control ---------------------------------------------

def test_when_labels_depend_only_on_the_prompt_the_controls_equal_the_probe():
    """Every image with a prompt has the same label map, so (1) the mean of the fitting images'
    labels per prompt *is* each test image's label (prompt-only scores 1, like a perfect probe),
    and (2) another same-prompt image's label is the image's own, so any probe's score against
    its partners equals its score against itself, image by image."""
    g = torch.Generator().manual_seed(0)
    prompts = ["a red cube", "a blue cone", "a green torus"]
    depth_of = {p: torch.rand(*SIZE, generator=g, dtype=torch.float64) for p in prompts}
    mask_of = {p: _blob(4 + 4 * k, 5 + 3 * k, 3 + k) for k, p in enumerate(prompts)}
    fit = [prompts[i % 3] for i in range(12)]
    test = [prompts[i % 3] for i in range(9)]
    index = {p: k for k, p in enumerate(prompts)}
    sums = torch.zeros(3, *SIZE, dtype=torch.float64)
    fsums = torch.zeros(3, *SIZE, dtype=torch.float64)
    counts = torch.zeros(3)
    for p in fit:
        sums[index[p]] += depth_of[p]
        fsums[index[p]] += mask_of[p]
        counts[index[p]] += 1
    means, fmeans = ctl.prompt_means(sums, counts), ctl.prompt_means(fsums, counts)
    fallback = sums.sum(0) / counts.sum()
    for p in test:
        dmap, seen = ctl.prompt_map(p, index, means, fallback)
        assert seen
        assert ev.score_maps("depth", dmap[None], depth_of[p])["score"][0] == pytest.approx(1.0)
        assert _dice(ctl.prompt_map(p, index, fmeans, fallback)[0], mask_of[p]) == 1.0

    # a probe that reads the prompt (its readout a fixed function of the prompt), scored three ways
    labels = torch.stack([depth_of[p] for p in test])
    noise = {p: 0.3 * torch.rand(*SIZE, generator=g, dtype=torch.float64) for p in prompts}
    preds = torch.stack([depth_of[p] + noise[p] for p in test])[:, None]  # [N, M=1, H, W]
    own = np.array([ev.score_maps("depth", preds[i], labels[i])["score"][0] for i in range(len(test))])
    control = ctl.same_prompt_control("depth", preds, labels, test)["score"][:, 0]
    np.testing.assert_allclose(control, own, rtol=0, atol=1e-12)
    assert own.mean() < 0.99  # the noisy reader is not perfect, and the control still matches it

    fmasks = torch.stack([mask_of[p] for p in test])
    fpreds = torch.stack([ev.pool(mask_of[p][None], (4, 4))[0] for p in test])[:, None]  # a coarse reader
    fown = np.array([_dice(fpreds[i, 0], fmasks[i]) for i in range(len(test))])
    fcontrol = ctl.same_prompt_control("foreground", fpreds, fmasks, test)["score"][:, 0]
    np.testing.assert_allclose(fcontrol, fown, rtol=0, atol=1e-12)


def test_when_the_layout_is_random_per_image_the_probe_beats_both_controls():
    """Each image's object sits at a random place whatever its prompt: the prompt's mean mask is a
    faint smear (prompt-only scores low), another image's mask rarely overlaps this one's (the
    control scores low), while a probe that reads this image's layout from its own grid scores high."""
    rng = np.random.default_rng(1)
    prompts = ["a red cube", "a blue cone"]

    def draw(n):
        ps = [prompts[i % 2] for i in range(n)]
        return ps, torch.stack([_blob(*rng.uniform(3, 13, size=2), 3.0) for _ in ps])

    fit_prompts, fit_masks = draw(40)
    val_prompts, val_masks = draw(10)
    test_prompts, test_masks = draw(20)
    index = {p: k for k, p in enumerate(prompts)}
    sums = torch.stack([fit_masks[[i for i, q in enumerate(fit_prompts) if q == p]].sum(0) for p in prompts])
    counts = torch.tensor([fit_prompts.count(p) for p in prompts], dtype=torch.float64)
    means = ctl.prompt_means(sums, counts)
    fallback = fit_masks.mean(0)
    val_maps = torch.stack([ctl.prompt_map(p, index, means, fallback)[0] for p in val_prompts])
    tau, per_tau = ctl.choose_threshold(val_maps, val_masks, [0.05 * i for i in range(1, 13)])
    assert per_tau.max() == per_tau[round(tau / 0.05) - 1]
    prompt_only = np.mean([_dice(ctl.prompt_map(p, index, means, fallback)[0], m, tau)
                           for p, m in zip(test_prompts, test_masks)])
    probe_maps = ev.pool(test_masks, (8, 8))[:, None]  # reads the image's own layout on an 8x8 grid
    probe = np.array([_dice(probe_maps[i, 0], test_masks[i]) for i in range(20)])
    control = ctl.same_prompt_control("foreground", probe_maps, test_masks, test_prompts)["score"][:, 0]
    assert probe.mean() > 0.85
    assert prompt_only < 0.5 and control.mean() < 0.4
    assert probe.mean() - prompt_only > 0.4 and probe.mean() - control.mean() > 0.4


def test_prompt_map_falls_back_for_unseen_prompts_and_partners_exclude_self():
    means = ctl.prompt_means(torch.ones(2, 2, 2), torch.tensor([2.0, 0.0]))
    assert torch.equal(means[0], torch.full((2, 2), 0.5)) and torch.isnan(means[1]).all()
    fallback = torch.zeros(2, 2)
    assert ctl.prompt_map("a", {"a": 0, "b": 1}, means, fallback)[1]
    assert ctl.prompt_map("b", {"a": 0, "b": 1}, means, fallback) == (fallback, False)  # row without images
    assert ctl.prompt_map("c", {"a": 0, "b": 1}, means, fallback) == (fallback, False)  # never seen
    assert ctl.same_prompt_partners(["x", "y", "x", "x"]) == [[2, 3], [], [0, 3], [0, 2]]
    # test prompts seen in train or val, and val prompts seen in train; a prompt only val has is not kept
    assert ctl.shared_prompts(["a", "b", "a"], ["b", "d", "e"], ["c", "b", "e"]) == ["b", "e"]
    assert ctl.shared_prompts(["a"], ["d"], ["c"]) == []
    alone = ctl.partner_scores("depth", torch.zeros(3, 2, 2), torch.zeros(0, 4, 4), torch.zeros(4, 4))
    assert set(alone) == {"score", "residual"} and np.isnan(alone["score"]).all()


# --- grid ceiling -------------------------------------------------------------------------------

def test_grid_ceiling_is_one_for_a_label_the_grid_represents():
    """A half-plane on cell boundaries pools to exact 0/1 cells; bilinear upsampling of those is
    above 0.5 exactly on the foreground side (an even upsampling factor puts no pixel centre on a
    cell boundary), so the ceiling is 1 on every grid that divides the boundary."""
    label = torch.zeros(*SIZE, dtype=torch.float64)
    label[:, :8] = 1.0
    ceil = ctl.grid_ceiling_scores("foreground", label, [(2, 2), (4, 4), (8, 8), (16, 16)])
    assert all(v["score"] == 1.0 and v["iou"] == 1.0 for v in ceil.values())


def test_grid_ceiling_rounds_corners_and_loses_sub_cell_objects():
    """An 8x8-pixel square on a 4x4 grid (4-pixel cells): bilinear read-out keeps its edges but
    rounds each convex corner by one pixel (the corner pixel sits 0.375 cells from both
    neighbours: 0.625 * 0.625 = 0.39 < 0.5), so Dice = 2 * 60 / (60 + 64). A 2x2-pixel object fills a
    quarter of one cell: pooled to 0.25 it never reaches 0.5, and it is lost (Dice 0), as is a
    one-cell object straddling four cells; on the label's own grid both are exact."""
    square = torch.zeros(*SIZE, dtype=torch.float64)
    square[4:12, 4:12] = 1.0
    assert ctl.grid_ceiling_scores("foreground", square, [(4, 4)])[(4, 4)]["score"] == pytest.approx(120 / 124)
    dot = torch.zeros(*SIZE, dtype=torch.float64)
    dot[5:7, 5:7] = 1.0
    straddle = torch.zeros(*SIZE, dtype=torch.float64)
    straddle[2:6, 2:6] = 1.0
    for obj in (dot, straddle):
        ceil = ctl.grid_ceiling_scores("foreground", obj, [(4, 4), (16, 16)])
        assert ceil[(4, 4)]["score"] == 0.0 and ceil[(16, 16)]["score"] == 1.0


def test_grid_ceiling_of_depth_falls_as_the_grid_coarsens():
    """Fine depth detail cannot be represented on a coarse grid: pooling loses more the larger the
    cells, so the rank correlation of the pooled-and-upsampled map with the label falls."""
    g = torch.Generator().manual_seed(3)
    depth = ev.upsample(torch.rand(1, 8, 8, generator=g, dtype=torch.float64), (32, 32))[0]
    depth = depth + 0.05 * torch.rand(32, 32, generator=g, dtype=torch.float64)
    prior = torch.zeros(32, 32, dtype=torch.float64)
    ceil = ctl.grid_ceiling_scores("depth", depth, [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)], prior)
    scores = [ceil[hw]["score"] for hw in [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]]
    assert scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert ceil[(8, 8)]["residual"] == pytest.approx(ceil[(8, 8)]["score"])  # a zero prior changes nothing


# --- the pipeline on the tiny model -------------------------------------------------------------

def test_pipeline_controls_equal_the_probe_when_labels_depend_only_on_the_prompt(tmp_path, tiny_model):
    """End to end: with labels a function of the prompt alone, every test image's same-prompt
    control equals its probe score at every site and step (partners' labels are its own), and the
    prompt-only baseline reproduces the label exactly for prompts seen in fitting."""
    from ldm_scene.training.dataset import make_records
    from ldm_scene.training.eval_pass import control_path, eval_path
    from ldm_scene.training.pipeline import RunConfig, prepare, run

    prompts = ["a red cat", "a blue dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    records = {r.seed: r.prompt for r in make_records(10, prompts=prompts)}
    g = torch.Generator().manual_seed(0)
    by_prompt = {p: {"foreground": _blob(10 + 12 * k, 12, 7, (32, 32)).float().numpy(),
                     "depth": torch.rand(32, 32, generator=g).numpy(), "shading": torch.rand(32, 32, generator=g).numpy()}
                 for k, p in enumerate(prompts)}

    class ByPrompt:
        name, tasks, labels_any_image = "by-prompt", TASKS, False

        def __call__(self, images, seeds=None):
            return {t: np.stack([by_prompt[records[s]][t] for s in seeds]) for t in TASKS}

    config = RunConfig(model="tiny", n=10, out=str(tmp_path / "out"), steps=2, prompts=str(tmp_path / "prompts.txt"),
                       permuted=False, latent_baseline=False, adam_keys=(), figures=False, n_examples=0,
                       device="cpu", bootstrap_resamples=50)
    metrics = run(config, labeler=ByPrompt(), model=tiny_model, progress=False)
    ctx = prepare(config, ByPrompt(), tiny_model)
    fit_prompts = {r.prompt for r in ctx.fit_records}
    checked = 0
    for record in ctx.test_records:
        with np.load(eval_path(ctx, record)) as f:
            scores = {k: f[k] for k in f.files}
        if record.prompt in fit_prompts:
            assert scores["prompt_only/foreground/score"] == pytest.approx(1.0)
            assert scores["prompt_only/depth/score"] == pytest.approx(1.0)
            assert scores["prompt_only/depth/residual"] == pytest.approx(1.0)
        if ctx.test_partners[record.index]:
            with np.load(control_path(ctx, record)) as f:
                for task in TASKS:
                    np.testing.assert_allclose(f[f"control/{task}/score"], scores[f"probe/{task}/score"], rtol=0, atol=1e-12)
                np.testing.assert_allclose(f["control/depth/residual"], scores["probe/depth/residual"], rtol=0, atol=1e-12)
            checked += 1
    assert checked == metrics["n_test_with_same_prompt_partners"] > 0
    for task in TASKS:
        t = metrics["tasks"][task]
        for mean in t["margins"]["same_prompt_control"]["mean"]:
            assert mean == pytest.approx(0.0, abs=1e-12)


def test_pipeline_with_unique_prompts_reports_the_controls_as_undefined(tmp_path, tiny_model):
    """SD's LAION captions never repeat: no per-prompt sums are kept, the prompt-only map is the
    prior (its residual depth 0, as the prior's), no test image has a same-prompt partner, and
    the control and its margin are reported as missing rather than as a number."""
    from ldm_scene.training.pipeline import RunConfig, prepare, run

    words = ["a red cat", "a blue dog", "a green cube", "a photo of a sphere", "a red dog", "a blue cat"]
    (tmp_path / "prompts.txt").write_text("\n".join(words) + "\n")

    class Luma:
        name, tasks, labels_any_image = "luma", TASKS, True

        def __call__(self, images, seeds=None):
            x = images.astype(np.float32).mean(-1) / 255.0
            return {"foreground": (x > x.mean()).astype(np.float32), "depth": x, "shading": x ** 2}

    config = RunConfig(model="tiny", n=6, out=str(tmp_path / "out"), steps=2, prompts=str(tmp_path / "prompts.txt"),
                       permuted=False, latent_baseline=False, adam_keys=(), figures=False, n_examples=0,
                       device="cpu", bootstrap_resamples=50)
    metrics = run(config, labeler=Luma(), model=tiny_model, progress=False)
    ctx = prepare(config, Luma(), tiny_model)
    assert ctx.prompt_index == {} and not any(ctx.test_partners.values())
    assert metrics["n_test_with_same_prompt_partners"] == 0
    for task in TASKS:
        t = metrics["tasks"][task]
        if task != "foreground":  # (the foreground prior is cut at 0.5, the prompt-only map at its tuned threshold)
            assert t["baselines"]["prompt_only"] == t["baselines"]["prior"]
        assert t["baselines"]["same_prompt_control"] == [None, None]
        assert t["margins"]["same_prompt_control"]["mean"] == [None, None]
        assert t["margins"]["same_prompt_control"]["n_images"] == [0, 0]
    assert metrics["tasks"]["depth"]["baselines_residual"]["prompt_only"] == [0.0, 0.0]
