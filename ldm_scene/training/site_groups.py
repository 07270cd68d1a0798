"""Foreground probes over groups of sites read together: what reading several sites at once adds.

The banks read one site each, as the paper's do. ``ldm-scene probes groups`` fits one ridge
foreground probe per *group* of sites at chosen steps, and saves the :data:`SHIPPED_GROUP`'s as a
:class:`~ldm_scene.probes.GroupProbe` (``foreground_group.safetensors``), which the app reads the
foreground with by default: each site's self-attention output is
resampled (bilinear) to the group's finest grid and the channels are concatenated per token, so the
probe is still linear in the activations. The images, their split, labels and guidance are the
probe run's (the same model, N and seed make the same records); the penalty and the threshold are
chosen on the validation images and Dice is scored on the test images after bilinear upsampling of
the readout, as the probe run scores. Beside each group, measured on the same test images: the
prompt-only baseline (the mean mask of the training images with the same prompt, its threshold
chosen on validation), the labeler on the decoded x0 prediction of that step, and the group's grid
ceiling (the exact mask pooled to the grid and upsampled back); margins carry paired bootstrap
95% intervals over test images.

The images are generated in two passes (training and validation images to fit, then validation
and test images to score), so only one image's activations are held at a time; what stays is each
group's ridge statistics per step and split (``C x C`` float64); of the image, only the chosen groups'
sites are kept. For SD v1.4 at 512 px, N images' activations would be some 23 MB per image and step; the statistics are 0.36 GB per step and split
for the up-block group (C = 6720) and 1.25 GB for the all-sites group (C = 12480), about 49 GB for
the four groups at 15 steps, about 11 GB for ``--groups up`` alone (``--at`` reads fewer steps, and
then writes no probe file).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import metrics
from ..reports import markdown_table
from ..sampler import decode
from ..probes import GROUP_FILE, GroupProbe, ProbeMeta, group_tokens
from ..sites import SITE_KEYS, UP_SITE_KEYS
from .controls import grid_ceiling_scores
from .fit import DEFAULT_PENALTY_GRID, RidgeStats, choose_penalty
from .trace import generate_trace, label_images

if TYPE_CHECKING:
    import argparse

    from .context import RunContext

#: The groups read together, by name: the probe run's best site at step 5 alone, the three 8x8 sites
#: of ``up_blocks.2`` together, every up-block site, every site.
GROUPS: dict[str, tuple[str, ...]] = {
    "up_blocks.2.attentions.1": ("up_blocks.2.attentions.1",),
    "up_blocks.2 (3 sites)": tuple(k for k in SITE_KEYS if k.startswith("up_blocks.2.")),
    f"up blocks ({len(UP_SITE_KEYS)} sites)": UP_SITE_KEYS,
    f"all {len(SITE_KEYS)} sites": SITE_KEYS,
}
#: Short names for :data:`GROUPS` on the command line (``--groups``), in the same order.
GROUP_IDS: dict[str, str] = dict(zip(("site", "up2", "up", "all"), GROUPS))
#: The group whose probe is saved (:data:`~ldm_scene.probes.GROUP_FILE`) for the app to read: every
#: up-block site, the best group at the early steps (step 3: +0.27 Dice over prompt-only, where one site
#: gives +0.23) at a third of all sites' channels.
SHIPPED_GROUP = f"up blocks ({len(UP_SITE_KEYS)} sites)"
#: 0-based steps whose margins groups.md details: steps 3 and 5 (where the probe targets are set);
#: the last step is detailed too. Every analysed step is in its Dice table and figure.
KEY_STEPS: tuple[int, ...] = (2, 4)
#: Thresholds tried on the validation images (ridge outputs predict the foreground fraction of a cell).
THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2))


def group_features(acts: Mapping[str, torch.Tensor], sites: Sequence[str]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens ``[h*w, C]`` of ``sites``' activations (each ``[T, C]``) read together, as a
    :class:`~ldm_scene.probes.GroupProbe` reads them (:func:`~ldm_scene.probes.group_tokens`)."""
    x, grid = group_tokens({s: acts[s][None] for s in sites}, sites)
    return x[0], grid


def _readout(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The ridge readout of tokens ``x`` upsampled bilinearly to the image size ``[H, W]``."""
    z = (x @ w.T + b).reshape(1, 1, *grid)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)[0, 0]


class _Image:
    """What the analysis keeps of one generated image: the activations of ``sites`` (default: every
    site) at the chosen steps (float16), its final foreground mask and, for a test image, the
    labeler's mask of each step's x0."""

    def __init__(self, ctx: "RunContext", record, steps: Sequence[int], sites: Sequence[str] = SITE_KEYS):
        trace = generate_trace(ctx, record)
        self.split, self.prompt = record.split, record.prompt
        self.acts = {k: {s: trace.acts[s][k].to(torch.float16).cpu() for s in sites} for k in steps}
        fg = label_images(ctx, trace.image[None], [record.seed])["foreground"][0]
        self.mask = torch.from_numpy(np.asarray(fg) > 0.5)
        self.x0_masks: dict[int, torch.Tensor] = {}
        if record.split == "test":
            images = np.stack([np.asarray(decode(ctx.model, trace.x0[k:k + 1])[0].convert("RGB")) for k in steps])
            x0_fg = label_images(ctx, images, None)["foreground"]
            self.x0_masks = {k: torch.from_numpy(np.asarray(m) > 0.5) for k, m in zip(steps, x0_fg)}


def _margin(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    mean, low, high = metrics.bootstrap_mean_ci(np.asarray(a) - np.asarray(b), resamples=resamples, seed=seed)
    return {"mean": float(mean), "low": float(low), "high": float(high)}


Images = Sequence[_Image] | Callable[[frozenset], Iterable[_Image]]


def analyse(images: Images, steps: Sequence[int], groups: Mapping[str, Sequence[str]] = GROUPS,
            resamples: int = 1000, seed: int = 0, progress: bool = False,
            fits: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]] | None = None) -> dict:
    """Dice of each group's probe and of the baselines on the test images, per step; margins with intervals.

    ``images``: the images in memory, or ``source(splits)`` yielding the images of those splits afresh
    on each call. Two passes, so that one image's activations are held at a time: the training and
    validation images accumulate each (group, step)'s ridge statistics (the penalty chosen on
    validation MSE); then the validation and test images are read out, each at every threshold, and
    the threshold with the best mean validation Dice scores the test images. ``fits``, when given,
    receives each ``(group, step)``'s probe: ``(w [1, C], b [1], threshold)``."""
    source = images if callable(images) else (lambda splits: (im for im in images if im.split in splits))
    cuts = torch.tensor(THRESHOLDS, dtype=torch.float32)

    def at_thresholds(m: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Dice of ``m > t`` with ``mask`` for every ``t`` in :data:`THRESHOLDS`."""
        return metrics.dice_rows(m[None] > cuts.to(m.dtype)[:, None, None], mask)

    # pass 1: the training and validation images fit every (group, step)
    stats: dict[tuple[int, str], dict[str, RidgeStats]] = {}
    grids: dict[str, tuple[int, int]] = {}
    train_masks: dict[str, list[torch.Tensor]] = {}
    count = {"train": 0, "val": 0, "test": 0}
    for im in tqdm(source(frozenset({"train", "val"})), desc="group probes: fitting images", disable=not progress):
        count[im.split] += 1
        if im.split == "train":
            train_masks.setdefault(im.prompt, []).append(im.mask)
        for k in steps:
            for name, sites in groups.items():
                x, grids[name] = group_features(im.acts[k], sites)
                pair = stats.setdefault((k, name), {"train": RidgeStats(x.shape[1], 1), "val": RidgeStats(x.shape[1], 1)})
                y = F.adaptive_avg_pool2d(im.mask[None, None].float(), grids[name]).reshape(-1, 1)
                pair[im.split].update(x, y)
    if not (count["train"] and count["val"]):
        raise ValueError(f"need train, val and test images, got {count['train']}, {count['val']} and (not read yet) test")
    solved = {key: choose_penalty(pair["train"], pair["val"], DEFAULT_PENALTY_GRID)[:3] for key, pair in stats.items()}
    # prompt-only: each prompt's mean training mask (the mean over all training images for an unseen prompt)
    prior = torch.stack([m.float() for ms in train_masks.values() for m in ms]).mean(0)
    by_prompt = {p: torch.stack([m.float() for m in ms]).mean(0) for p, ms in train_masks.items()}

    # pass 2: the validation and test images, read out at every threshold
    rows: dict[str, dict] = {"val": {}, "test": {}}
    x0: dict[int, list[float]] = {k: [] for k in steps}
    ceilings: dict[tuple[int, int], list[float]] = {}
    for im in tqdm(source(frozenset({"val", "test"})), desc="group probes: scoring images", disable=not progress):
        if im.split == "test":
            count["test"] += 1
        kept, size = rows[im.split], tuple(im.mask.shape)
        kept.setdefault("prompt", []).append(at_thresholds(by_prompt.get(im.prompt, prior), im.mask))
        for k in steps:
            if im.split == "test":
                x0[k].append(float(metrics.dice_rows(im.x0_masks[k][None], im.mask)[0]))
            for name, sites in groups.items():
                x, grid = group_features(im.acts[k], sites)
                _, w, b = solved[(k, name)]
                kept.setdefault((k, name), []).append(at_thresholds(_readout(w, b, x, grid, size), im.mask))
        if im.split == "test":
            for grid in set(grids.values()):
                ceilings.setdefault(grid, []).append(grid_ceiling_scores("foreground", im.mask, [grid])[grid]["score"])
    if not count["test"]:
        raise ValueError(f"need train, val and test images, got {count['train']}, {count['val']}, 0")

    def chosen(key) -> tuple[float, np.ndarray]:
        """The threshold with the best mean validation Dice (ties: the lowest) and the test Dice at it."""
        i = int(np.argmax(np.stack(rows["val"][key]).mean(axis=0)))
        return float(THRESHOLDS[i]), np.stack(rows["test"][key])[:, i]

    prompt_t, prompt_only = chosen("prompt")
    out: dict = {"n_train": count["train"], "n_val": count["val"], "n_test": count["test"], "steps": list(steps),
                 "groups": {name: list(sites) for name, sites in groups.items()},
                 "prompt_only": {"dice": float(prompt_only.mean()), "threshold": prompt_t}, "per_step": {}}
    first = next(iter(groups))
    for k in steps:
        labeler = np.array(x0[k])
        row: dict = {"labeler_on_x0": float(labeler.mean()), "groups": {}}
        scored: dict[str, np.ndarray] = {}
        for name in groups:
            penalty, w, b = solved[(k, name)]
            t, scores = chosen((k, name))
            if fits is not None:
                fits[(name, k)] = (w.reshape(1, -1).float(), b.reshape(1).float(), t)
            grid = grids[name]
            ceiling = float(np.mean(ceilings[grid]))
            row["groups"][name] = {
                "dice": float(scores.mean()), "channels": int(w.numel()), "grid": list(grid), "penalty": penalty,
                "threshold": t, "grid_ceiling": ceiling, "over_ceiling": float(scores.mean() / ceiling),
                "over_prompt_only": _margin(scores, prompt_only, resamples, seed),
                "over_labeler_on_x0": _margin(scores, labeler, resamples, seed),
            }
            if name != first:
                row["groups"][name]["over_" + first] = _margin(scores, scored[first], resamples, seed)
            scored[name] = scores
        out["per_step"][str(k)] = row
    return out


def render_markdown(result: dict, context: str) -> str:
    """groups.md from groups.json (nothing typed by hand): Dice per step for every group beside the
    baselines, then the margins in detail at steps 3, 5 and the last."""
    first = next(iter(result["groups"]))
    names = list(result["groups"])
    lines = ["# Foreground probes over groups of sites", "",
             "Generated by `python -m ldm_scene probes groups` from `groups.json`; do not edit by hand.", "",
             context, "",
             f"{result['n_train']} training, {result['n_val']} validation and {result['n_test']} test images. "
             "Each group's probe is one ridge regression from the concatenated activations of its sites (coarser "
             "sites upsampled bilinearly to the finest grid) to the foreground fraction of each cell; penalty and "
             "threshold chosen on validation, Dice on test after bilinear upsampling. Margins: mean paired "
             "difference with its bootstrap 95% interval over test images.", "",
             f"Prompt-only baseline (each prompt's mean training mask): Dice {result['prompt_only']['dice']:.3f}.", "",
             *([f"The probe of **{result['shipped']['group']}** at every step is saved as `{result['shipped']['file']}` "
                "beside this page; the app reads the foreground with it by default (its *foreground site* menu "
                "still offers each single site).", ""] if "shipped" in result else []),
             "![groups](groups.png)", "", "## Dice per step", ""]
    rows = [[str(int(k) + 1), f"{row['labeler_on_x0']:.3f}"] + [f"{row['groups'][n]['dice']:.3f}" for n in names]
            for k, row in result["per_step"].items()]
    lines += markdown_table(["step", "labeler on x0"] + names, rows)
    lines.append("")

    def ci(m: dict) -> str:
        return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"

    last = max(int(k) for k in result["per_step"])
    for k, row in result["per_step"].items():
        if int(k) not in KEY_STEPS and int(k) != last:
            continue
        lines += [f"## Step {int(k) + 1}", "", f"Labeler on the decoded x0 prediction: Dice {row['labeler_on_x0']:.3f}.", ""]
        table = []
        for name, g in row["groups"].items():
            table.append((name, f"{g['channels']}", f"{g['grid'][0]}x{g['grid'][1]}", f"{g['dice']:.3f}",
                          f"{g['grid_ceiling']:.3f}", f"{g['over_ceiling']:.2f}", ci(g["over_prompt_only"]),
                          ci(g["over_labeler_on_x0"]), ci(g["over_" + first]) if "over_" + first in g else "—"))
        lines += markdown_table(("group", "channels", "grid", "Dice", "grid ceiling", "Dice / ceiling",
                                 "over prompt-only", "over labeler on x0", f"over {first}"), table)
        lines.append("")
    return "\n".join(lines)


def groups_figure(result: dict):
    """Dice per step of every group's probe, with the prompt-only baseline and the labeler on x0
    (matplotlib Figure)."""
    from matplotlib.figure import Figure

    steps = [int(k) for k in result["per_step"]]
    rows = list(result["per_step"].values())
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    x = [k + 1 for k in steps]
    for name in result["groups"]:
        ax.plot(x, [r["groups"][name]["dice"] for r in rows], marker="o", ms=3, label=name)
    ax.plot(x, [r["labeler_on_x0"] for r in rows], color="tab:green", ls=":", label="labeler on x0")
    ax.axhline(result["prompt_only"]["dice"], color="tab:red", ls="--", label="prompt-only")
    ax.set_xlabel(f"denoising step (of {result.get('num_steps', max(x))})")
    ax.set_ylabel("foreground Dice (test)")
    ax.set_ylim(0, 1)
    ax.set_xticks(x)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Foreground probes over groups of sites", fontsize=9)
    return fig


def run(config, steps: Sequence[int] | None = None, out: Path | None = None, resamples: int = 1000,
        progress: bool = True, labeler=None, model=None, groups: Mapping[str, Sequence[str]] = GROUPS) -> dict:
    """Generate the probe run's images, fit each of ``groups``' probes at ``steps``, write groups.json/.md/.png to
    ``out`` and, when every step was analysed and it is among ``groups``, the :data:`SHIPPED_GROUP`'s probe
    (``labeler``, ``model``: as :func:`~.context.prepare` takes them; default: the run's own)."""
    from .config import RunConfig
    from .context import prepare

    ctx = prepare(config, labeler, model)
    steps = tuple(range(config.steps)) if steps is None else tuple(steps)
    bad = [k for k in steps if not 0 <= k < config.steps]
    if bad:
        raise ValueError(f"steps {bad} are outside the run's {config.steps} steps")
    # the app reads the file beside the probe banks: only a fit on their split (the default) may ship
    same_split = config.train_fraction == RunConfig.train_fraction and config.val_fraction == RunConfig.val_fraction
    ships = set(steps) == set(range(config.steps)) and SHIPPED_GROUP in groups and same_split

    sites = [k for k in SITE_KEYS if any(k in group for group in groups.values())]  # what the groups read

    def source(splits: frozenset) -> Iterable[_Image]:  # each pass generates its images again
        return (_Image(ctx, r, steps, sites) for r in ctx.records if r.split in splits)

    fits: dict = {}
    result = analyse(source, steps, groups, resamples=resamples, seed=config.seed, progress=progress, fits=fits)
    gen = ctx.generation(ctx.records[0])
    result.update(model=config.model, n=config.n, seed=config.seed, num_steps=config.steps, guidance=gen.guidance_text)
    if ships:
        result["shipped"] = {"group": SHIPPED_GROUP, "file": GROUP_FILE}
    out = Path(out or config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "groups.json").write_text(json.dumps(result, indent=1))
    context = (f"Model `{config.model}`, {config.n} images from seed {config.seed}, {config.steps} steps, "
               f"{gen.guidance_text}; the probe banks read one site each (see README.md).")
    (out / "groups.md").write_text(render_markdown(result, context))
    groups_figure(result).savefig(out / "groups.png", dpi=120)
    if ships:
        shipped_probe(ctx, result, fits).save(out / GROUP_FILE)
    else:  # the app reads the foreground at every step: a probe for some steps would leave the others blank
        print(f"{GROUP_FILE} not written: it is saved only when every step is analysed (no --at), "
              f"the {SHIPPED_GROUP} group is among --groups and the images split as the probe run's (--train-fraction 0.4)")
    link_groups_page(out)
    return result


def shipped_probe(ctx: "RunContext", result: dict, fits: Mapping[tuple[str, int], tuple]) -> GroupProbe:
    """The :data:`SHIPPED_GROUP`'s probe at every analysed step as a :class:`~ldm_scene.probes.GroupProbe`,
    with what it was fit on and its test Dice in the metadata."""
    sites = GROUPS[SHIPPED_GROUP]
    info = {i.key: (i.channels, i.height, i.width) for i in ctx.sites}
    steps = sorted(k for name, k in fits if name == SHIPPED_GROUP)
    rows = {k: result["per_step"][str(k)]["groups"][SHIPPED_GROUP] for k in steps}
    seeds = [r.seed for r in ctx.records]
    g = ctx.guidance
    meta = ProbeMeta(
        task="foreground", model_id=ctx.model.model_id, image_size=ctx.image_size, scheduler=ctx.model.scheduler_name,
        num_steps=ctx.config.steps, sites={s: info[s] for s in sites},
        training={
            "method": "group ridge", "name": SHIPPED_GROUP, "group": list(sites),
            "thresholds": {str(k): fits[(SHIPPED_GROUP, k)][2] for k in steps},
            "penalty": {str(k): rows[k]["penalty"] for k in steps},
            "fit_on": "train images; penalty (validation MSE) and threshold (validation Dice) chosen on validation",
            "targets": "the foreground fraction of each cell of the group's finest grid",
            "readout_upsampling": "bilinear, then the step's threshold",
            "n_train": result["n_train"], "n_val": result["n_val"], "n_test": result["n_test"],
            "test_dice": {str(k): rows[k]["dice"] for k in steps},
            "seeds": {"first": min(seeds), "count": len(seeds)},
            "labeler": ctx.labeler.name, "guidance": g["guidance"], "late_guidance": g["late_guidance"],
            "late_from": g["late_from"], "guidance_schedule": g["text"],
        })
    return GroupProbe(meta, {k: fits[(SHIPPED_GROUP, k)][0] for k in steps}, {k: fits[(SHIPPED_GROUP, k)][1] for k in steps})


def link_groups_page(folder: Path) -> bool:
    """In a probe folder (``metrics.json`` and ``README.md`` there), re-render the README from the
    metrics with a link to ``groups.md``; elsewhere do nothing. Returns whether it did."""
    if not ((folder / "metrics.json").is_file() and (folder / "README.md").is_file()):
        return False
    from .readme import groups_page, render_readme

    (folder / "README.md").write_text(render_readme(json.loads((folder / "metrics.json").read_text()),
                                                    groups=groups_page(folder) or True))
    return True


def parse_steps(text: str | None, num_steps: int) -> tuple[int, ...]:
    """0-based steps from ``--at`` (a comma list of 1-based steps; None: every step)."""
    if not text:
        steps = tuple(range(num_steps))
    else:
        try:
            steps = tuple(int(s) - 1 for s in text.split(","))
        except ValueError:
            raise ValueError(f"--at takes a comma list of steps such as 3,5,15, got {text!r}") from None
    bad = [k + 1 for k in steps if not 0 <= k < num_steps]
    if bad:
        raise ValueError(f"steps {bad} are outside the run's {num_steps} steps (--at counts from 1)")
    return tuple(dict.fromkeys(steps))


def parse_groups(text: str | None) -> dict[str, tuple[str, ...]]:
    """The :data:`GROUPS` named by ``--groups`` (a comma list of :data:`GROUP_IDS`; None: all), in their order."""
    if not text:
        return dict(GROUPS)
    chosen = [g.strip() for g in text.split(",")]
    unknown = [g for g in chosen if g not in GROUP_IDS]
    if unknown:
        raise ValueError(f"--groups takes a comma list of {', '.join(GROUP_IDS)}, got {', '.join(unknown)}")
    return {GROUP_IDS[g]: GROUPS[GROUP_IDS[g]] for g in GROUP_IDS if g in chosen}


def run_cli(args: "argparse.Namespace") -> int:
    from .config import RunConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = parse_steps(args.at, args.steps)
    config = RunConfig(model=args.model, n=args.n, out=args.work, steps=args.steps, seed=args.seed, device=args.device,
                       train_fraction=args.train_fraction)
    result = run(config, steps, Path(args.out), resamples=args.bootstrap, progress=not args.no_progress,
                 groups=parse_groups(args.groups))
    for k, row in result["per_step"].items():
        if int(k) not in KEY_STEPS and int(k) != max(int(j) for j in result["per_step"]):
            continue
        print(f"step {int(k) + 1}: labeler on x0 {row['labeler_on_x0']:.3f}, prompt-only {result['prompt_only']['dice']:.3f}; "
              + "; ".join(f"{n} {g['dice']:.3f}" for n, g in row["groups"].items()))
    wrote = f" and {GROUP_FILE} ({SHIPPED_GROUP})" if "shipped" in result else ""
    print(f"wrote groups.json, groups.md, groups.png{wrote} to {args.out}")
    return 0
