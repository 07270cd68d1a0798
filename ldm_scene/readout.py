"""Probe readouts during sampling, and how they are drawn.

:class:`StackedProbes` applies every task's probe at a site in one matrix product: at each
``(site, step)`` the probes of all tasks are stacked into one ``[R, C]`` weight (R = 1 row per task:
foreground's two logits enter as their difference, since a two-class softmax is the sigmoid of it;
depth and shading carry their target normalisation in the row), so reading 16 sites x 3 tasks costs
16 small matmuls instead of 48 readouts. Maps stay on the activation's device, at the site's token
grid unless a consumer asks for a size (one nearest upsample per site, on the device), until
:func:`to_numpy` brings a whole step's maps to the host in one copy.

:class:`ProbeReader` is a sampler :class:`~ldm_scene.sampler.Reader` over it: at each step it applies,
for each task, that task's probe at the site chosen for the step, and hands back the maps when the
step is done. It keeps nothing but the current step's maps, so a run of any length costs the
memory of one step. The results equal :meth:`ProbeBank.readout <ldm_scene.probes.ProbeBank.readout>`
(the one-probe path) to float32 rounding.

The rest are pure numpy/PIL helpers that turn maps into pictures (foreground as a tinted overlay
on the preview, depth and shading through colour maps with a fixed range, so a map's colours mean
the same at every step) and score per-step maps against a reference (the probe emergence of one
image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Hashable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from .metrics import dice, spearman
from .probes import TASKS, GroupProbe, ProbeBank, ProbeError
from .sites import as_hw
from .upsample import nearest, nearest_array as upsample_nearest

__all__ = [
    "ProbeReader",
    "StackedProbes",
    "Stacked",
    "SiteChoice",
    "site_for_step",
    "to_numpy",
    "upsample_nearest",
    "foreground_overlay",
    "colormap_image",
    "value_range",
    "readout_image",
    "emergence",
]

#: A task's site: one site for every step, a site per step (``{step: site}``), or (foreground) a
#: :class:`~ldm_scene.probes.GroupProbe` that reads its sites together.
SiteChoice = str | Mapping[int, str] | GroupProbe
K = TypeVar("K", bound=Hashable)

# Matplotlib colour maps by task; depth is reversed so that near is bright, as MiDaS-style
# inverse-depth pictures are usually shown.
_CMAPS = {"depth": "magma_r", "shading": "gray"}
_FOREGROUND_TINT = (255, 40, 40)


def site_for_step(choice: SiteChoice, step: int) -> str | None:
    """The site a task reads at ``step``: the one site, or the step's entry (None if absent, and for
    a group probe, which reads several)."""
    if isinstance(choice, str):
        return choice
    if isinstance(choice, GroupProbe):
        return None
    return choice.get(int(step))


def _chosen_sites(choice: SiteChoice) -> set[str]:
    if isinstance(choice, str):
        return {choice}
    if isinstance(choice, GroupProbe):
        return set(choice.sites)
    return set(choice.values())


# --- fused readout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stack:
    """The probes of some tasks at one ``(site, step)`` on one token grid, as one linear map."""

    weight: torch.Tensor  # [1, R, C] float32, on the device it is applied on
    bias: torch.Tensor  # [R, 1]
    tasks: tuple[str, ...]  # the task of each row; foreground rows first
    sigmoid_rows: int  # how many leading rows are foreground (a sigmoid turns them into probabilities)
    channels: int
    grid: tuple[int, int]


#: The maps of one group of tasks: ``(tasks, float32 [B, R, H, W])``, row ``r`` is ``tasks[r]``'s map.
Stacked = tuple[tuple[str, ...], torch.Tensor]


class StackedProbes:
    """Every task's probe at a ``(site, step)`` applied in one matmul (see the module docstring).

    ``banks`` maps task -> :class:`ProbeBank`. The stacked weights are built on first use of a
    ``(site, step, tasks, device)`` and kept, so the weights are copied to a device once.
    """

    def __init__(self, banks: Mapping[str, ProbeBank]) -> None:
        self.banks = dict(banks)
        self._stacks: dict[tuple, tuple[_Stack, ...]] = {}

    def tasks_at(self, site: str, step: int) -> tuple[str, ...]:
        """The tasks that have a probe at ``(site, step)``."""
        return tuple(task for task, bank in self.banks.items() if (site, step) in bank)

    def apply(
        self,
        site: str,
        step: int,
        act: torch.Tensor,
        tasks: Sequence[str] | None = None,
        out_size: int | Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """What each task's probe reports for ``act`` ``[B, T, C]``: ``{task: float32 [B, H, W]}``.

        ``tasks`` default to all that have a probe here. Foreground: the probability of class 1;
        depth/shading: the prediction in target units. ``out_size`` ``(H, W)`` nearest-upsamples
        (once for all tasks, on ``act``'s device); ``None`` keeps the site's grid. Computed in
        float32 without autograd; the maps stay on ``act``'s device (:func:`to_numpy` fetches them).
        """
        return {task: z[:, row] for names, z in self.stacked(site, step, act, tasks, out_size)
                for row, task in enumerate(names)}

    def stacked(
        self,
        site: str,
        step: int,
        act: torch.Tensor,
        tasks: Sequence[str] | None = None,
        out_size: int | Sequence[int] | None = None,
    ) -> list[Stacked]:
        """:meth:`apply` without splitting by task: ``[(tasks, [B, R, H, W])]``, one entry per token
        grid (one in practice), so a reader can keep a site's maps as one tensor."""
        if act.ndim != 3:
            raise ProbeError(f"activation for {site} must be [B, T, C], got shape {tuple(act.shape)}")
        key = (site, step, None if tasks is None else tuple(tasks), act.device)
        stacks = self._stacks.get(key)
        if stacks is None:
            stacks = self._stacks[key] = self._build(site, int(step), key[2], act.device)
        if torch.is_grad_enabled():  # the sampler runs without autograd: skip the context there
            with torch.no_grad():
                return self._apply(site, stacks, act, out_size)
        return self._apply(site, stacks, act, out_size)

    @staticmethod
    def _apply(site: str, stacks: tuple[_Stack, ...], act: torch.Tensor, out_size: int | Sequence[int] | None) -> list[Stacked]:
        # Called from a forward hook at every site and step: kept to a handful of tensor ops.
        batch, tokens, channels = act.shape
        x = act if act.dtype == torch.float32 else act.float()
        xt = x.transpose(1, 2)
        out = []
        for stack in stacks:
            h, w = stack.grid
            if channels != stack.channels:
                raise ProbeError(f"probe for {site} expects {stack.channels} channels, the activation has {channels}")
            if tokens != h * w:
                raise ProbeError(
                    f"probe for {site} expects a {h}x{w} grid ({h * w} tokens), the activation has {tokens} tokens"
                )
            # W @ x^T gives [B, R, T]: each task's map is already a contiguous [h, w] plane.
            weight = stack.weight if batch == 1 else stack.weight.expand(batch, -1, -1)
            z = torch.baddbmm(stack.bias, weight, xt).view(batch, len(stack.tasks), h, w)
            if stack.sigmoid_rows:
                z.narrow(1, 0, stack.sigmoid_rows).sigmoid_()
            if out_size is not None:
                size = as_hw(out_size)
                if size != (h, w):
                    z = nearest(z, size)
            out.append((stack.tasks, z))
        return out

    def _build(self, site: str, step: int, tasks: tuple[str, ...] | None, device: torch.device) -> tuple[_Stack, ...]:
        # Rows grouped by token grid (banks of one model share it; a group each if they do not).
        groups: dict[tuple[int, int, int], list[tuple[bool, str, torch.Tensor, torch.Tensor]]] = {}
        for task in self.tasks_at(site, step) if tasks is None else tasks:
            if task not in self.banks:
                raise ProbeError(f"no probe bank for task {task!r}; loaded: {sorted(self.banks) or 'none'}")
            bank = self.banks[task]
            if (site, step) not in bank:
                raise ProbeError(
                    f"no {bank.meta.task} probe for {site} at step {step} "
                    f"(this bank has sites {list(bank.sites)} and steps {list(bank.steps)})"
                )
            weight, bias = bank.weights[(site, step)].detach().to(torch.float32), bank.biases.get((site, step))
            bias = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias.detach().to(torch.float32)
            if bank.meta.task == "foreground":
                # softmax([z0, z1])[1] == sigmoid(z1 - z0): one row instead of two, and no softmax.
                row, offset, fg = weight[1] - weight[0], bias[1] - bias[0], True
            else:
                std, mean = bank.meta.target_std, bank.meta.target_mean
                row, offset, fg = weight[0] * std, bias[0] * std + mean, False
            groups.setdefault(bank.meta.sites[site], []).append((fg, task, row.to(device), offset.to(device)))
        stacks = []
        for (c, h, w), rows in groups.items():
            rows.sort(key=lambda r: not r[0])  # foreground first (stable: task order otherwise)
            stacks.append(_Stack(
                weight=torch.stack([r[2] for r in rows])[None].contiguous(),
                bias=torch.stack([r[3] for r in rows])[:, None],
                tasks=tuple(r[1] for r in rows),
                sigmoid_rows=sum(r[0] for r in rows),
                channels=c,
                grid=(h, w),
            ))
        return tuple(stacks)


def to_numpy(maps: Mapping[K, torch.Tensor]) -> dict[K, np.ndarray]:
    """Maps on any device as float32 numpy arrays, fetched from a GPU in one copy (one sync)."""
    if not maps:
        return {}
    keys, tensors = list(maps), [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in maps.values()]
    if all(t.device.type == "cpu" for t in tensors):
        return {k: t.numpy() if t.is_contiguous() else np.ascontiguousarray(t.numpy()) for k, t in zip(keys, tensors)}
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors]).cpu().numpy()
    out, start = {}, 0
    for k, t in zip(keys, tensors):
        out[k] = flat[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


class ProbeReader:
    """Apply each task's probe at its chosen site, step by step (a sampler ``Reader``).

    ``banks`` maps task -> :class:`ProbeBank` (already on the model's device for speed; any device
    works). ``sites`` maps task -> a site key, or ``{step: site}`` for a per-step choice (e.g. the
    best site at each step), or for the foreground a :class:`~ldm_scene.probes.GroupProbe` (no bank
    needed): its sites' activations are kept through the step and read together when it is
    collected, at the image size it was fit at (bilinear). Tasks in ``sites`` without a bank are
    refused; a step the chosen site's probe does not cover is simply not reported. ``out_size`` is
    the ``(height, width)`` of the returned maps; ``None`` keeps each site's own token grid
    (smallest; upsample for display with :func:`upsample_nearest`). Tasks that read the same site at
    a step share one matmul (:class:`StackedProbes`), and a step's maps reach the host in one copy
    when it is collected.
    """

    name = "probes"

    def __init__(
        self,
        banks: Mapping[str, ProbeBank],
        sites: Mapping[str, SiteChoice],
        out_size: int | Sequence[int] | None = None,
    ) -> None:
        self.groups: dict[str, GroupProbe] = {t: c for t, c in sites.items() if isinstance(c, GroupProbe)}
        bad = [t for t in self.groups if t != "foreground"]
        if bad:
            raise ProbeError(f"a group probe reads the foreground, not {bad}")
        missing = [t for t in sites if t not in banks and t not in self.groups]
        if missing:
            raise ProbeError(f"no probe bank for task(s) {missing}; loaded: {sorted(banks) or 'none'}")
        for task, choice in sites.items():
            if task in self.groups:
                continue
            unknown = sorted(_chosen_sites(choice) - set(banks[task].sites))
            if unknown:
                raise ProbeError(
                    f"{task}: no probes at site(s) {unknown}; this bank has {', '.join(banks[task].sites)}"
                )
        self.banks = {t: b for t, b in banks.items() if t not in self.groups}
        self.choices = {t: c for t, c in sites.items() if t not in self.groups}
        self.out_size = out_size
        used = set()
        for choice in sites.values():
            used |= _chosen_sites(choice)
        bank_order = [s for bank in self.banks.values() for s in bank.sites]
        bank_order += [s for g in self.groups.values() for s in g.sites]
        self.sites: tuple[str, ...] = tuple(dict.fromkeys(s for s in bank_order if s in used))
        covered: set[int] = set()
        for task, choice in self.choices.items():
            steps = self.banks[task].steps
            covered |= set(steps) if isinstance(choice, str) else {s for s in choice if s in steps}
        for group in self.groups.values():
            covered |= set(group.steps)
        self.steps: Collection[int] | None = frozenset(covered)
        self._probes = StackedProbes({t: self.banks[t] for t in self.choices})
        self._plan: dict[tuple[str, int], tuple[str, ...]] = {}
        self._pending: list[Stacked] = []
        self._group_acts: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.groups}

    def _tasks(self, site: str, step: int) -> tuple[str, ...]:
        """The tasks that read ``site`` at ``step`` (worked out once per pair)."""
        key = (site, step)
        tasks = self._plan.get(key)
        if tasks is None:
            tasks = self._plan[key] = tuple(
                task for task, choice in self.choices.items()
                if site_for_step(choice, step) == site and key in self.banks[task]
            )
        return tasks

    def read(self, site: str, step: int, activation: torch.Tensor) -> None:
        tasks = self._tasks(site, step)
        if tasks:
            self._pending.extend(self._probes.stacked(site, step, activation[:1], tasks, self.out_size))
        for task, group in self.groups.items():
            if step in group.weights and site in group.sites:
                self._group_acts[task][site] = activation[:1].detach()

    def collect(self, step: int) -> dict[str, np.ndarray]:
        """This step's maps ``{task: float32 [H, W]}`` (only tasks that had a probe here)."""
        pending, self._pending = self._pending, []
        maps = {i: z for i, (_, z) in enumerate(pending)}
        done = {}
        for task, group in self.groups.items():
            acts, self._group_acts[task] = self._group_acts[task], {}
            if step in group.weights and all(s in acts for s in group.sites):
                done[task] = len(maps)
                maps[len(maps)] = group.readout(step, acts, self.out_size)[:, None]
        arrays = to_numpy(maps)
        out = {task: arrays[i][0, row] for i, (tasks, _) in enumerate(pending) for row, task in enumerate(tasks)}
        out.update({task: arrays[i][0, 0] for task, i in done.items()})
        return out


# --- pictures ------------------------------------------------------------------------------------


def _display(image: Image.Image, size: int | None) -> Image.Image:
    image = image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    # Small toy images are blown up without smoothing so every pixel stays visible.
    resample = Image.NEAREST if max(image.size) * 2 <= size else Image.BILINEAR
    return image.resize((size, size), resample)


def foreground_overlay(
    image: Image.Image, prob: np.ndarray, display_size: int | None = None, alpha: float = 0.6
) -> Image.Image:
    """The image with the foreground probability ``prob`` (any grid) laid over it as a red tint."""
    base = _display(image, display_size)
    w, h = base.size
    p = np.clip(upsample_nearest(np.asarray(prob, np.float32), (h, w)), 0.0, 1.0)[..., None]
    rgb = np.asarray(base, np.float32)
    tint = np.array(_FOREGROUND_TINT, np.float32)
    out = rgb * (1 - alpha * p) + tint * (alpha * p)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def value_range(bank: ProbeBank) -> tuple[float, float]:
    """A fixed colour range for a depth/shading bank: its target mean +- 2 standard deviations."""
    lo = bank.meta.target_mean - 2 * bank.meta.target_std
    hi = bank.meta.target_mean + 2 * bank.meta.target_std
    return float(lo), float(hi)


def colormap_image(
    values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis", display_size: int | None = None
) -> Image.Image:
    """A 2-D map through a matplotlib colour map, ``[vmin, vmax]`` fixed, nearest-upsampled."""
    import matplotlib

    values = np.asarray(values, np.float32)
    if display_size is not None:
        values = upsample_nearest(values, (display_size, display_size))
    span = vmax - vmin if math.isfinite(vmax - vmin) and vmax > vmin else 1.0
    scaled = np.nan_to_num((values - vmin) / span, nan=0.0).clip(0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled, bytes=True)
    return Image.fromarray(rgba[..., :3])


def readout_image(
    task: str,
    values: np.ndarray,
    preview: Image.Image,
    bank: ProbeBank,
    display_size: int | None = None,
) -> Image.Image:
    """The picture of one task's map: overlay for foreground, colour map for depth and shading."""
    if task not in TASKS:
        raise ProbeError(f"unknown task {task!r}")
    if task == "foreground":
        return foreground_overlay(preview, values, display_size)
    lo, hi = value_range(bank)
    size = display_size or max(preview.size)
    return colormap_image(values, lo, hi, _CMAPS[task], size)


# --- emergence for one image -----------------------------------------------------------------------


def emergence(
    per_step: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> dict[str, list[float]]:
    """Score each step's maps against a reference: Dice for foreground, Spearman for depth/shading.

    ``per_step[s]`` holds the step's maps (any grid, upsampled to the reference's size);
    ``reference`` the target per task (a bool/probability mask for foreground, values otherwise).
    A step without a map for a task, or an undefined correlation (a constant map), scores nan.
    Returns ``{task: [score per step]}`` for the tasks in ``reference``.
    """
    curves: dict[str, list[float]] = {}
    for task, ref in reference.items():
        ref = np.asarray(ref)
        scores = []
        for maps in per_step:
            if task not in maps:
                scores.append(float("nan"))
                continue
            pred = upsample_nearest(np.asarray(maps[task]), ref.shape)
            if task == "foreground":
                scores.append(dice(pred > 0.5, ref > 0.5))
            else:
                scores.append(spearman(pred, ref) if np.isfinite(pred).all() else float("nan"))
        curves[task] = scores
    return curves
