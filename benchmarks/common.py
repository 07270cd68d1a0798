"""Shared pieces of the benchmarks: random probe banks of a model's sizes, interleaved timing."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

from ldm_scene.models import Model
from ldm_scene.probes import TASKS, ProbeBank, ProbeMeta
from ldm_scene.readout import StackedProbes, to_numpy


def random_banks(model: Model, num_steps: int, seed: int = 0) -> dict[str, ProbeBank]:
    """Probe banks with the model's exact sizes (costs do not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    sites = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    banks = {}
    for task in TASKS:
        k = 2 if task == "foreground" else 1
        meta = ProbeMeta(task, model.model_id, model.image_size, model.scheduler_name, num_steps, sites)
        weights = {(s, t): torch.randn(k, c, generator=gen) * 0.01 for s, (c, _, _) in sites.items() for t in range(num_steps)}
        banks[task] = ProbeBank(meta, weights).to(model.device)
    return banks


class AllSitesReader:
    """The heaviest readout: every task's probe at every one of the 16 sites, every step.

    Fused (:class:`~ldm_scene.readout.StackedProbes`: one matmul per site over all tasks), maps at
    each site's grid, or nearest-upsampled on the device to ``out_size``; a step's maps reach the
    host in one copy when it is collected.
    """

    name = "all-probes"

    def __init__(self, banks: dict[str, ProbeBank], out_size: tuple[int, int] | None = None):
        self.probes, self.out_size = StackedProbes(banks), out_size
        self.sites = tuple(next(iter(banks.values())).sites)
        self.steps = None
        self.maps: dict = {}

    def read(self, site, step, act):
        for tasks, values in self.probes.stacked(site, step, act, out_size=self.out_size):
            self.maps[(tasks, site)] = values

    def collect(self, step):
        out, self.maps = self.maps, {}
        arrays = to_numpy(out)  # one copy from a GPU; maps are rows of each site's array
        return sum(len(tasks) for tasks, _ in arrays)


class UnfusedReader(AllSitesReader):
    """The same maps the way they were read before the fused readout: 48 one-probe readouts a step,
    each upsampled to ``out_size`` and copied to the host on its own."""

    def __init__(self, banks: dict[str, ProbeBank], out_size: tuple[int, int]):
        super().__init__(banks, out_size)
        self.banks = banks

    def read(self, site, step, act):
        for task, bank in self.banks.items():
            self.maps[(task, site)] = bank.readout(site, step, act, self.out_size)

    def collect(self, step):
        out, self.maps = self.maps, {}
        return len(out)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation so drifts in machine load hit all alike."""
    return {name: statistics.median(w for w, _ in runs) for name, runs in interleaved_clocks(fns, repeats).items()}


def interleaved_clocks(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Each function's ``(wall seconds, this process's CPU seconds)`` per round, run in alternation.

    On a CPU shared with other jobs the wall clock also counts the time other processes held the
    cores; this process's CPU time does not, so with one torch thread it is the steadier clock (it
    misses GPU time: use the wall clock there). Round ``i`` of every function ran side by side, so
    per-round ratios cancel slow drifts in machine load (see :func:`paired_ratio`).
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(repeats):
        # every other round in reverse, so no function always runs right after the same one
        for name in order if i % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def paired_ratio(runs: list[tuple[float, float]], base: list[tuple[float, float]], clock: int = 0) -> float:
    """The median over rounds of ``runs[i] / base[i]`` on one clock (0: wall, 1: CPU)."""
    return statistics.median(r[clock] / b[clock] for r, b in zip(runs, base))


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"
