"""What a probe set's ``metrics.json`` says: the best site per task and per step, the shipped curves.

``metrics.json`` is untrusted input (any folder can be passed with ``--probes``): every reader here
takes what it understands and ignores the rest.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..probes import TASKS, GroupProbe, ProbeBank


def task_metrics(metrics: Mapping[str, Any], task: str) -> dict[str, Any]:
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    entry = tasks.get(task) if isinstance(tasks, Mapping) else None
    return dict(entry) if isinstance(entry, Mapping) else {}


def parse_per_step(raw: Any) -> dict[int, str]:
    """``best_per_step`` as ``{step: site}`` from a list (of sites or ``{"site": ...}``) or a dict."""
    items: list[tuple[Any, Any]]
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, (list, tuple)):
        items = []
        for i, entry in enumerate(raw):
            if isinstance(entry, Mapping):
                items.append((entry.get("step", i), entry.get("site")))
            else:
                items.append((i, entry))
    else:
        return {}
    out = {}
    for step, site in items:
        if isinstance(site, Mapping):
            site = site.get("site")
        try:
            step = int(step)
        except (TypeError, ValueError):
            continue
        if isinstance(site, str):
            out[step] = site
    return out


def best_per_step(metrics: Mapping[str, Any], bank: ProbeBank | None, task: str) -> dict[int, str]:
    """``{step: site}`` from ``best_site_per_step`` (else ``best_per_step``), keeping probed (site, step)s only."""
    entry = task_metrics(metrics, task)
    # metrics.json names the sites in best_site_per_step (best_per_step holds their scores)
    raw = entry.get("best_site_per_step", entry.get("best_per_step"))
    if bank is None or raw is None:
        return {}
    return {s: site for s, site in parse_per_step(raw).items() if (site, s) in bank}


def shipped_emergence(metrics: Mapping[str, Any]) -> dict[str, tuple[str, list[float]]]:
    """The probe set's test-split score per step at the best site, ``{task: (metric, scores)}``.

    Read from ``tasks[task]["best_per_step"]`` when it is a list of numbers.
    """
    out = {}
    for task in TASKS:
        entry = task_metrics(metrics, task)
        raw = entry.get("best_per_step")
        if isinstance(raw, (list, tuple)) and raw and all(v is None or isinstance(v, (int, float)) for v in raw):
            scores = [float("nan") if v is None else float(v) for v in raw]
            out[task] = (str(entry.get("metric", "score")), scores)
    return out


#: What a group probe and the foreground bank beside it must share to be read as one probe set: the
#: images (first seed and count) and how they were split (training and validation counts), the labels
#: and the guidance schedule they were fit under.
_SHARED_FIT = ("seeds", "n_train", "n_val", "labeler", "guidance_schedule")


def _shown(value: Any, limit: int = 60) -> str:
    """A metadata value as the page may show it (the files are untrusted): its repr, cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def group_mismatch(group: GroupProbe, bank: ProbeBank | None) -> str | None:
    """Why ``group`` should not be read beside the foreground ``bank`` (None when it may): no bank,
    another schedule length, steps the bank reads that the group does not, or a fit on other images
    (or another split of them), labels or guidance (a group file left behind when the probes were fit again)."""
    if bank is None:
        return "it needs foreground.safetensors beside it"
    if bank.meta.num_steps != group.meta.num_steps:
        return (f"it was fit for {group.meta.num_steps}-step runs, the foreground probes for "
                f"{bank.meta.num_steps}-step runs")
    missing = sorted(set(bank.steps) - set(group.steps))
    if missing:
        return f"it reads only steps {[s + 1 for s in group.steps]}, not {[s + 1 for s in missing]}"
    ours, theirs = group.meta.training, bank.meta.training
    for key in _SHARED_FIT:
        a, b = ours.get(key), theirs.get(key)
        if key == "seeds" and isinstance(a, Mapping) and isinstance(b, Mapping):
            a, b = (a.get("first"), a.get("count")), (b.get("first"), b.get("count"))
        if a != b:
            return (f"it was fit with {key.replace('_', ' ')} {_shown(a)}, the foreground probes with {_shown(b)}; "
                    "run probes groups again")
    return None


def group_test_dice(group: GroupProbe) -> list[float]:
    """A group probe's test Dice per step from its metadata (``training.test_dice``, ``{step: dice}``,
    as ``probes groups`` writes it), nan where a step has none; ``[]`` when it records none."""
    raw = group.meta.training.get("test_dice")
    if not isinstance(raw, Mapping):
        return []
    scores = [float("nan")] * group.meta.num_steps
    for step, value in raw.items():
        try:
            k = int(step)
        except (TypeError, ValueError):
            continue
        if 0 <= k < len(scores) and isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[k] = float(value)
    return scores if any(v == v for v in scores) else []


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A summary row per task: metric, best site, its test score at the last step, when it got there."""
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    if not isinstance(tasks, Mapping) or not tasks:
        return ""
    rows = ["| task | metric | best site | score at the last step | first step at 90% of it |",
            "|---|---|---|---|---|"]
    for task, entry in tasks.items():
        if not isinstance(entry, Mapping):
            continue
        score = entry.get("best_score")
        per_step = entry.get("best_per_step")
        if score is None and isinstance(per_step, (list, tuple)) and per_step:
            score = per_step[-1]
        shown = f"{score:.3f}" if isinstance(score, (int, float)) else "–"
        first = entry.get("first_step_90pct")
        first_shown = f"{first + 1}" if isinstance(first, int) else "–"  # metrics.json counts from 0
        rows.append(f"| {task} | {entry.get('metric', '')} | `{entry.get('best_site', '–')}` | {shown} | {first_shown} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def readable_sites(banks: Mapping[str, ProbeBank], choices: Mapping[str, Any], steps: int,
                   notes: list[str]) -> dict[str, Any]:
    """The site ``choices`` whose task's probes were fit for ``steps``-step runs; a note in ``notes``
    for each task left out (its probes cannot read a schedule of another length)."""
    readable = {}
    for task, choice in choices.items():
        fit_for = banks[task].meta.num_steps
        if fit_for != steps:
            notes.append(f"{task} probes were fit for {fit_for}-step runs; no {task} readout at {steps} steps")
            continue
        readable[task] = choice
    return readable
