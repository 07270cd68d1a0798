"""``metrics.json`` and the generated ``README.md`` of a probe run, from the per-image scores.

:func:`build_metrics` averages the test images' scores (nan-skipping) per task, site and step, picks
the validation-chosen site per step, and puts every probe score beside the controls that could
explain it away (DESIGN.md, STYLE.md): the labeler on the decoded x0 preview, the latent probe, the
permuted UNet, the layout prior, the prompt-only baseline, the same-prompt control and the site
grid's ceiling. Margins over the baselines are paired per test image, with percentile-bootstrap
95% intervals (:func:`ldm_scene.metrics.bootstrap_mean_ci`). :func:`targets` checks the issue's
targets from those numbers, and :func:`render_readme` writes everything out; nothing is typed by hand.

Steps are 0-based in ``metrics.json`` and 1-based in the README ("step 5 of 15" is index 4).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..metrics import bootstrap_mean_ci
from ..reports import markdown_table
from . import evaluate as ev

if TYPE_CHECKING:
    from .context import RunContext
    from .solve import Solution

__all__ = ["TARGETS", "build_metrics", "targets", "render_readme"]

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
_NAMES = {
    "prompt_only": "prompt-only", "same_prompt_control": "same-prompt control", "labeler_on_x0": "labeler on x0",
    "latent_probe": "latent probe", "permuted_unet": "permuted UNet", "prior": "prior",
}


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

def _at(curve: Sequence[float | None] | None, step: int) -> float | None:
    if not curve or step >= len(curve):
        return None
    return curve[step]


def _panels(m: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
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
    panels = _panels(metrics)
    steps = int(metrics["num_steps"])
    out = []
    for name, task, step, what, threshold in TARGETS:
        p = panels.get(task)
        if p is None:
            continue
        step = min(step, steps - 1)
        ci = None
        if what == "probe":
            value = _at(p["probe"], step)
        elif what == "probe_over_ceiling":
            value = _at(p["ratio"], step)
        else:
            margin = p["margins"].get(what.split(":", 1)[1], {})
            value = _at(margin.get("mean"), step)
            ci = [_at(margin.get("ci95_low"), step), _at(margin.get("ci95_high"), step)]
        beside = {k: _at(v, step) for k, v in p["baselines"].items()}
        beside["grid_ceiling"] = _at(p["ceiling"], step)
        out.append({
            "name": name, "task": task, "step": step, "measure": what, "threshold": threshold, "value": value,
            "met": value is not None and value >= threshold, "ci95": ci,
            "ci95_low_also_meets": None if ci is None or ci[0] is None else ci[0] >= threshold,
            "site": _at(p["sites"], step), "probe": _at(p["probe"], step), "baselines": beside,
        })
    return out


# --- README -----------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _short(site: str | None) -> str:
    if site is None:
        return "—"
    parts = site.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].replace('_blocks', '')}{parts[1]}.{parts[3]}"


def _margin(p: Mapping[str, Any], name: str, step: int) -> str:
    mg = p["margins"].get(name)
    if not mg:
        return "—"
    value = _at(mg["mean"], step)
    if value is None:
        return "—"
    return f"{_fmt(value, sign=True)} [{_fmt(_at(mg['ci95_low'], step), sign=True)}, {_fmt(_at(mg['ci95_high'], step), sign=True)}]"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _grid(m: Mapping[str, Any], site: str | None) -> str:
    hw = (m.get("site_grids") or {}).get(site) if site else None
    return f"{hw[0]}x{hw[1]}" if hw else "?"


def _target_lines(m: Mapping[str, Any]) -> list[str]:
    found = {(t["name"]): t for t in m.get("targets", [])}
    lines = []

    def base(t: Mapping[str, Any], keys: Sequence[str]) -> str:
        b = t["baselines"]
        return ", ".join(f"{_NAMES.get(k, k.replace('_', ' '))} {_fmt(b.get(k))}" for k in keys if k in b)

    dice, ratio = found.get("foreground Dice"), found.get("foreground Dice / grid ceiling")
    if dice:
        s = dice["step"]
        text = (f"- foreground Dice at step {s + 1}: **{_fmt(dice['value'])}** (target >= {dice['threshold']:g}: "
                f"**{_met(dice['met'])}**)")
        if ratio:
            text += (f"; grid ceiling of its site (`{_short(dice['site'])}`, {_grid(m, dice['site'])}) "
                     f"{_fmt(dice['baselines'].get('grid_ceiling'))}, probe / ceiling **{_fmt(ratio['value'])}** "
                     f"(target >= {ratio['threshold']:g}: **{_met(ratio['met'])}**)")
        lines.append(text + "; beside it: " + base(dice, ("prompt_only", "same_prompt_control", "labeler_on_x0",
                                                           "latent_probe", "permuted_unet", "prior")))
    for key in ("foreground lead over the prompt-only baseline", "foreground lead over the labeler on decoded x0"):
        t = found.get(key)
        if not t:
            continue
        other = "prompt_only" if "prompt" in key else "labeler_on_x0"
        ci = t["ci95"] or [None, None]
        lines.append(
            f"- {key} at step {t['step'] + 1}: **{_fmt(t['value'], sign=True)}** Dice (95% CI {_fmt(ci[0], sign=True)} to "
            f"{_fmt(ci[1], sign=True)}; target >= {t['threshold']:g}: **{_met(t['met'])}**"
            + ("" if not t["met"] or t["ci95_low_also_meets"] is None else
               f", {'and' if t['ci95_low_also_meets'] else 'but not'} by the interval's lower end")
            + f"): probe {_fmt(t['probe'])} vs {_NAMES[other]} {_fmt(t['baselines'].get(other))}; same-prompt control "
            f"{_fmt(t['baselines'].get('same_prompt_control'))}, grid ceiling {_fmt(t['baselines'].get('grid_ceiling'))}"
        )
    t = found.get("residual depth Spearman (prior removed)")
    if t:
        lines.append(
            f"- residual depth Spearman at step {t['step'] + 1} (prior removed): **{_fmt(t['value'])}** (target >= "
            f"{t['threshold']:g}: **{_met(t['met'])}**); beside it: "
            + base(t, ("prompt_only", "same_prompt_control", "grid_ceiling", "labeler_on_x0", "latent_probe",
                       "permuted_unet", "prior"))
        )
    return lines


def render_readme(metrics: Mapping[str, Any], target_step: int = 4, lead_step: int = 2) -> str:
    """The ``README.md`` of a probe directory, generated from ``metrics.json`` (no hand-written numbers).

    ``target_step`` (0-based, default 4: "step 5 of 15") and ``lead_step`` (default 2: step 3) are
    the steps of the summary's tables; the targets section reads ``metrics["targets"]``.
    """
    m = metrics
    steps = int(m["num_steps"])
    tstep, lstep = min(target_step, steps - 1), min(lead_step, steps - 1)
    panels = _panels(m)
    boot = m.get("bootstrap", {})
    lines = [
        f"# Linear probes for `{m['model']}`",
        "",
        "Generated by `python -m ldm_scene.training run` from `metrics.json`; do not edit by hand.",
        "",
        f"- images: {m['n_train']} train + {m['n_val']} validation (probes fit on both; the ridge penalty and the "
        f"best site per step chosen on validation) and {m['n_test']} test images, seeds "
        f"{m['seeds']['first']}..{m['seeds']['first'] + m['seeds']['count'] - 1}",
        f"- generation: {m['scheduler']}, {steps} steps, {m.get('guidance_schedule', 'guidance ' + str(m['guidance']))}"
        f"{' (' + m['guidance_source'] + ')' if m.get('guidance_source') else ''}, "
        f"{m['image_size'][0]}x{m['image_size'][1]} images; probes are fit and tested under this schedule; labels: "
        f"{m['labeler']} applied to the final image",
        "- probes: closed-form ridge per (site, step) from streamed statistics; files `foreground.safetensors`, "
        "`depth.safetensors`, `shading.safetensors`",
        f"- read-out: each site's token-grid output is brought to the labels' resolution by upsampling: "
        f"{m.get('upsampling', 'bilinear')}",
        "- foreground decision threshold: ridge regresses each token's foreground fraction p; the threshold on p "
        "with the best mean Dice on the validation images is chosen per (site, step) (the latent and permuted-UNet "
        "baselines get the same) and folded into the bias, so a logit margin > 0 is the calibrated mask",
        "- controls: **prompt-only** = the fitting images' mean label for the test image's prompt (the prior for an "
        f"unseen prompt; foreground threshold {_fmt(m.get('prompt_only_threshold'), 2)}, chosen on validation by "
        "the same rule); **same-prompt control** = the probe's readout scored against the other test images with the "
        f"same prompt ({m.get('n_test_with_same_prompt_partners', '?')} of {m['n_test']} test images have one); "
        "**grid ceiling** = the exact label pooled to the site's grid and upsampled back, foreground at 0.5",
        f"- margins: probe minus baseline per test image, mean and 95% interval from {boot.get('resamples', '?')} "
        f"bootstrap resamples of the test images (seed {boot.get('seed', '?')})",
        "- steps are numbered 1..N here (metrics.json uses 0-based indices)",
        "- best site per step: highest validation R² of the ridge fit; overall best site: highest mean validation R² "
        "over the last 5 steps",
        "",
        "Figures: [emergence](emergence.png) · [controls and margins](controls.png) · "
        + " · ".join(f"[{t} heat map](heatmap_{t}.png)" for t in m["tasks"])
        + " · [readout strips](strips.png)",
        "",
        "![emergence](emergence.png)",
        "",
        "![controls](controls.png)",
        "",
        "## Summary",
        "",
        f"Scores at step {tstep + 1} of {steps} (best site per step), with the controls beside them:",
        "",
    ]
    rows = []
    for name, p in panels.items():
        t = m["tasks"][name.split("/")[0]]
        first = t.get("residual_first_step_90pct" if name == "depth/residual" else "first_step_90pct")
        b = p["baselines"]
        label = "depth (residual)" if name == "depth/residual" else name
        rows.append([label, p["metric"], f"`{t['best_site']}`", _fmt(_at(p["probe"], steps - 1)),
                     "—" if first is None else first + 1, _fmt(_at(p["probe"], tstep)), _fmt(_at(p["ceiling"], tstep))]
                    + [_fmt(_at(b.get(k), tstep)) for k in ("prompt_only", "same_prompt_control", "labeler_on_x0",
                                                            "latent_probe", "permuted_unet", "prior")])
    lines += markdown_table(("task", "metric", "best site", "final score", "step reaching 90% of final",
                             f"score at step {tstep + 1}", "grid ceiling", "prompt-only", "same-prompt control",
                             "labeler on x0", "latent probe", "permuted UNet", "prior"), rows)
    lines += [
        "",
        "Margins of the probe over the baselines (paired per test image; 95% bootstrap interval in brackets) and the "
        "share of its grid's ceiling it reaches:",
        "",
    ]
    rows = []
    for name, p in panels.items():
        label = "depth (residual)" if name == "depth/residual" else name
        for s in sorted({lstep, tstep}):
            rows.append((label, s + 1, _fmt(_at(p["probe"], s)), _margin(p, "prompt_only", s),
                         _margin(p, "same_prompt_control", s), _margin(p, "labeler_on_x0", s), _fmt(_at(p["ratio"], s))))
    lines += markdown_table(("task", "step", "probe", "probe − prompt-only", "probe − same-prompt control",
                             "probe − labeler on x0", "probe / grid ceiling"), rows)
    lines += ["", f"## Targets at step {tstep + 1} of {steps}", ""]
    lines += _target_lines(m)
    for name, p in panels.items():
        task = name.split("/")[0]
        t = m["tasks"][task]
        title = "depth (residual, prior removed)" if name == "depth/residual" else task
        fg = name == "foreground"
        lines += [
            "",
            f"## {title}: {p['metric']} per step (test split)",
            "",
        ]
        b = p["baselines"]
        rows = []
        for s in range(steps):
            row = [s + 1, _short(p["sites"][s]), _fmt(_at(p["probe"], s)), _fmt(_at(p["ceiling"], s))]
            row += [_fmt(_at(b.get(k), s)) for k in ("prompt_only", "same_prompt_control", "labeler_on_x0",
                                                     "latent_probe", "permuted_unet", "prior")]
            if fg:
                row.append(_fmt(_at(t.get("iou_best_per_step"), s)))
            rows.append(row)
        lines += markdown_table(("step", "best site", "probe", "grid ceiling", "prompt-only", "same-prompt control",
                                 "labeler on x0", "latent probe", "permuted UNet", "prior") + (("IoU",) if fg else ()), rows)
    avr = m.get("adam_vs_ridge")
    if avr and avr.get("tasks"):
        lines += [
            "",
            f"## Adam (the paper's trainer) vs closed-form ridge, same {avr['n_images']} images",
            "",
            f"Adam: bias-free linear map, lr {avr['lr']}, batch {avr['batch_size']}, {avr['epochs']} epochs "
            f"({_fmt(avr['seconds']['adam'], 1)} s); ridge: {_fmt(avr['seconds']['ridge'], 2)} s. Test-split scores:",
            "",
        ]
        rows = []
        for task, per_key in avr["tasks"].items():
            for key, v in per_key.items():
                site, _, step = key.partition("@")
                rows.append((task, f"`{site}`", int(step) + 1, _fmt(v["ridge"]), _fmt(v["adam"])))
        lines += markdown_table(("task", "site", "step", "ridge", "adam"), rows)
    tim = m.get("timings")
    if tim:
        lines += ["", "## Cost", ""]
        for k, v in tim.items():
            lines.append(f"- {k.replace('_', ' ')}: {_fmt(v, 3) if isinstance(v, float) else v}")
    lines.append("")
    return "\n".join(lines)
