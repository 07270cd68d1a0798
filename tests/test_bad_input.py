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
from ldm_scene.testing import APP_STEPS as STEPS, png_header, write_probe_dir


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


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
    ("scrub past the end", lambda s, r: s.view_of(r, STEPS), f"there is no step {STEPS + 1}: this run has steps 1 to {STEPS}"),
    ("scrub to NaN", lambda s, r: s.view_of(r, float("nan")), "step must be a whole number, got nan"),
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


# -- probe files that used to crash the loader or load silently ------------------------------------

def _deep_metadata(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"ldm_scene": "[" * 100_000 + "]" * 100_000})


def _nan_weight(path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("task, writer, message", [
    ("depth", _deep_metadata, "nested too deeply"),
    ("depth", _nan_weight, r"tensor '.*' has 1 non-finite value"),
    ("shading", _nan_weight, r"tensor '.*' has 1 non-finite value"),
], ids=["deeply-nested-metadata", "nan-depth-weight", "nan-shading-weight"])
def test_service_load_survives_hostile_probe_files(tiny_model, tmp_path, task, writer, message):
    """Service.load is documented never to raise: a RecursionError from a probe file's metadata
    used to escape it (and the app exited at start-up); NaN weights loaded silently."""
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path / "p")
    writer(folder / f"{task}.safetensors")
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    status = svc.status_markdown()
    assert svc.ready and task not in svc.banks and "foreground" in svc.banks, status
    assert f"{task}.safetensors" in status and re.search(message, status), status


def test_service_load_survives_a_deeply_nested_metrics_file(tiny_model, tmp_path):
    from ldm_scene.ui.service import Service

    folder = write_probe_dir(tiny_model, tmp_path / "p")
    (folder / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    svc = Service.load("tiny", folder, device="cpu", classifier=False)
    assert svc.ready and set(svc.banks) == {"foreground", "depth", "shading"}
    assert "metrics.json" in svc.status_markdown() and "nested too deeply" in svc.status_markdown()


# -- masks as the hint describes them, and uploads too large to decode -----------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
def test_white_on_black_masks_mean_white_is_the_object(service, mode):
    """An opaque mask (greyscale, RGB, RGBA or LA with no transparency) is read by brightness; its
    alpha, all opaque, says nothing. (It used to be read by alpha: "covers the whole image".)"""
    arr = np.zeros((64, 64), np.uint8)
    arr[8:24, 32:56] = 255
    layer = np.asarray(Image.fromarray(arr).convert(mode))
    mask = service.drawn_target([layer])
    expected = np.zeros((H, W), bool)
    expected[4:12, 16:28] = True
    assert np.array_equal(mask, expected)


def test_strokes_on_a_transparent_layer_are_still_read_by_alpha(service):
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[8:24, 32:56] = (255, 32, 32, 255)  # the editor's red brush
    mask = service.drawn_target([layer])
    assert mask[4:12, 16:28].all() and mask.sum() == 8 * 12


def test_a_huge_layer_is_refused_by_size(service):
    layer = np.zeros((4097, 8, 4), np.uint8)
    with pytest.raises(ValueError, match="8x4097 px; the largest accepted is 4096 px a side"):
        service.drawn_target([layer])


def test_uploads_are_checked_from_the_header_before_decoding(tmp_path):

    from ldm_scene.ui.inputs import InputError, open_image

    # Header-only files: decoding them would fail as "truncated"; the size message proves the
    # size was checked first, without decoding (an 8000x8000 RGBA canvas is 256 MB).
    with pytest.raises(InputError, match="the drawing is 8000x8000 px; the largest accepted is 4096 px a side"):
        open_image(png_header(8000, 8000), "drawing")
    with pytest.raises(InputError, match="13000x13000 px"):
        open_image(png_header(13_000, 13_000), "drawing")
    with pytest.raises(InputError, match="declares more pixels than an image may have"):
        open_image(png_header(20_000, 20_000), "drawing")
    with pytest.raises(InputError, match="not an image"):
        open_image(b"%PDF-1.4 not an image", "drawing")
    with pytest.raises(InputError, match="damaged or cut short"):
        open_image(png_header(64, 64), "drawing")
    good = tmp_path / "ok.png"
    Image.new("RGBA", (300, 200)).save(good)
    with open_image(good, "drawing") as image:
        assert image.size == (300, 200)
