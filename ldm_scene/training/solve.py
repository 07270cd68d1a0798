"""Solve the fit: ridge penalties chosen on validation, probes refit on train + val, banks saved."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..probes import CLASS_MEANS, ProbeBank, ProbeMeta, class_means_bank, load_probe_dir, probe_path, tensor_name
from . import controls as ctl
from . import evaluate as ev
from .config import LATENT, PERMUTED, UNET, slice_stats
from .context import RunContext, write_text
from .fit import RidgeStats, choose_penalty, to_normalised
from .fit_pass import FitState


# --- solve ------------------------------------------------------------------------------------

@dataclass
class Solution:
    """Solved probes and what evaluation needs, as saved in ``out`` and ``out/work``.

    ``weights[group][task][(key, step)] = (w [K, C], b [K])`` predicting normalised targets;
    ``val_r2[group][task][key]`` per step; ``best[group][task]`` the site per step with the highest
    validation R^2; ``norm[task] = (mean, std)``; ``priors[task]`` the per-pixel mean label map.
    The prompt-only baseline: ``prompt_maps[task]`` ``[P, H, W]``, the fitting images' mean label
    per prompt of ``prompts`` (nan rows for a prompt without fitting images); ``train_prompt_maps``
    and ``train_priors`` the same over the train images alone (for choosing its foreground threshold
    on the validation images), and ``prompt_threshold`` that threshold.
    """

    weights: dict[str, dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]]]
    penalties: dict[str, dict[str, dict[tuple[str, int], float]]]
    val_r2: dict[str, dict[str, dict[str, list[float]]]]
    best: dict[str, dict[str, list[str]]]
    best_site: dict[str, str]
    norm: dict[str, tuple[float, float]]
    priors: dict[str, torch.Tensor]
    n_fit: dict[str, int]
    thresholds: dict[str, dict[tuple[str, int], float]] | None = None
    prompts: list[str] = field(default_factory=list)
    prompt_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    train_prompt_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    train_priors: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_threshold: float | None = None

    def prompt_only(self, task: str, prompt: str) -> tuple[torch.Tensor, bool]:
        """The prompt-only map ``[H, W]`` for a test image's prompt, and whether same-prompt images made it."""
        index = {p: k for k, p in enumerate(self.prompts)}
        return ctl.prompt_map(prompt, index, self.prompt_maps[task], self.priors[task])


def _val_r2(val: RidgeStats, mse: float) -> float:
    var = float((val.target_std() ** 2).mean())
    return 1.0 - mse / var if var > 0 else math.nan


def _best_sites(val_r2: dict[str, list[float]], steps: int) -> tuple[list[str], str]:
    sites = [s for s in val_r2 if s != LATENT]
    per_step = []
    for step in range(steps):
        per_step.append(max(sites, key=lambda s: -math.inf if math.isnan(val_r2[s][step]) else val_r2[s][step]))
    tail = range(max(0, steps - 5), steps)

    def tail_mean(s: str) -> float:
        vals = [val_r2[s][t] for t in tail if not math.isnan(val_r2[s][t])]
        return sum(vals) / len(vals) if vals else -math.inf

    return per_step, max(sites, key=tail_mean)


def solve(ctx: RunContext, state: FitState, progress: bool = True) -> Solution:
    """Choose penalties on validation, refit on train + val, normalise, pick best sites; save everything."""
    c = ctx.config
    cols = ctx.layout.columns
    norm: dict[str, tuple[float, float]] = {}
    for task in ctx.layout.tasks:
        if task == "foreground":
            norm[task] = (0.0, 1.0)
            continue
        total, sq, count = (float(v) for v in state.pixels[task])
        mean = total / count
        std = math.sqrt(max(sq / count - mean * mean, 0.0))
        norm[task] = (mean, std if std > 0 else 1.0)
    priors = {t: (state.maps[t] / max(state.n_images, 1)).to(torch.float32) for t in ctx.layout.tasks}
    prompt_maps, train_prompt_maps, train_priors = {}, {}, {}
    for t in ctx.layout.tasks:
        sums = state.prompt_sums["train"][t] + state.prompt_sums["val"][t]
        counts = state.prompt_counts["train"] + state.prompt_counts["val"]
        prompt_maps[t] = ctl.prompt_means(sums[:-1], counts[:-1]).to(torch.float32)
        train = ctl.prompt_means(state.prompt_sums["train"][t], state.prompt_counts["train"]).to(torch.float32)
        train_prompt_maps[t], train_priors[t] = train[:-1], train[-1]
    weights: dict = {}
    penalties: dict = {}
    val_r2: dict = {}
    best: dict = {}
    best_site: dict = {}
    for group, splits in state.stats.items():
        weights[group], penalties[group], val_r2[group], best[group] = {}, {}, {}, {}
        keys = list(splits["train"])
        for task in ctx.layout.tasks:
            weights[group][task], penalties[group][task] = {}, {}
            r2: dict[str, list[float]] = {}
            mean, std = norm[task]
            for key in tqdm(keys, desc=f"solve {group} {task}", disable=not progress, leave=False):
                train = slice_stats(splits["train"][key], cols[task])
                val = slice_stats(splits["val"][key], cols[task])
                penalty, _, _, scores = choose_penalty(train, val, c.penalties, refit=False)
                both = RidgeStats(train.channels, train.outputs, device=train.device)
                both.merge(train)
                both.merge(val)
                w, b = both.solve(penalty)
                if task != "foreground":
                    w, b = to_normalised(w, b, mean, std)
                weights[group][task][key] = (w, b)
                penalties[group][task][key] = penalty
                r2.setdefault(key[0], [math.nan] * c.steps)[key[1]] = _val_r2(val, scores[penalty])
            val_r2[group][task] = r2
            per_step, overall = _best_sites(r2, c.steps)
            best[group][task] = per_step
            if group == UNET:
                best_site[task] = overall
    n_fit = {
        "train": sum(1 for r in ctx.records if r.split == "train"),
        "val": sum(1 for r in ctx.records if r.split == "val"),
    }
    sol = Solution(weights, penalties, val_r2, best, best_site, norm, priors, n_fit, prompts=list(ctx.prompt_index),
                   prompt_maps=prompt_maps, train_prompt_maps=train_prompt_maps, train_priors=train_priors)
    save_solution(ctx, sol)
    if "foreground" in cols and UNET in state.stats:
        save_class_means(ctx, sol, state)
    return sol


def _meta(ctx: RunContext, sol: Solution, task: str, group: str) -> ProbeMeta:
    c = ctx.config
    mean, std = sol.norm[task]
    seeds = [r.seed for r in ctx.records]
    g = ctx.guidance
    return ProbeMeta(
        task=task,
        model_id=ctx.model.model_id,
        image_size=ctx.image_size,
        scheduler=ctx.model.scheduler_name,
        num_steps=c.steps,
        sites={i.key: (i.channels, i.height, i.width) for i in ctx.sites},
        target_mean=mean,
        target_std=std,
        training={
            "method": "ridge",
            "unet": "permuted (control)" if group == PERMUTED else "as trained",
            "penalty": {tensor_name(s, t, "weight")[: -len(".weight")]: p for (s, t), p in sol.penalties[group][task].items() if s != LATENT},
            "penalty_grid": list(c.penalties),
            "penalty_scale": "relative: lambda = penalty * trace(centred X^T X) / C",
            "penalty_chosen_on": "validation MSE; probe refit on train + val",
            "targets": "labels of the final image, area-averaged to each site's token grid"
            + ("; foreground as [1 - p, p] with p the cell's foreground fraction" if task == "foreground" else ""),
            "n_images": sol.n_fit["train"] + sol.n_fit["val"],
            "n_train": sol.n_fit["train"],
            "n_val": sol.n_fit["val"],
            "seeds": {"first": min(seeds), "count": len(seeds), "fit": [r.seed for r in ctx.fit_records]},
            "labeler": ctx.labeler.name,
            "guidance": g["guidance"],
            "late_guidance": g["late_guidance"],
            "late_from": g["late_from"],
            "guidance_schedule": g["text"],
            "guidance_per_step": g["per_step"],
            "readout_upsampling": ev.UPSAMPLING,
            "bias": True,
            **({"decision_threshold": {
                "chosen_on": "validation images, highest mean Dice over a grid of thresholds on the ridge "
                             "prediction p, folded into the bias so that softmax probability > 0.5 means p > threshold",
                "threshold": {tensor_name(s, t, "weight")[: -len(".weight")]: v
                              for (s, t), v in sol.thresholds[group].items() if s != LATENT},
            }} if task == "foreground" and sol.thresholds and group in sol.thresholds else {}),
            "best_site_per_step": sol.best[group][task],
            "best_site": sol.best_site.get(task),
        },
    )


def _bank(ctx: RunContext, sol: Solution, task: str, group: str) -> ProbeBank:
    ws = {k: v[0] for k, v in sol.weights[group][task].items() if k[0] != LATENT}
    bs = {k: v[1] for k, v in sol.weights[group][task].items() if k[0] != LATENT}
    return ProbeBank(_meta(ctx, sol, task, group), ws, bs)


def save_class_means(ctx: RunContext, sol: Solution, state: FitState) -> None:
    """The background / foreground mean activation per (site, step), read off the statistics.

    With foreground targets ``[1 - p, p]``, column k of ``X^T Y`` sums the activations weighted by
    each token's background / foreground fraction and its bias row sums the weights, so their
    ratio is the class mean. The steering intervention moves tokens along their difference.
    """
    cols = ctx.layout.columns["foreground"]
    sums, counts = {}, {}
    for (key, step), train in state.stats[UNET]["train"].items():
        if key == LATENT:
            continue
        xty = train.xty[:, cols] + state.stats[UNET]["val"][(key, step)].xty[:, cols]
        sums[(key, step)] = xty[: train.channels].T
        counts[(key, step)] = xty[train.channels]
    bank = class_means_bank(sums, counts, _bank(ctx, sol, "foreground", UNET))
    bank.save(Path(ctx.out) / f"{CLASS_MEANS}.safetensors")


def save_solution(ctx: RunContext, sol: Solution) -> None:
    """Banks to ``out/<task>.safetensors`` (and the permuted control's to ``work/permuted/``);
    the latent probes, priors and selection to ``work/solution.*``."""
    for group in sol.weights:
        for task in ctx.layout.tasks:
            bank = _bank(ctx, sol, task, group)
            bank.save(probe_path(ctx.out if group == UNET else ctx.work / "permuted", task))
    tensors = {f"prior/{t}": p.contiguous() for t, p in sol.priors.items()}
    for t in sol.prompt_maps:
        tensors[f"prompt/fit/{t}"] = sol.prompt_maps[t].contiguous()
        tensors[f"prompt/train/{t}"] = sol.train_prompt_maps[t].contiguous()
        tensors[f"prompt/train_prior/{t}"] = sol.train_priors[t].contiguous()
    for task, keyed in sol.weights.get(UNET, {}).items():
        for (key, step), (w, b) in keyed.items():
            if key == LATENT:
                tensors[f"latent/{task}/{step:03d}/weight"] = w.contiguous()
                tensors[f"latent/{task}/{step:03d}/bias"] = b.contiguous()
    save_file(tensors, str(ctx.work / "solution.safetensors"))
    info = {
        "val_r2": sol.val_r2, "best": sol.best, "best_site": sol.best_site, "norm": sol.norm, "n_fit": sol.n_fit,
        "latent_penalty": {t: [sol.penalties[UNET][t].get((LATENT, s)) for s in range(ctx.config.steps)] for t in ctx.layout.tasks},
        "prompts": sol.prompts, "prompt_threshold": sol.prompt_threshold,
    }
    write_text(ctx.work / "solution.json", ev.dumps(info))


def load_solution(ctx: RunContext) -> Solution:
    """Read what :func:`save_solution` wrote (every evaluation process reads it from disk)."""
    info = json.loads((ctx.work / "solution.json").read_text())
    tensors = load_file(str(ctx.work / "solution.safetensors"))
    weights: dict = {}
    groups = [UNET] + ([PERMUTED] if ctx.config.permuted else [])
    for group in groups:
        weights[group] = {}
        banks = load_probe_dir(ctx.out if group == UNET else ctx.work / "permuted", expect_sites=ctx.sites, tasks=ctx.layout.tasks)
        for task in ctx.layout.tasks:
            bank = banks[task]
            weights[group][task] = {k: (bank.weights[k], bank.biases[k]) for k in bank.keys()}
    for name, tensor in tensors.items():
        parts = name.split("/")
        if parts[0] == "latent" and parts[3] == "weight":
            task, step = parts[1], int(parts[2])
            weights[UNET][task][(LATENT, step)] = (tensor, tensors[f"latent/{task}/{parts[2]}/bias"])
    priors = {name.split("/")[1]: t for name, t in tensors.items() if name.startswith("prior/")}
    prompt = {kind: {name.split("/")[2]: t for name, t in tensors.items() if name.startswith(f"prompt/{kind}/")}
              for kind in ("fit", "train", "train_prior")}
    nan_fix = lambda d: {g: {t: {s: [math.nan if v is None else v for v in vals] for s, vals in st.items()} for t, st in gd.items()} for g, gd in d.items()}  # noqa: E731
    return Solution(
        weights=weights, penalties={}, val_r2=nan_fix(info["val_r2"]), best=info["best"], best_site=info["best_site"],
        norm={t: tuple(v) for t, v in info["norm"].items()}, priors=priors, n_fit=info["n_fit"],
        prompts=info["prompts"], prompt_maps=prompt["fit"], train_prompt_maps=prompt["train"],
        train_priors=prompt["train_prior"], prompt_threshold=info["prompt_threshold"],
    )
