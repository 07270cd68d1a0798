"""``ldm-scene probes run`` (alias ``python -m ldm_scene.training run``): fit, evaluate and report probes
for every (task, site, step). Parsed by :mod:`ldm_scene.cli`; this module has the options and the run.

Examples::

    # the toy world (embedded model, its own labelers and its own guidance schedule from
    # ldm_scene.json), as shipped in weights/toy-scenes/probes
    python -m ldm_scene.training run --model toy --n 600 --out weights/toy-scenes/probes

    # the paper's setting on a GPU machine (needs the Hub for SD v1.4 and DPT, and
    # `pip install transparent-background` for saliency); several GPUs:
    accelerate launch -m ldm_scene.training run --model CompVis/stable-diffusion-v1-4 --n 617 \\
        --prompts prompts.txt --labeler dpt+tracer --out runs/sd14-probes

Guidance: by default the model's own schedule (``ldm_scene.json``: guidance, late_guidance,
late_from; 7.5 throughout without one, the paper's); ``--late-guidance`` equal to ``--guidance``
gives a constant scale. The run is resumable: rerunning the same command continues from ``OUT/work``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from .dataset import Shard

if TYPE_CHECKING:
    import argparse


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed options that argparse cannot check, or None (``groups``: its ``--at``, ``--groups`` and ``--n``)."""
    if getattr(args, "command", None) != "groups":
        return None
    from .site_groups import parse_groups, parse_steps

    if args.n < 5:
        return "--n must be at least 5 (the images split into train, validation and test)"
    if not 0 < args.train_fraction < 1:
        return f"--train-fraction must lie between 0 and 1 (the rest of the images test the probes), got {args.train_fraction}"
    from .config import RunConfig
    from .dataset import split_counts

    counts = split_counts(args.n, args.train_fraction, RunConfig.val_fraction)
    if min(counts) < 1:
        return (f"--n {args.n} with --train-fraction {args.train_fraction} leaves {counts[0]} training, {counts[1]} "
                f"validation and {counts[2]} test images: each part needs at least one")
    try:
        parse_steps(args.at, args.steps)
        parse_groups(args.groups)
    except ValueError as err:
        return str(err)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``probes`` command's options: its ``run`` and ``groups`` subcommands."""
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate, label, fit ridge probes, evaluate with baselines, write figures")
    r.add_argument("--model", required=True, help="Hub id, local model directory, 'toy' or 'tiny'")
    r.add_argument("--n", type=int, required=True, help="number of images (40%% fit the probes, 60%% test them)")
    r.add_argument("--out", required=True, help="output directory (probes, metrics.json, figures; work/ for state)")
    r.add_argument("--steps", type=int, default=15)
    r.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own, from its ldm_scene.json; else 7.5)")
    r.add_argument("--late-guidance", type=float, default=None,
                   help="cap on the guidance from --late-from of the steps on (default: the model's own; "
                        "set it to --guidance for a constant scale)")
    r.add_argument("--late-from", type=float, default=None,
                   help="fraction of the steps from which --late-guidance applies (default: the model's own)")
    r.add_argument("--seed", type=int, default=0, help="first seed; images use seeds SEED..SEED+N-1")
    r.add_argument("--labeler", default=None,
                   help="toy | toy:DIR | dpt | dpt-large | tracer | folder:[TASK=]PATH, joined by '+' "
                        "(default: toy if the model directory has labelers/, else dpt+tracer)")
    r.add_argument("--prompts", default=None, help="text file with one prompt per line (default: toy renderer prompts)")
    r.add_argument("--checkpoint-every", type=int, default=25)
    r.add_argument("--preview-images", type=int, default=None,
                   help="test images that get the labeler-on-x0 baseline (default: all)")
    r.add_argument("--adam-images", type=int, default=128, help="fitting images kept for the Adam vs ridge comparison")
    r.add_argument("--no-adam", action="store_true", help="skip the Adam vs ridge comparison")
    r.add_argument("--no-permuted", action="store_true", help="skip the permuted-UNet control")
    r.add_argument("--no-latent", action="store_true", help="skip the latent-probe baseline")
    r.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    r.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the test images for the margins' 95%% intervals")
    r.add_argument("--device", default=None, help="torch device (default: accelerate's, else cuda if available)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--quick", action="store_true", help="a small run (12 images, short Adam) to check the setup")
    r.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("groups", help="foreground probes over groups of sites read together, beside the single-site "
                                      "probe and the baselines (groups.json, groups.md, groups.png)")
    g.add_argument("--model", required=True, help="Hub id, local model directory, 'toy' or 'tiny'")
    g.add_argument("--n", type=int, required=True, help="number of images (the probe run's N: the same records)")
    g.add_argument("--out", required=True, help="where groups.json, groups.md and groups.png go (e.g. the probe folder)")
    g.add_argument("--work", default="runs/probe-groups", help="scratch folder (the run's fingerprint)")
    g.add_argument("--steps", type=int, default=15)
    g.add_argument("--at", default=None, help="comma list of 1-based steps to analyse (default: every step)")
    g.add_argument("--groups", default=None,
                   help="comma list of site, up2, up, all: the best single site, up_blocks.2's 3 sites, the 9 up-block "
                        "sites (the probe the app reads), every site (default: all four; fewer keep less in memory)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-fraction", type=float, default=0.4,
                   help="share of the images that fit the probes (a fifth of it validates), the rest test them; "
                        "the probe file is written only at the probe run's 0.4, the split its banks were fit on")
    g.add_argument("--bootstrap", type=int, default=1000)
    g.add_argument("--device", default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace):
    """The :class:`~.config.RunConfig` a parsed ``run`` command asks for."""
    from .config import RunConfig

    config = RunConfig(
        model=args.model, n=args.n, out=args.out, steps=args.steps, guidance=args.guidance,
        late_guidance=args.late_guidance, late_from=args.late_from, seed=args.seed, bootstrap_resamples=args.bootstrap,
        labeler=args.labeler, prompts=args.prompts, checkpoint_every=args.checkpoint_every,
        preview_images=args.preview_images, adam_images=args.adam_images,
        adam_keys=() if args.no_adam else None, permuted=not args.no_permuted, latent_baseline=not args.no_latent,
        figures=not args.no_figures, device=args.device,
    )
    if args.quick:
        config = replace(config, n=min(config.n, 12), adam_epochs=3, adam_images=min(config.adam_images, 8),
                         checkpoint_every=min(config.checkpoint_every, 4))
    return config


def _distributed() -> tuple[Shard, Callable[[], None], str | None]:
    """This process's shard, a barrier and device from ``accelerate`` when launched by it; else one plain process."""
    try:
        from accelerate import PartialState
    except ImportError:
        return Shard(), (lambda: None), None
    state = PartialState()
    if state.num_processes == 1:
        return Shard(), (lambda: None), None
    return Shard(state.process_index, state.num_processes), state.wait_for_everyone, str(state.device)


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``run`` command: fit, evaluate and report; print the summary (or the ``groups`` analysis)."""
    import torch

    if args.command == "groups":
        from .site_groups import run_cli

        return run_cli(args)

    from .pipeline import run as run_probes

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    shard, barrier, device = _distributed()
    if device is not None and config.device is None:
        config = replace(config, device=device)
    metrics = run_probes(config, shard=shard, barrier=barrier, progress=not args.no_progress)
    if metrics is not None:
        summary = {
            task: {"best_site": t["best_site"], "final": t["best_per_step"][-1], "first_step_90pct": t["first_step_90pct"]}
            for task, t in metrics["tasks"].items()
        }
        print(json.dumps(summary, indent=1))
        for t in metrics.get("targets", []):
            print(f"target: {t['name']} at step {t['step'] + 1}: {t['value'] if t['value'] is None else round(t['value'], 3)} "
                  f"(>= {t['threshold']:g}: {'met' if t['met'] else 'not met'})")
        print(f"wrote probes, metrics.json, figures and README.md to {config.out}")
    return 0

