"""The probe pipeline end to end on the tiny model: dataset, labelers, one-pass fitting, resumption,
sharding, evaluation, metrics.json, figures and the command line.

Everything runs in-process on the session's tiny model with 3 denoising steps and a stand-in
labeler (a deterministic function of the image), so the whole file takes a few seconds.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_scene import metrics as M
from ldm_scene.capture import capture
from ldm_scene.probes import TASKS, ProbeBank, load_probe_dir
from ldm_scene.sampler import GenerationConfig, sample
from ldm_scene.training import evaluate as ev
from ldm_scene.training import report as rep
from ldm_scene.training.readme import render_readme
from ldm_scene.training.dataset import Shard, make_records, read_prompts, split_counts
from ldm_scene.training.fit import RidgeStats
from ldm_scene.training.labelers import (
    Combined,
    FolderLabels,
    LabelerError,
    Saliency,
    build_labeler,
    check_labels,
)
from ldm_scene.training.pipeline import (
    LATENT,
    RunConfig,
    accumulate,
    fit_pass,
    generate_trace,
    label_images,
    load_fit_state,
    merge_fits,
    new_fit_state,
    permuted_copy,
    THRESHOLD_GRID,
    calibrate_foreground,
    prepare,
    run,
    solve,
)

STEPS = 3
N = 10  # 4 fitting images (3 train + 1 val) and 6 test images
WORDS = ["a red cat", "a blue dog", "a green cube", "a photo of a sphere"]


class LumaLabeler:
    """Stand-in labeler: foreground = brighter than the image's mean, depth = luminance, shading = red."""

    name = "luma-test"
    tasks = TASKS
    labels_any_image = True

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, images, seeds=None):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        x = images.astype(np.float32) / 255.0
        luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return {
            "foreground": (luma > luma.mean(axis=(1, 2), keepdims=True)).astype(np.float32),
            "depth": luma,
            "shading": x[..., 0],
        }


def _config(out, **kw):
    base = dict(model="tiny", n=N, out=str(out), steps=STEPS, prompts=str(out.parent / "prompts.txt"),
                checkpoint_every=2, adam_epochs=2, adam_images=4, device="cpu")
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-runs")
    (root / "prompts.txt").write_text("# tiny prompts\n" + "\n".join(WORDS) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(run_root, tiny_model):
    """One uninterrupted, unsharded run: its metrics, and its context."""
    torch.set_num_threads(1)
    config = _config(run_root / "ref")
    metrics = run(config, labeler=LumaLabeler(), model=tiny_model, progress=False)
    ctx = prepare(config, LumaLabeler(), tiny_model)
    return metrics, ctx


# --- dataset ----------------------------------------------------------------------------------

def test_records_split_like_the_paper_and_are_deterministic():
    assert split_counts(617) == (197, 49, 371)  # 246 fitting images (197 + 49 val), 371 test, as the paper
    a, b = make_records(617), make_records(617)
    assert a == b
    assert [r.seed for r in a] == list(range(617))
    assert sum(r.split == "test" for r in a) == 371 and sum(r.split == "val" for r in a) == 49
    # toy prompts come from the renderer (what the object is, never where); a prompt list is cycled
    from ldm_scene.toy.render import PLACE_WORDS, scene_from_seed

    assert [r.prompt for r in a[:5]] == [scene_from_seed(s).prompt for s in range(5)]
    assert all(r.prompt.startswith(("a ", "an ")) and not PLACE_WORDS & set(r.prompt.split()) for r in a)
    recs = make_records(5, seed=7, prompts=["x y", "z"])
    assert [r.prompt for r in recs] == ["x y", "z", "x y", "z", "x y"] and recs[0].seed == 7
    # shards partition the records
    shards = [Shard(r, 3).select(a) for r in range(3)]
    assert sorted(x.index for s in shards for x in s) == list(range(617))
    with pytest.raises(ValueError):
        make_records(2)


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n\na cat\n  a dog  \n")
    assert read_prompts(path) == ["a cat", "a dog"]
    path.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)


# --- labelers ---------------------------------------------------------------------------------

def test_folder_labeler_reads_npy_and_png_and_resizes(tmp_path):
    np.save(tmp_path / "3.npy", np.full((8, 8), 0.25, dtype=np.float32))
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(tmp_path / "4.png")
    lab = FolderLabels(tmp_path, "shading")
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    out = lab(images, seeds=[3, 4])["shading"]
    assert out.shape == (2, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 0.25)
    np.testing.assert_allclose(out[1], 1.0)
    assert not lab.labels_any_image
    with pytest.raises(LabelerError, match="needs their seeds"):
        lab(images)
    with pytest.raises(LabelerError, match="no label file for seed 5"):
        lab(images[:1], seeds=[5])


def test_build_labeler_specs_and_errors(tmp_path):
    combo = build_labeler(f"folder:depth={tmp_path}+folder:{tmp_path}")
    assert isinstance(combo, Combined) and combo.tasks == ("depth", "shading")
    with pytest.raises(LabelerError, match="unknown labeler"):
        build_labeler("midas")
    with pytest.raises(LabelerError, match="labelers/"):
        build_labeler("toy")
    sal = build_labeler("tracer")
    assert isinstance(sal, Saliency) and sal.tasks == ("foreground",)
    try:
        import transparent_background  # noqa: F401
    except ImportError:
        with pytest.raises(LabelerError, match="pip install transparent-background"):
            sal(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_check_labels_resizes_and_validates():
    labels = {"foreground": np.ones((1, 4, 4), dtype=np.float32), "depth": np.arange(16, dtype=np.float32).reshape(1, 4, 4)}
    out = check_labels(labels, ("foreground", "depth"), 1, (8, 8))
    assert out["foreground"].shape == (1, 8, 8) and set(np.unique(out["foreground"])) == {1.0}
    assert out["depth"].shape == (1, 8, 8)
    with pytest.raises(LabelerError, match="gave no 'shading'"):
        check_labels(labels, ("shading",), 1, (4, 4))
    with pytest.raises(LabelerError, match="nan"):
        check_labels({"depth": np.full((1, 4, 4), np.nan)}, ("depth",), 1, (4, 4))


# --- batched metrics ----------------------------------------------------------------------------

def _bilinear(x, size):
    """The read-out the evaluation promises, written out independently of ``ev.upsample``."""
    return F.interpolate(x[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]


def test_batched_metrics_equal_the_reference_metrics():
    """Every batched score equals ldm_scene.metrics (scipy) on the bilinearly upsampled map, also
    with ties in the target and in the readout, and against several targets at once."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(16, 16, generator=g, dtype=torch.float64)
    target[:4, :4] = 0.5  # ties in the target
    grid = torch.randint(0, 5, (6, 4, 4), generator=g).to(torch.float64)  # many ties in the readout
    grid[5] = 2.0  # a constant readout: undefined correlation
    full = _bilinear(grid, (16, 16))
    torch.testing.assert_close(ev.upsample(grid, (16, 16)), full, rtol=0, atol=0)
    got = ev.spearman_rows(grid, target)  # upsampled inside
    got_full = ev.spearman_rows(full, target)  # already at full resolution
    want = [M.spearman(full[i].numpy(), target.numpy()) for i in range(6)]
    np.testing.assert_allclose(got[:5], want[:5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_full[:5], want[:5], rtol=0, atol=1e-12)
    assert math.isnan(got[5]) and math.isnan(want[5])
    np.testing.assert_array_equal(ev.average_ranks(target.reshape(1, -1))[0].numpy(), M.rank_average(target.numpy()))

    # several targets at once: every readout against every target, the same numbers as one by one
    targets = torch.stack([target, target.T, torch.rand(16, 16, generator=g, dtype=torch.float64)])
    many = ev.spearman_rows(grid[:5], targets)
    assert many.shape == (5, 3)
    for j in range(3):
        np.testing.assert_allclose(many[:, j], ev.spearman_rows(grid[:5], targets[j]), rtol=0, atol=1e-12)

    # foreground: threshold after upsampling
    mask = target > 0.6
    pred = ev.foreground_mask(grid, (16, 16), 2.0)
    assert torch.equal(pred, full > 2.0)
    np.testing.assert_allclose(ev.dice_rows(pred, mask), [M.dice(p, mask.numpy()) for p in pred.numpy()])
    np.testing.assert_allclose(ev.iou_rows(pred, mask), [M.iou(p, mask.numpy()) for p in pred.numpy()])
    assert ev.dice_rows(torch.zeros(1, 16, 16, dtype=torch.bool), torch.zeros(16, 16, dtype=torch.bool))[0] == 1.0
    with pytest.raises(ValueError, match="same size"):
        ev.dice_rows(grid > 2, mask)  # a coarse mask is refused: upsample the scores, then threshold
    with pytest.raises(TypeError, match="then threshold"):
        ev.upsample(grid > 2, (16, 16))
    scored = ev.score_maps("foreground", grid, target.to(torch.float32), threshold=2.0)
    np.testing.assert_allclose(scored["score"], ev.dice_rows(pred, target > 0.5))

    prior = torch.linspace(0, 1, 16, dtype=torch.float64)[:, None].expand(16, 16)
    res = ev.score_maps("depth", grid[:5], target, prior)["residual"]
    np.testing.assert_allclose(res, [M.spearman((full[i] - prior).numpy(), (target - prior).numpy()) for i in range(5)], atol=1e-12)
    both = ev.score_maps("depth", grid[:5], targets, prior)
    assert both["residual"].shape == (5, 3)
    np.testing.assert_allclose(both["residual"][:, 0], res, atol=1e-12)


def test_bilinear_upsampling_of_a_constant_is_the_constant():
    """Bilinear weights sum to one at every pixel (edges clamp), so a constant map stays that constant."""
    out = ev.upsample(torch.full((2, 3, 5), 0.37, dtype=torch.float64), (12, 20))
    assert out.shape == (2, 12, 20)
    torch.testing.assert_close(out, torch.full((2, 12, 20), 0.37, dtype=torch.float64), rtol=0, atol=1e-15)
    # a linear ramp across cell centres is reproduced between them: bilinear, not nearest
    ramp = torch.arange(4, dtype=torch.float64).reshape(1, 1, 4).expand(1, 4, 4)
    row = ev.upsample(ramp, (8, 8))[0, 0]
    torch.testing.assert_close(row[1:7], torch.tensor([0.25, 0.75, 1.25, 1.75, 2.25, 2.75], dtype=torch.float64))


def test_first_step_reaching_and_json_clean():
    assert ev.first_step_reaching([0.1, 0.5, 0.95, 1.0]) == 2
    assert ev.first_step_reaching([0.1, None, 0.2]) == 2
    assert ev.first_step_reaching([0.5, -0.1]) is None
    assert ev.json_clean({"a": np.float32(np.nan), "b": np.arange(2), "c": (1.5, math.inf)}) == {"a": None, "b": [0, 1], "c": [1.5, None]}


# --- the permuted control -----------------------------------------------------------------------

def test_permuted_copy_shuffles_every_tensor_reproducibly(tiny_model):
    a = permuted_copy(tiny_model.unet, seed=3)
    b = permuted_copy(tiny_model.unet, seed=3)
    for (name, p0), p1, p2 in zip(tiny_model.unet.named_parameters(), a.parameters(), b.parameters()):
        assert torch.equal(p1, p2), name
        assert torch.equal(p0.flatten().sort().values, p1.flatten().sort().values), name
    changed = sum(not torch.equal(p0, p1) for p0, p1 in zip(tiny_model.unet.parameters(), a.parameters()))
    assert changed > 0.9 * len(list(a.parameters()))


# --- fitting --------------------------------------------------------------------------------------

def test_pipeline_stats_equal_stats_built_by_hand(run_root, tiny_model):
    ctx = prepare(_config(run_root / "hand", permuted=False), LumaLabeler(), tiny_model)
    record = ctx.fit_records[0]
    state = fit_pass(ctx, limit=1, progress=False)  # processes exactly this record
    got = state.stats["unet"][record.split]

    config = GenerationConfig(record.prompt, seed=record.seed, steps=STEPS)
    with capture(tiny_model.unet) as cap:
        for s in sample(tiny_model, config):
            image = s.image
    labels = LumaLabeler()(np.asarray(image)[None])
    for info in tiny_model.sites():
        k = 32 // info.height
        pooled = {t: F.avg_pool2d(torch.from_numpy(v).double()[:, None], k).reshape(-1) for t, v in labels.items()}
        y = torch.stack([1 - pooled["foreground"], pooled["foreground"], pooled["depth"], pooled["shading"]], dim=1)
        for step in range(STEPS):
            want = RidgeStats(info.channels, 4)
            want.update(cap.values[(info.key, step)][0], y)
            have = got[(info.key, step)]
            assert have.n == want.n == info.tokens
            torch.testing.assert_close(have.xtx, want.xtx, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(have.xty, want.xty, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(have.yty, want.yty, rtol=1e-12, atol=1e-12)
    assert got[(LATENT, 0)].n == 64  # the latent baseline: 8x8 latent tokens, 4 channels
    assert got[(LATENT, 0)].channels == 4
    assert state.stats["unet"]["val" if record.split == "train" else "train"][(LATENT, 0)].n == 0


def test_resumed_run_gives_exactly_the_uninterrupted_probes(run_root, tiny_model, reference):
    config = _config(run_root / "resumed")
    ctx = prepare(config, LumaLabeler(fail_on_call=4), tiny_model)
    with pytest.raises(KeyboardInterrupt):
        fit_pass(ctx, progress=False)  # checkpoint after 2 images; dies labelling the 4th
    assert load_fit_state(ctx, ctx.work / "fit" / "rank0of1.safetensors").done == 2
    ctx = prepare(config, LumaLabeler(), tiny_model)
    state = fit_pass(ctx, progress=False)
    assert state.done == 4
    calibrate_foreground(ctx, solve(ctx, merge_fits(ctx, 1), progress=False), progress=False)
    ref_banks = load_probe_dir(reference[1].out)
    banks = load_probe_dir(ctx.out)
    for task in TASKS:
        assert banks[task].keys() == ref_banks[task].keys()
        for key in banks[task].keys():
            assert torch.equal(banks[task].weights[key], ref_banks[task].weights[key]), (task, key)
            assert torch.equal(banks[task].biases[key], ref_banks[task].biases[key]), (task, key)


def test_sharded_fit_merged_equals_the_single_run(run_root, tiny_model, reference):
    config = _config(run_root / "sharded")
    ctx = prepare(config, LumaLabeler(), tiny_model)
    for rank in range(2):
        fit_pass(ctx, Shard(rank, 2), progress=False)  # two processes' shares, run one after the other
    merged = merge_fits(ctx, 2)
    ref_ctx = reference[1]
    single = load_fit_state(ref_ctx, ref_ctx.work / "fit" / "rank0of1.safetensors")
    assert merged.n_images == single.n_images == 4
    for group in single.stats:
        for split in single.stats[group]:
            for key, want in single.stats[group][split].items():
                have = merged.stats[group][split][key]
                assert have.n == want.n
                torch.testing.assert_close(have.xtx, want.xtx, rtol=1e-12, atol=1e-10)
                torch.testing.assert_close(have.xty, want.xty, rtol=1e-12, atol=1e-10)
    for task in single.pixels:
        torch.testing.assert_close(merged.maps[task], single.maps[task])
    solve(ctx, merged, progress=False)
    for task, bank in load_probe_dir(ctx.out).items():
        ref = load_probe_dir(ref_ctx.out)[task]
        for key in bank.keys():
            torch.testing.assert_close(bank.weights[key], ref.weights[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="rank0of3"):
        merge_fits(ctx, 3)


def test_foreground_threshold_is_chosen_on_validation_and_folded_into_the_bias(reference):
    """Recomputed here from the validation image: at every (site, step) the saved threshold gives
    the best Dice of the bilinearly upsampled ridge prediction on the grid of thresholds, and the
    shipped (calibrated) probe's logit margin is exactly twice the raw prediction minus it."""
    import json

    ctx = reference[1]
    saved = json.loads((ctx.work / "calibration.json").read_text())
    bank = load_probe_dir(ctx.out)["foreground"]
    assert bank.meta.training["decision_threshold"]["threshold"]
    val = [r for r in ctx.records if r.split == "val"]
    assert len(val) == 1
    trace = generate_trace(ctx, val[0])
    label = torch.from_numpy(label_images(ctx, trace.image[None], [val[0].seed])["foreground"][0] > 0.5)
    grid = torch.tensor(THRESHOLD_GRID)
    for info in ctx.sites:
        for step in range(STEPS):
            tau = saved["unet"][f"{info.key}@{step}"]
            w, b = bank.weights[(info.key, step)], bank.biases[(info.key, step)]
            z = trace.acts[info.key][step].float() @ w.T + b
            p_raw = (z[:, 1] - z[:, 0]) / 2 + tau  # the calibrated margin is 2 * (p_raw - tau)
            full = _bilinear(p_raw.reshape(1, info.height, info.width), tuple(label.shape))[0]
            dice = ev.dice_rows(full[None] > grid[:, None, None].double(), label)
            assert dice[THRESHOLD_GRID.index(tau)] == pytest.approx(dice.max(), abs=1e-9), (info.key, step)
            prob = torch.softmax(z, dim=1)[:, 1]
            assert torch.equal(prob > 0.5, z[:, 1] > z[:, 0])


def test_images_are_generated_under_the_models_own_guidance_schedule(run_root, tiny_model):
    """A model whose ldm_scene.json lowers guidance late is probed under that schedule, not a
    constant 7.5; an explicit setting overrides it; the fingerprint tells the two runs apart."""
    from dataclasses import replace

    late = replace(tiny_model, late_guidance=2.5, late_from=0.5)
    ctx = prepare(_config(run_root / "late", permuted=False), LumaLabeler(), late)
    record = ctx.fit_records[0]
    assert ctx.guidance["per_step"] == [7.5, 7.5, 2.5]  # from round(0.5 * 3) = step 2 (0-based) on
    assert "at most 2.5" in ctx.guidance["text"]
    config = ctx.generation(record)
    assert (config.guidance, config.late_guidance, config.late_from) == (7.5, 2.5, 0.5)
    image = generate_trace(ctx, record).image
    own = [s.image for s in sample(late, config) if s.image is not None][0]
    constant = [s.image for s in sample(late, GenerationConfig(record.prompt, seed=record.seed, steps=STEPS)) if s.image is not None][0]
    assert np.array_equal(image, np.asarray(own.convert("RGB")))
    assert not np.array_equal(image, np.asarray(constant.convert("RGB")))
    fixed = prepare(_config(run_root / "late-constant", permuted=False, late_guidance=7.5), LumaLabeler(), late)
    assert fixed.guidance["per_step"] == [7.5] * STEPS and fixed.guidance["source"] == "set for this run"
    assert fixed.fingerprint()["guidance"] != ctx.fingerprint()["guidance"]


def test_work_dir_of_another_run_is_refused(run_root, tiny_model, reference):
    with pytest.raises(ValueError, match="another run.*steps"):
        prepare(_config(run_root / "ref", steps=STEPS + 1), LumaLabeler(), tiny_model)


# --- outputs --------------------------------------------------------------------------------------

def test_metrics_schema_banks_figures_and_readme(reference, tiny_model):
    metrics, ctx = reference
    out = ctx.out
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["model"] == "tiny" and metrics["num_steps"] == STEPS
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (3, 1, 6)
    sites = [i.key for i in tiny_model.sites()]
    for task in TASKS:
        t = metrics["tasks"][task]
        assert t["metric"] == ("dice" if task == "foreground" else "spearman")
        assert list(t["probe"]) == sites and all(len(v) == STEPS for v in t["probe"].values())
        assert t["best_site"] in sites and len(t["best_site_per_step"]) == STEPS
        assert all(s in sites for s in t["best_site_per_step"])
        assert t["best_per_step"] == [t["probe"][s][i] for i, s in enumerate(t["best_site_per_step"])]
        assert set(t["baselines"]) == {"labeler_on_x0", "latent_probe", "permuted_unet", "prior", "prompt_only",
                                       "same_prompt_control"}
        assert all(len(v) == STEPS for v in t["baselines"].values())
        assert t["first_step_90pct"] is None or 0 <= t["first_step_90pct"] < STEPS
        assert len(set(t["baselines"]["prior"])) == 1  # the prior does not change with the step
        assert len(set(t["baselines"]["prompt_only"])) == 1  # nor does the prompt-only map
        # the grid ceiling depends on the site's grid only; probe / ceiling is read off the two
        assert list(t["grid_ceiling"]) == sites
        grid_of = {i.key: (i.height, i.width) for i in tiny_model.sites()}
        by_grid = {}
        for site, v in t["grid_ceiling"].items():
            assert by_grid.setdefault(grid_of[site], v) == v
        for i, site in enumerate(t["best_site_per_step"]):
            assert t["grid_ceiling_best_per_step"][i] == t["grid_ceiling"][site]
            if t["grid_ceiling"][site]:
                assert t["probe_over_ceiling_best_per_step"][i] == pytest.approx(t["best_per_step"][i] / t["grid_ceiling"][site])
        # margins: paired per image, so the mean margin is the probe's mean minus the baseline's
        # over the images that have both, with an interval around it
        for name in ("prompt_only", "same_prompt_control", "labeler_on_x0"):
            mg = t["margins"][name]
            assert len(mg["mean"]) == len(mg["ci95_low"]) == len(mg["ci95_high"]) == STEPS
            for m, lo, hi in zip(mg["mean"], mg["ci95_low"], mg["ci95_high"]):
                assert m is None or lo - 1e-12 <= m <= hi + 1e-12
        assert t["margins"]["prompt_only"]["n_images"] == [6] * STEPS
        assert t["margins"]["same_prompt_control"]["n_images"] == [metrics["n_test_with_same_prompt_partners"]] * STEPS
        if task == "foreground":
            assert list(t["iou"]) == sites
            d = [v for v in t["probe"][sites[0]] if v is not None]
            assert all(0 <= v <= 1 for v in d)
        if task == "depth":
            assert list(t["residual"]) == sites
            assert t["baselines_residual"]["prior"] == [0.0] * STEPS
            assert {"prompt_only", "same_prompt_control"} <= set(t["baselines_residual"])
            assert set(t["margins_residual"]) == {"prompt_only", "same_prompt_control", "labeler_on_x0"}
    assert all(v is not None for v in metrics["tasks"]["depth"]["baselines"]["labeler_on_x0"])
    # the tiny prompts repeat (4 prompts over 10 images), so test images have same-prompt partners
    assert metrics["n_test_with_same_prompt_partners"] > 0
    assert metrics["prompt_only_threshold"] in THRESHOLD_GRID
    assert metrics["upsampling"].startswith("bilinear")
    # the guidance schedule: the tiny model's own (7.5 throughout: it has no ldm_scene.json)
    assert (metrics["guidance"], metrics["late_guidance"], metrics["guidance_per_step"]) == (7.5, None, [7.5] * STEPS)
    assert [t["name"] for t in metrics["targets"]] == [t[0] for t in rep.TARGETS]
    for t in metrics["targets"]:
        assert t["met"] == (t["value"] is not None and t["value"] >= t["threshold"])
        assert 0 <= t["step"] < STEPS
    avr = metrics["adam_vs_ridge"]
    assert avr["n_images"] == 4 and avr["keys"]
    for task in TASKS:
        for scores in avr["tasks"][task].values():
            assert set(scores) == {"ridge", "adam"}

    banks = load_probe_dir(out, expect_sites=tiny_model.sites(), expect_image_size=(32, 32), expect_num_steps=STEPS)
    for task, bank in banks.items():
        meta = bank.meta
        assert meta.model_id == "tiny" and meta.scheduler == "LMSDiscreteScheduler" and len(bank) == 16 * STEPS
        assert meta.training["method"] == "ridge" and meta.training["n_images"] == 4
        assert meta.training["labeler"] == "luma-test" and len(meta.training["penalty"]) == 16 * STEPS
        assert (meta.target_std == 1.0) == (task == "foreground")
        assert meta.training["guidance_per_step"] == [7.5] * STEPS and meta.training["late_guidance"] is None
        assert meta.training["guidance_schedule"] == metrics["guidance_schedule"] == "guidance 7.5"

    for name in ["emergence.png", "strips.png", "controls.png"] + [f"heatmap_{t}.png" for t in TASKS]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    readme = (out / "README.md").read_text()
    assert readme == render_readme(metrics)
    assert "emergence.png" in readme and "strips.png" in readme and "controls.png" in readme
    # the groups page is linked only where `probes groups` has written it beside the probes
    assert "groups.md" not in readme and "[foreground probes over groups of sites](groups.md)" in render_readme(metrics, groups=True)
    fg = metrics["tasks"]["foreground"]
    assert f"`{fg['best_site']}`" in readme
    assert f"## Targets at step {STEPS} of {STEPS}" in readme  # step 5 of 15, read at the last of 3 steps
    targets = readme.split("## Targets")[1].split("\n## ")[0]
    assert targets.count("met**") == len(metrics["targets"])  # each target says met or not met, from the numbers
    assert "guidance 7.5" in readme and "prompt-only" in readme and "same-prompt control" in readme


def test_constructed_labels_are_read_perfectly_at_their_site(run_root, tiny_model):
    """Labels that are a linear function of one site's activations at one step (constant on each
    token's cell) are fit perfectly by that site's probe at that step, and validation picks that
    site. Its test score is then exactly that of the perfect read-out, the bilinear upsampling of
    the linear function: just under 1, since bilinear blends neighbouring cells near their edges
    where the constructed labels step."""
    site, step = "up_blocks.3.attentions.0", 1  # an 8x8 grid, 8 channels
    records = make_records(N, prompts=WORDS)
    g = torch.Generator().manual_seed(1)
    v_depth, v_shade = torch.randn(8, generator=g), torch.randn(8, generator=g)
    table, perfect = {}, {}
    for r in records:
        with capture(tiny_model.unet, [site], steps=[step]) as cap:
            for s in sample(tiny_model, GenerationConfig(r.prompt, seed=r.seed, steps=STEPS)):
                pass
        act = cap.values[(site, step)][0]  # [64, 8]

        def up(x):
            return F.interpolate(x.reshape(1, 1, 8, 8), size=(32, 32), mode="nearest")[0, 0].numpy()

        depth, shading = act @ v_depth, act @ v_shade
        table[r.seed] = {"depth": up(depth), "shading": up(shading), "foreground": up((depth > depth.median()).float())}
        if r.split == "test":
            for task, x in (("depth", depth), ("shading", shading)):
                readout = _bilinear(x.reshape(1, 8, 8), (32, 32))[0].numpy()
                perfect.setdefault(task, []).append(M.spearman(readout, table[r.seed][task]))

    class Linear:
        name, tasks, labels_any_image = "linear-in-activations", TASKS, False

        def __call__(self, images, seeds=None):
            return {t: np.stack([table[s][t] for s in seeds]) for t in TASKS}

    config = _config(run_root / "constructed", permuted=False, adam_keys=(), n_examples=0, figures=False)
    metrics = run(config, labeler=Linear(), model=tiny_model, progress=False)
    for task in ("depth", "shading"):
        t = metrics["tasks"][task]
        assert t["validation_r2"][site][step] > 0.999
        assert t["best_site_per_step"][step] == site
        assert t["probe"][site][step] == pytest.approx(np.mean(perfect[task]), abs=2e-3)
        assert 0.85 < np.mean(perfect[task]) < 0.99
        assert t["baselines"]["labeler_on_x0"] == [None] * STEPS  # a folder-like labeler cannot label previews
    # a thresholded linear function is not itself linear: least squares reads it well, not perfectly
    assert metrics["tasks"]["foreground"]["probe"][site][step] > 0.6


def test_cli_runs_the_paper_reproduction_path_on_the_tiny_model(run_root, tiny_model, monkeypatch):
    """``run --model M --n N --prompts FILE --labeler ...``: the code path of
    ``--model CompVis/stable-diffusion-v1-4 --n 617 --labeler dpt+tracer``, with folder labels."""
    from ldm_scene.training import __main__ as cli

    labels = run_root / "cli-labels"
    for task in ("depth", "foreground"):
        (labels / task).mkdir(parents=True)
    for seed in range(6):
        yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
        np.save(labels / "depth" / f"{seed}.npy", yy / 31 + 0.1 * seed)
        np.save(labels / "foreground" / f"{seed}.npy", ((xx - 16 + seed) ** 2 + (yy - 16) ** 2 < 60).astype(np.float32))
    out = run_root / "cli"
    argv = ["run", "--model", "tiny", "--n", "6", "--steps", "2", "--out", str(out), "--device", "cpu",
            "--prompts", str(run_root / "prompts.txt"), "--no-adam", "--no-progress", "--no-figures",
            "--labeler", f"folder:depth={labels / 'depth'}+folder:foreground={labels / 'foreground'}"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert (config.model, config.n, config.steps, config.adam_keys, config.permuted) == ("tiny", 6, 2, (), True)
    import ldm_scene.training.context as context

    real_load = context.load_model
    monkeypatch.setattr(context, "load_model", lambda name, device=None: tiny_model if name == "tiny" else real_load(name, device))
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"foreground", "depth"}
    assert metrics["labeler"].startswith("folder depth (depth) + folder foreground (foreground)")
    assert (out / "depth.safetensors").exists() and not (out / "shading.safetensors").exists()
    assert ProbeBank.load(out / "depth.safetensors").meta.target_std > 0
    # a rerun finds everything done and reproduces the same metrics
    assert cli.main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    again.pop("timings"), metrics.pop("timings")
    assert again == metrics


def test_label_images_checks_the_labeler(run_root, tiny_model):
    class Bad:
        name, tasks, labels_any_image = "bad", TASKS, True

        def __call__(self, images, seeds=None):
            return {"foreground": np.zeros((1, 32, 32)), "depth": np.zeros((1, 32, 32))}

    ctx = prepare(_config(run_root / "bad", permuted=False), Bad(), tiny_model)
    trace = generate_trace(ctx, ctx.fit_records[0])
    assert trace.image.shape == (32, 32, 3) and trace.acts["mid_block.attentions.0"].shape[0] == STEPS
    with pytest.raises(LabelerError, match="shading"):
        label_images(ctx, trace.image[None], [0])
    labels = {t: v[0] for t, v in LumaLabeler()(trace.image[None]).items()}
    state = new_fit_state(ctx)
    accumulate(ctx, state, trace, labels)
    assert state.n_images == 1
