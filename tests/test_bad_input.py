"""The bad-input table, end to end through the service the app calls: every bad request gets a
clear message, and none of them corrupts anything: after the whole table, with no hook left and
the lock free, the same generation and intervention reproduce their earlier results exactly.

Probe-file refusals (truncated, wrong shape, wrong model, wrong metadata version, pickle) are
checked in detail in test_probes.py; here each is loaded by the service, which must keep going
with the good files and say which file it refused and why.
"""
from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.capture import attached_hooks

from test_service import STEPS, ColourClassifier, write_probe_dir


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    from ldm_scene.ui.service import Service

    svc = Service.load("tiny", write_probe_dir(tiny_model, tmp_path_factory.mktemp("probes")), device="cpu",
                       classifier=ColourClassifier())
    svc.model = tiny_model
    return svc


def _generate(service, **kw):
    args = dict(prompt="a red cube", seed=3, steps=STEPS, guidance=7.5) | kw
    return list(service.generate_stream(**args))[-1].run


def _reference(service, run):
    target = service.shift_target(run, 8, 0)
    last = list(service.intervene_stream(run, target, "steer"))[-1]
    return np.asarray(run.image), np.asarray(last.comparison.result), last.comparison.iou_target


H, W = 32, 32  # the tiny model's image size, checked in the fixture below


@pytest.fixture(scope="module")
def run(service, tiny_model):
    assert tuple(tiny_model.image_size) == (H, W)
    return _generate(service)


def _mask(fill=None, shape=(H, W), dtype=bool):
    m = np.zeros(shape, dtype)
    if fill == "all":
        m[...] = 1
    elif fill == "box":
        m[4:12, 4:12] = 1
    return m


BAD_REQUESTS = [
    # prompts
    ("empty prompt", lambda s, r: next(s.generate_stream("", 0, STEPS)), "prompt is empty"),
    ("whitespace prompt", lambda s, r: next(s.generate_stream(" \n\t ", 0, STEPS)), "prompt is empty"),
    ("overlong prompt", lambda s, r: next(s.generate_stream("red " * 200, 0, STEPS)), "prompt is too long"),
    ("number as prompt", lambda s, r: next(s.generate_stream(42, 0, STEPS)), "prompt must be text"),
    ("list as prompt", lambda s, r: next(s.generate_stream(["a cube"], 0, STEPS)), "prompt must be text"),
    ("bytes as prompt", lambda s, r: next(s.generate_stream(b"a cube", 0, STEPS)), "prompt must be text"),
    # seed, steps, guidance
    ("negative seed", lambda s, r: next(s.generate_stream("a cube", -1, STEPS)), "seed must be between"),
    ("huge seed", lambda s, r: next(s.generate_stream("a cube", 2**80, STEPS)), "seed must be between"),
    ("fractional seed", lambda s, r: next(s.generate_stream("a cube", 0.5, STEPS)), "seed must be a whole number"),
    ("text seed", lambda s, r: next(s.generate_stream("a cube", "seven", STEPS)), "seed must be a whole number"),
    ("zero steps", lambda s, r: next(s.generate_stream("a cube", 0, 0)), "steps must be between 1 and"),
    ("too many steps", lambda s, r: next(s.generate_stream("a cube", 0, 10_000)), "steps must be between 1 and"),
    ("text steps", lambda s, r: next(s.generate_stream("a cube", 0, "four")), "steps must be a whole number"),
    ("negative guidance", lambda s, r: next(s.generate_stream("a cube", 0, STEPS, -2)), "guidance must be between 0 and 30"),
    ("huge guidance", lambda s, r: next(s.generate_stream("a cube", 0, STEPS, 1e9)), "guidance must be between 0 and 30"),
    ("nan guidance", lambda s, r: next(s.generate_stream("a cube", 0, STEPS, float("nan"))), "guidance must be between"),
    ("text guidance", lambda s, r: next(s.generate_stream("a cube", 0, STEPS, "high")), "guidance must be a number"),
    # scrubbing
    ("scrub past the end", lambda s, r: s.view_of(r, STEPS), "step must be between 0 and"),
    ("scrub before a run", lambda s, r: s.view_of(None, 0), "generate an image first"),
    # masks, drawn
    ("no drawing", lambda s, r: s.drawn_target([]), "the mask is empty"),
    ("blank drawing", lambda s, r: s.drawn_target([np.zeros((H, W, 4), np.uint8)]), "the mask is empty"),
    ("all-white drawing", lambda s, r: s.drawn_target([np.full((H, W, 4), 255, np.uint8)]), "covers the whole image"),
    ("drawing is text", lambda s, r: s.drawn_target(["not an image"]), "expected an image|not an image|dtype"),
    ("drawing is 1-D", lambda s, r: s.drawn_target([np.ones(10, np.uint8)]), "expected an image|must be 2-D"),
    ("drawing layers differ in size", lambda s, r: s.drawn_target(
        [np.full((H, W, 4), 255, np.uint8), np.zeros((H + 1, W, 4), np.uint8)]), "differ in size"),
    # masks, handed to the intervention directly
    ("empty target", lambda s, r: next(s.intervene_stream(r, _mask())), "empty|nothing"),
    ("full target", lambda s, r: next(s.intervene_stream(r, _mask("all"))), "whole image|covers"),
    ("wrong-size target", lambda s, r: next(s.intervene_stream(r, _mask("box", (16, 16)))), "bool mask of"),
    ("wrong-dtype target", lambda s, r: next(s.intervene_stream(r, _mask("box", dtype=np.float32))), "bool mask of"),
    ("target not an array", lambda s, r: next(s.intervene_stream(r, "left half")), "bool mask of"),
    # shifting
    ("shift too far", lambda s, r: s.shift_target(r, 10_000, 0), "too far"),
    ("shift not a number", lambda s, r: s.shift_target(r, "left", 0), "dx must be a whole number"),
    ("intervene before generating", lambda s, r: next(s.intervene_stream(None, _mask("box"))), "generate an image first"),
    ("unknown method", lambda s, r: next(s.intervene_stream(r, _mask("box"), "teleport")), "unknown method"),
    ("strength out of range", lambda s, r: next(s.intervene_stream(r, _mask("box"), "steer", 99)), "strength must be between"),
    ("strength not a number", lambda s, r: next(s.intervene_stream(r, _mask("box"), "steer", "max")), "strength must be a number"),
    # classification
    ("classify before generating", lambda s, r: s.classify(None), "generate an image first"),
]


def test_every_bad_request_is_explained_and_corrupts_nothing(service, run, tiny_model):
    before = _reference(service, run)
    failures = []
    for label, action, message in BAD_REQUESTS:
        try:
            action(service, run)
        except ValueError as err:
            if not re.search(message, str(err)):
                failures.append(f"{label}: message {str(err)!r} does not say {message!r}")
        except Exception as err:  # noqa: BLE001 - anything but a ValueError is a crash
            failures.append(f"{label}: crashed with {type(err).__name__}: {err}")
        else:
            failures.append(f"{label}: accepted")
        if attached_hooks(tiny_model.unet) or service._lock.locked():
            failures.append(f"{label}: left hooks or the lock behind")
    assert not failures, "\n".join(failures)
    again = _generate(service)
    after = _reference(service, again)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


BAD_PROBE_FILES = [
    ("truncated", "depth", lambda p: p.write_bytes(p.read_bytes()[:-64]), "truncated"),
    ("pickle", "depth", lambda p: torch.save({"dense1.weight": torch.zeros(2, 8)}, p), "pickle"),
    ("plain pickle", "shading", lambda p: p.write_bytes(pickle.dumps({"w": [1, 2]})), "pickle"),
    ("empty", "shading", lambda p: p.write_bytes(b""), "empty"),
    ("wrong metadata version", "depth", None, "format_version 99"),
    ("wrong model", "depth", None, "another-model"),
    ("wrong shape", "depth", None, r"has shape"),
]


@pytest.mark.parametrize("label, task, writer, message", BAD_PROBE_FILES, ids=[b[0] for b in BAD_PROBE_FILES])
def test_a_bad_probe_file_is_refused_by_name_and_the_rest_still_work(tiny_model, tmp_path, label, task, writer, message):
    from safetensors.torch import load_file, save_file

    from ldm_scene.ui.service import Service

    folder = tmp_path / "p"
    write_probe_dir(tiny_model, folder)
    path = folder / f"{task}.safetensors"
    if writer is not None:
        writer(path)
    else:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["ldm_scene"])
        tensors = load_file(str(path))
        if label == "wrong metadata version":
            meta["format_version"] = 99
        elif label == "wrong model":
            meta["model_id"] = "another-model"
        else:
            key = next(k for k in tensors if k.endswith(".weight"))
            tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        save_file(tensors, str(path), metadata={"ldm_scene": json.dumps(meta)})
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    status = svc.status_markdown()
    assert svc.ready and task not in svc.banks, status
    assert f"{task}.safetensors" in status and re.search(message, status), status
    assert "foreground" in svc.banks  # the good files still load
    views = list(svc.generate_stream("a red cube", 0, STEPS))
    assert len(views) == STEPS and "foreground" in views[-1].overlays


@pytest.mark.parametrize("where, message", [
    ("missing", "does not exist|no such"),
    ("empty-dir", "model_index.json"),
    ("a-file", "not a folder|not a directory|model_index.json|does not exist"),
])
def test_a_model_path_that_is_not_a_model_is_explained(tmp_path, where, message):
    from ldm_scene.ui.service import Service

    path = tmp_path / where
    if where == "empty-dir":
        path.mkdir()
    elif where == "a-file":
        path.write_text("not a model")
    svc = Service.load(str(path), device="cpu")
    assert not svc.ready
    assert re.search(message, svc.status_markdown()), svc.status_markdown()
    with pytest.raises(ValueError, match="no model is loaded"):
        next(svc.generate_stream("a red cube", 0, STEPS))


def test_pil_mask_and_odd_sized_drawings_are_accepted(service):
    """Not bad input: any canvas size and PIL images are resized to the model's grid."""
    big = np.zeros((300, 500, 4), np.uint8)
    big[:150, :250, 3] = 255
    mask = service.drawn_target([Image.fromarray(big)])
    assert mask.shape == (H, W) and mask[: H // 2, : W // 2].all() and not mask[H // 2 :, :].any()
