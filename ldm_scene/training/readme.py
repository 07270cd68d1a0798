"""The generated ``README.md`` of a probe run, from its ``metrics.json`` (no hand-written numbers).

Steps are 0-based in ``metrics.json`` and 1-based in the README ("step 5 of 15" is index 4).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..reports import markdown_table
from .report import at_step, task_panels

__all__ = ["render_readme"]

_NAMES = {
    "prompt_only": "prompt-only", "same_prompt_control": "same-prompt control", "labeler_on_x0": "labeler on x0",
    "latent_probe": "latent probe", "permuted_unet": "permuted UNet", "prior": "prior",
}


def _fmt(v: float | None, digits: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


from ..sites import short_site_name as _short  # noqa: E402  (one spelling of site names)


def _margin(p: Mapping[str, Any], name: str, step: int) -> str:
    mg = p["margins"].get(name)
    if not mg:
        return "—"
    value = at_step(mg["mean"], step)
    if value is None:
        return "—"
    return f"{_fmt(value, sign=True)} [{_fmt(at_step(mg['ci95_low'], step), sign=True)}, {_fmt(at_step(mg['ci95_high'], step), sign=True)}]"


def groups_page(folder: Any) -> bool | dict[str, Any]:
    """What :func:`render_readme` is told of a probe folder's groups page: its ``groups.json`` where it
    reads as a JSON object, else whether ``groups.md`` is there."""
    folder = Path(folder)
    try:
        data = json.loads((folder / "groups.json").read_text())
        if isinstance(data, dict) and (folder / "groups.md").is_file():
            shipped = data.get("shipped")
            if not (isinstance(shipped, dict) and isinstance(shipped.get("file"), str)
                    and (folder / Path(shipped["file"]).name).is_file()):
                data.pop("shipped", None)  # no probe file beside the page: no line says the app reads one
            return data
    except (OSError, ValueError, RecursionError):
        pass
    return (folder / "groups.md").is_file()


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


def _group_target_lines(m: Mapping[str, Any], g: Mapping[str, Any]) -> list[str]:
    """The foreground targets met or not by the group probe ``probes groups`` saved (``g``: groups.json),
    at the steps and thresholds of the probe run's own targets; ``[]`` if it saved none."""
    name = (g.get("shipped") or {}).get("group")
    found = {t["name"]: t for t in m.get("targets", [])}
    if not name or not found:
        return []

    def row(step: int) -> Mapping[str, Any] | None:
        return ((g.get("per_step") or {}).get(str(step)) or {}).get("groups", {}).get(name)

    def ci(x: Mapping[str, Any]) -> str:
        return f"{_fmt(x['mean'], sign=True)} [{_fmt(x['low'], sign=True)}, {_fmt(x['high'], sign=True)}]"

    def verdict(value: float, low: float | None, threshold: float) -> str:
        text = f"target >= {threshold:g}: **{_met(value >= threshold)}**"
        if value >= threshold and low is not None:
            text += f", {'and' if low >= threshold else 'but not'} by the interval's lower end"
        return text

    parts = []
    dice, ratio = found.get("foreground Dice"), found.get("foreground Dice / grid ceiling")
    r = row(dice["step"]) if dice else None
    if r:
        text = f"Dice at step {dice['step'] + 1} {_fmt(r['dice'])} ({verdict(r['dice'], None, dice['threshold'])})"
        if ratio:
            text += (f", {_fmt(r['over_ceiling'])} of its {r['grid'][0]}x{r['grid'][1]} grid's ceiling {_fmt(r['grid_ceiling'])} "
                     f"({verdict(r['over_ceiling'], None, ratio['threshold'])})")
        parts.append(text)
    for key, field in (("foreground lead over the prompt-only baseline", "over_prompt_only"),
                       ("foreground lead over the labeler on decoded x0", "over_labeler_on_x0")):
        t = found.get(key)
        r = row(t["step"]) if t else None
        if r and field in r:
            what = "prompt-only (by the groups page's rule)" if field == "over_prompt_only" else "the labeler on x0"
            parts.append(f"at step {t['step'] + 1} over {what} {ci(r[field])} "
                         f"({verdict(r[field]['mean'], r[field]['low'], t['threshold'])})")
    if not parts:
        return []
    return [f"- the foreground readout the app uses, **{name}** read together (`foreground_group.safetensors`, "
            f"[groups.md](groups.md); fit on the training images alone): " + "; ".join(parts)]


def render_readme(metrics: Mapping[str, Any], target_step: int = 4, lead_step: int = 2,
                  groups: bool | Mapping[str, Any] = False) -> str:
    """The ``README.md`` of a probe directory, generated from ``metrics.json`` (no hand-written numbers).

    ``target_step`` (0-based, default 4: "step 5 of 15") and ``lead_step`` (default 2: step 3) are
    the steps of the summary's tables; the targets section reads ``metrics["targets"]``. ``groups``:
    the directory also holds ``groups.md`` (``ldm-scene probes groups``), which the figures line links;
    given as that page's ``groups.json``, the targets section also says which targets the group probe
    it saved meets.
    """
    m = metrics
    steps = int(m["num_steps"])
    tstep, lstep = min(target_step, steps - 1), min(lead_step, steps - 1)
    panels = task_panels(m)
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
        + " · [readout strips](strips.png)"
        + (" · [foreground probes over groups of sites](groups.md)" if groups else ""),
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
        rows.append([label, p["metric"], f"`{t['best_site']}`", _fmt(at_step(p["probe"], steps - 1)),
                     "—" if first is None else first + 1, _fmt(at_step(p["probe"], tstep)), _fmt(at_step(p["ceiling"], tstep))]
                    + [_fmt(at_step(b.get(k), tstep)) for k in ("prompt_only", "same_prompt_control", "labeler_on_x0",
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
            rows.append((label, s + 1, _fmt(at_step(p["probe"], s)), _margin(p, "prompt_only", s),
                         _margin(p, "same_prompt_control", s), _margin(p, "labeler_on_x0", s), _fmt(at_step(p["ratio"], s))))
    lines += markdown_table(("task", "step", "probe", "probe − prompt-only", "probe − same-prompt control",
                             "probe − labeler on x0", "probe / grid ceiling"), rows)
    lines += ["", f"## Targets at step {tstep + 1} of {steps}", ""]
    lines += _target_lines(m)
    if isinstance(groups, Mapping):
        lines += _group_target_lines(m, groups)
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
            row = [s + 1, _short(p["sites"][s]), _fmt(at_step(p["probe"], s)), _fmt(at_step(p["ceiling"], s))]
            row += [_fmt(at_step(b.get(k), s)) for k in ("prompt_only", "same_prompt_control", "labeler_on_x0",
                                                     "latent_probe", "permuted_unet", "prior")]
            if fg:
                row.append(_fmt(at_step(t.get("iou_best_per_step"), s)))
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
