"""``python -m ldm_scene generate``, run in-process through ``main()`` (a subprocess would pay ~10 s
of diffusers import per call); the ``__main__`` guard itself is one line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ldm_scene.__main__ import build_parser, main
from ldm_scene.sampler import GenerationConfig, generate


def _generate_args(out, *extra, prompt="a red cat"):
    return ["generate", "--model", "tiny", "--device", "cpu", "--prompt", prompt, "--seed", "1", "--steps", "4",
            "--out", str(out), *extra]


def test_generate_writes_image_previews_and_summary(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert main(_generate_args(out)) == 0
    assert "wrote" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in ("model", "prompt", "seed", "steps", "guidance", "scheduler", "image_size", "image")} == {
        "model": "tiny", "prompt": "a red cat", "seed": 1, "steps": 4, "guidance": 7.5,
        "scheduler": "LMSDiscreteScheduler", "image_size": [32, 32], "image": "image.png",
    }
    assert len(summary["timesteps"]) == 4 and summary["timesteps"] == sorted(summary["timesteps"], reverse=True)
    assert summary["timesteps"][0] == pytest.approx(999.0)
    assert summary["previews"] == [f"steps/step{i:02d}_x0.png" for i in range(4)]
    for name in summary["previews"]:
        preview = Image.open(out / name)
        assert preview.size == (32, 32) and preview.mode == "RGB"

    # The saved image is the sampler's image for the same request (PNG is lossless), and a fresh
    # tiny model in the CLI is the same function as the session's.
    image = np.asarray(Image.open(out / "image.png"))
    want = generate(tiny_model, GenerationConfig("a red cat", seed=1, steps=4), previews=True)
    np.testing.assert_array_equal(image, np.asarray(want[-1].image))
    np.testing.assert_array_equal(np.asarray(Image.open(out / summary["previews"][1])), np.asarray(want[1].preview))


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_exits_2_with_a_clear_message(tmp_path, capsys, prompt):
    out = tmp_path / "run"
    assert main(_generate_args(out, prompt=prompt)) == 2
    err = capsys.readouterr().err
    assert "error: prompt is empty: describe the image to generate" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "change, message",
    [
        (["--steps", "0"], "error: steps must be between 1 and 200, got 0"),
        (["--seed", "-3"], "error: seed must be between 0 and"),
        (["--guidance", "nan"], "error: guidance must be between 0 and 30, got nan"),
    ],
)
def test_bad_values_exit_2(tmp_path, capsys, change, message):
    assert main(_generate_args(tmp_path / "run", *change)) == 2
    assert message in capsys.readouterr().err


def test_missing_model_exits_2_with_the_loader_message(tmp_path, capsys):
    args = _generate_args(tmp_path / "run")
    args[args.index("tiny")] = str(tmp_path / "nowhere")
    assert main(args) == 2
    assert "does not exist or is not a directory" in capsys.readouterr().err


def test_parser_defaults_are_the_papers_setting():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "o"])
    # guidance None: the model's own (7.5, the paper's, unless the model directory recommends one)
    assert (args.model, args.seed, args.steps, args.guidance) == ("toy", 0, 15, None)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["generate", "--prompt", "x"])  # --out is required
    assert info.value.code == 2


def _intervene_args(out, *extra):
    return ["intervene", "--model", "toy", "--device", "cpu", "--prompt", "a red cube", "--seed", "1",
            "--dx", "20", "--out", str(out), *extra]  # the default method


def test_intervene_on_the_toy_model_writes_masks_that_agree_with_its_summary(tmp_path, capsys):
    """The README's intervene command, offline on the shipped model and probes: the target is the
    original mask shifted by --dx, and the summary's IoUs are those of the written masks."""
    from ldm_scene import metrics
    from ldm_scene.intervention import translate_mask

    out = tmp_path / "move"
    assert main(_intervene_args(out)) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    masks = {n: np.asarray(Image.open(out / f"{n}_mask.png")) > 127 for n in ("original", "target", "result")}
    assert masks["original"].any() and masks["original"].shape == (64, 64)
    assert np.array_equal(masks["target"], translate_mask(masks["original"], 20, 0))
    assert summary["method"] == "latent-move"
    # the move corrected itself (the shipped labeler on the decoded x0) after step 14 of 15, or found no need
    assert all(c["after_step"] == 14 for c in summary["corrections"]) and len(summary["corrections"]) <= 1
    assert summary["iou_result_target"] == pytest.approx(metrics.iou(masks["result"], masks["target"]))
    assert summary["iou_result_original"] == pytest.approx(metrics.iou(masks["result"], masks["original"]))
    for name in ("original.png", "edited.png", "side_by_side.png"):
        assert Image.open(out / name).size[0] >= 64
    assert not np.array_equal(np.asarray(Image.open(out / "original.png")), np.asarray(Image.open(out / "edited.png")))
    # the background is kept: 16 px (four latent cells) away from both masks the image is the original's,
    # pixel for pixel (the free cells reach at most two cells beyond the masks, the paste-back's ramp one
    # more; without keeping, the whole scene is redrawn: ~15-20 dB)
    import cv2

    from ldm_scene.toy.intervention_eval import background_psnr

    assert summary["keep_background"] is True
    near = cv2.dilate((masks["original"] | masks["target"]).astype(np.uint8), np.ones((33, 33), np.uint8)) > 0
    psnr = background_psnr(np.asarray(Image.open(out / "edited.png")), np.asarray(Image.open(out / "original.png")), near)
    assert psnr == math.inf, psnr


def test_intervene_refuses_probes_fit_under_another_scheduler(tmp_path, capsys):
    from ldm_scene.testing import write_probe_dir

    from ldm_scene.models import load_model

    folder = write_probe_dir(load_model("toy", device="cpu"), tmp_path / "probes", steps=15, scheduler="LMSDiscreteScheduler")
    assert main(_intervene_args(tmp_path / "out", "--probes", str(folder))) == 2
    err = capsys.readouterr().err
    assert "sampled with LMSDiscreteScheduler, the loaded model samples with EulerDiscreteScheduler" in err
    assert not (tmp_path / "out").exists()


def test_one_command_line_and_its_aliases_parse_alike():
    """``ldm-scene <command>`` and the ``python -m ldm_scene.<package>`` aliases share one parser per command."""
    from ldm_scene import cli
    from ldm_scene.training import __main__ as training_alias

    argv = ["run", "--model", "tiny", "--n", "6", "--out", "o", "--no-adam"]
    full = cli.build_parser(only="probes").parse_args(["probes", *argv])
    legacy = cli.build_parser(only="probes").parse_args(["training", *argv])
    alias = training_alias.build_parser().parse_args(argv)
    assert training_alias.config_from_args(full) == training_alias.config_from_args(alias) == training_alias.config_from_args(legacy)
    toy = cli.command_parser("toy", "python -m ldm_scene.toy").parse_args(["report", "--n", "3"])
    assert (toy.command, toy.n) == ("report", 3)
    classify = cli.command_parser("classify", "python -m ldm_scene.classify").parse_args(["--out", "o"])
    assert classify.n == 100 and classify.model == "toy"


def test_classify_refuses_no_runs(capsys):
    from ldm_scene.classify import main

    with pytest.raises(SystemExit) as info:
        main(["--out", "o", "--n", "0"])
    assert info.value.code == 2 and "--n must be at least 1" in capsys.readouterr().err


def test_only_cli_builds_a_parser():
    """No library module parses a command line of its own (STYLE.md): argparse parsers live in cli.py."""
    import ast
    from pathlib import Path

    import ldm_scene

    root = Path(ldm_scene.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if getattr(func, "attr", getattr(func, "id", None)) == "ArgumentParser":
                offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders
