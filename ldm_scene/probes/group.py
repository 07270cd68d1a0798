"""A foreground probe over a group of sites read together: :class:`GroupProbe`, one safetensors file.

The banks read one site each, as the paper's probes do. A group probe reads several: each site's
self-attention output ``[B, T, C]`` is resampled bilinearly to the group's finest grid and the
channels are concatenated per token in the metadata's site order (:func:`group_tokens`), so the
probe is still one linear map per step, a weight ``[1, sum C]`` and a bias: a ridge regression to
the foreground fraction of each cell (``ldm-scene probes groups`` fits it and writes
:data:`GROUP_FILE`). Its threshold per step was chosen on validation images. :meth:`GroupProbe.readout`
upsamples the fraction bilinearly to the image size (as the fit was scored) and shifts it by the
threshold, ``p = clip(z - threshold + 0.5, 0, 1)`` (kept on the right side of 0.5 where float
rounding would put it on it), so ``p > 0.5`` is exactly the fitted mask and
the map is drawn and scored as the single-site foreground probabilities are.

The file holds tensors ``group.step<NN>.weight`` / ``.bias`` and a :class:`~.meta.ProbeMeta`
(task foreground) whose ``training`` names the ``group`` (its sites in concatenation order) and
the ``thresholds`` per step; it is read with ``safe_open`` and checked as a bank is.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..sites import SiteInfo, as_hw
from .bank import check_meta, check_values, read_probe_file
from .meta import METADATA_KEY, ProbeError, ProbeMeta

#: Where a probe folder keeps its group probe.
GROUP_FILE = "foreground_group.safetensors"
_TENSOR = re.compile(r"^group\.step(?P<step>\d+)\.(?P<kind>weight|bias)$")
#: A name the app shows as it is: letters, digits, spaces and ``()._,-``, at most 60 characters.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9 ()._,-]{1,60}")


def group_tokens(acts: Mapping[str, torch.Tensor], sites: Sequence[str]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens ``[B, h*w, sum C]`` of ``sites``' activations (each ``[B, T, C]`` on a square grid) on the
    finest of their grids, coarser sites upsampled bilinearly, channels concatenated in ``sites`` order."""
    grids = {}
    for s in sites:
        if s not in acts:
            raise ProbeError(f"the group reads {s}, which has no activation here")
        if acts[s].ndim != 3:
            raise ProbeError(f"activation for {s} must be [B, T, C], got shape {tuple(acts[s].shape)}")
        n = int(round(acts[s].shape[1] ** 0.5))
        if n * n != acts[s].shape[1]:
            raise ProbeError(f"site {s} has {acts[s].shape[1]} tokens, not a square grid")
        grids[s] = n
    size = max(grids.values())
    parts = []
    for s in sites:
        n, a = grids[s], acts[s].float()
        if n != size:
            g = a.transpose(1, 2).reshape(a.shape[0], a.shape[2], n, n)
            g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
            a = g.reshape(a.shape[0], a.shape[2], size * size).transpose(1, 2)
        parts.append(a)
    return torch.cat(parts, dim=2), (size, size)


def tensor_name(step: int, kind: str) -> str:
    return f"group.step{int(step):02d}.{kind}"


class GroupProbe:
    """A foreground probe over ``meta.training["group"]`` read together, one linear map per step.

    ``weights[step]`` is ``[1, sum C]`` (channels in group order), ``biases[step]`` ``[1]``;
    ``meta.training["thresholds"]`` maps each step (as a string, JSON) to the fraction threshold
    chosen on validation. ``name`` is how the app lists it.
    """

    def __init__(self, meta: ProbeMeta, weights: Mapping[int, torch.Tensor], biases: Mapping[int, torch.Tensor]) -> None:
        if meta.task != "foreground":
            raise ProbeError(f"a group probe reads the foreground, its metadata says task {meta.task!r}")
        group = meta.training.get("group")
        if not isinstance(group, list) or not group or not all(isinstance(s, str) for s in group):
            raise ProbeError("metadata lacks the group's sites (training.group: a list of site keys)")
        if len(set(group)) != len(group) or set(group) != set(meta.sites):
            raise ProbeError(f"training.group {group} must list each of the metadata's sites {list(meta.sites)} once")
        raw = meta.training.get("thresholds")
        if not isinstance(raw, Mapping):
            raise ProbeError("metadata lacks the thresholds per step (training.thresholds)")
        thresholds = {}
        for k, t in raw.items():
            try:
                step, value = int(k), float(t)
            except (TypeError, ValueError):
                raise ProbeError(f"threshold {k!r}: {t!r} is not a step and a number") from None
            if not math.isfinite(value):
                raise ProbeError(f"threshold at step {step} is not finite")
            thresholds[step] = value
        self.meta = meta
        self.sites: tuple[str, ...] = tuple(group)
        self.channels = sum(meta.sites[s][0] for s in group)
        self.thresholds = thresholds
        self.weights: dict[int, torch.Tensor] = {}
        self.biases: dict[int, torch.Tensor] = {}
        for step, w in weights.items():
            step = int(step)
            if not 0 <= step < meta.num_steps:
                raise ProbeError(f"group probe at step {step}, outside the {meta.num_steps}-step schedule")
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (1, self.channels):
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ProbeError(f"group weight at step {step} has shape {shape}, expected [1, {self.channels}] "
                                 f"({len(group)} sites' channels together)")
            b = biases.get(step)
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != (1,):
                raise ProbeError(f"group probe at step {step} needs a bias of shape [1]")
            if step not in thresholds:
                raise ProbeError(f"group probe at step {step} has no threshold in training.thresholds")
            self.weights[step] = w.detach().to(torch.float32).contiguous()
            self.biases[step] = b.detach().to(torch.float32).contiguous()
        extra = sorted(set(int(b) for b in biases) - set(self.weights))
        if extra:
            raise ProbeError(f"group bias at step(s) {extra} without a weight")
        if not self.weights:
            raise ProbeError("the group probe holds no step")

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.weights))

    @property
    def name(self) -> str:
        """How the app lists it: ``"<name> read together"`` with the metadata's name where it is a short
        plain label (the file is untrusted and the name reaches the page), else ``"<N> sites read together"``."""
        name = self.meta.training.get("name")
        if isinstance(name, str) and _PLAIN_NAME.fullmatch(name):
            return f"{name} read together"
        return f"{len(self.sites)} sites read together"

    def __repr__(self) -> str:
        return f"GroupProbe({self.name!r}, {len(self.sites)} sites, {self.channels} channels, steps {list(self.steps)})"

    def to(self, device: torch.device | str) -> "GroupProbe":
        return GroupProbe(self.meta, {k: v.to(device) for k, v in self.weights.items()},
                          {k: v.to(device) for k, v in self.biases.items()})

    # --- apply ----------------------------------------------------------------------------------
    def fraction(self, step: int, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ridge readout ``[B, h, w]`` on the group's grid: each cell's predicted foreground fraction.

        Equal to ``group_tokens(acts) @ w.T + b``, computed site by site: bilinear resampling is linear
        and acts on each channel alone, so each site's share of the weight is applied on the site's own
        grid and only that one-channel map is resampled (not every channel)."""
        step = int(step)
        if step not in self.weights:
            raise ProbeError(f"no group probe at step {step} (it has steps {list(self.steps)})")
        size = max(self.meta.sites[s][1] for s in self.sites)
        w = self.weights[step]
        out, start = None, 0
        for s in self.sites:
            c, h, width = self.meta.sites[s]
            a = acts.get(s)
            if a is None:
                raise ProbeError(f"the group reads {s}, which has no activation here")
            if a.ndim != 3 or (a.shape[1], a.shape[2]) != (h * width, c):
                raise ProbeError(f"group probe expects {s} as [B, {h * width}, {c}], the activation is {tuple(a.shape)}")
            z = (a.float() @ w[:, start:start + c].to(a.device).T).reshape(a.shape[0], 1, h, width)
            start += c
            if (h, width) != (size, size):
                z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
            out = z if out is None else out + z
        return out[:, 0] + self.biases[step].to(out.device)

    def readout(self, step: int, acts: Mapping[str, torch.Tensor], out_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """``[B, H, W]`` float32 in [0, 1], ``> 0.5`` where the fitted mask is: the fraction upsampled
        bilinearly to ``out_size`` (default: the image size it was fit at), shifted by the step's threshold."""
        size = as_hw(out_size) if out_size is not None else self.meta.image_size
        with torch.no_grad():
            z = self.fraction(step, acts)[:, None]
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)[:, 0]
            t = self.thresholds[int(step)]
            p = (z - t + 0.5).clamp(0.0, 1.0)
            # exactly the fitted mask, even where z - t is too small to move 0.5 in float32
            above = torch.full_like(p, 0.5).nextafter(torch.ones_like(p))
            return torch.where(z > t, torch.maximum(p, above), torch.minimum(p, torch.full_like(p, 0.5)))

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as one safetensors file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for step in self.steps:
            tensors[tensor_name(step, "weight")] = self.weights[step].cpu().contiguous()
            tensors[tensor_name(step, "bias")] = self.biases[step].cpu().contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={METADATA_KEY: self.meta.to_json()})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_sites: Sequence[SiteInfo] | None = None,
             expect_image_size: int | Sequence[int] | None = None, expect_num_steps: int | None = None, *,
             expect_model_id: str | None = None, expect_scheduler: str | None = None) -> "GroupProbe":
        """Read a file written by :meth:`save`, refusing what does not fit (:class:`ProbeError`, naming
        the file): not safetensors, bad metadata, a tensor of another name, dtype or shape, a
        non-finite value, or sites, image size, step count, model or sampler other than the expected
        ones (:func:`~.bank.check_meta`, as for a bank)."""
        path = Path(path)
        try:
            meta, tensors = read_probe_file(path)
            weights, biases = {}, {}
            for name, tensor in tensors.items():
                m = _TENSOR.match(name)
                if m is None:
                    raise ProbeError(f"tensor name {name!r} is not 'group.step<NN>.weight|bias'")
                check_values(name, tensor)
                (weights if m["kind"] == "weight" else biases)[int(m["step"])] = tensor
            probe = cls(meta, weights, biases)
            check_meta(meta, expect_sites, expect_image_size, expect_num_steps, expect_model_id, expect_scheduler)
            if expect_sites is not None:
                known = {i.key for i in expect_sites}
                missing = [s for s in probe.sites if s not in known]
                if missing:
                    raise ProbeError(f"the group reads site(s) {missing} this model does not have")
            return probe
        except ProbeError as exc:
            raise ProbeError(f"{path}: {exc}") from exc.__cause__
