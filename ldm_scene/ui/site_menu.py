"""Where each task's probe reads in the app: the site menu's options and defaults, a request turned into
reader choices, and the shipped curve a run is drawn beside.

The options are, per task: the foreground's :class:`~ldm_scene.probes.GroupProbe` where one is loaded
(the default), the best site at each step where the metrics name them, and every probed site.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..probes import TASKS, GroupProbe, ProbeBank
from ..readout import SiteChoice
from .inputs import ServiceError
from .probe_set import best_per_step, group_test_dice, shipped_emergence, task_metrics

#: The site choice that reads, at each step, the site that scored best at that step (metrics.json).
BEST_PER_STEP = "best site at each step"


class SiteMenu:
    """The site choices of a probe set: ``banks`` by task, their ``metrics.json`` and an optional group probe."""

    def __init__(self, banks: Mapping[str, ProbeBank], metrics: Mapping[str, Any],
                 group_probe: GroupProbe | None = None) -> None:
        self.banks, self.metrics, self.group_probe = banks, metrics, group_probe

    def group(self, task: str) -> GroupProbe | None:
        return self.group_probe if task == "foreground" else None

    def best_per_step(self, task: str) -> dict[int, str]:
        return best_per_step(self.metrics, self.banks.get(task), task)

    def choices(self, task: str) -> list[str]:
        """The site options for a task: the group probe (foreground, if loaded), the per-step best (if
        the metrics say) and every probed site."""
        bank = self.banks.get(task)
        if bank is None:
            return []
        options = list(bank.sites)
        if self.best_per_step(task):
            options.insert(0, BEST_PER_STEP)
        if (group := self.group(task)) is not None:
            options.insert(0, group.name)
        return options

    def default(self, task: str) -> str | None:
        """The group probe for the foreground where one is loaded (it reads the layout best, early
        most of all); else the best site for a task from metrics.json, else the finest-grid decoder
        site probed."""
        bank = self.banks.get(task)
        if bank is None:
            return None
        if (group := self.group(task)) is not None:
            return group.name
        best = task_metrics(self.metrics, task).get("best_site")
        if isinstance(best, str) and best in bank.sites:
            return best
        return max(bank.sites, key=lambda s: (bank.meta.sites[s][1], s.startswith("up_blocks"), s))

    def defaults(self) -> dict[str, str]:
        return {t: s for t in self.banks if (s := self.default(t)) is not None}

    def resolve(self, sites: Mapping[str, str | None] | None) -> dict[str, SiteChoice]:
        """Turn the UI's per-task site names into reader choices; defaults where a task has none."""
        sites = dict(sites or {})
        unknown = sorted(set(sites) - set(TASKS))
        if unknown:
            raise ServiceError(f"unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")
        out: dict[str, SiteChoice] = {}
        for task in self.banks:
            name = sites.get(task) or self.default(task)
            group = self.group(task)
            if group is not None and name == group.name:
                out[task] = group
            elif name == BEST_PER_STEP:
                per_step = self.best_per_step(task)
                if not per_step:
                    raise ServiceError(f"{task}: the metrics name no best site per step; pick a site")
                out[task] = per_step
            elif name in self.banks[task].sites:
                out[task] = name
            else:
                raise ServiceError(f"{task}: no probe at site {name!r}; choose one of {', '.join(self.choices(task))}")
        return out

    def shipped_emergence(self, choices: Mapping[str, SiteChoice] | None = None) -> dict[str, tuple[str, list[float]]]:
        """The probe set's test-split score per step at the best site, ``{task: (metric, scores)}``;
        where ``choices`` (a run's) read the foreground with the group probe, that probe's own test Dice."""
        curves = shipped_emergence(self.metrics)
        group = (choices or {}).get("foreground")
        if isinstance(group, GroupProbe):
            scores = group_test_dice(group)
            if scores:
                curves["foreground"] = ("dice", scores)
            else:  # another probe's curve would mislead
                curves.pop("foreground", None)
        return curves
