"""ProbeBank: application on the token grid, save/load with refusals, and the paper-checkpoint importer."""
from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_scene.probes import (
    CLASS_MEANS,
    DEPTH_MEAN,
    DEPTH_STD,
    PAPER_SITE_NAMES,
    TASKS,
    ProbeBank,
    ProbeError,
    ProbeMeta,
    import_paper_checkpoints,
    load_probe_dir,
    paper_checkpoint_path,
    task_outputs,
)
from ldm_scene.sites import SITE_KEYS, site_table

# A tiny UNet layout with SD v1.4's blocks; a non-square image makes row- vs column-major differ.
TINY_UNET = {
    "block_out_channels": (32, 64, 128, 128),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}
IMAGE = (128, 64)
SITES = site_table(TINY_UNET, IMAGE, 8)
SITE = SITES[0]  # down_blocks.0.attentions.0: 32 channels on a 16x8 grid


def _meta(task="foreground", **kw):
    args = dict(
        task=task,
        model_id="tiny",
        image_size=IMAGE,
        scheduler="LMSDiscreteScheduler",
        num_steps=3,
        sites={s.key: (s.channels, s.height, s.width) for s in SITES},
        training={"method": "ridge", "penalty": 0.01, "n_images": 4, "seeds": [0, 1]},
    )
    if task != "foreground":
        args.update(target_mean=2.0, target_std=0.5)
    args.update(kw)
    return ProbeMeta(**args)


def _bank(task="foreground", with_bias=True):
    k = task_outputs(task)
    g = torch.Generator().manual_seed(0)
    weights, biases = {}, {}
    for s in SITES[:3]:
        for step in (0, 2):
            weights[(s.key, step)] = torch.randn(k, s.channels, generator=g)
            if with_bias:
                biases[(s.key, step)] = torch.randn(k, generator=g)
    return ProbeBank(_meta(task), weights, biases)


def test_logits_shape_and_row_major_grid():
    c, h, w = SITE.channels, SITE.height, SITE.width
    copy_channel = torch.zeros(2, c)
    copy_channel[1, 5] = 1.0  # class-1 logit = channel 5 of each token
    bank = ProbeBank(_meta(), {(SITE.key, 1): copy_channel})
    act = torch.randn(3, h * w, c, dtype=torch.float64, requires_grad=True)
    out = bank.logits(SITE.key, 1, act)
    assert out.shape == (3, 2, h, w) and out.dtype == torch.float64
    # token t sits at row t // w, column t % w
    expected = act[..., 5].reshape(3, h, w)
    torch.testing.assert_close(out[:, 1], expected)
    assert out[0, 1, 2, 3] == act[0, 2 * w + 3, 5]
    out[:, 1].sum().backward()  # differentiable in the activation (used by interventions)
    assert act.grad is not None and act.grad[..., 5].eq(1).all() and act.grad[..., 4].eq(0).all()


def test_logits_refuses_mismatched_activation():
    bank = _bank()
    key, step = SITE.key, 0
    with pytest.raises(ProbeError, match="expects 32 channels, the activation has 31"):
        bank.logits(key, step, torch.zeros(1, SITE.tokens, 31))
    with pytest.raises(ProbeError, match=r"expects a 16x8 grid \(128 tokens\), the activation has 64"):
        bank.logits(key, step, torch.zeros(1, 64, 32))
    with pytest.raises(ProbeError, match="no foreground probe for .* at step 1"):
        bank.logits(key, 1, torch.zeros(1, SITE.tokens, 32))
    with pytest.raises(ProbeError, match=r"must be \[B, T, C\]"):
        bank.logits(key, step, torch.zeros(SITE.tokens, 32))


def test_readout_foreground_and_depth():
    c, h, w = SITE.channels, SITE.height, SITE.width
    weight = torch.zeros(2, c)
    weight[1, 0] = 1.0
    fg = ProbeBank(_meta(), {(SITE.key, 0): weight})
    act = torch.randn(2, h * w, c)
    prob = fg.readout(SITE.key, 0, act.half(), out_size=(4 * h, 4 * w))
    want = torch.sigmoid(act[..., 0].half().float()).reshape(2, h, w).numpy()  # softmax([0, z])[1]
    assert prob.shape == (2, 4 * h, 4 * w) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, want.repeat(4, axis=1).repeat(4, axis=2), rtol=1e-6)

    depth = ProbeBank(_meta("depth"), {(SITE.key, 0): weight[1:]}, {(SITE.key, 0): torch.tensor([0.25])})
    value = depth.readout(SITE.key, 0, act, out_size=(h, w))
    np.testing.assert_allclose(value, ((act[..., 0] + 0.25) * 0.5 + 2.0).reshape(2, h, w).numpy(), rtol=1e-6)


def test_keys_sites_steps_contains():
    bank = _bank()
    assert bank.sites == tuple(s.key for s in SITES[:3])
    assert bank.steps == (0, 2)
    assert len(bank) == 6 and bank.keys()[0] == (SITES[0].key, 0)
    assert (SITES[1].key, 2) in bank and (SITES[1].key, 1) not in bank and "x" not in bank


def test_meta_validation():
    with pytest.raises(ProbeError, match="unknown task"):
        _meta(task="normals")
    with pytest.raises(ProbeError, match="foreground probes output logits"):
        _meta(target_mean=3.0)
    with pytest.raises(ProbeError, match="unknown site"):
        _meta(sites={"down_blocks.9.attentions.0": (1, 1, 1)})
    with pytest.raises(ProbeError, match="JSON-serialisable"):
        _meta(training={"gen": torch.Generator()})
    with pytest.raises(ProbeError, match=r"shape \(2, 31\), expected \[2, 32\]"):
        ProbeBank(_meta(), {(SITE.key, 0): torch.zeros(2, 31)})
    with pytest.raises(ProbeError, match="outside the 3-step schedule"):
        ProbeBank(_meta(), {(SITE.key, 3): torch.zeros(2, 32)})
    meta = _meta("depth")
    assert ProbeMeta.from_json(meta.to_json()) == meta


@pytest.mark.parametrize("task,with_bias", [("foreground", False), ("depth", True)])
def test_save_load_roundtrip_exact(tmp_path, task, with_bias):
    bank = _bank(task, with_bias)
    path = bank.save(tmp_path / "probes" / f"{task}.safetensors")
    back = ProbeBank.load(path, expect_sites=SITES, expect_image_size=IMAGE, expect_num_steps=3)
    assert back.meta == bank.meta
    assert back.keys() == bank.keys()
    for key in bank.keys():
        assert torch.equal(back.weights[key], bank.weights[key])
    assert back.biases.keys() == bank.biases.keys()
    for key in bank.biases:
        assert torch.equal(back.biases[key], bank.biases[key])
    assert not list(tmp_path.glob("probes/*.tmp"))


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _refuse(path, match, **expect):
    # every refusal names the file, then says what is wrong
    with pytest.raises(ProbeError, match=re.escape(str(path)) + ": .*" + match):
        ProbeBank.load(path, **expect)


def test_load_refuses_corrupt_files(tmp_path):
    good = _bank().save(tmp_path / "good.safetensors")
    raw = good.read_bytes()

    pkl = tmp_path / "probe.pth"
    torch.save({"dense1.weight": torch.zeros(2, 32)}, pkl)
    _refuse(pkl, "pickle / torch.save file")
    old_pickle = tmp_path / "old.pkl"
    old_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _refuse(old_pickle, "pickle")

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _refuse(empty, "empty")

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 100])
    _refuse(cut, "truncated")
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(raw[:40])
    _refuse(cut_header, "truncated")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world, not a tensor file at all")
    _refuse(garbage, "not a safetensors file")
    _refuse(tmp_path / "missing.safetensors", "no such file")


def test_load_refuses_bad_metadata_and_tensors(tmp_path):
    weight = {f"{SITE.key}.step00.weight": torch.zeros(2, 32)}
    meta = json.loads(_meta().to_json())

    plain = tmp_path / "plain.safetensors"
    save_file(weight, str(plain))
    _refuse(plain, "no 'ldm_scene' entry")

    bad_json = tmp_path / "bad_json.safetensors"
    save_file(weight, str(bad_json), metadata={"ldm_scene": "{not json"})
    _refuse(bad_json, "not valid JSON")

    v2 = tmp_path / "v2.safetensors"
    save_file(weight, str(v2), metadata={"ldm_scene": json.dumps({**meta, "format_version": 2})})
    _refuse(v2, "format_version 2; this version of ldm_scene reads 1")

    unknown = tmp_path / "unknown.safetensors"
    save_file(weight, str(unknown), metadata={"ldm_scene": json.dumps({**meta, "colour": "red"})})
    _refuse(unknown, r"unknown metadata field\(s\) \['colour'\]")

    lacking = tmp_path / "lacking.safetensors"
    save_file(weight, str(lacking), metadata={"ldm_scene": json.dumps({k: v for k, v in meta.items() if k != "sites"})})
    _refuse(lacking, r"lacks field\(s\) \['sites'\]")

    meta_json = _meta().to_json()
    bad_name = tmp_path / "bad_name.safetensors"
    bad_tensors = {"down_blocks.0.attentions.0.step_a.weight": torch.zeros(2, 32)}
    save_file(bad_tensors, str(bad_name), metadata={"ldm_scene": meta_json})
    _refuse(bad_name, "tensor name 'down_blocks.0.attentions.0.step_a.weight' is not")

    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file({f"{SITE.key}.step00.weight": torch.zeros(1, 32)}, str(bad_shape), metadata={"ldm_scene": meta_json})
    _refuse(bad_shape, r"has shape \(1, 32\), expected \[2, 32\] \(foreground: K=2")

    bad_step = tmp_path / "bad_step.safetensors"
    save_file({f"{SITE.key}.step07.weight": torch.zeros(2, 32)}, str(bad_step), metadata={"ldm_scene": meta_json})
    _refuse(bad_step, "at step 7, outside the 3-step schedule")


def test_deeply_nested_json_is_refused_not_a_crash(tmp_path):
    """Python's json recurses once per nesting level: a hostile file used to raise RecursionError
    out of the loader (and the app exited at start-up). Now it is a refusal that names the file."""
    weight = {f"{SITE.key}.step00.weight": torch.zeros(2, 32)}
    in_metadata = tmp_path / "deep_meta.safetensors"
    save_file(weight, str(in_metadata), metadata={"ldm_scene": "[" * 100_000 + "]" * 100_000})
    _refuse(in_metadata, "nested too deeply")
    in_header = tmp_path / "deep_header.safetensors"
    header = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    in_header.write_bytes(struct.pack("<Q", len(header)) + header)
    _refuse(in_header, "not a safetensors file")


def test_metadata_values_of_the_wrong_kind_are_refused(tmp_path):
    weight = {f"{SITE.key}.step00.weight": torch.zeros(2, 32)}
    meta = json.loads(_meta().to_json())
    for field, value in (("num_steps", "three"), ("target_mean", {"a": 1}), ("sites", {SITE.key: 5})):
        path = tmp_path / f"bad_{field}.safetensors"
        save_file(weight, str(path), metadata={"ldm_scene": json.dumps({**meta, field: value})})
        with pytest.raises(ProbeError, match=re.escape(str(path))):
            ProbeBank.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_non_finite_weights_are_refused_by_file_and_tensor(tmp_path, bad, kind):
    """A NaN or infinite weight made every readout NaN and steering return a black image, silently."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _bank().save(tmp_path / "foreground.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith(f".{kind}"))
    tensors[name].view(-1)[1] = bad
    save_file(tensors, str(path), metadata=metadata)
    _refuse(path, re.escape(f"tensor '{name}' has 1 non-finite value(s) (NaN or infinity)"))


def test_load_refuses_a_model_that_differs(tmp_path):
    path = _bank().save(tmp_path / "foreground.safetensors")
    sd_sites = site_table({**TINY_UNET, "block_out_channels": (320, 640, 1280, 1280)}, IMAGE, 8)
    _refuse(path, "probe for down_blocks.0.attentions.0 expects 32 channels, the model has 320", expect_sites=sd_sites)
    small_sites = site_table(TINY_UNET, (64, 64), 8)
    _refuse(path, "down_blocks.0.attentions.0 expects a 16x8 grid, the model has 8x8", expect_sites=small_sites)
    _refuse(path, "probes were fit at 128x64 images, the model generates 512x512", expect_image_size=512)
    _refuse(path, "fit for a 3-step schedule, the sampler runs 15 steps", expect_num_steps=15)


def test_load_probe_dir(tmp_path):
    _bank("foreground").save(tmp_path / "foreground.safetensors")
    _bank("depth").save(tmp_path / "depth.safetensors")
    (tmp_path / "metrics.json").write_text("{}")
    banks = load_probe_dir(tmp_path, expect_sites=SITES)
    assert sorted(banks) == ["depth", "foreground"] and banks["depth"].meta.task == "depth"
    _bank("depth").save(tmp_path / "shading.safetensors")
    with pytest.raises(ProbeError, match="metadata says task 'depth', the file name says 'shading'"):
        load_probe_dir(tmp_path)
    with pytest.raises(ProbeError, match="does not exist"):
        load_probe_dir(tmp_path / "nope")


def test_load_probe_dir_collects_errors_and_keeps_the_good_files(tmp_path):
    # The app's case: one bad file must not drop the others, and each refusal names its file.
    _bank("foreground").save(tmp_path / "foreground.safetensors")
    _bank("depth").save(tmp_path / "shading.safetensors")  # metadata names another task
    (tmp_path / "depth.safetensors").write_bytes(b"not a safetensors file")
    _bank("foreground").save(tmp_path / f"{CLASS_MEANS}.safetensors")  # class means carry the foreground task
    errors: list[str] = []
    banks = load_probe_dir(tmp_path, expect_sites=SITES, tasks=(*TASKS, CLASS_MEANS), errors=errors)
    assert sorted(banks) == sorted(["foreground", CLASS_MEANS])
    assert len(errors) == 2
    assert any("shading.safetensors" in e and "file name says 'shading'" in e for e in errors)
    assert any("depth.safetensors" in e for e in errors)
    model_id = _bank().meta.model_id
    errors.clear()
    assert load_probe_dir(tmp_path, tasks=("foreground",), expect_model_id="another/model", errors=errors) == {}
    assert errors == [f"{tmp_path / 'foreground.safetensors'}: fit on model {model_id!r}, the loaded model is 'another/model'"]
    with pytest.raises(ProbeError, match="the loaded model is 'another/model'"):
        load_probe_dir(tmp_path, tasks=("foreground",), expect_model_id="another/model")
    scheduler = _bank().meta.scheduler
    assert sorted(load_probe_dir(tmp_path, tasks=("foreground", CLASS_MEANS), expect_scheduler=scheduler)) == ["foreground", CLASS_MEANS]
    with pytest.raises(ProbeError, match=f"sampled with {scheduler}, the loaded model samples with EulerDiscreteScheduler"):
        load_probe_dir(tmp_path, tasks=("foreground",), expect_scheduler="EulerDiscreteScheduler")


def test_class_means_hold_the_foreground_task_and_other_names_are_not_banks(tmp_path):
    """foreground_means: two rows (background, foreground) under task 'foreground', loaded by its file
    name only. A file of another name that an older version left in the folder is never read, and a
    bank whose metadata names a task this version lacks (the retired 'position') is refused."""
    bank = _bank("foreground", with_bias=False)
    bank.save(tmp_path / f"{CLASS_MEANS}.safetensors")
    loaded = load_probe_dir(tmp_path, expect_sites=SITES, tasks=(*TASKS, CLASS_MEANS))
    assert sorted(loaded) == [CLASS_MEANS] and loaded[CLASS_MEANS].meta.outputs == 2
    _bank("depth").save(tmp_path / f"{CLASS_MEANS}.safetensors")
    with pytest.raises(ProbeError, match="metadata says task 'depth', foreground_means.safetensors must hold task 'foreground'"):
        load_probe_dir(tmp_path, tasks=(CLASS_MEANS,))
    with pytest.raises(ProbeError, match="unknown task 'position'"):
        _meta("position")
    with pytest.raises(ProbeError, match="unknown task 'old_means'"):
        load_probe_dir(tmp_path, tasks=("old_means",))
    # an old three-row position bank, metadata and all, left beside the probes
    old = json.loads(bank.meta.to_json()) | {"task": "position"}
    save_file({"mid_block.attentions.0.step00.weight": torch.zeros(3, 8)}, str(tmp_path / "old_means.safetensors"),
              metadata={"ldm_scene": json.dumps(old)})
    (tmp_path / f"{CLASS_MEANS}.safetensors").unlink()
    assert load_probe_dir(tmp_path, expect_sites=SITES, tasks=(*TASKS, CLASS_MEANS)) == {}
    with pytest.raises(ProbeError, match="unknown task 'position'"):
        ProbeBank.load(tmp_path / "old_means.safetensors")


def test_paper_site_names():
    assert PAPER_SITE_NAMES["down_blocks.1.attentions.0"] == "down_1_attn1_out_0"
    assert PAPER_SITE_NAMES["mid_block.attentions.0"] == "mid_0_attn1_out_0"
    assert PAPER_SITE_NAMES["up_blocks.3.attentions.2"] == "up_3_attn1_out_2"
    assert len(set(PAPER_SITE_NAMES.values())) == len(SITE_KEYS) == 16


def _write_paper_release(root: Path, steps=(0, 4)) -> dict:
    """Synthetic files in the paper's layout: probe_checkpoints/large_syn_dataset[_continuous]/at_step_s/."""
    sd = site_table({**TINY_UNET, "block_out_channels": (320, 640, 1280, 1280)}, 512, 8)
    g = torch.Generator().manual_seed(0)
    written = {}
    for step in steps:
        for s in sd:
            fg = paper_checkpoint_path(root / "large_syn_dataset", "foreground", s.key, step)
            fg.parent.mkdir(parents=True, exist_ok=True)
            w = torch.randn(2, s.channels, generator=g)
            torch.save({"dense1.weight": w}, fg)
            written[("foreground", s.key, step)] = w
            depth = root / "large_syn_dataset_continuous" / f"at_step_{step}" / (
                f"regression_probe_{PAPER_SITE_NAMES[s.key]}_linear_no_bias_unsmoothed.pth"
            )
            depth.parent.mkdir(parents=True, exist_ok=True)
            w = torch.randn(1, s.channels, generator=g)
            torch.save({"dense1.weight": w}, depth)
            written[("depth", s.key, step)] = w
    return written


def test_import_paper_checkpoints(tmp_path):
    written = _write_paper_release(tmp_path / "probe_checkpoints")
    fg = import_paper_checkpoints(tmp_path / "probe_checkpoints", "foreground")
    assert fg.steps == (0, 4) and fg.sites == SITE_KEYS and len(fg) == 32 and not fg.biases
    assert fg.meta.sites["down_blocks.0.attentions.0"] == (320, 64, 64)
    assert fg.meta.sites["mid_block.attentions.0"] == (1280, 8, 8)
    assert fg.meta.sites["up_blocks.2.attentions.1"] == (640, 32, 32)
    assert fg.meta.num_steps == 15 and fg.meta.image_size == (512, 512)
    for (task, site, step), w in written.items():
        if task == "foreground":
            assert torch.equal(fg.weights[(site, step)], w)
    depth_root = tmp_path / "probe_checkpoints" / "large_syn_dataset_continuous"
    depth = import_paper_checkpoints(depth_root, "depth", steps=[4])
    assert depth.steps == (4,) and depth.meta.target_mean == DEPTH_MEAN and depth.meta.target_std == DEPTH_STD
    site = "up_blocks.3.attentions.2"
    assert torch.equal(depth.weights[(site, 4)], written[("depth", site, 4)])
    # imported banks survive the project's own format
    again = ProbeBank.load(fg.save(tmp_path / "fg.safetensors"), expect_image_size=512, expect_num_steps=15)
    assert again.keys() == fg.keys()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="no at_step_<s> folders"):
        import_paper_checkpoints(tmp_path / "empty", "foreground")
    # the folder above probe_checkpoints/ is accepted too
    assert import_paper_checkpoints(tmp_path, "foreground", steps=[0]).steps == (0,)
    with pytest.raises(ProbeError, match="not 'shading'"):
        import_paper_checkpoints(tmp_path / "probe_checkpoints", "shading")
    with pytest.raises(ProbeError, match="no depth checkpoints named like regression_probe_down_0_attn1_out_0_final"):
        import_paper_checkpoints(tmp_path / "probe_checkpoints", "depth", suffix="_final")


class _Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_import_refuses_malicious_and_wrong_checkpoints(tmp_path):
    root = tmp_path / "large_syn_dataset"
    path = paper_checkpoint_path(root, "foreground", "up_blocks.1.attentions.0", 0)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"dense1.weight": _Payload(marker)}, path)
    with pytest.raises(ProbeError, match="refused or unreadable as a weights-only checkpoint"):
        import_paper_checkpoints(root, "foreground")
    assert not marker.exists()

    torch.save({"dense1.weight": torch.zeros(2, 640)}, path)  # up_blocks.1 has 1280 channels
    with pytest.raises(ProbeError, match=r"shape \(2, 640\), expected \[2, 1280\]"):
        import_paper_checkpoints(root, "foreground")
    torch.save({"dense1.weight": torch.zeros(640, 1280), "dense2.weight": torch.zeros(2, 640)}, path)
    with pytest.raises(ProbeError, match=r"not a linear probe \(unexpected keys \['dense2.weight'\]\)"):
        import_paper_checkpoints(root, "foreground")
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ProbeError, match="refused or unreadable"):
        import_paper_checkpoints(root, "foreground")
