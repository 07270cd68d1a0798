"""A probe run's configuration, its fixed names, and the column layout of its shared accumulators."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..probes import task_outputs
from ..sampler import DEFAULT_STEPS
from ..sites import SITE_KEYS
from .fit import DEFAULT_PENALTY_GRID, RidgeStats, ridge_targets

#: The pseudo-site of the latent baseline (the UNet's 4-channel input at each step).
LATENT = "latent"
#: Statistics groups: the model's own UNet, and its permuted copy.
UNET, PERMUTED = "unet", "permuted"
_META_KEY = "ldm_scene_fit"
#: Version of the work directory's layout; a work directory of another version is refused.
#: 2: per-prompt label sums in the fit state, prompt-only and same-prompt controls, bilinear read-out.
WORK_FORMAT = 2
#: Statistics groups (above) and the metadata key of the work files' JSON.


@dataclass(frozen=True)
class RunConfig:
    """One probe run. ``out`` receives the probes, metrics and figures; ``out/work`` the resumable state.

    ``guidance``, ``late_guidance`` and ``late_from`` are the generation's guidance schedule; each
    None takes the model's own (its ``ldm_scene.json``, see :func:`~ldm_scene.sampler.config_for`;
    7.5 throughout for a model without one, the paper's). Pass ``late_guidance=guidance`` for a
    constant scale on a model that lowers it late. Probes are fit and evaluated under the same
    schedule, which their metadata and ``metrics.json`` record.
    ``labeler`` is a :func:`~.labelers.build_labeler` spec (default: ``toy`` when the model
    directory has ``labelers/``, else ``dpt+tracer``). ``prompts`` is a file of prompts (default:
    the toy renderer's prompt for each seed). ``preview_images`` caps how many test images get the
    labeler-on-x0 baseline (None: all). ``adam_keys`` are ``(site, step)`` pairs for the Adam vs
    ridge comparison (None: a default few; empty: skip it), trained on the first ``adam_images``
    fitting images. ``bootstrap_resamples`` resamples of the test images (a generator seeded with
    ``seed``) give the 95% confidence intervals of the margins over the baselines.
    """

    model: str
    n: int
    out: str
    steps: int = DEFAULT_STEPS
    guidance: float | None = None
    late_guidance: float | None = None
    late_from: float | None = None
    seed: int = 0
    labeler: str | None = None
    prompts: str | None = None
    train_fraction: float = 0.4
    val_fraction: float = 0.2
    penalties: tuple[float, ...] = DEFAULT_PENALTY_GRID
    checkpoint_every: int = 25
    latent_baseline: bool = True
    permuted: bool = True
    permute_seed: int = 0
    preview_images: int | None = None
    adam_keys: tuple[tuple[str, int], ...] | None = None
    adam_images: int = 128
    adam_epochs: int = 30
    n_examples: int = 3
    figures: bool = True
    device: str | None = None
    bootstrap_resamples: int = 1000

    def __post_init__(self) -> None:
        if self.n < 3:
            raise ValueError(f"n must be >= 3 (train, val and test images), got {self.n}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be in 1..200, got {self.steps}")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1): the penalty is chosen on validation images")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.penalties or any(p < 0 or not math.isfinite(p) for p in self.penalties):
            raise ValueError(f"penalties must be finite and >= 0, got {self.penalties}")
        if self.adam_images < 1 or self.adam_epochs < 1 or self.n_examples < 0:
            raise ValueError("adam_images and adam_epochs must be >= 1, n_examples >= 0")
        for name in ("guidance", "late_guidance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 30):
                raise ValueError(f"{name} must be between 0 and 30 (or None: the model's own), got {value}")
        if self.late_from is not None and not 0 <= self.late_from <= 1:
            raise ValueError(f"late_from must be a fraction of the steps in [0, 1] (or None), got {self.late_from}")
        if self.bootstrap_resamples < 10:
            raise ValueError(f"bootstrap_resamples must be >= 10, got {self.bootstrap_resamples}")
        for key in self.adam_keys or ():
            if key[0] not in SITE_KEYS or not 0 <= int(key[1]) < self.steps:
                raise ValueError(f"adam key {key} is not (site, step) with a known site and step < {self.steps}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def work_dir(self) -> Path:
        return Path(self.out) / "work"


# --- column layout: all tasks' targets side by side in one accumulator -----------------------

@dataclass(frozen=True)
class Layout:
    """Where each task's target columns sit in the shared accumulators (foreground takes 2: [1-p, p])."""

    tasks: tuple[str, ...]

    @property
    def columns(self) -> dict[str, slice]:
        cols, start = {}, 0
        for task in self.tasks:
            k = task_outputs(task)
            cols[task] = slice(start, start + k)
            start += k
        return cols

    @property
    def width(self) -> int:
        return sum(task_outputs(t) for t in self.tasks)

    def targets(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[T, K]`` float64 from per-token labels ``{task: [T]}``."""
        return torch.cat([ridge_targets(t, labels[t].to(torch.float64)) for t in self.tasks], dim=1)


def slice_stats(stats: RidgeStats, cols: slice) -> RidgeStats:
    """The accumulator of a subset of target columns (``X^T X`` is shared by every column)."""
    out = RidgeStats.__new__(RidgeStats)
    out.channels, out.outputs = stats.channels, cols.stop - cols.start
    out.n = stats.n
    out.xtx = stats.xtx
    out.xty = stats.xty[:, cols]
    out.yty = stats.yty[cols]
    return out
