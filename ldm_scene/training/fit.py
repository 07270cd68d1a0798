"""Fitting linear probes: closed-form ridge from streamed sufficient statistics.

Ridge. For one (site, step) every token is a row ``x`` (C channels) with a target row ``y`` (K
outputs). :class:`RidgeStats` accumulates ``X^T X``, ``X^T y`` and ``sum y^2`` over an augmented
``[x, 1]`` in float64, so memory is ``O(C^2)`` whatever the number of images, shards merge by
addition, and :meth:`RidgeStats.solve` gives the exact ridge solution (intercept unpenalised).
The paper scored its probe on the nearest-upsampled 512x512 map; since every token covers the
same number of pixels, least squares against full-resolution labels equals least squares against
each token's cell mean, so targets at token resolution lose nothing for a linear probe with that
read-out. (The evaluation here reads probes out bilinearly, :func:`~.evaluate.upsample`, which
smooths across cell edges; the fit keeps the per-token cell-mean targets, the paper's objective.)

Foreground with ridge regresses one-hot (or fractional) targets ``[1 - p, p]`` (K=2), so the
result has the paper's ``[2, C]`` shape and is read by argmax / softmax like its probes.

(The paper's Adam trainer is :func:`ldm_scene.training.adam.train_adam`.)
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..probes import parse_tensor_name, task_outputs

__all__ = [
    "RidgeStats",
    "choose_penalty",
    "ridge_targets",
    "to_normalised",
    "pack_stats",
    "unpack_stats",
    "DEFAULT_PENALTY_GRID",
]

DEFAULT_PENALTY_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_STAT_NAMES = ("n", "xtx", "xty", "yty")


class RidgeStats:
    """Sufficient statistics of one linear probe's least-squares problem, in float64.

    ``xtx`` is ``[C+1, C+1]`` and ``xty`` ``[C+1, K]`` over rows ``[x, 1]`` (the last index is the
    bias column, so ``xtx[C, C] == n``, ``xtx[:C, C]`` is the sum of ``x`` and ``xty[C]`` the sum
    of ``y``); ``yty`` is ``[K]``, the sum of squared targets per output; ``n`` counts rows.
    Statistics live on ``device`` (accumulate on the GPU that produces activations).
    """

    def __init__(self, channels: int, outputs: int, device: torch.device | str = "cpu") -> None:
        if channels < 1 or outputs < 1:
            raise ValueError(f"channels and outputs must be positive, got {channels}, {outputs}")
        self.channels, self.outputs = int(channels), int(outputs)
        self.n = 0
        self.xtx = torch.zeros(channels + 1, channels + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(channels + 1, outputs, dtype=torch.float64, device=device)
        self.yty = torch.zeros(outputs, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        """Where the statistics are kept and accumulated."""
        return self.xtx.device

    def __repr__(self) -> str:
        return f"RidgeStats(channels={self.channels}, outputs={self.outputs}, n={self.n})"

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x [N, C]`` with targets ``y [N, K]`` (``[N]`` is accepted when K == 1)."""
        if y.ndim == 1 and self.outputs == 1:
            y = y[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [N, {self.channels}], got {tuple(x.shape)}")
        if y.ndim != 2 or y.shape != (x.shape[0], self.outputs):
            raise ValueError(f"y must be [{x.shape[0]}, {self.outputs}], got {tuple(y.shape)}")
        x = x.detach().to(device=self.device, dtype=torch.float64)
        y = y.detach().to(device=self.device, dtype=torch.float64)
        c = self.channels
        # Blocks of [x, 1]^T [x, 1] without materialising the augmented matrix.
        self.xtx[:c, :c] += x.T @ x
        sx = x.sum(0)
        self.xtx[:c, c] += sx
        self.xtx[c, :c] += sx
        self.xtx[c, c] += x.shape[0]
        self.xty[:c] += x.T @ y
        self.xty[c] += y.sum(0)
        self.yty += (y * y).sum(0)
        self.n += int(x.shape[0])

    def merge(self, other: "RidgeStats") -> None:
        """Add another accumulator's statistics (e.g. from another shard) into this one."""
        if (other.channels, other.outputs) != (self.channels, self.outputs):
            raise ValueError(
                f"cannot merge stats for C={other.channels}, K={other.outputs} into C={self.channels}, K={self.outputs}"
            )
        self.xtx += other.xtx.to(self.device)
        self.xty += other.xty.to(self.device)
        self.yty += other.yty.to(self.device)
        self.n += other.n

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centred ``Sxx [C, C]``, ``Sxy [C, K]`` and the means of x and y."""
        if self.n == 0:
            raise ValueError("no data accumulated")
        c, n = self.channels, self.n
        mx = self.xtx[:c, c] / n
        my = self.xty[c] / n
        sxx = self.xtx[:c, :c] - n * torch.outer(mx, mx)
        sxy = self.xty[:c] - n * torch.outer(mx, my)
        return sxx, sxy, mx, my

    def target_mean(self) -> torch.Tensor:
        """Mean of each target output over the accumulated rows, ``[K]``."""
        if self.n == 0:
            raise ValueError("no data accumulated")
        return self.xty[self.channels] / self.n

    def target_std(self) -> torch.Tensor:
        """Population standard deviation of each target output, ``[K]``."""
        mean = self.target_mean()
        return (self.yty / self.n - mean**2).clamp_min(0).sqrt()

    def penalty_scale(self) -> float:
        """``trace(Sxx) / C``, the mean per-channel variance times n, that ``penalty`` is relative to."""
        sxx = self._moments()[0]
        return float(torch.diagonal(sxx).sum()) / self.channels

    def solve(self, penalty: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge solution ``(w [K, C], b [K])`` (``dtype``, CPU) minimising ``|y - xw^T - b|^2 + lam |w|^2``.

        ``lam = penalty * trace(Sxx) / C`` with ``Sxx`` the centred ``X^T X``: relative to the
        channels' mean variance (times n), so one grid of penalties fits any C, any activation
        scale and any number of rows. The intercept is not penalised (fit on centred data).
        ``penalty = 0`` gives the minimum-norm least-squares solution.
        """
        if penalty < 0 or not math.isfinite(penalty):
            raise ValueError(f"penalty must be finite and >= 0, got {penalty}")
        sxx, sxy, mx, my = self._moments()
        lam = penalty * float(torch.diagonal(sxx).sum()) / self.channels
        a = sxx + lam * torch.eye(self.channels, dtype=sxx.dtype, device=sxx.device)
        chol, info = torch.linalg.cholesky_ex(a)
        if penalty > 0 and int(info) == 0:
            wt = torch.cholesky_solve(sxy, chol)
        else:
            # singular (no penalty, collinear or constant channels): minimum-norm solution
            wt = torch.linalg.lstsq(a.cpu(), sxy.cpu(), driver="gelsd").solution.to(a.device)
        b = my - mx @ wt
        if not (torch.isfinite(wt).all() and torch.isfinite(b).all()):
            raise ValueError("ridge solution is not finite (non-finite inputs were accumulated?)")
        return wt.T.to(dtype).cpu().contiguous(), b.to(dtype).cpu()

    def mse(self, w: torch.Tensor, b: torch.Tensor | None = None) -> float:
        """Mean squared error (over rows and outputs) of ``x w^T + b`` on the accumulated data.

        Computed from the statistics alone: ``sum |y - [x,1] theta|^2 = yty - 2 theta.xty +
        theta^T xtx theta`` per output. In float64 this loses about ``1e-16 * mean(y^2)`` to
        cancellation, far below any error worth comparing.
        """
        if self.n == 0:
            raise ValueError("no data accumulated")
        k, c = self.outputs, self.channels
        w = w.detach().to(device=self.device, dtype=torch.float64).reshape(k, c)
        b = torch.zeros(k, dtype=torch.float64, device=self.device) if b is None else (
            b.detach().to(device=self.device, dtype=torch.float64).reshape(k)
        )
        theta = torch.cat([w.T, b[None]], dim=0)  # [C+1, K]
        sse = self.yty - 2 * (theta * self.xty).sum(0) + (theta * (self.xtx @ theta)).sum(0)
        return float(sse.clamp_min(0).sum()) / (self.n * k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): ``n`` (int64 [1]), ``xtx``, ``xty``, ``yty``."""
        return {
            "n": torch.tensor([self.n], dtype=torch.int64),
            "xtx": self.xtx.cpu(),
            "xty": self.xty.cpu(),
            "yty": self.yty.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> "RidgeStats":
        """Rebuild from :meth:`state_dict`; sizes come from the tensors' shapes."""
        xtx, xty, yty = state["xtx"], state["xty"], state["yty"]
        c1, k = xty.shape
        if xtx.shape != (c1, c1) or yty.shape != (k,):
            raise ValueError(
                f"inconsistent stats shapes: xtx {tuple(xtx.shape)}, xty {tuple(xty.shape)}, yty {tuple(yty.shape)}"
            )
        stats = cls(c1 - 1, k, device=device)
        stats.xtx.copy_(xtx)
        stats.xty.copy_(xty)
        stats.yty.copy_(yty)
        stats.n = int(state["n"].reshape(-1)[0])
        return stats


def pack_stats(stats: Mapping[tuple[str, int], RidgeStats]) -> dict[str, torch.Tensor]:
    """Flatten per-(site, step) stats into one tensor dict (``"<site>.stepNN.xtx"``, ...) for a checkpoint."""
    out = {}
    for (site, step), s in stats.items():
        for name, tensor in s.state_dict().items():
            out[f"{site}.step{int(step):02d}.{name}"] = tensor.contiguous()
    return out


def unpack_stats(
    tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[tuple[str, int], RidgeStats]:
    """Inverse of :func:`pack_stats`."""
    grouped: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem, _, kind = name.rpartition(".")
        if kind not in _STAT_NAMES:
            raise ValueError(f"unexpected tensor {name!r} in a stats checkpoint")
        site, step, _ = parse_tensor_name(stem + ".weight")
        grouped.setdefault((site, step), {})[kind] = tensor
    return {key: RidgeStats.from_state_dict(state, device) for key, state in grouped.items()}


def choose_penalty(
    train: RidgeStats,
    val: RidgeStats,
    grid: Sequence[float] = DEFAULT_PENALTY_GRID,
    refit: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor, dict[float, float]]:
    """Pick the penalty in ``grid`` whose ridge fit on ``train`` has the lowest MSE on ``val``.

    Returns ``(penalty, w, b, {penalty: val_mse})``; ties go to the larger penalty. With
    ``refit=True`` the returned probe is refit on train and val together at that penalty.
    """
    if not grid:
        raise ValueError("empty penalty grid")
    scores: dict[float, float] = {}
    fits = {}
    for penalty in grid:
        w, b = train.solve(float(penalty))
        fits[float(penalty)] = (w, b)
        scores[float(penalty)] = val.mse(w, b)
    best = min(scores, key=lambda p: (scores[p], -p))
    w, b = fits[best]
    if refit:
        both = RidgeStats(train.channels, train.outputs, device=train.device)
        both.merge(train)
        both.merge(val)
        w, b = both.solve(best)
    return best, w, b, scores


def ridge_targets(task: str, y: torch.Tensor) -> torch.Tensor:
    """Regression targets ``[N, K]`` for ``task`` from per-token labels ``y [N]``.

    Foreground: ``[1 - p, p]`` with ``p`` the foreground label (0/1, or the fraction of a token's
    cell that is foreground). Depth/shading: ``y[:, None]`` as given (normalise it first, or fit
    raw and convert with :func:`to_normalised`).
    """
    task_outputs(task)
    if y.ndim != 1:
        raise ValueError(f"labels must be [N], got {tuple(y.shape)}")
    if task == "foreground":
        p = y.to(torch.float64)
        return torch.stack([1 - p, p], dim=1)
    return y[:, None]


def to_normalised(w: torch.Tensor, b: torch.Tensor, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express a probe fit on raw targets so it predicts ``(target - mean) / std``."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    return w / std, (b - mean) / std
