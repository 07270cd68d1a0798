"""Shared pieces of the benchmarks: random probe banks of a model's sizes, interleaved timing."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

from ldm_scene.models import Model
from ldm_scene.probes import TASKS, ProbeBank, ProbeMeta


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
    """The heaviest readout: every task's probe at every one of the 16 sites, every step."""

    name = "all-probes"

    def __init__(self, banks: dict[str, ProbeBank], out_size: tuple[int, int]):
        self.banks, self.out_size = banks, out_size
        self.sites = tuple(next(iter(banks.values())).sites)
        self.steps = None
        self.maps: dict = {}

    def read(self, site, step, act):
        for task, bank in self.banks.items():
            self.maps[(task, site)] = bank.readout(site, step, act, self.out_size)

    def collect(self, step):
        out, self.maps = self.maps, {}
        return len(out)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation so drifts in machine load hit all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"
