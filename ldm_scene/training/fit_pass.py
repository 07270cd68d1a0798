"""The fit pass: stream the fitting images into ridge statistics (:class:`FitState`), checkpointed
and resumable, one shard per process, merged on rank 0."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import LATENT, PERMUTED, UNET, _META_KEY
from .context import RunContext
from .dataset import Record, Shard
from .fit import RidgeStats
from .trace import ImageTrace, generate_trace, label_images, latent_tokens, permuted_acts, site_targets


# --- fitting state --------------------------------------------------------------------------

@dataclass
class FitState:
    """Everything the fit pass accumulates, for one shard or merged.

    ``stats[group][split][(key, step)]``: group ``"unet"`` or ``"permuted"``, split ``"train"`` or
    ``"val"``, key a site or :data:`LATENT`. ``pixels[task]`` is ``[sum, sum of squares, count]``
    over every label pixel of the fitting images (train and val) and ``maps[task]`` the per-pixel
    sum ``[H, W]`` of the label maps over ``n_images`` images. ``prompt_sums[split][task]`` is
    ``[P + 1, H, W]``: the label sums of that split's images per prompt of
    :attr:`RunContext.prompt_index` (row P: every image of the split), ``prompt_counts[split]``
    ``[P + 1]`` their image counts (the prompt-only baseline). ``done`` counts processed images.
    """

    stats: dict[str, dict[str, dict[tuple[str, int], RidgeStats]]]
    pixels: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    prompt_sums: dict[str, dict[str, torch.Tensor]]
    prompt_counts: dict[str, torch.Tensor]
    n_images: int = 0
    done: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: "FitState") -> None:
        for group, splits in other.stats.items():
            for split, keyed in splits.items():
                for key, s in keyed.items():
                    self.stats[group][split][key].merge(s)
        for task in self.pixels:
            self.pixels[task] += other.pixels[task]
            self.maps[task] += other.maps[task]
        for split, per_task in other.prompt_sums.items():
            for task, v in per_task.items():
                self.prompt_sums[split][task] += v
            self.prompt_counts[split] += other.prompt_counts[split]
        self.n_images += other.n_images
        self.done += other.done
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


def new_fit_state(ctx: RunContext) -> FitState:
    device = ctx.model.device
    k = ctx.layout.width
    groups = [UNET] + ([PERMUTED] if ctx.config.permuted else [])
    stats: dict[str, dict[str, dict[tuple[str, int], RidgeStats]]] = {}
    for group in groups:
        stats[group] = {}
        for split in ("train", "val"):
            keyed = {}
            for info in ctx.sites:
                for step in range(ctx.config.steps):
                    keyed[(info.key, step)] = RidgeStats(info.channels, k, device=device)
            if group == UNET and ctx.config.latent_baseline:
                channels = int(ctx.model.unet.config.in_channels)
                for step in range(ctx.config.steps):
                    keyed[(LATENT, step)] = RidgeStats(channels, k, device=device)
            stats[group][split] = keyed
    h, w = ctx.image_size
    pixels = {t: torch.zeros(3, dtype=torch.float64) for t in ctx.layout.tasks}
    maps = {t: torch.zeros(h, w, dtype=torch.float64) for t in ctx.layout.tasks}
    rows = len(ctx.prompt_index) + 1
    prompt_sums = {split: {t: torch.zeros(rows, h, w, dtype=torch.float64) for t in ctx.layout.tasks} for split in ("train", "val")}
    prompt_counts = {split: torch.zeros(rows, dtype=torch.float64) for split in ("train", "val")}
    return FitState(stats, pixels, maps, prompt_sums, prompt_counts)


def _state_tensors(state: FitState) -> dict[str, torch.Tensor]:
    out = {}
    for group, splits in state.stats.items():
        for split, keyed in splits.items():
            for (key, step), s in keyed.items():
                for name, tensor in s.state_dict().items():
                    out[f"stats/{group}/{split}/{key}/{step:03d}/{name}"] = tensor.contiguous()
    for task in state.pixels:
        out[f"pixels/{task}"] = state.pixels[task].contiguous()
        out[f"maps/{task}"] = state.maps[task].contiguous()
    for split, per_task in state.prompt_sums.items():
        for task, v in per_task.items():
            out[f"prompt_sums/{split}/{task}"] = v.contiguous()
        out[f"prompt_counts/{split}"] = state.prompt_counts[split].contiguous()
    return out


def save_fit_state(state: FitState, path: Path, fingerprint: dict) -> None:
    """One safetensors file, replaced atomically, with the progress in its metadata."""
    meta = {"done": state.done, "n_images": state.n_images, "seconds": state.seconds, "run": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_state_tensors(state), str(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_fit_state(ctx: RunContext, path: Path) -> FitState:
    """Read a checkpoint written by :func:`save_fit_state` for this run."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    if meta["run"] != ctx.fingerprint():
        raise ValueError(f"{path} was written by another run; delete it or use another --out")
    tensors = load_file(str(path), device="cpu")
    state = new_fit_state(ctx)
    device = ctx.model.device
    grouped: dict[tuple[str, str, str, int], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split("/")
        if parts[0] == "stats":
            _, group, split, key, step, stat = parts
            grouped.setdefault((group, split, key, int(step)), {})[stat] = tensor
        elif parts[0] == "pixels":
            state.pixels[parts[1]] = tensor.clone()
        elif parts[0] == "maps":
            state.maps[parts[1]] = tensor.clone()
        elif parts[0] == "prompt_sums":
            state.prompt_sums[parts[1]][parts[2]] = tensor.clone()
        elif parts[0] == "prompt_counts":
            state.prompt_counts[parts[1]] = tensor.clone()
    for (group, split, key, step), sd in grouped.items():
        state.stats[group][split][(key, step)] = RidgeStats.from_state_dict(sd, device=device)
    expected = sum(len(k) for s in state.stats.values() for k in s.values())
    if len(grouped) != expected:
        raise ValueError(f"{path} holds {len(grouped)} accumulators, this run has {expected}")
    state.done, state.n_images, state.seconds = int(meta["done"]), int(meta["n_images"]), dict(meta["seconds"])
    return state


def fit_path(ctx: RunContext, shard: Shard) -> Path:
    return ctx.work / "fit" / f"{shard.tag}.safetensors"


def accumulate(ctx: RunContext, state: FitState, trace: ImageTrace, labels: dict[str, np.ndarray]) -> None:
    """Add one image (its kept activations and its final image's labels) to the fit state."""
    split = trace.record.split
    layout = ctx.layout
    device = ctx.model.device
    t0 = time.perf_counter()
    keyed = state.stats[UNET][split]
    targets_by_hw: dict[tuple[int, int], torch.Tensor] = {}

    def targets(hw: tuple[int, int]) -> torch.Tensor:
        if hw not in targets_by_hw:
            targets_by_hw[hw] = layout.targets(site_targets(labels, hw, device))
        return targets_by_hw[hw]

    for info in ctx.sites:
        y = targets((info.height, info.width))
        acts = trace.acts[info.key]
        for step in range(acts.shape[0]):
            keyed[(info.key, step)].update(acts[step], y)
    if ctx.config.latent_baseline:
        y = targets(ctx.latent_hw)
        tokens = latent_tokens(trace.inputs)
        for step in range(tokens.shape[0]):
            keyed[(LATENT, step)].update(tokens[step], y)
    t1 = time.perf_counter()
    if ctx.config.permuted:
        perm = permuted_acts(ctx, trace)
        t2 = time.perf_counter()
        pkeyed = state.stats[PERMUTED][split]
        for info in ctx.sites:
            y = targets((info.height, info.width))
            for step in range(perm[info.key].shape[0]):
                pkeyed[(info.key, step)].update(perm[info.key][step], y)
        t3 = time.perf_counter()
        state.seconds["permuted_forward"] = state.seconds.get("permuted_forward", 0.0) + t2 - t1
        state.seconds["permuted_update"] = state.seconds.get("permuted_update", 0.0) + t3 - t2
    index = ctx.prompt_index
    rows = [len(index)] + ([index[trace.record.prompt]] if trace.record.prompt in index else [])  # the split's row, the prompt's
    for task in layout.tasks:
        y = torch.from_numpy(labels[task]).to(torch.float64)
        state.pixels[task] += torch.stack([y.sum(), (y * y).sum(), torch.tensor(float(y.numel()), dtype=torch.float64)])
        state.maps[task] += y
        state.prompt_sums[split][task][rows] += y
    state.prompt_counts[split][rows] += 1
    state.n_images += 1
    state.seconds["update"] = state.seconds.get("update", 0.0) + t1 - t0


def save_adam_acts(ctx: RunContext, trace: ImageTrace, labels: dict[str, np.ndarray]) -> None:
    tensors = {}
    for site, step in ctx.adam_keys:
        tensors[f"{site}.step{step:02d}.act"] = trace.acts[site][step].to(torch.float16).cpu().contiguous()
    for info in ctx.sites:
        if any(site == info.key for site, _ in ctx.adam_keys):
            y = site_targets(labels, (info.height, info.width))
            for task, v in y.items():
                tensors[f"{info.key}.{task}"] = v.to(torch.float32).contiguous()
    path = ctx.work / "adam" / f"{trace.record.index:06d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def fit_image(ctx: RunContext, state: FitState, record: Record) -> tuple["ImageTrace", dict[str, np.ndarray]]:
    """Generate one fitting image with every site kept, label its final image, update the statistics."""
    trace = generate_trace(ctx, record)
    t0 = time.perf_counter()
    labels = {t: v[0] for t, v in label_images(ctx, trace.image[None], [record.seed]).items()}
    state.seconds["label"] = state.seconds.get("label", 0.0) + time.perf_counter() - t0
    state.seconds["generate"] = state.seconds.get("generate", 0.0) + trace.seconds
    accumulate(ctx, state, trace, labels)
    return trace, labels


def fit_pass(ctx: RunContext, shard: Shard = Shard(), limit: int | None = None, progress: bool = True) -> FitState:
    """Stream this shard's train and val images into the fit state, resuming from its checkpoint.

    Saves a checkpoint every ``checkpoint_every`` images and at the end. ``limit`` stops after that
    many newly processed images (a time-boxed run; rerun to continue). Returns the shard's state.
    """
    path = fit_path(ctx, shard)
    state = load_fit_state(ctx, path) if path.exists() else new_fit_state(ctx)
    todo = shard.select(ctx.fit_records)
    adam = ctx.adam_indices
    fp = ctx.fingerprint()
    bar = tqdm(total=len(todo), initial=state.done, desc=f"fit {shard.tag}", disable=not progress, unit="img")
    processed = 0
    try:
        for record in todo[state.done :]:
            if limit is not None and processed >= limit:
                break
            trace, labels = fit_image(ctx, state, record)
            if record.index in adam:
                save_adam_acts(ctx, trace, labels)
            del trace
            state.done += 1
            processed += 1
            bar.update(1)
            if state.done % ctx.config.checkpoint_every == 0:
                save_fit_state(state, path, fp)
    finally:
        bar.close()
    save_fit_state(state, path, fp)
    return state


def merge_fits(ctx: RunContext, world: int) -> FitState:
    """Merge the ``world`` shards' checkpoints (rank order) into one state; every shard must be complete."""
    merged = None
    for rank in range(world):
        shard = Shard(rank, world)
        path = fit_path(ctx, shard)
        if not path.exists():
            raise FileNotFoundError(f"shard {shard.tag} has no fit checkpoint at {path}")
        state = load_fit_state(ctx, path)
        expected = len(shard.select(ctx.fit_records))
        if state.done != expected:
            raise RuntimeError(f"shard {shard.tag} fit {state.done} of its {expected} images; rerun to finish it")
        if merged is None:
            merged = state
        else:
            merged.merge(state)
    assert merged is not None
    return merged
