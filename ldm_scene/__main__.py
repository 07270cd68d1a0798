"""Command line: ``python -m ldm_scene generate|intervene ...``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def _generate(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sampler import config_for, sample

    model = load_model(args.model, device=args.device)
    config = config_for(model, args.prompt, args.seed, args.steps, args.guidance, args.late_guidance)
    out = Path(args.out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    summary = {
        "model": model.model_id, "prompt": config.prompt, "seed": config.seed, "steps": config.steps,
        "guidance": config.guidance, "late_guidance": config.late_guidance, "late_from": config.late_from,
        "scheduler": model.scheduler_name,
        "image_size": list(model.image_size), "timesteps": [], "previews": [],
    }
    for state in tqdm(sample(model, config, previews=True), total=config.steps, desc="denoising"):
        name = f"steps/step{state.step:02d}_x0.png"
        state.preview.save(out / name)
        summary["timesteps"].append(state.timestep)
        summary["previews"].append(name)
        if state.image is not None:
            state.image.save(out / "image.png")
    summary["image"] = "image.png"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'image.png'}, {config.steps} previews and summary.json")
    return 0


def _intervene(args: argparse.Namespace) -> int:
    from .intervention import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_scene", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an image and save every step's x0 preview")
    gen.add_argument("--model", default="toy", help="Hub id, local model directory, 'toy' or 'tiny'")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=15)
    gen.add_argument("--guidance", type=float, default=None, help="default: the model's own (7.5 unless its ldm_scene.json says)")
    gen.add_argument("--late-guidance", type=float, default=None,
                     help="cap on guidance from the model's late_from of the steps on (default: the model's; "
                          "equal to --guidance for a constant scale)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=_generate)
    iv = sub.add_parser("intervene", help="move the object by editing activations towards a target mask")
    iv.add_argument("--model", default="toy")
    iv.add_argument("--prompt", required=True)
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--steps", type=int, default=15)
    iv.add_argument("--guidance", type=float, default=None, help="default: the model's own (7.5 unless its ldm_scene.json says)")
    iv.add_argument("--late-guidance", type=float, default=None,
                     help="cap on guidance from the model's late_from of the steps on (default: the model's; "
                          "equal to --guidance for a constant scale)")
    group = iv.add_mutually_exclusive_group(required=True)
    group.add_argument("--dx", type=int, help="shift the current foreground right by DX pixels (with --dy)")
    group.add_argument("--mask", help="a target mask image (white = foreground), any size")
    iv.add_argument("--dy", type=int, default=0)
    iv.add_argument("--method", default=None,
                    help="steer, probe-gradient (the paper's) or random-control (steer along random directions); "
                         "default: the first of these that the model's probe folder supports")
    iv.add_argument("--probes", default=None, help="probe directory (default: the model's probes/)")
    iv.add_argument("--device", default=None)
    iv.add_argument("--out", required=True)
    iv.set_defaults(func=_intervene)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import ModelLoadError
    from .sampler import GenerationError

    try:
        return args.func(args)
    except (GenerationError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
