"""The command line: ``ldm-scene <command> ...`` (also ``python -m ldm_scene <command> ...``).

Commands:

- ``generate``: generate an image and save every step's x0 preview and a JSON summary;
- ``intervene``: move the object by editing activations towards a target mask;
- ``probes`` (alias ``training``) ``run``: fit, evaluate and report probes for every (task, site, step); ``groups``: foreground probes over groups of sites read together;
- ``classify``: classifier confidence per step over many runs;
- ``toy``: build the toy world from nothing (``train``), measure it (``report``, ``intervene-eval``,
  ``intervene-sweep``, ``guidance-sweep``).

This is the only module that builds an ``argparse`` parser. Each command's options and run live
beside the code they drive (``add_arguments(parser)`` and ``run(args)`` in
:mod:`ldm_scene.training.command`, :mod:`ldm_scene.classify.command`, :mod:`ldm_scene.toy.command`);
``python -m ldm_scene.training``, ``python -m ldm_scene.classify`` and ``python -m ldm_scene.toy``
are aliases that parse one command with the same options.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

__all__ = ["COMMANDS", "build_parser", "command_parser", "main"]

_GUIDANCE_HELP = "default: the model's own (7.5 unless its ldm_scene.json says)"
_LATE_HELP = ("cap on guidance from the model's late_from of the steps on (default: the model's; "
              "equal to --guidance for a constant scale)")


# --- generate and intervene -------------------------------------------------------------------

def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", default="toy", help="Hub id, local model directory, 'toy' or 'tiny'")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=15)
    gen.add_argument("--guidance", type=float, default=None, help=_GUIDANCE_HELP)
    gen.add_argument("--late-guidance", type=float, default=None, help=_LATE_HELP)
    gen.add_argument("--device", default=None)
    gen.add_argument("--out", required=True)


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

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


def _intervene_arguments(iv: argparse.ArgumentParser) -> None:
    iv.add_argument("--model", default="toy")
    iv.add_argument("--prompt", required=True)
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--steps", type=int, default=15)
    iv.add_argument("--guidance", type=float, default=None, help=_GUIDANCE_HELP)
    iv.add_argument("--late-guidance", type=float, default=None, help=_LATE_HELP)
    group = iv.add_mutually_exclusive_group(required=True)
    group.add_argument("--dx", type=int, help="shift the current foreground right by DX pixels (with --dy)")
    group.add_argument("--mask", help="a target mask image (white = foreground), any size")
    iv.add_argument("--dy", type=int, default=0)
    iv.add_argument("--method", default=None,
                    help="latent-move, readout-guidance, steer, probe-gradient (the paper's), or a random-direction "
                         "control (random-move, random-guidance, random-control); default: the first of these that "
                         "the model's probe folder supports")
    iv.add_argument("--probes", default=None, help="probe directory (default: the model's probes/)")
    iv.add_argument("--keep-background", action=argparse.BooleanOptionalAction, default=True,
                    help="hold the unedited run's latents outside the object's old place and its target "
                         "(blended latent diffusion) and paste the unedited image back there on the result (default on)")
    iv.add_argument("--device", default=None)
    iv.add_argument("--out", required=True)


def _intervene(args: argparse.Namespace) -> int:
    from .intervention import run_cli

    return run_cli(args)


# --- the command table ------------------------------------------------------------------------

class Command(NamedTuple):
    """One command: where its ``add_arguments``/``run`` live (a module path, or this module's functions),
    its help, aliases, and whether a model or input error exits 2 with its message (no traceback)."""

    help: str
    module: str | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    aliases: tuple[str, ...] = ()
    description: str | None = None
    reports_errors: bool = False

    def functions(self) -> tuple[Callable, Callable, Callable | None]:
        if self.module is None:
            return self.add_arguments, self.run, None
        mod = importlib.import_module(self.module)
        return mod.add_arguments, mod.run, getattr(mod, "check_args", None)


COMMANDS: dict[str, Command] = {
    "generate": Command("generate an image and save every step's x0 preview",
                        add_arguments=_generate_arguments, run=_generate, reports_errors=True),
    "intervene": Command("move the object by editing activations towards a target mask",
                         add_arguments=_intervene_arguments, run=_intervene, reports_errors=True),
    "probes": Command("fit, evaluate and report probes for every (task, site, step)", "ldm_scene.training.command",
                      aliases=("training",), description="ldm_scene.training.command"),
    "classify": Command("classifier confidence per step over many runs", "ldm_scene.classify.command",
                        description="ldm_scene.classify.command"),
    "toy": Command("build the toy world from nothing, and measure it", "ldm_scene.toy.command",
                   description="ldm_scene.toy.command"),
}


def _description(command: Command) -> str | None:
    if command.description is None:
        return None
    mod = importlib.import_module(command.description)
    return getattr(mod, "DESCRIPTION", mod.__doc__)


def _formatter(command: Command) -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter if command.module == "ldm_scene.training.command" else argparse.HelpFormatter


def build_parser(prog: str = "ldm-scene", only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (``ldm-scene --help`` lists them).

    With ``only`` (a command name), only that command gets its options: the others' modules are
    not imported (the toy command's pulls in diffusers, seconds on a small machine).
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cli_command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        full = only is None or only == name
        p = sub.add_parser(name, help=command.help, aliases=list(command.aliases),
                           description=_description(command) if full else None,
                           formatter_class=_formatter(command))
        if full:
            command.functions()[0](p)
        p.set_defaults(cli_command=name)
    return parser


def _command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is not an option), or None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        if word == name or word in command.aliases:
            return name
    return None


def command_parser(name: str, prog: str) -> argparse.ArgumentParser:
    """One command's parser on its own, for an alias such as ``python -m ldm_scene.training``."""
    command = COMMANDS[name]
    add_arguments, _, _ = command.functions()
    parser = argparse.ArgumentParser(prog=prog, description=_description(command), formatter_class=_formatter(command))
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit status.

    With ``command``, ``argv`` holds only that command's options (an alias's command line).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is None:
        parser = build_parser(prog or "ldm-scene", only=_command_named(argv) or "")
        args = parser.parse_args(argv)
        name = args.cli_command
    else:
        parser = command_parser(command, prog or f"ldm-scene {command}")
        args = parser.parse_args(argv)
        name = command
    spec = COMMANDS[name]
    _, run, check = spec.functions()
    if check is not None:
        problem = check(args)
        if problem:
            parser.error(problem)
    if not spec.reports_errors:
        return run(args)
    from .models import ModelLoadError
    from .sampler import GenerationError

    try:
        return run(args)
    except (GenerationError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
