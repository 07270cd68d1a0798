"""``python -m ldm_scene generate``, run in-process through ``main()`` (a subprocess would pay ~10 s
of diffusers import per call); the ``__main__`` guard itself is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm_scene.__main__ import build_parser, main
from ldm_scene.sampler import GenerationConfig, generate


def _generate_args(out, *extra, prompt="a red cat on the left"):
    return ["generate", "--model", "tiny", "--device", "cpu", "--prompt", prompt, "--seed", "1", "--steps", "4",
            "--out", str(out), *extra]


def test_generate_writes_image_previews_and_summary(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert main(_generate_args(out)) == 0
    assert "wrote" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in ("model", "prompt", "seed", "steps", "guidance", "scheduler", "image_size", "image")} == {
        "model": "tiny", "prompt": "a red cat on the left", "seed": 1, "steps": 4, "guidance": 7.5,
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
    want = generate(tiny_model, GenerationConfig("a red cat on the left", seed=1, steps=4), previews=True)
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
    assert (args.model, args.seed, args.steps, args.guidance) == ("toy", 0, 15, 7.5)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["generate", "--prompt", "x"])  # --out is required
    assert info.value.code == 2
