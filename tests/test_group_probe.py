"""The foreground probe over a group of sites read together: file, readout, reader, app.

A :class:`GroupProbe` must reproduce the fit that made it (the analysis's test Dice, after a save
and a load), read during sampling exactly what it reads offline, refuse files that do not fit with
a message naming the file, and be the app's default foreground readout where one ships.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_scene import metrics
from ldm_scene.capture import capture
from ldm_scene.probes import GROUP_FILE, GroupProbe, ProbeError, ProbeMeta, group_tokens
from ldm_scene.readout import ProbeReader
from ldm_scene.sampler import GenerationConfig, sample
from ldm_scene.sites import SITE_KEYS, UP_SITE_KEYS
from ldm_scene.testing import APP_STEPS, ColourClassifier, random_group_probe, write_probe_dir
from ldm_scene.training.site_groups import SHIPPED_GROUP, analyse

from test_site_groups import _images

FINE, COARSE = "up_blocks.3.attentions.0", "up_blocks.1.attentions.0"


def _named(images):
    """The synthetic images of test_site_groups with real site names: ``cells`` (8x8, the layout) as
    a fine site, ``noise`` (4x4) as a coarse one."""
    for im in images:
        im.acts = {k: {FINE: a["cells"], COARSE: a["noise"]} for k, a in im.acts.items()}
    return images


def _probe_from_fits(fits, name, steps, image_size):
    meta = ProbeMeta("foreground", "synthetic", image_size, "LMSDiscreteScheduler", max(steps) + 1,
                     {FINE: (4, 8, 8), COARSE: (4, 4, 4)},
                     training={"group": [COARSE, FINE], "thresholds": {str(k): fits[(name, k)][2] for k in steps}})
    return GroupProbe(meta, {k: fits[(name, k)][0] for k in steps}, {k: fits[(name, k)][1] for k in steps})


def test_a_saved_group_probe_reproduces_the_fits_test_dice(tmp_path):
    images = _named(_images(100, steps=(0, 1)))
    fits = {}
    name = "both"
    result = analyse(images, (0, 1), {name: (COARSE, FINE)}, resamples=50, fits=fits)
    path = _probe_from_fits(fits, name, (0, 1), (32, 32)).save(tmp_path / GROUP_FILE)
    probe = GroupProbe.load(path, expect_image_size=32, expect_num_steps=2)
    assert probe.sites == (COARSE, FINE) and probe.channels == 8 and probe.steps == (0, 1)
    test = [im for im in images if im.split == "test"]
    for k in (0, 1):
        got = [metrics.dice_rows((probe.readout(k, {s: a[None] for s, a in im.acts[k].items()})[0] > 0.5)[None],
                                 im.mask)[0] for im in test]
        # the same Dice as the analysis scored on these test images, to float rounding
        assert np.mean(got) == pytest.approx(result["per_step"][str(k)]["groups"][name]["dice"], abs=1e-9)
        assert np.mean(got) > 0.8  # and the layout is there to read: the fit is not vacuous


def test_group_tokens_upsample_coarse_sites_and_keep_the_order():
    gen = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(2, 16, 3, generator=gen), torch.randn(2, 4, 5, generator=gen)
    x, grid = group_tokens({"f": fine, "c": coarse}, ("c", "f"))
    assert grid == (4, 4) and x.shape == (2, 16, 8)
    torch.testing.assert_close(x[:, :, 5:], fine)
    up = F.interpolate(coarse.transpose(1, 2).reshape(2, 5, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, :, :5], up.reshape(2, 5, 16).transpose(1, 2))
    with pytest.raises(ProbeError, match="no activation"):
        group_tokens({"f": fine}, ("c", "f"))


def test_the_fraction_site_by_site_equals_the_concatenated_tokens_map(tiny_model):
    probe = random_group_probe(tiny_model, steps=1, seed=3)
    gen = torch.Generator().manual_seed(4)
    acts = {s.key: torch.randn(2, s.tokens, s.channels, generator=gen) for s in tiny_model.sites()}
    x, grid = group_tokens(acts, probe.sites)
    want = (x @ probe.weights[0].T + probe.biases[0]).reshape(2, *grid)
    torch.testing.assert_close(probe.fraction(0, acts), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ProbeError, match="expects"):
        probe.fraction(0, {**acts, probe.sites[0]: acts[probe.sites[0]][:, :, :-1]})


def test_readout_is_thresholded_at_one_half(tiny_model):
    probe = random_group_probe(tiny_model, steps=2)
    acts = {s.key: torch.randn(1, s.tokens, s.channels, generator=torch.Generator().manual_seed(1)) for s in tiny_model.sites()}
    for k in (0, 1):
        z = F.interpolate(probe.fraction(k, acts)[:, None], size=tiny_model.image_size, mode="bilinear",
                          align_corners=False)[:, 0]
        p = probe.readout(k, acts)
        assert p.shape == (1, *tiny_model.image_size) and float(p.min()) >= 0 and float(p.max()) <= 1
        assert torch.equal(p > 0.5, z > probe.thresholds[k])  # the fitted mask, exactly
        assert 0 < float((p > 0.5).float().mean()) < 1  # both sides occur, so the check above means something


def test_the_reader_during_sampling_equals_the_offline_readout(tiny_model):
    steps = 3
    probe = random_group_probe(tiny_model, steps=steps, seed=2)
    config = GenerationConfig("a red cube", seed=5, steps=steps)
    reader = ProbeReader({}, {"foreground": probe})
    assert set(reader.sites) == set(UP_SITE_KEYS) and set(reader.steps) == set(range(steps))
    with capture(tiny_model.unet, SITE_KEYS) as cap:
        states = list(sample(tiny_model, config, readers=[reader], decode_final=False))
    for state in states:
        got = state.readouts["probes"]["foreground"]
        acts = {s: cap.values[(s, state.step)][:1] for s in probe.sites}
        want = probe.readout(state.step, acts)[0].numpy()
        assert got.shape == tiny_model.image_size
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_a_short_plain_name_from_the_file_reaches_the_page(tiny_model):
    probe = random_group_probe(tiny_model, steps=1)
    assert _with_training(probe, name="up blocks (9 sites)").name == "up blocks (9 sites) read together"
    for name in ("<img src=x onerror=alert(1)>", "[link](http://x)", "x" * 61, "", 7):
        assert _with_training(probe, name=name).name == f"{len(UP_SITE_KEYS)} sites read together"


def test_a_group_reads_the_foreground_only(tiny_model):
    probe = random_group_probe(tiny_model, steps=2)
    with pytest.raises(ProbeError, match="reads the foreground"):
        ProbeReader({}, {"depth": probe})


def _save(tmp_path, probe, name=GROUP_FILE):
    return probe.save(tmp_path / name)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated|not a safetensors"),
    ("pickle", "pickle"),
    ("empty", "empty"),
])
def test_a_damaged_file_is_refused_naming_it(tiny_model, tmp_path, damage, message):
    path = _save(tmp_path, random_group_probe(tiny_model, steps=2))
    data = path.read_bytes()
    if damage == "pickle":
        torch.save({"group.step00.weight": torch.zeros(1, 3)}, path)
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    with pytest.raises(ProbeError, match=message) as err:
        GroupProbe.load(path)
    assert GROUP_FILE in str(err.value)


def _rewrite(path, tensors=None, training=None):
    """The file at ``path`` with some tensors or training fields replaced (a hand-edited file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ldm_scene"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    meta["training"].update(training or {})
    save_file(data, str(path), metadata={"ldm_scene": json.dumps(meta)})


@pytest.mark.parametrize("tensors, training, message", [
    ({"group.step00.weight": torch.zeros(1, 7)}, None, "shape"),
    ({"group.step00.weight": torch.full((1, 1), float("nan"))}, None, "non-finite"),
    ({"up_blocks.1.attentions.0.step00.weight": torch.zeros(1, 2)}, None, "group.step"),
    (None, {"thresholds": {"0": 0.5}}, "no threshold"),
    (None, {"group": ["up_blocks.1.attentions.0"]}, "once"),
    (None, {"group": None}, "group's sites"),
])
def test_a_file_that_does_not_add_up_is_refused(tiny_model, tmp_path, tensors, training, message):
    path = _save(tmp_path, random_group_probe(tiny_model, steps=2))
    _rewrite(path, tensors, training)
    with pytest.raises(ProbeError, match=message):
        GroupProbe.load(path)


def test_a_probe_for_another_model_is_refused(tiny_model, tmp_path):
    path = _save(tmp_path, random_group_probe(tiny_model, steps=2))
    with pytest.raises(ProbeError, match="4-step|2-step"):
        GroupProbe.load(path, expect_sites=tiny_model.sites(), expect_num_steps=4)
    with pytest.raises(ProbeError, match="generates"):
        GroupProbe.load(path, expect_image_size=(64, 64))
    sites = [s for s in tiny_model.sites()]
    wider = [type(s)(**{**s.__dict__, "channels": s.channels + 1}) if s.key == UP_SITE_KEYS[0] else s for s in sites]
    with pytest.raises(ProbeError, match="channels"):
        GroupProbe.load(path, expect_sites=wider)


# -- in the app ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def group_service(tiny_model, tmp_path_factory):
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path_factory.mktemp("probes"), group=True)
    svc = Service.load("tiny", folder, device="cpu", classifier=ColourClassifier())
    svc.model = tiny_model
    return svc


def test_the_app_reads_the_foreground_with_the_group_by_default(group_service):
    svc = group_service
    name = svc.group_probe.name
    assert not svc.problems and svc.default_site("foreground") == name
    assert svc.site_choices("foreground")[0] == name and name not in svc.site_choices("depth")
    assert name in svc.status_markdown()
    from ldm_scene.ui.tab_generate import site_note
    assert name in site_note(svc) and "read together" in site_note(svc)
    views = list(svc.generate_stream("a red cube", seed=3, steps=APP_STEPS, guidance=7.5))
    run = views[-1].run
    assert run.sites["foreground"] is svc.group_probe
    assert all(r["foreground"].shape == svc.model.image_size for r in run.readouts)
    assert len(run.emergence["foreground"]) == APP_STEPS
    # the test mean drawn beside this run's curve is the group's own, never a single site's
    assert "foreground" in svc.shipped_emergence() and "foreground" not in svc.shipped_emergence(run)
    from dataclasses import replace
    g = svc.group_probe
    scored = GroupProbe(replace(g.meta, training={**g.meta.training, "test_dice": {"0": 0.5, "2": 0.7, "x": 1}}),
                        g.weights, g.biases)
    run.sites["foreground"] = scored
    metric, curve = svc.shipped_emergence(run)["foreground"]
    assert metric == "dice" and curve[0] == 0.5 and curve[2] == 0.7 and np.isnan(curve[1]) and len(curve) == APP_STEPS
    run.sites["foreground"] = g
    # a single site can still be chosen, and reads its own grid
    views = list(svc.generate_stream("a red cube", seed=3, steps=APP_STEPS, guidance=7.5,
                                     sites={"foreground": UP_SITE_KEYS[0]}))
    assert views[-1].run.readouts[-1]["foreground"].shape == (svc.model.site(UP_SITE_KEYS[0]).height,) * 2


def test_a_group_file_for_another_model_costs_only_itself(tiny_model, tmp_path):
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path / "p")
    random_group_probe(tiny_model, model_id="another-model").save(folder / GROUP_FILE)
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    assert svc.group_probe is None and set(svc.banks) == {"foreground", "depth", "shading"}
    assert any(GROUP_FILE in p and "another-model" in p for p in svc.problems)
    (folder / GROUP_FILE).write_bytes(struct.pack("<Q", 10) + b"{not json")
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    assert svc.group_probe is None and any(GROUP_FILE in p for p in svc.problems)


def _with_training(probe, steps=None, **training):
    from dataclasses import replace

    meta = replace(probe.meta, training={**probe.meta.training, **training})
    keep = probe.steps if steps is None else steps
    return GroupProbe(meta, {k: probe.weights[k] for k in keep}, {k: probe.biases[k] for k in keep})


def test_a_group_that_does_not_match_the_foreground_bank_is_left_out_with_a_note(tiny_model):
    from ldm_scene.testing import random_banks
    from ldm_scene.ui.service import Service

    banks = random_banks(tiny_model)
    banks = {t: b for t, b in banks.items() if t in ("foreground", "depth", "shading")}
    group = random_group_probe(tiny_model)
    assert Service(tiny_model, banks, group_probe=group).group_probe is not None
    cases = {
        "only steps": _with_training(group, steps=(1, 2)),  # a probe for some steps would leave others blank
        "labeler": _with_training(group, labeler="another labeler"),  # left behind when the probes were refit
        "seeds": _with_training(group, seeds={"first": 5, "count": 10}),
        "n train": _with_training(group, n_train=672),  # the same images split otherwise (--train-fraction)
        "foreground.safetensors": group,  # no foreground bank beside it
    }
    for needle, probe in cases.items():
        svc = Service(tiny_model, banks if needle != "foreground.safetensors" else {"depth": banks["depth"]},
                      group_probe=probe)
        assert svc.group_probe is None and any(needle in n and probe.name in n for n in svc.notes), needle
        assert svc.default_site("depth") is not None  # the rest of the probe set still reads


def test_a_reader_with_a_group_and_banks_reads_each_as_it_reads_alone(tiny_model):
    from ldm_scene.testing import random_banks

    steps = 3
    banks = {t: b for t, b in random_banks(tiny_model, steps=steps, seed=1).items() if t in ("depth", "shading")}
    group = random_group_probe(tiny_model, steps=steps, seed=2)
    site = UP_SITE_KEYS[4]
    config = GenerationConfig("a red cube", seed=5, steps=steps)
    reader = ProbeReader(banks, {"foreground": group, "depth": site, "shading": UP_SITE_KEYS[0]})
    with capture(tiny_model.unet, SITE_KEYS) as cap:
        states = list(sample(tiny_model, config, readers=[reader], decode_final=False))
    for state in states:
        got = state.readouts["probes"]
        assert set(got) == {"foreground", "depth", "shading"}
        acts = {s: cap.values[(s, state.step)][:1] for s in group.sites}
        np.testing.assert_allclose(got["foreground"], group.readout(state.step, acts)[0].numpy(), rtol=1e-5, atol=1e-6)
        grid = tiny_model.site(site)
        want = banks["depth"].readout(site, state.step, cap.values[(site, state.step)][:1], (grid.height, grid.width))[0]
        np.testing.assert_allclose(got["depth"], want, rtol=1e-5, atol=1e-5)


def test_the_command_saves_the_probe_only_when_it_analysed_every_step(tiny_model, tmp_path, capsys):
    from dataclasses import replace

    from ldm_scene.training.config import RunConfig
    from ldm_scene.training.site_groups import run

    from test_training import LumaLabeler

    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    config = RunConfig(model="tiny", n=10, out=str(tmp_path / "work"), steps=3, seed=0, device="cpu",
                       prompts=str(tmp_path / "prompts.txt"))
    run(config, (1,), tmp_path / "some", resamples=20, progress=False, labeler=LumaLabeler(), model=tiny_model)
    assert (tmp_path / "some" / "groups.json").is_file() and not (tmp_path / "some" / GROUP_FILE).exists()
    assert "not written" in capsys.readouterr().out
    run(config, None, tmp_path / "none", resamples=20, progress=False, labeler=LumaLabeler(), model=tiny_model,
        groups={"one": (SITE_KEYS[-1],)})  # every step, but without the app's group: no file
    assert not (tmp_path / "none" / GROUP_FILE).exists() and "not written" in capsys.readouterr().out
    run(replace(config, train_fraction=0.6, out=str(tmp_path / "work-split")), None, tmp_path / "split", resamples=20,
        progress=False,
        labeler=LumaLabeler(), model=tiny_model)  # every step and group, but not the banks' split: no file
    assert not (tmp_path / "split" / GROUP_FILE).exists() and "--train-fraction 0.4" in capsys.readouterr().out
    result = run(config, None, tmp_path / "all", resamples=20, progress=False, labeler=LumaLabeler(), model=tiny_model)
    probe = GroupProbe.load(tmp_path / "all" / GROUP_FILE)
    assert probe.steps == (0, 1, 2) and result["shipped"]["file"] == GROUP_FILE
    for k in probe.steps:  # the file holds the fits the page scores
        assert probe.meta.training["test_dice"][str(k)] == result["per_step"][str(k)]["groups"][SHIPPED_GROUP]["dice"]


def test_the_shipped_group_probe_fits_the_toy_model_and_its_report():
    from pathlib import Path

    from ldm_scene.models import load_model

    folder = Path(__file__).resolve().parents[1] / "weights" / "toy-scenes" / "probes"
    model = load_model("toy", device="cpu")
    probe = GroupProbe.load(folder / GROUP_FILE, model.sites(), model.image_size, 15)
    report = json.loads((folder / "groups.json").read_text())
    assert probe.sites == tuple(report["groups"][SHIPPED_GROUP]) and probe.meta.model_id == model.model_id
    assert probe.steps == tuple(report["steps"])
    for k in probe.steps:  # the file is the fit groups.json reports
        row = report["per_step"][str(k)]["groups"][SHIPPED_GROUP]
        assert probe.meta.training["test_dice"][str(k)] == row["dice"] and probe.thresholds[k] == row["threshold"]
