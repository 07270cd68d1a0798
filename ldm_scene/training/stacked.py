"""Probe weights stacked per site over steps and tasks, for fast readouts in evaluation and calibration."""
from __future__ import annotations

import torch

from ..probes import task_outputs
from .config import Layout
from .context import RunContext
from .solve import Solution


class StackedReadout:
    """Stacked probe weights for fast readouts of one group at every (site, step)."""

    def __init__(self, ctx: RunContext, weights: dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]], sol: Solution):
        self.layout = Layout(tuple(t for t in ctx.layout.tasks if t in weights))
        self.steps = ctx.config.steps
        device = ctx.model.device
        self.w: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        keys = {k[0] for k in next(iter(weights.values()))}
        for key in keys:
            ws, bs = [], []
            for step in range(self.steps):
                ws.append(torch.cat([weights[t][(key, step)][0] for t in self.layout.tasks]))
                bs.append(torch.cat([weights[t][(key, step)][1] for t in self.layout.tasks]))
            self.w[key] = torch.stack(ws).to(device=device, dtype=torch.float32)  # [S, K, C]
            self.b[key] = torch.stack(bs).to(device=device, dtype=torch.float32)  # [S, K]
        scale, shift = [], []
        for t in self.layout.tasks:
            mean, std = sol.norm[t]
            k = task_outputs(t)
            scale += [1.0 if t == "foreground" else std] * k
            shift += [0.0 if t == "foreground" else mean] * k
        self.scale = torch.tensor(scale, device=device)
        self.shift = torch.tensor(shift, device=device)

    def logits(self, key: str, acts: torch.Tensor) -> torch.Tensor:
        """The probes' raw outputs ``[S, T, K]`` for ``acts`` ``[S, T, C]`` (all steps at once)."""
        return torch.einsum("stc,skc->stk", acts.to(torch.float32), self.w[key]) + self.b[key][:, None, :]

    def maps(self, key: str, acts: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Readouts on the token grid ``{task: [S, h, w]}``: depth/shading in label units; foreground
        the logit margin ``z1 - z0`` (:data:`FOREGROUND_THRESHOLD`: foreground above 0).

        The margin, not the softmax probability, is what is upsampled: it is linear in the
        activations (``2 (p - threshold)`` for a calibrated ridge probe), so its bilinear upsampling
        above 0 is exactly the upsampled ridge prediction above the threshold chosen on validation.
        """
        z = self.logits(key, acts)
        z = z * self.scale + self.shift
        z = z.reshape(z.shape[0], hw[0], hw[1], -1)
        out = {}
        for task, sl in self.layout.columns.items():
            if task == "foreground":
                out[task] = z[..., sl.start + 1] - z[..., sl.start]
            else:
                out[task] = z[..., sl.start]
        return out


#: Foreground readouts of probes are logit margins: the mask is the upsampled margin above 0.
FOREGROUND_THRESHOLD = 0.0
