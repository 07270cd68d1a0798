"""Scoring probe readouts on test images, and the tables made from the scores.

Per test image and step, every readout (a probe at a site, the latent probe, the permuted-UNet
probe, the labeler applied to the decoded x0 preview, the layout prior) is compared with the
labeler's labels of the *final* image, at the labels' resolution (the paper's protocol):

- foreground: Dice (and IoU) of the readout's mask (probe probability > 0.5, nearest-upsampled
  from the site's grid; the probes' decision thresholds were chosen on the validation images and
  folded into their biases) against the labeler's mask;
- depth: Spearman rank correlation over all pixels, raw and *residual* (DESIGN.md section 4: the
  train split's per-pixel mean depth map subtracted from prediction and target, so that the layout
  prior alone scores 0);
- shading: Spearman rank correlation.

Scores are averaged over test images, skipping images where a correlation is undefined (a
constant map), as :mod:`ldm_scene.metrics` does. The batched functions here compute exactly the
metrics of :mod:`ldm_scene.metrics` for many maps at once (ties get average ranks).

Steps are 0-based denoising-loop indices everywhere in ``metrics.json``; :func:`render_readme`
prints them 1-based ("step 5 of 15" is index 4).
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "METRIC",
    "average_ranks",
    "pearson_rows",
    "spearman_rows",
    "dice_rows",
    "iou_rows",
    "upsample",
    "target_ranks_for",
    "score_maps",
    "first_step_reaching",
    "nan_mean",
    "json_clean",
    "render_readme",
]

#: The headline metric of each task.
METRIC = {"foreground": "dice", "depth": "spearman", "shading": "spearman"}


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..P of each row of ``x [M, P]``, ties given the mean of the ranks they span (float64)."""
    if x.ndim != 2:
        raise ValueError(f"expected [M, P], got {tuple(x.shape)}")
    m, p = x.shape
    values, order = torch.sort(x, dim=1)
    pos = torch.arange(p, device=x.device).expand(m, p)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    if bool(starts.all()):
        ranks_sorted = (pos + 1).to(torch.float64)
    else:
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        # first and last sorted position of each element's tie group
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        last = torch.where(ends, pos, torch.full_like(pos, p - 1)).flip(1).cummin(dim=1).values.flip(1)
        ranks_sorted = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Pearson correlation of each row of ``a [M, P]`` with ``b [P]`` (or the rows of ``b [M, P]``).

    ``nan`` where a row (or ``b``) is constant, as :func:`ldm_scene.metrics.pearson`.
    """
    a = a.to(torch.float64)
    b = b.to(device=a.device, dtype=torch.float64)
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    num = (a * b).sum(-1)
    den = a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt()
    return _ratio(num, den)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
    ok = den > 0
    r = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))
    return r.clamp(-1, 1).cpu().numpy()


def _check_finite(*xs: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(x).all()) for x in xs):
        raise ValueError("spearman: inputs must be finite (got nan or inf)")


def _cell_factors(grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int] | None:
    """Integer up-sampling factors from a token grid to a label size, or None if they do not divide."""
    (h, w), (hh, ww) = grid, size
    if hh % h or ww % w:
        return None
    return hh // h, ww // w


def upsample(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-upsample maps ``[M, h, w]`` to ``[M, *size]`` (the paper's probe read-out)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    dtype = pred.dtype
    out = torch.nn.functional.interpolate(pred[:, None].to(torch.float32 if dtype == torch.bool else dtype), size=size, mode="nearest")[:, 0]
    return out.bool() if dtype == torch.bool else out


def spearman_rows(pred: torch.Tensor, target: torch.Tensor, target_ranks: torch.Tensor | None = None) -> np.ndarray:
    """Spearman correlation of each map of ``pred [M, h, w]``, nearest-upsampled, with ``target [H, W]``.

    The maps may be on a coarser grid than the target (a probe's token grid): when it divides the
    target's size, the correlation is computed exactly on the grid (a nearest-upsampled map's
    average ranks are an affine function of its cells' ranks), without upsampling. ``target`` may
    also be ``[M, H, W]`` (one target per map). ``target_ranks`` may pass the target's
    :func:`average_ranks` (flattened) to save a sort. Non-finite inputs raise ``ValueError``.
    """
    _check_finite(pred, target)
    size = tuple(target.shape[-2:])
    m = pred.shape[0]
    factors = _cell_factors(tuple(pred.shape[-2:]), size) if target.ndim == 2 else None
    if factors is None or factors == (1, 1):
        pred = upsample(pred, size).reshape(m, -1)
        if target_ranks is None:
            flat = target.reshape(-1, pred.shape[1]).to(torch.float64)
            target_ranks = average_ranks(flat)
            if target.ndim == 2:
                target_ranks = target_ranks[0]
        return pearson_rows(average_ranks(pred.to(torch.float64)), target_ranks)
    if target_ranks is None:
        target_ranks = average_ranks(target.reshape(1, -1).to(torch.float64))[0]
    (h, w), (fh, fw) = pred.shape[-2:], factors
    rt = target_ranks.reshape(h, fh, w, fw).to(torch.float64)
    cell_mean = rt.mean(dim=(1, 3)).reshape(-1)
    rt_std = (rt - rt.mean()).pow(2).mean().sqrt()
    rg = average_ranks(pred.reshape(m, -1).to(torch.float64))
    rg = rg - rg.mean(dim=1, keepdim=True)
    num = (rg * cell_mean.to(rg.device)).mean(1)
    den = rg.pow(2).mean(1).sqrt() * rt_std.to(rg.device)
    return _ratio(num, den)


def _mask_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|A|, |B| and |A n B| of nearest-upsampled masks ``pred [M, h, w]`` and ``target [H, W]``."""
    pred = pred.bool()
    target = target.bool().to(pred.device)
    size = tuple(target.shape[-2:])
    m = pred.shape[0]
    factors = _cell_factors(tuple(pred.shape[-2:]), size)
    if factors is None:
        pred = upsample(pred, size)
        factors = (1, 1)
    (h, w), (fh, fw) = pred.shape[-2:], factors
    per_cell = target.reshape(h, fh, w, fw).sum(dim=(1, 3)).reshape(-1).to(torch.float64)
    flat = pred.reshape(m, -1).to(torch.float64)
    inter = flat @ per_cell
    return flat.sum(1) * (fh * fw), per_cell.sum().expand(m), inter


def dice_rows(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of each mask of ``pred [M, h, w]``, nearest-upsampled, with ``target [H, W]``; 1.0 if both are empty."""
    a, b, inter = _mask_counts(pred, target)
    total = a + b
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).cpu().numpy()


def iou_rows(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """IoU of each mask of ``pred [M, h, w]``, nearest-upsampled, with ``target [H, W]``; 1.0 if both are empty."""
    a, b, inter = _mask_counts(pred, target)
    union = a + b - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).cpu().numpy()


def score_maps(
    task: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor | None = None,
    target_ranks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Scores of readouts ``pred [M, h, w]`` (nearest-upsampled) against the final image's labels ``target [H, W]``.

    Foreground: ``pred`` is a mask (bool, or a probability thresholded at 0.5) and the result has
    ``"score"`` (Dice) and ``"iou"``. Depth: ``"score"`` (Spearman) and, with the ``prior`` map,
    ``"residual"`` (Spearman after subtracting it from both, at full resolution). Shading:
    ``"score"``. Each is ``[M]``. ``target_ranks`` may hold the target's precomputed ranks
    (:func:`target_ranks_for`).
    """
    target_ranks = target_ranks or {}
    if task == "foreground":
        mask = pred if pred.dtype == torch.bool else pred > 0.5
        return {"score": dice_rows(mask, target > 0.5), "iou": iou_rows(mask, target > 0.5)}
    out = {"score": spearman_rows(pred, target, target_ranks.get("score"))}
    if task == "depth" and prior is not None:
        full = upsample(pred, tuple(target.shape[-2:]))
        out["residual"] = spearman_rows(full - prior, target - prior, target_ranks.get("residual"))
    return out


def target_ranks_for(task: str, target: torch.Tensor, prior: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Ranks of a target map (and of its residual) for :func:`score_maps`, computed once per image."""
    if task == "foreground":
        return {}
    ranks = {"score": average_ranks(target.reshape(1, -1).to(torch.float64))[0]}
    if task == "depth" and prior is not None:
        ranks["residual"] = average_ranks((target - prior).reshape(1, -1).to(torch.float64))[0]
    return ranks


def nan_mean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring nans (images where a score is undefined); nan where all are."""
    values = np.asarray(values, dtype=np.float64)
    count = np.sum(~np.isnan(values), axis=axis)
    total = np.nansum(values, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def first_step_reaching(curve: Sequence[float | None], fraction: float = 0.9) -> int | None:
    """The first 0-based step whose score reaches ``fraction`` of the last step's score.

    ``None`` when the final score is undefined or not positive (no meaningful fraction of it).
    """
    values = [math.nan if v is None else float(v) for v in curve]
    if not values or not math.isfinite(values[-1]) or values[-1] <= 0:
        return None
    goal = fraction * values[-1]
    for step, v in enumerate(values):
        if math.isfinite(v) and v >= goal:
            return step
    return None


def json_clean(obj: Any) -> Any:
    """Make ``obj`` JSON-safe: numpy scalars and arrays to Python, nan and inf to ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --- README -----------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _at(curve: Sequence[float | None] | None, step: int) -> float | None:
    if not curve or step >= len(curve):
        return None
    return curve[step]


def _short(site: str | None) -> str:
    if site is None:
        return "—"
    parts = site.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].replace('_blocks', '')}{parts[1]}.{parts[3]}"


def render_readme(metrics: Mapping[str, Any], target_step: int = 4) -> str:
    """The ``README.md`` of a probe directory, generated from ``metrics.json`` (no hand-written numbers).

    ``target_step`` (0-based, default 4: "step 5 of 15") is the step at which the issue's targets
    are checked: foreground Dice >= 0.85 and residual-depth Spearman well above the prior and the
    latent probe, with the labeler on the decoded x0 preview still far behind.
    """
    m = metrics
    steps = int(m["num_steps"])
    tstep = min(target_step, steps - 1)
    lines = [
        f"# Linear probes for `{m['model']}`",
        "",
        "Generated by `python -m ldm_scene.training run` from `metrics.json`; do not edit by hand.",
        "",
        f"- images: {m['n_train']} train + {m['n_val']} validation (probes fit on both; the ridge penalty and the "
        f"best site per step chosen on validation) and {m['n_test']} test images, seeds "
        f"{m['seeds']['first']}..{m['seeds']['first'] + m['seeds']['count'] - 1}",
        f"- generation: {m['scheduler']}, {steps} steps, guidance {m['guidance']}, "
        f"{m['image_size'][0]}x{m['image_size'][1]} images; labels: {m['labeler']} applied to the final image",
        f"- probes: closed-form ridge per (site, step) from streamed statistics; files `foreground.safetensors`, "
        f"`depth.safetensors`, `shading.safetensors`",
        "- foreground decision threshold: ridge regresses each token's foreground fraction p; the threshold on p "
        "with the best mean Dice on the validation images is chosen per (site, step) (the latent and permuted-UNet "
        "baselines get the same) and folded into the bias, so probability > 0.5 is the calibrated mask",
        "- steps are numbered 1..N here (metrics.json uses 0-based indices)",
        "- best site per step: highest validation R² of the ridge fit; overall best site: highest mean validation R² "
        "over the last 5 steps",
        "",
        "Figures: [emergence](emergence.png) · "
        + " · ".join(f"[{t} heat map](heatmap_{t}.png)" for t in m["tasks"])
        + " · [readout strips](strips.png)",
        "",
        "![emergence](emergence.png)",
        "",
        "## Summary",
        "",
        "| task | metric | best site | final score | step reaching 90% of final | "
        f"score at step {tstep + 1} | labeler on x0 at step {tstep + 1} | latent probe | permuted UNet | prior |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, t in m["tasks"].items():
        b = t["baselines"]
        first = t.get("first_step_90pct")
        lines.append(
            f"| {task} | {t['metric']} | `{t['best_site']}` | {_fmt(_at(t['best_per_step'], steps - 1))} | "
            f"{'—' if first is None else first + 1} | {_fmt(_at(t['best_per_step'], tstep))} | "
            f"{_fmt(_at(b.get('labeler_on_x0'), tstep))} | {_fmt(_at(b.get('latent_probe'), tstep))} | "
            f"{_fmt(_at(b.get('permuted_unet'), tstep))} | {_fmt(_at(b.get('prior'), tstep))} |"
        )
        if task == "depth" and "residual_best_per_step" in t:
            br = t.get("baselines_residual", {})
            lines.append(
                f"| depth (residual) | spearman | `{t['best_site']}` | {_fmt(_at(t['residual_best_per_step'], steps - 1))} | "
                f"{'—' if t.get('residual_first_step_90pct') is None else t['residual_first_step_90pct'] + 1} | "
                f"{_fmt(_at(t['residual_best_per_step'], tstep))} | {_fmt(_at(br.get('labeler_on_x0'), tstep))} | "
                f"{_fmt(_at(br.get('latent_probe'), tstep))} | {_fmt(_at(br.get('permuted_unet'), tstep))} | "
                f"{_fmt(_at(br.get('prior'), tstep))} |"
            )
    lines += ["", f"## Targets at step {tstep + 1} of {steps}", ""]
    fg, depth = m["tasks"].get("foreground"), m["tasks"].get("depth")
    if fg is not None:
        d = _at(fg["best_per_step"], tstep)
        x0 = _at(fg["baselines"].get("labeler_on_x0"), tstep)
        ok = d is not None and d >= 0.85
        lines.append(
            f"- foreground Dice {_fmt(d)} (target >= 0.85: {'met' if ok else 'not met'}); "
            f"labeler on the decoded x0 preview {_fmt(x0)}"
        )
    if depth is not None and "residual_best_per_step" in depth:
        r = _at(depth["residual_best_per_step"], tstep)
        br = depth.get("baselines_residual", {})
        lines.append(
            f"- residual depth Spearman {_fmt(r)} vs prior {_fmt(_at(br.get('prior'), tstep))}, latent probe "
            f"{_fmt(_at(br.get('latent_probe'), tstep))}, permuted UNet {_fmt(_at(br.get('permuted_unet'), tstep))}, "
            f"labeler on x0 {_fmt(_at(br.get('labeler_on_x0'), tstep))}"
        )
    for task, t in m["tasks"].items():
        lines += [
            "",
            f"## {task}: {t['metric']} per step (test split)",
            "",
            "| step | best site | probe | labeler on x0 | latent probe | permuted UNet | prior |"
            + (" residual probe | residual latent | residual labeler on x0 |" if task == "depth" else "")
            + (" IoU |" if task == "foreground" else ""),
            "|---|---|---|---|---|---|---|" + ("---|---|---|" if task == "depth" else "") + ("---|" if task == "foreground" else ""),
        ]
        b = t["baselines"]
        for s in range(steps):
            row = (
                f"| {s + 1} | {_short(t['best_site_per_step'][s])} | {_fmt(t['best_per_step'][s])} | "
                f"{_fmt(_at(b.get('labeler_on_x0'), s))} | {_fmt(_at(b.get('latent_probe'), s))} | "
                f"{_fmt(_at(b.get('permuted_unet'), s))} | {_fmt(_at(b.get('prior'), s))} |"
            )
            if task == "depth":
                br = t.get("baselines_residual", {})
                row += (
                    f" {_fmt(_at(t.get('residual_best_per_step'), s))} | {_fmt(_at(br.get('latent_probe'), s))} | "
                    f"{_fmt(_at(br.get('labeler_on_x0'), s))} |"
                )
            if task == "foreground":
                row += f" {_fmt(_at(t.get('iou_best_per_step'), s))} |"
            lines.append(row)
    avr = m.get("adam_vs_ridge")
    if avr and avr.get("tasks"):
        lines += [
            "",
            f"## Adam (the paper's trainer) vs closed-form ridge, same {avr['n_images']} images",
            "",
            f"Adam: bias-free linear map, lr {avr['lr']}, batch {avr['batch_size']}, {avr['epochs']} epochs "
            f"({_fmt(avr['seconds']['adam'], 1)} s); ridge: {_fmt(avr['seconds']['ridge'], 2)} s. Test-split scores:",
            "",
            "| task | site | step | ridge | adam |",
            "|---|---|---|---|---|",
        ]
        for task, per_key in avr["tasks"].items():
            for key, v in per_key.items():
                site, _, step = key.partition("@")
                lines.append(f"| {task} | `{site}` | {int(step) + 1} | {_fmt(v['ridge'])} | {_fmt(v['adam'])} |")
    tim = m.get("timings")
    if tim:
        lines += ["", "## Cost", ""]
        for k, v in tim.items():
            lines.append(f"- {k.replace('_', ' ')}: {_fmt(v, 3) if isinstance(v, float) else v}")
    lines.append("")
    return "\n".join(lines)


def dumps(metrics: Mapping[str, Any]) -> str:
    """``metrics.json`` text: JSON-cleaned (nan -> null), indented, stable key order as built."""
    return json.dumps(json_clean(metrics), indent=1, allow_nan=False)
