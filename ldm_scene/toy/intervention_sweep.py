"""How each intervention method's defaults are chosen: success per setting on seeds apart from the evaluation's.

``python -m ldm_scene.toy intervene-sweep`` runs :data:`SWEEP_GRID` on trials drawn from
:data:`~ldm_scene.seeds.SWEEP_SEED0`, with the targets and the success rule of
:mod:`.intervention_eval`, and writes ``sweep.json`` and ``sweep.md``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..intervention import METHOD_DEFAULTS
from ..reports import markdown_table
from ..seeds import SWEEP_SEED0, TRIAL_SEED0
from .intervention_eval import Setting, _trial_target, _World, judge
from .intervention_summary import _num, _pct, summarise_rows
from .quality import has_object

#: The settings ``intervene-sweep`` tries: latent-move's step, its scaling to the target (``fit``),
#: the ring it frees around the old place (``vacated_margin``), how it fills that place (``fill``) and its correction (none: ``locate``
#: None; ``correct_after``); readout-guidance's gain and
#: steps; steer's gain and outside share.
SWEEP_GRID: tuple[Setting, ...] = (
    Setting("latent-move", "none", 0.4, 1.0), Setting("latent-move", "none", 0.6, 1.0),
    Setting("latent-move", "none", 0.6, 1.0, options=(("fit", False),)),
    Setting("latent-move", "none", 0.6, 1.0, options=(("vacated_margin", 0),)),
    Setting("latent-move", "none", 0.6, 1.0, options=(("vacated_margin", 2),)),
    Setting("latent-move", "none", 0.6, 1.0, options=(("fill", "harmonic"),)),
    Setting("latent-move", "none", 0.6, 1.0, options=(("fill", "harmonic"), ("vacated_margin", 2))),
    Setting("latent-move", "none", 0.73, 1.0),
    Setting("latent-move", "none", 0.6, 1.0, options=(("locate", None),)),
    Setting("latent-move", "none", 0.6, 1.0, options=(("correct_after", 2),)),
    Setting("readout-guidance", "up", 1 / 3, 0.25), Setting("readout-guidance", "up", 1 / 3, 0.4),
    Setting("readout-guidance", "up", 1 / 3, 0.6), Setting("readout-guidance", "up", 1 / 2, 0.25),
    Setting("readout-guidance", "up", 1 / 2, 0.4), Setting("readout-guidance", "all", 1 / 3, 0.4),
    Setting("steer", "up", 2 / 3, 15.0, 0.3), Setting("steer", "up", 2 / 3, 25.0, 0.3),
)


def _is_default(s: Setting) -> bool:
    d = METHOD_DEFAULTS[s.method]
    return not s.options and (s.sites, round(s.steps_fraction or 0, 4), s.gain,
                              s.outside if s.outside is not None else d.outside) == (
        d.sites, round(d.steps_fraction, 4), d.gain, d.outside)


def run_sweep(model_dir: Path, n: int, out: Path, grid: Sequence[Setting] = SWEEP_GRID, steps: int = 15,
              keep: bool = True) -> list[dict]:
    """Success per setting on ``n`` trials drawn from :data:`SWEEP_SEED0` (targets as in the evaluation).

    This is how the methods' defaults are chosen; its seeds are disjoint from :func:`run_trials`'s,
    so the evaluation does not measure the settings on the trials that chose them. ``keep``: the
    edits keep the background, as the evaluation's do.
    """
    world = _World(Path(model_dir))
    trials = []
    for i in tqdm(range(n), desc="sweep originals"):
        seed = SWEEP_SEED0 + i
        config, original = world.original(seed, steps)
        if has_object(original.mask):
            kind, target, _ = _trial_target(seed, i, original.mask)
            trials.append((config, original, kind, target))
    rows = []
    for setting in tqdm(grid, desc="sweep settings"):
        results = []
        for config, original, _, target in trials:
            image, seconds, _ = world.edit(config, setting, target, steps, original, keep)
            results.append(judge(image, original, target, world.labeler, world.classifier)[0])
        s = summarise_rows(results)
        rows.append({**vars(setting), "options": dict(setting.options), "default": _is_default(setting), **s,
                     "guidance": trials[0][0].guidance_text if trials else None, "keep_background": keep})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    text = render_sweep(rows, steps)
    (out / "sweep.md").write_text(text)
    print(text)
    return rows


def _option(name: str, value) -> str:
    if name == "locate":
        return "no correction" if value is None else "correction"
    return f"{name} {value}"


def render_sweep(rows: Sequence[dict], steps: int = 15) -> str:
    """sweep.md from sweep.json's rows (nothing typed by hand); * marks each method's shipped default."""
    lines = ["# Intervention settings on the toy model", "",
             f"`python -m ldm_scene.toy intervene-sweep`: {rows[0]['n'] if rows else 0} trials with seeds from "
             f"{SWEEP_SEED0:,} (the evaluation's start at {TRIAL_SEED0:,}), {steps} steps"
             f"{', ' + rows[0]['guidance'] if rows and rows[0].get('guidance') else ''}; targets and success as in "
             "the evaluation. * marks the method's shipped default."
             + (" Every edit kept the background (the unedited run's latents outside the old mask and the target, "
                "and the unedited image pasted back outside them on the final image)."
                if rows and rows[0].get("keep_background") else ""), ""]
    table = []
    for r in rows:
        if METHOD_DEFAULTS[r["method"]].single_step:
            edited = f"after step {min(steps - 1, round(steps * r['steps_fraction']))}"
        else:
            edited = "all" if (r["steps_fraction"] or 0) >= 1 else f"first {r['steps_fraction']:.2f}"
        table.append((f"{r['method']}{' *' if r.get('default') else ''}", r["sites"], edited, f"{r['gain']:g}",
                      "—" if r.get("outside") is None else format(r["outside"], "g"),
                      ", ".join(_option(k, v) for k, v in (r.get("options") or {}).items()) or "—", r["n"],
                      _pct(r["success_rate"]), _num(r["distance_px"], ".1f"), _num(r["iou_target"], ".3f"),
                      _pct(r["shape_kept"]), _pct(r["colour_kept"]), _num(r["background_psnr"], ".1f")))
    lines += markdown_table(("method", "sites", "steps edited", "gain", "outside share", "other", "trials", "success",
                             "centroid distance (px)", "IoU target", "shape kept", "colour kept", "background PSNR (dB)"), table)
    return "\n".join(lines) + "\n"
