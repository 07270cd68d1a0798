"""The evaluation pass over the test images, and the same-prompt control after it."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..sampler import decode
from . import controls as ctl
from . import evaluate as ev
from .adam import load_adam
from .config import LATENT, PERMUTED, UNET
from .context import RunContext
from .dataset import Record, Shard
from .solve import Solution, load_solution
from .stacked import FOREGROUND_THRESHOLD, StackedReadout
from .trace import generate_trace, label_images, latent_tokens, permuted_acts


def eval_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "eval" / f"{record.index:06d}.npz"


def pairs_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "pairs" / f"{record.index:06d}.safetensors"


def control_path(ctx: RunContext, record: Record) -> Path:
    return ctx.work / "control" / f"{record.index:06d}.npz"


def _score(ctx: RunContext, maps: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], priors: dict[str, torch.Tensor], ranks: dict,
           threshold: float = FOREGROUND_THRESHOLD) -> dict[str, np.ndarray]:
    """Score readouts ``{task: [M, h, w]}`` against one image's labels (``threshold``: the foreground one)."""
    out = {}
    for task, pred in maps.items():
        scores = ev.score_maps(task, pred, labels[task], priors.get(task) if task == "depth" else None, ranks[task], threshold)
        for name, v in scores.items():
            out[f"{task}/{name}"] = v
    return out


def eval_image(ctx: RunContext, sol: Solution, readouts: dict[str, StackedReadout], adam: dict, record: Record, previews: bool, example: bool) -> dict[str, np.ndarray]:
    """All scores for one test image: ``{"<source>/<task>/<score>": array}`` (see :func:`eval_pass`)."""
    device = ctx.model.device
    size = ctx.image_size
    trace = generate_trace(ctx, record)
    labels_np = {t: v[0] for t, v in label_images(ctx, trace.image[None], [record.seed]).items()}
    labels = {t: torch.from_numpy(v).to(device) for t, v in labels_np.items()}
    priors = {t: p.to(device) for t, p in sol.priors.items()}
    ranks = {t: ev.target_ranks_for(t, labels[t], priors.get(t) if t == "depth" else None) for t in labels}
    out: dict[str, np.ndarray] = {}
    steps = ctx.config.steps
    example_maps: dict[str, np.ndarray] = {}

    def add(prefix: str, scores: dict[str, np.ndarray], row: int | None = None, rows: int | None = None) -> None:
        for name, v in scores.items():
            key = f"{prefix}/{name}"
            if row is None:
                out[key] = v
            else:
                out.setdefault(key, np.full((rows, steps), np.nan))[row] = v

    # probes at every site, and the permuted control (scored without the residual, which is
    # computed below at its validation-chosen site per step only)
    perm = permuted_acts(ctx, trace) if ctx.config.permuted else None
    perm_maps: dict[str, dict[str, torch.Tensor]] = {}
    # an image with same-prompt partners keeps its readouts and labels for the control pass
    pairs: dict[str, torch.Tensor] | None = {} if ctx.test_partners.get(record.index) else None
    for row, info in enumerate(ctx.sites):
        hw = (info.height, info.width)
        maps = readouts[UNET].maps(info.key, trace.acts[info.key], hw)
        add("probe", _score(ctx, maps, labels, priors, ranks), row, len(ctx.sites))
        if pairs is not None:
            for task, v in maps.items():
                pairs[f"pred/{task}/{info.key}"] = v.to(torch.float32).cpu().contiguous()
        if example:
            for task in ctx.layout.tasks:
                if sol.best_site.get(task) == info.key:
                    shown = torch.sigmoid(maps[task]) if task == "foreground" else maps[task]  # margin -> probability
                    example_maps[f"probe/{task}"] = shown.cpu().numpy().astype(np.float32)
        if perm is not None:
            perm_maps[info.key] = readouts[PERMUTED].maps(info.key, perm[info.key], hw)
            add("permuted", _score(ctx, perm_maps[info.key], labels, {}, ranks), row, len(ctx.sites))
    if perm is not None and "depth" in labels:
        best = sol.best[PERMUTED]["depth"]
        stack = torch.stack([ev.upsample(perm_maps[best[t]]["depth"][t : t + 1], size)[0] for t in range(steps)])
        res = ev.score_maps("depth", stack, labels["depth"], priors["depth"], ranks["depth"])["residual"]
        out["permuted_best/depth/residual"] = res
    if ctx.config.latent_baseline:
        maps = readouts[LATENT].maps(LATENT, latent_tokens(trace.inputs), ctx.latent_hw)
        add("latent", _score(ctx, maps, labels, priors, ranks))
    # the layout prior, the same map at every step (foreground: the mean mask above 0.5)
    pmaps = {t: priors[t][None] for t in ctx.layout.tasks}
    prior_scores = {k: np.repeat(v, steps) for k, v in _score(ctx, pmaps, labels, priors, ranks, 0.5).items()}
    if "depth/residual" in prior_scores:
        # prior minus prior is constant: no rank information, score 0 by definition
        prior_scores["depth/residual"] = np.zeros(steps)
    add("prior", prior_scores)
    # the prompt-only map (the fitting images' mean label for this prompt), the same at every step
    prompt_scores: dict[str, np.ndarray] = {}
    for task in ctx.layout.tasks:
        pmap, seen = sol.prompt_only(task, record.prompt)
        tau = sol.prompt_threshold if sol.prompt_threshold is not None else 0.5
        scores = _score(ctx, {task: pmap.to(device)[None]}, labels, priors, ranks, tau)
        if not seen and f"{task}/residual" in scores:
            scores[f"{task}/residual"] = np.zeros(1)  # the prior's own map: 0 by definition, as above
        prompt_scores.update({k: np.repeat(v, steps) for k, v in scores.items()})
    add("prompt_only", prompt_scores)
    # the grid ceiling of each site: the exact label pooled to its grid and upsampled back
    grids = [(i.height, i.width) for i in ctx.sites]
    for task in ctx.layout.tasks:
        by_grid = ctl.grid_ceiling_scores(task, labels[task], grids, priors.get(task) if task == "depth" else None, ranks[task])
        for name in next(iter(by_grid.values())):
            out[f"ceiling/{task}/{name}"] = np.array([by_grid[hw][name] for hw in grids])
    # the labeler on each step's decoded x0 preview
    if previews or example:
        preview_images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in decode(ctx.model, trace.x0)])
        if example:
            example_maps["x0"] = preview_images
        if previews and getattr(ctx.labeler, "labels_any_image", True):
            plabels = label_images(ctx, preview_images, None)
            pmaps = {t: torch.from_numpy(v).to(device) for t, v in plabels.items()}
            add("x0", _score(ctx, pmaps, labels, priors, ranks, 0.5))
    # Adam vs ridge at the chosen keys
    for kind, probes in adam.items():
        for (task, site, step), (w, b) in probes.items():
            info = next(i for i in ctx.sites if i.key == site)
            z = trace.acts[site][step].to(torch.float32) @ w.to(device).T + b.to(device)  # [T, K]
            mean, std = sol.norm[task]
            z = z.reshape(1, info.height, info.width, -1)
            pred = z[..., 1] - z[..., 0] if task == "foreground" else z[..., 0] * std + mean
            s = ev.score_maps(task, pred, labels[task], None, ranks[task], FOREGROUND_THRESHOLD)
            out[f"{kind}/{task}/{site}@{step}"] = np.asarray(s["score"])
    if example:
        example_maps["image"] = trace.image
        for t, v in labels_np.items():
            example_maps[f"label/{t}"] = v
        path = ctx.work / "examples" / f"{record.index:06d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **example_maps)
    if pairs is not None:
        for t, v in labels_np.items():
            pairs[f"label/{t}"] = torch.from_numpy(v).contiguous()
        path = pairs_path(ctx, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(pairs, str(tmp))
        os.replace(tmp, path)
    out["seconds/generate"] = np.asarray(trace.seconds)
    return out


def eval_pass(ctx: RunContext, shard: Shard = Shard(), limit: int | None = None, progress: bool = True) -> int:
    """Score this shard's test images, one ``work/eval/<index>.npz`` each; done images are skipped.

    Returns the number of images scored now. ``limit`` stops after that many.
    """
    sol = load_solution(ctx)
    readouts = {UNET: StackedReadout(ctx, {t: {k: v for k, v in kv.items() if k[0] != LATENT} for t, kv in sol.weights[UNET].items()}, sol)}
    if ctx.config.latent_baseline:
        readouts[LATENT] = StackedReadout(ctx, {t: {k: v for k, v in kv.items() if k[0] == LATENT} for t, kv in sol.weights[UNET].items()}, sol)
    if ctx.config.permuted:
        readouts[PERMUTED] = StackedReadout(ctx, sol.weights[PERMUTED], sol)
    adam, _ = load_adam(ctx)
    tests = ctx.test_records
    cap = len(tests) if ctx.config.preview_images is None else ctx.config.preview_images
    with_previews = {r.index for r in tests[:cap]}
    examples = {r.index for r in tests[: ctx.config.n_examples]}
    mine = shard.select(tests)
    todo = [r for r in mine if not eval_path(ctx, r).exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"test {shard.tag}", disable=not progress, unit="img")
    done = 0
    try:
        for record in todo:
            if limit is not None and done >= limit:
                break
            t0 = time.perf_counter()
            scores = eval_image(ctx, sol, readouts, adam, record, record.index in with_previews, record.index in examples)
            scores["seconds/total"] = np.asarray(time.perf_counter() - t0)
            _save_scores(eval_path(ctx, record), scores)
            done += 1
            bar.update(1)
    finally:
        bar.close()
    return done


def _save_scores(path: Path, scores: dict[str, np.ndarray]) -> None:
    """One image's score arrays as ``path`` (.npz), replaced atomically so a killed pass leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **scores)
    os.replace(tmp, path)


def control_pass(ctx: RunContext, shard: Shard = Shard(), progress: bool = True) -> int:
    """The same-prompt control for this shard's test images, one ``work/control/<index>.npz`` each.

    Needs every test image evaluated (:func:`eval_pass` keeps the readouts and labels of each image
    that shares its prompt with another test image in ``work/pairs/``). Each image's probe readouts,
    at every site and step, are scored against the labels of the *other* test images with its
    prompt, exactly as against its own, and averaged over them (:func:`~.controls.partner_scores`):
    ``control/<task>/<score>`` ``[sites, steps]``. Done images are skipped; returns how many were
    scored now. Images without partners get no file (their control is undefined: nan).
    """
    partners = ctx.test_partners
    mine = [r for r in shard.select(ctx.test_records) if partners.get(r.index)]
    todo = [r for r in mine if not control_path(ctx, r).exists()]
    if not todo:
        return 0
    missing = [r.index for r in ctx.test_records if partners.get(r.index) and not pairs_path(ctx, r).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} test images have no kept readouts yet (e.g. index {missing[0]}); finish the evaluation first")
    sol = load_solution(ctx)
    device = ctx.model.device
    priors = {t: p.to(device) for t, p in sol.priors.items()}
    groups: dict[str, list[Record]] = {}
    for record in todo:
        groups.setdefault(record.prompt, []).append(record)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"same-prompt control {shard.tag}", disable=not progress, unit="img")
    done = 0
    try:
        for prompt, records in groups.items():
            members = [r for r in ctx.test_records if r.prompt == prompt]
            labels = {t: [] for t in ctx.layout.tasks}
            for r in members:
                kept = load_file(str(pairs_path(ctx, r)))
                for t in ctx.layout.tasks:
                    labels[t].append(kept[f"label/{t}"])
            labels = {t: torch.stack(v).to(device) for t, v in labels.items()}
            ranks = {t: ev.target_ranks_for(t, labels[t], priors.get(t) if t == "depth" else None) for t in labels}
            for record in records:
                kept = load_file(str(pairs_path(ctx, record)), device=str(device))
                others = [j for j, r in enumerate(members) if r.index != record.index]
                scores: dict[str, np.ndarray] = {}
                for row, info in enumerate(ctx.sites):
                    for task in ctx.layout.tasks:
                        prior = priors.get(task) if task == "depth" else None
                        sub = {k: v[others] for k, v in ranks[task].items()}
                        got = ctl.partner_scores(task, kept[f"pred/{task}/{info.key}"], labels[task][others], prior, sub,
                                                 FOREGROUND_THRESHOLD)
                        for name, v in got.items():
                            scores.setdefault(f"control/{task}/{name}", np.full((len(ctx.sites), ctx.config.steps), np.nan))[row] = v
                _save_scores(control_path(ctx, record), scores)
                done += 1
                bar.update(1)
    finally:
        bar.close()
    return done
