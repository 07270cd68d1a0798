"""``metrics.json`` of a probe run, from the per-image scores, and the targets it is checked against.

:func:`build_metrics` averages the test images' scores (nan-skipping) per task, site and step, picks
the validation-chosen site per step, and puts every probe score beside the controls that could
explain it away (DESIGN.md, STYLE.md): the labeler on the decoded x0 preview, the latent probe, the
permuted UNet, the layout prior, the prompt-only baseline, the same-prompt control and the site
grid's ceiling. Margins over the baselines are paired per test image, with percentile-bootstrap
95% intervals (:func:`ldm_scene.metrics.bootstrap_mean_ci`). :func:`targets` checks the issue's
targets from those numbers, and :func:`ldm_scene.training.readme.render_readme` writes everything out;
nothing is typed by hand.

Steps are 0-based in ``metrics.json`` and 1-based in the README ("step 5 of 15" is index 4).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..metrics import bootstrap_mean_ci
from . import evaluate as ev

if TYPE_CHECKING:
    from .context import RunContext
    from .solve import Solution

__all__ = ["TARGETS", "MARGINS", "build_metrics", "targets", "at_step", "task_panels"]

#: The issue's targets: (name, task, 0-based step, what is measured, threshold).
TARGETS: tuple[tuple[str, str, int, str, float], ...] = (
    ("foreground Dice", "foreground", 4, "probe", 0.85),
    ("foreground Dice / grid ceiling", "foreground", 4, "probe_over_ceiling", 0.9),
    ("foreground lead over the prompt-only baseline", "foreground", 2, "margin:prompt_only", 0.25),
    ("foreground lead over the labeler on decoded x0", "foreground", 2, "margin:labeler_on_x0", 0.1),
    ("residual depth Spearman (prior removed)", "depth/residual", 4, "probe", 0.6),
)
#: Margins with bootstrap intervals: probe minus each of these baselines, paired per test image.
MARGINS = ("prompt_only", "same_prompt_control", "labeler_on_x0")


def _list(a: Any) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _best(values: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    """``values [..., sites, steps]`` at the chosen site of each step: ``[..., steps]``."""
    return np.stack([values[..., i, t] for t, i in enumerate(idx)], axis=-1)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(b) > 0, np.asarray(a) / np.where(np.asarray(b) > 0, b, 1.0), np.nan)


def _panel(stacked: Mapping[str, np.ndarray], score: str, task: str, idx: Sequence[int], n_sites: int, steps: int,
           resamples: int, seed: int) -> dict[str, Any]:
    """One task's (or depth residual's) probe, controls, ceiling and margins from the per-image scores.

    ``score`` is the per-image score name (``score`` or ``residual``); ``idx`` the site index per step.
    """
    n = next(iter(stacked.values())).shape[0]
    probe_img = stacked[f"probe/{task}/{score}"]  # [N, sites, steps]
    best_img = _best(probe_img, idx)  # [N, steps]
    nan = np.full((n, steps), np.nan)
    per_image = {
        "prompt_only": stacked.get(f"prompt_only/{task}/{score}", nan),
        "labeler_on_x0": stacked.get(f"x0/{task}/{score}", nan),
    }
    control_img = stacked.get(f"control/{task}/{score}", np.full((n, n_sites, steps), np.nan))
    per_image["same_prompt_control"] = _best(control_img, idx)
    ceiling_img = stacked.get(f"ceiling/{task}/{score}", np.full((n, n_sites), np.nan))  # [N, sites]
    ceiling = ev.nan_mean(ceiling_img, axis=0)  # [sites]
    probe = ev.nan_mean(probe_img, axis=0)
    margins = {}
    for name in MARGINS:
        mean, low, high = bootstrap_mean_ci(best_img - per_image[name], resamples=resamples, seed=seed)
        count = np.sum(np.isfinite(best_img - per_image[name]), axis=0)
        margins[name] = {"mean": _list(mean), "ci95_low": _list(low), "ci95_high": _list(high),
                         "n_images": [int(c) for c in count]}
    return {
        "probe_site": probe, "best": _best(probe, idx), "ceiling_site": ceiling, "control_site": ev.nan_mean(control_img, axis=0),
        "prompt_only": ev.nan_mean(per_image["prompt_only"], axis=0), "control": ev.nan_mean(per_image["same_prompt_control"], axis=0),
        "ceiling_best": np.array([ceiling[i] for i in idx]), "margins": margins,
    }


def build_metrics(ctx: "RunContext", sol: "Solution", stacked: dict[str, np.ndarray], adam_meta: dict) -> dict[str, Any]:
    """The ``metrics.json`` dictionary from the stacked per-image scores ``{name: [n_test, ...]}``."""
    from .config import PERMUTED, UNET

    c = ctx.config
    steps = c.steps
    sites = [i.key for i in ctx.sites]
    mean = {k: ev.nan_mean(v, axis=0) for k, v in stacked.items()}
    n_test = len(ctx.test_records)
    boot = {"resamples": c.bootstrap_resamples, "seed": c.seed}
    tasks: dict[str, Any] = {}
    for task in ctx.layout.tasks:
        probe = mean[f"probe/{task}/score"]  # [sites, steps]
        best = sol.best[UNET][task]
        idx = [sites.index(s) for s in best]
        panel = _panel(stacked, "score", task, idx, len(sites), steps, boot["resamples"], boot["seed"])
        entry: dict[str, Any] = {
            "metric": ev.METRIC[task],
            "probe": {s: _list(probe[i]) for i, s in enumerate(sites)},
            "best_site": sol.best_site[task],
            "best_site_per_step": best,
            "best_per_step": _list([probe[idx[t], t] for t in range(steps)]),
            "max_over_sites_per_step": _list(np.nanmax(np.where(np.isnan(probe), -np.inf, probe), axis=0)),
            "baselines": {},
            "validation_r2": {s: _list(sol.val_r2[UNET][task][s]) for s in sites},
        }
        base = entry["baselines"]
        base["labeler_on_x0"] = _list(mean[f"x0/{task}/score"]) if f"x0/{task}/score" in mean else [None] * steps
        if f"latent/{task}/score" in mean:
            base["latent_probe"] = _list(mean[f"latent/{task}/score"])
        if f"permuted/{task}/score" in mean:
            pbest = sol.best[PERMUTED][task]
            perm = mean[f"permuted/{task}/score"]
            base["permuted_unet"] = _list([perm[sites.index(pbest[t]), t] for t in range(steps)])
            entry["permuted_site_per_step"] = pbest
            entry["permuted_probe"] = {s: _list(perm[i]) for i, s in enumerate(sites)}
        base["prior"] = _list(mean[f"prior/{task}/score"])
        base["prompt_only"] = _list(panel["prompt_only"])
        base["same_prompt_control"] = _list(panel["control"])
        entry["same_prompt_control"] = {s: _list(panel["control_site"][i]) for i, s in enumerate(sites)}
        entry["grid_ceiling"] = {s: _list(panel["ceiling_site"][i:i + 1])[0] for i, s in enumerate(sites)}
        entry["grid_ceiling_best_per_step"] = _list(panel["ceiling_best"])
        entry["probe_over_ceiling"] = {s: _list(_ratio(probe[i], panel["ceiling_site"][i])) for i, s in enumerate(sites)}
        entry["probe_over_ceiling_best_per_step"] = _list(_ratio(panel["best"], panel["ceiling_best"]))
        entry["margins"] = panel["margins"]
        entry["first_step_90pct"] = ev.first_step_reaching(entry["best_per_step"])
        if task == "foreground":
            iou = mean["probe/foreground/iou"]
            entry["iou"] = {s: _list(iou[i]) for i, s in enumerate(sites)}
            entry["iou_best_per_step"] = _list([iou[idx[t], t] for t in range(steps)])
        if task == "depth" and "probe/depth/residual" in mean:
            res = mean["probe/depth/residual"]
            rpanel = _panel(stacked, "residual", task, idx, len(sites), steps, boot["resamples"], boot["seed"])
            entry["residual"] = {s: _list(res[i]) for i, s in enumerate(sites)}
            entry["residual_best_per_step"] = _list([res[idx[t], t] for t in range(steps)])
            entry["residual_first_step_90pct"] = ev.first_step_reaching(entry["residual_best_per_step"])
            br: dict[str, Any] = {}
            br["labeler_on_x0"] = _list(mean["x0/depth/residual"]) if "x0/depth/residual" in mean else [None] * steps
            if "latent/depth/residual" in mean:
                br["latent_probe"] = _list(mean["latent/depth/residual"])
            if "permuted_best/depth/residual" in mean:
                br["permuted_unet"] = _list(mean["permuted_best/depth/residual"])
            br["prior"] = _list(mean["prior/depth/residual"])
            br["prompt_only"] = _list(rpanel["prompt_only"])
            br["same_prompt_control"] = _list(rpanel["control"])
            entry["baselines_residual"] = br
            entry["residual_same_prompt_control"] = {s: _list(rpanel["control_site"][i]) for i, s in enumerate(sites)}
            entry["residual_grid_ceiling"] = {s: _list(rpanel["ceiling_site"][i:i + 1])[0] for i, s in enumerate(sites)}
            entry["residual_grid_ceiling_best_per_step"] = _list(rpanel["ceiling_best"])
            entry["residual_probe_over_ceiling_best_per_step"] = _list(_ratio(rpanel["best"], rpanel["ceiling_best"]))
            entry["margins_residual"] = rpanel["margins"]
        tasks[task] = entry
    adam_vs_ridge: dict[str, Any] = {}
    if adam_meta:
        per_task: dict[str, dict[str, dict[str, float | None]]] = {}
        for name, values in mean.items():
            kind, _, rest = name.partition("/")
            if kind not in ("adam", "ridge"):
                continue
            task, _, key = rest.partition("/")
            per_task.setdefault(task, {}).setdefault(key, {})[kind] = _list(values)[0]
        adam_vs_ridge = {
            "n_images": adam_meta["n_images"], "epochs": adam_meta["epochs"], "lr": adam_meta["lr"],
            "batch_size": adam_meta["batch_size"], "seconds": adam_meta["seconds"],
            "keys": [f"{s}@{t}" for s, t in ctx.adam_keys],
            "note": "test-split scores of both probes fit on the same kept activations; ridge at the penalty chosen "
                    f"for that (task, site, step) in the main fit, Adam as in the paper (bias-free, lr 1e-3, batch 4, "
                    f"{adam_meta['epochs']} epochs; the paper used 30)",
            "tasks": {t: per_task[t] for t in ctx.layout.tasks if t in per_task},
        }
    first = ctx.layout.tasks[0]
    n_preview = int(np.sum(~np.isnan(stacked[f"x0/{first}/score"][:, 0]))) if f"x0/{first}/score" in stacked else 0
    partners = ctx.test_partners
    seeds = [r.seed for r in ctx.records]
    g = ctx.guidance
    metrics = {
        "model": ctx.model.model_id,
        "image_size": list(ctx.image_size),
        "scheduler": ctx.model.scheduler_name,
        "num_steps": steps,
        "guidance": g["guidance"],
        "late_guidance": g["late_guidance"],
        "late_from": g["late_from"],
        "guidance_schedule": g["text"],
        "guidance_per_step": g["per_step"],
        "guidance_source": g["source"],
        "labeler": ctx.labeler.name,
        "n_train": sol.n_fit["train"],
        "n_val": sol.n_fit["val"],
        "n_test": n_test,
        "n_test_labeler_on_x0": n_preview,
        "n_test_with_same_prompt_partners": sum(1 for r in ctx.test_records if partners.get(r.index)),
        "n_prompts": {"test": len({r.prompt for r in ctx.test_records}), "shared_with_fitting_images": len(sol.prompts)},
        "seeds": {"first": min(seeds), "count": len(seeds)},
        "sites": sites,
        "site_grids": {i.key: [i.height, i.width] for i in ctx.sites},
        "steps": "0-based denoising-loop indices",
        "upsampling": ev.UPSAMPLING,
        "prompt_only_threshold": sol.prompt_threshold,
        "bootstrap": {**boot, "level": 0.95, "method": "percentile; test images resampled with replacement, "
                                                       "the same resamples for every step and margin"},
        "selection": (
            "best_site_per_step: the site with the highest validation R^2 of its ridge fit at that step; best_site: "
            "the highest mean validation R^2 over the last 5 steps; permuted_unet: the permuted UNet's site chosen "
            "the same way. Scores are means over test images (nan-skipping). max_over_sites_per_step is the "
            "test-selected maximum, for reference only."
        ),
        "baseline_definitions": {
            "labeler_on_x0": "the labeler applied to each step's decoded x0 prediction, scored against its labels of "
                             "the final image (what a detector can see at that step)",
            "latent_probe": "the same ridge fit on the 4-channel UNet input at that step (x_t after the scheduler's "
                            "input scaling), on the latent grid",
            "permuted_unet": "the same ridge fit on a copy of the UNet with every parameter tensor's entries shuffled "
                             "(seeded), run on the real trajectory's inputs; its site chosen per step on validation",
            "prior": "the fitting images' per-pixel mean label map (foreground: mean mask > 0.5), the same every step; "
                     "its residual depth score is 0 by definition",
            "prompt_only": "the per-pixel mean label of the fitting images (train + val, as the probes) with the test "
                           "image's prompt, or the prior for a prompt no fitting image has; foreground thresholded "
                           "at prompt_only_threshold, chosen on the validation images (from the train images' means) "
                           "by the probes' rule; the same every step; residual 0 where it is the prior",
            "same_prompt_control": "the probe's readout of a test image scored against the labels of the other test "
                                   "images with the same prompt, averaged over them (images without one: skipped); a "
                                   "probe that read only the prompt would score as well against them as against its own",
            "grid_ceiling": "the exact label area-averaged to the site's grid and upsampled back as probe readouts "
                            "are, foreground thresholded at 0.5: what knowing the layout exactly scores at that grid's "
                            "resolution (not a strict bound: a tuned threshold can beat 0.5 on a coarse grid)",
            "margins": "probe (best site per step) minus the baseline, per test image, then averaged; ci95_low/high: "
                       "percentile bootstrap over test images",
            "residual": "depth Spearman after subtracting the prior depth map from prediction and target",
        },
        "tasks": tasks,
        "adam_vs_ridge": adam_vs_ridge,
    }
    metrics["targets"] = targets(metrics)
    return metrics


# --- targets ----------------------------------------------------------------------------------

def at_step(curve: Sequence[float | None] | None, step: int) -> float | None:
    """``curve[step]``, or None where the curve is missing or too short."""
    if not curve or step >= len(curve):
        return None
    return curve[step]


def task_panels(m: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task (and ``depth/residual``): the probe curve, its baselines, ceiling and margins."""
    out = {}
    for task, t in m["tasks"].items():
        out[task] = {"probe": t["best_per_step"], "baselines": t["baselines"], "margins": t.get("margins", {}),
                     "ceiling": t.get("grid_ceiling_best_per_step"), "ratio": t.get("probe_over_ceiling_best_per_step"),
                     "sites": t["best_site_per_step"], "metric": t["metric"]}
        if task == "depth" and "residual_best_per_step" in t:
            out["depth/residual"] = {
                "probe": t["residual_best_per_step"], "baselines": t.get("baselines_residual", {}),
                "margins": t.get("margins_residual", {}), "ceiling": t.get("residual_grid_ceiling_best_per_step"),
                "ratio": t.get("residual_probe_over_ceiling_best_per_step"), "sites": t["best_site_per_step"],
                "metric": "spearman"}
    return out


def targets(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's :data:`TARGETS` checked against ``metrics`` ("met" from the point estimate).

    A target step beyond a shorter run's last step is read at its last step. Each entry has the
    value, its 95% interval where it is a margin, whether the interval's lower end clears the
    threshold too, and the baselines beside it at that step.
    """
    panels = task_panels(metrics)
    steps = int(metrics["num_steps"])
    out = []
    for name, task, step, what, threshold in TARGETS:
        p = panels.get(task)
        if p is None:
            continue
        step = min(step, steps - 1)
        ci = None
        if what == "probe":
            value = at_step(p["probe"], step)
        elif what == "probe_over_ceiling":
            value = at_step(p["ratio"], step)
        else:
            margin = p["margins"].get(what.split(":", 1)[1], {})
            value = at_step(margin.get("mean"), step)
            ci = [at_step(margin.get("ci95_low"), step), at_step(margin.get("ci95_high"), step)]
        beside = {k: at_step(v, step) for k, v in p["baselines"].items()}
        beside["grid_ceiling"] = at_step(p["ceiling"], step)
        out.append({
            "name": name, "task": task, "step": step, "measure": what, "threshold": threshold, "value": value,
            "met": value is not None and value >= threshold, "ci95": ci,
            "ci95_low_also_meets": None if ci is None or ci[0] is None else ci[0] >= threshold,
            "site": at_step(p["sites"], step), "probe": at_step(p["probe"], step), "baselines": beside,
        })
    return out
