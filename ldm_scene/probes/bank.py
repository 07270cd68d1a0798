"""A probe bank (one task, one linear map per (site, step)): apply it, save it, load it via ``safe_open``."""
from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..sites import SiteInfo, as_hw
from ..upsample import nearest
from .meta import METADATA_KEY, ProbeError, ProbeMeta, _site_order, parse_tensor_name, tensor_name

class ProbeBank:
    """One task's linear probes, keyed ``(site, step)``, with the metadata they were fit under.

    ``weights[(site, step)]`` is ``[K, C]`` and ``biases[(site, step)]`` (optional) is ``[K]``,
    both float32. Every key's site must be in ``meta.sites`` with matching channels, and its step
    in ``range(meta.num_steps)``.
    """

    def __init__(
        self,
        meta: ProbeMeta,
        weights: Mapping[tuple[str, int], torch.Tensor],
        biases: Mapping[tuple[str, int], torch.Tensor] | None = None,
    ) -> None:
        self.meta = meta
        k = meta.outputs
        self.weights: dict[tuple[str, int], torch.Tensor] = {}
        self.biases: dict[tuple[str, int], torch.Tensor] = {}
        for (site, step), w in weights.items():
            key = (site, int(step))
            self._check_key(key)
            c = meta.sites[site][0]
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (k, c):
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ProbeError(
                    f"weight for {site} step {key[1]} has shape {shape}, "
                    f"expected [{k}, {c}] ({meta.task}: K={k}; {site}: {c} channels)"
                )
            self.weights[key] = w.detach().to(torch.float32).contiguous()
        for (site, step), b in (biases or {}).items():
            key = (site, int(step))
            if key not in self.weights:
                raise ProbeError(f"bias for {site} step {key[1]} has no weight")
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != (k,):
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ProbeError(f"bias for {site} step {key[1]} has shape {shape}, expected [{k}]")
            self.biases[key] = b.detach().to(torch.float32).contiguous()

    def _check_key(self, key: tuple[str, int]) -> None:
        site, step = key
        if site not in self.meta.sites:
            raise ProbeError(
                f"probe for {site} but metadata lists no such site (it lists {', '.join(self.meta.sites) or 'none'})"
            )
        if not 0 <= step < self.meta.num_steps:
            raise ProbeError(f"probe for {site} at step {step}, outside the {self.meta.num_steps}-step schedule")

    # --- keys -----------------------------------------------------------------------------------
    def keys(self) -> list[tuple[str, int]]:
        """All ``(site, step)`` keys, in network-depth order then step order."""
        return sorted(self.weights, key=lambda k: (_site_order(k[0]), k[1]))

    @property
    def sites(self) -> tuple[str, ...]:
        """Sites that have at least one probe, in network-depth order."""
        return tuple(sorted({s for s, _ in self.weights}, key=_site_order))

    @property
    def steps(self) -> tuple[int, ...]:
        """Steps that have at least one probe, ascending."""
        return tuple(sorted({t for _, t in self.weights}))

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        site, step = key
        try:
            return (site, int(step)) in self.weights
        except (TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return (
            f"ProbeBank(task={self.meta.task!r}, model_id={self.meta.model_id!r}, "
            f"{len(self.sites)} sites x {len(self.steps)} steps = {len(self)} probes)"
        )

    def to(self, device: torch.device | str) -> "ProbeBank":
        """A copy of this bank with its tensors on ``device`` (so :meth:`logits` copies nothing)."""
        return ProbeBank(
            self.meta,
            {k: v.to(device) for k, v in self.weights.items()},
            {k: v.to(device) for k, v in self.biases.items()},
        )

    # --- apply ----------------------------------------------------------------------------------
    def _params(self, site: str, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (site, int(step))
        if key not in self.weights:
            raise ProbeError(
                f"no {self.meta.task} probe for {site} at step {step} "
                f"(this bank has sites {list(self.sites)} and steps {list(self.steps)})"
            )
        return self.weights[key], self.biases.get(key)

    def logits(self, site: str, step: int, act: torch.Tensor) -> torch.Tensor:
        """Apply the probe for ``(site, step)`` to an activation ``[B, T, C]``; returns ``[B, K, h, w]``.

        ``T`` must equal ``h * w`` of the site's grid (from the metadata) and ``C`` its channels.
        Differentiable in ``act``; the result has ``act``'s dtype and device.
        """
        weight, bias = self._params(site, step)
        c, h, w = self.meta.sites[site]
        if act.ndim != 3:
            raise ProbeError(f"activation for {site} must be [B, T, C], got shape {tuple(act.shape)}")
        batch, tokens, channels = act.shape
        if channels != c:
            raise ProbeError(f"probe for {site} expects {c} channels, the activation has {channels}")
        if tokens != h * w:
            raise ProbeError(
                f"probe for {site} expects a {h}x{w} grid ({h * w} tokens), the activation has {tokens} tokens"
            )
        weight = weight.to(device=act.device, dtype=act.dtype)
        if bias is not None:
            bias = bias.to(device=act.device, dtype=act.dtype)
        out = F.linear(act, weight, bias)  # [B, T, K]
        return out.reshape(batch, h, w, -1).permute(0, 3, 1, 2)

    def readout(self, site: str, step: int, act: torch.Tensor, out_size: int | Sequence[int]) -> np.ndarray:
        """What the probe reports, as a float32 ``[B, H, W]`` array nearest-upsampled to ``out_size``.

        Foreground: the probability of class 1 (softmax over the two logits). Depth/shading: the
        prediction in target units (normalisation undone). Computed in float32 without autograd.
        """
        out_h, out_w = as_hw(out_size)
        with torch.no_grad():
            z = self.logits(site, step, act.detach().to(torch.float32))
            if self.meta.task == "foreground":
                z = torch.softmax(z, dim=1)[:, 1:2]
            else:
                z = z * self.meta.target_std + self.meta.target_mean
            z = nearest(z, (out_h, out_w))
        return z[:, 0].cpu().numpy()

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank as one safetensors file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key in self.keys():
            tensors[tensor_name(*key, "weight")] = self.weights[key].cpu().contiguous()
            if key in self.biases:
                tensors[tensor_name(*key, "bias")] = self.biases[key].cpu().contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={METADATA_KEY: self.meta.to_json()})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expect_sites: Sequence[SiteInfo] | None = None,
        expect_image_size: int | Sequence[int] | None = None,
        expect_num_steps: int | None = None,
        *,
        expect_model_id: str | None = None,
        expect_scheduler: str | None = None,
    ) -> "ProbeBank":
        """Read a bank written by :meth:`save`, refusing anything that does not fit.

        Raises :class:`ProbeError`, naming the file, when it is not a safetensors file (a pickle,
        truncated, empty), lacks or has malformed metadata, has another format version, a tensor
        name that does not parse or a tensor of the wrong shape; and when its sites' channels or
        grids differ from ``expect_sites`` (sites the file has but ``expect_sites`` lacks are not
        checked), or its image size, step count, model or sampler differ from the expected ones.
        """
        path = Path(path)
        try:
            bank = cls._load(path)
            check_meta(bank.meta, expect_sites, expect_image_size, expect_num_steps, expect_model_id, expect_scheduler)
            return bank
        except ProbeError as exc:
            raise ProbeError(f"{path}: {exc}") from exc.__cause__

    @classmethod
    def _load(cls, path: Path) -> "ProbeBank":
        meta, tensors = read_probe_file(path)
        weights, biases = {}, {}
        for name, tensor in tensors.items():
            site, step, kind = parse_tensor_name(name)
            check_values(name, tensor)
            (weights if kind == "weight" else biases)[(site, step)] = tensor
        return cls(meta, weights, biases)


def read_probe_file(path: Path) -> tuple[ProbeMeta, dict[str, torch.Tensor]]:
    """The :class:`ProbeMeta` and the tensors of a probe file; :class:`ProbeError` (the caller adds the
    path) when it is not a safetensors file or its metadata is missing or not a probe description."""
    _check_safetensors_file(path)
    try:
        # safe_open parses the header in Rust (bounded nesting, offsets checked against the
        # file) and reads each tensor without unpickling anything.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if METADATA_KEY not in metadata:
                raise ProbeError(
                    f"no '{METADATA_KEY}' entry in the safetensors metadata: not an ldm_scene probe file"
                )
            meta = ProbeMeta.from_json(metadata[METADATA_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise ProbeError(_describe_safetensors_error(exc)) from exc
    return meta, tensors


def check_values(name: str, tensor: torch.Tensor) -> None:
    """Refuse a probe tensor that is not floating point or holds a NaN or an infinity."""
    if not tensor.is_floating_point():
        raise ProbeError(f"tensor {name!r} has dtype {tensor.dtype}, expected a float type")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        # A NaN or infinite weight turns every readout and edit into NaN (a black image).
        raise ProbeError(f"tensor {name!r} has {bad} non-finite value(s) (NaN or infinity) of {tensor.numel()}")


def check_meta(
    meta: ProbeMeta,
    expect_sites: Sequence[SiteInfo] | None,
    expect_image_size: int | Sequence[int] | None,
    expect_num_steps: int | None,
    expect_model_id: str | None = None,
    expect_scheduler: str | None = None,
) -> None:
    """Refuse (:class:`ProbeError`) probe metadata whose image size, step count, sites' channels and
    grids (sites the model lacks are not checked here), model or sampler (a probe reads the
    activations of one sampler's trajectory) differ from the expected ones."""
    if expect_image_size is not None:
        want = as_hw(expect_image_size)
        if want != meta.image_size:
            raise ProbeError(
                f"probes were fit at {meta.image_size[0]}x{meta.image_size[1]} images, "
                f"the model generates {want[0]}x{want[1]}"
            )
    if expect_num_steps is not None and int(expect_num_steps) != meta.num_steps:
        raise ProbeError(
            f"probes were fit for a {meta.num_steps}-step schedule, the sampler runs {int(expect_num_steps)} steps"
        )
    for info in expect_sites or ():
        if info.key not in meta.sites:
            continue
        c, h, w = meta.sites[info.key]
        if c != info.channels:
            raise ProbeError(
                f"probe for {info.key} expects {c} channels, the model has {info.channels}"
            )
        if (h, w) != (info.height, info.width):
            raise ProbeError(
                f"probe for {info.key} expects a {h}x{w} grid, the model has {info.height}x{info.width}"
            )
    if expect_model_id is not None and meta.model_id != expect_model_id:
        raise ProbeError(f"fit on model {meta.model_id!r}, the loaded model is {expect_model_id!r}")
    if expect_scheduler is not None and meta.scheduler != expect_scheduler:
        raise ProbeError(f"fit on runs sampled with {meta.scheduler}, the loaded model samples with "
                         f"{expect_scheduler}; fit the probes again for this model")


def _check_safetensors_file(path: Path) -> None:
    """Refuse what is plainly not a safetensors file, with a message that says what it is instead.

    Only the 8-byte length prefix is read here; the header itself is parsed by ``safe_open``.
    """
    if not path.is_file():
        raise ProbeError("no such file")
    size = path.stat().st_size
    if size == 0:
        raise ProbeError("file is empty, not a safetensors file")
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        first = f.read(1) if 0 < n <= size - 8 else b""
    if n <= 0 or n > size - 8 or first != b"{":
        # Only now look at magic bytes: a valid header length can start with 0x80 too.
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            raise ProbeError(
                "looks like a pickle / torch.save file, not safetensors; it is not loaded "
                "(the paper's .pth checkpoints go through import_paper_checkpoints)"
            )
        if n < 0:
            raise ProbeError(f"file is {size} bytes, too short for a safetensors header")
        if n == 0 or n > size - 8:
            raise ProbeError(
                f"not a safetensors file (header length {n} does not fit a {size}-byte file; truncated?)"
            )
        raise ProbeError("not a safetensors file (header is not a JSON object)")


def _describe_safetensors_error(exc: Exception) -> str:
    text = str(exc)
    if "incomplete metadata" in text or "file not fully covered" in text:
        return f"file is truncated or its tensors overlap: the header's offsets do not fit the data ({text})"
    if "recursion limit" in text:
        return f"not a safetensors file (its header is nested too deeply to be a probe file: {text})"
    return f"not a safetensors file ({text})"


def class_means_bank(sums: dict[tuple[str, int], torch.Tensor], counts: dict[tuple[str, int], torch.Tensor],
                     like: ProbeBank) -> ProbeBank:
    """Per (site, step) background and foreground mean activations as a ProbeBank ([2, C] rows bg, fg).

    ``sums[key]`` is [2, C] (activation sums weighted by background / foreground fraction) and
    ``counts[key]`` is [2] (the weights' totals), e.g. read off ridge statistics' X^T Y.
    """
    weights = {k: (sums[k] / counts[k].clamp_min(1e-9)[:, None]).float() for k in sums}
    meta = replace(like.meta, training={"method": "class-means", "source": like.meta.training.get("method", "")})
    return ProbeBank(meta, weights)
