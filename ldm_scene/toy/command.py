"""``ldm-scene toy train|report|...`` (alias ``python -m ldm_scene.toy``): build the toy world from nothing,
and measure it. Parsed by :mod:`ldm_scene.cli`; this module has the options and the run."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .train import STAGES, TrainPlan, train_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``toy`` command's options: its subcommands."""
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="render data, train the autoencoder, fine-tune its decoder, train labelers, classifier and UNet, then report")
    tr.add_argument("--out", default="weights/toy-scenes")
    tr.add_argument("--work", default="runs/toy-train", help="caches and checkpoints (resumable)")
    tr.add_argument("--quick", action="store_true", help="a tiny plan to check the pipeline end to end")
    tr.add_argument("--no-report", action="store_true")
    tr.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    tr.add_argument("--unet-init", default=None, help="a model directory whose UNet and text encoder the UNet stage starts from")
    tr.add_argument("--labelers-init", default=None, help="a labelers/ directory whose nets the labelers stage starts from")
    for f in fields(TrainPlan):
        if f.type in ("int", "float", "str"):
            tr.add_argument(f"--{f.name.replace('_', '-')}", type={"int": int, "float": float, "str": str}[f.type], default=None)
    rp = sub.add_parser("report", help="measure a trained toy model and write REPORT.md / report.json")
    rp.add_argument("--out", default="weights/toy-scenes")
    rp.add_argument("--work", default="runs/toy-train")
    rp.add_argument("--n", type=int, default=200, help="fresh seeds to generate")
    iv = sub.add_parser("intervene-eval", help="intervention trials per method on the toy model")
    iv.add_argument("--model", default="weights/toy-scenes")
    iv.add_argument("--n", type=int, default=100)
    iv.add_argument("--out", default=None, help="default: <model>/intervention")
    iv.add_argument("--scheduler", choices=("model", "lms"), default="model",
                    help="the model's own scheduler, or the paper's LMS for every generation of the trials")
    iv.add_argument("--methods", default=None, help="comma list (default: every method with its random control)")
    iv.add_argument("--fresh", action="store_true", help="start over instead of resuming the trials in --out")
    iv.add_argument("--keep-background", action=argparse.BooleanOptionalAction, default=True,
                    help="every method keeps the unedited run's latents outside the old mask and the target "
                         "and pastes the unedited image back there")
    sw = sub.add_parser("intervene-sweep", help="each method's success per (sites, steps, gain) on seeds apart from the evaluation's")
    sw.add_argument("--model", default="weights/toy-scenes")
    sw.add_argument("--n", type=int, default=24)
    sw.add_argument("--out", default=None, help="default: <model>/intervention")
    sw.add_argument("--keep-background", action=argparse.BooleanOptionalAction, default=True,
                    help="every edit keeps the unedited run's latents outside the old mask and the target")
    at = sub.add_parser("atlas", help="decodability versus causality: probe Dice and an edit's effect per (site, step window)")
    at.add_argument("--model", default="weights/toy-scenes")
    at.add_argument("--n", type=int, default=8, help="trials (each edited at every site and window, and its control)")
    at.add_argument("--out", default=None, help="default: <model>/intervention")
    gs = sub.add_parser("guidance-sweep", help="prompt-following per guidance scale on seeds apart from the report's")
    gs.add_argument("--model", default="weights/toy-scenes")
    gs.add_argument("--n", type=int, default=200)
    gs.add_argument("--out", default=None, help="default: the model directory")
    gs.add_argument("--apply", action="store_true", help="write the pick into the model's ldm_scene.json")


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``toy`` subcommand."""
    if args.command == "guidance-sweep":
        from .report import GUIDANCE_GRID, guidance_sweep

        guidance_sweep(Path(args.model), args.n, GUIDANCE_GRID, Path(args.out) if args.out else None, apply=args.apply)
        return 0

    if args.command == "atlas":
        from .atlas import run_atlas

        run_atlas(Path(args.model), args.n, Path(args.out) if args.out else Path(args.model) / "intervention")
        return 0

    if args.command == "intervene-sweep":
        from .intervention_sweep import run_sweep

        run_sweep(Path(args.model), args.n, Path(args.out) if args.out else Path(args.model) / "intervention",
                  keep=args.keep_background)
        return 0

    if args.command == "intervene-eval":
        from .intervention_eval import EVAL_METHODS, run_trials

        out = Path(args.out) if args.out else Path(args.model) / "intervention"
        from diffusers import LMSDiscreteScheduler

        scheduler = LMSDiscreteScheduler if args.scheduler == "lms" else None
        methods = tuple(args.methods.split(",")) if args.methods else EVAL_METHODS
        print(json.dumps(run_trials(Path(args.model), args.n, out, methods=methods, scheduler=scheduler,
                                    resume=not args.fresh, keep=args.keep_background), indent=2))
        return 0

    if args.command == "train":
        overrides = {f.name: getattr(args, f.name) for f in fields(TrainPlan) if getattr(args, f.name, None) is not None}
        if args.quick:
            overrides = dict(n_train=500, n_heldout=100, ae_steps=20, decoder_steps=10, labeler_steps=10, classifier_steps=10,
                             unet_steps=20, checkpoint_every=10) | overrides
        plan = TrainPlan(**overrides)
        timings = train_all(Path(args.out), Path(args.work), plan, tuple(args.stages.split(",")),
                            unet_init=Path(args.unet_init) if args.unet_init else None,
                            labelers_init=Path(args.labelers_init) if args.labelers_init else None)
        print(json.dumps(timings, indent=2))
        if args.no_report:
            return 0
        args.n = 20 if args.quick else 200
    from .report import write_report

    write_report(Path(args.out), Path(args.work), n_samples=args.n)
    return 0

