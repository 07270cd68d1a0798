"""The activation edits: :class:`ProbeGradientEditor` (the paper's) and :class:`SteerEditor` (and its
random-direction control). Each rewrites the conditional half of a site's activation at a step;
the sampler's editor hooks hand it over (see :mod:`ldm_scene.capture`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .probes import ProbeBank
from .sites import UP_SITE_KEYS

#: The steps the paper edits (the first third of 15) where a caller gives none.
DEFAULT_STEPS: tuple[int, ...] = (0, 1, 2, 3, 4)


def grid_target(target: np.ndarray, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The fraction of foreground in each cell of ``grid``: [h, w] float (``.flatten()``: one per token, row-major)."""
    t = torch.from_numpy(target.astype(np.float32))[None, None]
    return F.interpolate(t, size=grid, mode="area")[0, 0].to(device)


@dataclass
class ProbeGradientEditor:
    """The paper's edit: Adam on the activation until the foreground probe reports the target."""

    probe: ProbeBank
    target: np.ndarray
    sites: Sequence[str] = UP_SITE_KEYS
    steps: Collection[int] = DEFAULT_STEPS
    iterations: int = 128
    lr: float = 5e-3
    edited: list[tuple[str, int]] = field(default_factory=list)
    #: Per edit: (site, step, agreement before, agreement after): the fraction of tokens whose
    #: probe argmax matches the target (cells at least half foreground), before and after the edit.
    agreement: list[tuple[str, int, float, float]] = field(default_factory=list)

    def _agreement(self, site: str, step: int, x: torch.Tensor, goal: torch.Tensor) -> float:
        with torch.no_grad():
            said = self.probe.logits(site, step, x).argmax(1).flatten(1)  # [B, T]
            return float((said == (goal >= 0.5)).float().mean())

    def edit(self, site: str, step: int, act: torch.Tensor) -> torch.Tensor:
        if (site, step) not in self.probe or self.iterations == 0:
            return act
        h, w = self.probe.meta.sites[site][1:]
        goal = grid_target(self.target, (h, w), act.device).flatten()[None]
        before = self._agreement(site, step, act.float(), goal)
        with torch.enable_grad():
            x = act.detach().float().clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=self.lr)
            for _ in range(self.iterations):
                logp = self.probe.logits(site, step, x).log_softmax(1).flatten(2)  # [B, 2, T]
                loss = -(goal * logp[:, 1] + (1 - goal) * logp[:, 0]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.edited.append((site, step))
        self.agreement.append((site, step, before, self._agreement(site, step, x.detach(), goal)))
        return x.detach().to(act.dtype)


@dataclass
class SteerEditor:
    """Move tokens along the fg-minus-bg class-mean direction, by how far they are from the target.

    ``means`` holds, per (site, step), the mean background and foreground activation ([2, C], as a
    ProbeBank with rows (background, foreground)). A token's current foreground-ness is where
    it lies between the two means along their difference, clipped to [0, 1]; the edit adds
    ``strength * (target - current) * direction``, with negative pushes (tokens that should lose
    foreground) scaled by ``outside``. ``random_seed`` (the random control) replaces the
    direction by a random one of the same norm, drawn per (site, step).
    """

    means: ProbeBank
    target: np.ndarray
    sites: Sequence[str] = UP_SITE_KEYS
    steps: Collection[int] = DEFAULT_STEPS
    strength: float = 1.0
    random_seed: int | None = None
    outside: float = 1.0
    edited: list[tuple[str, int]] = field(default_factory=list)

    def _direction(self, site: str, step: int, d: torch.Tensor) -> torch.Tensor:
        if self.random_seed is None:
            return d
        gen = torch.Generator().manual_seed(self.random_seed * 100_003 + step * 1009 + zlib.crc32(site.encode()))
        r = torch.randn(d.shape, generator=gen, dtype=d.dtype).to(d.device)
        return r * (d.norm() / r.norm())

    def edit(self, site: str, step: int, act: torch.Tensor) -> torch.Tensor:
        if (site, step) not in self.means:
            return act
        mu = self.means.weights[(site, step)].double().to(act.device)
        bg, fg_dir = mu[0], mu[1] - mu[0]
        h, w = self.means.meta.sites[site][1:]
        goal = grid_target(self.target, (h, w), act.device).flatten().double()[None, :, None]
        x = act.double()
        current = ((x - bg) @ fg_dir / fg_dir.dot(fg_dir)).clamp(0, 1)[..., None]
        push = goal - current
        if self.outside != 1.0:
            push = torch.where(push < 0, push * self.outside, push)
        self.edited.append((site, step))
        return (x + self.strength * push * self._direction(site, step, fg_dir)).to(act.dtype)
