"""Linear probes on self-attention activations: apply, save, load, and import the paper's checkpoints.

A probe bank holds, for one task, one linear map per (site, step) from the C channels of each
token to K outputs: K=2 logits (background, foreground) for ``"foreground"`` as in the paper, one
value for ``"depth"`` and ``"shading"``. Applied to a site's conditional activation ``[B, T, C]``
it gives ``[B, K, h, w]``, the tokens laid out row-major on the site's grid (the UNet's own
``[B, C, h, w] -> [B, h*w, C]`` flattening, and the paper's ``view(-1, h, w, K)``).

On disk a bank is one safetensors file (tensors ``"<site>.step<NN>.weight"`` [K, C] and optional
``".bias"`` [K]; ``__metadata__["ldm_scene"]`` is the JSON of :class:`ProbeMeta`). Loading never
unpickles: a file that is not safetensors, or whose metadata does not fit the model it is meant
for, is refused with a :class:`ProbeError` that names the file and says what differs. The paper's
released ``torch.save`` checkpoints are read by :func:`import_paper_checkpoints` with
``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import replace, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .sites import SITE_KEYS, SiteInfo, site_table

__all__ = [
    "TASKS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "DEPTH_MEAN",
    "DEPTH_STD",
    "ProbeError",
    "ProbeMeta",
    "ProbeBank",
    "task_outputs",
    "tensor_name",
    "parse_tensor_name",
    "probe_path",
    "load_probe_dir",
    "CLASS_MEANS",
    "PAPER_SITE_NAMES",
    "paper_checkpoint_path",
    "import_paper_checkpoints",
]

TASKS: tuple[str, ...] = ("foreground", "depth", "shading")
FORMAT_VERSION = 1
#: Key under the safetensors ``__metadata__`` that holds the JSON of :class:`ProbeMeta`.
METADATA_KEY = "ldm_scene"
#: The paper's depth normalisation (``probe_src/probe_depth_datasets.py: scale_and_norm``):
#: targets were ``(midas_depth - DEPTH_MEAN) / DEPTH_STD``.
DEPTH_MEAN = 15.740597
DEPTH_STD = 9.281932

_TENSOR_NAME = re.compile(r"^(?P<site>.+)\.step(?P<step>\d+)\.(?P<kind>weight|bias)$")


class ProbeError(ValueError):
    """A probe file or probe call that does not fit: the message says what differs or is wrong."""


def task_outputs(task: str) -> int:
    """Number of probe outputs K for ``task``: 2 logits for foreground, 1 value otherwise."""
    if task not in TASKS:
        raise ProbeError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return 2 if task == "foreground" else 1


def tensor_name(site: str, step: int, kind: str = "weight") -> str:
    """The safetensors name of a probe tensor: ``"<site>.step<NN>.<weight|bias>"``."""
    return f"{site}.step{int(step):02d}.{kind}"


def parse_tensor_name(name: str) -> tuple[str, int, str]:
    """Split a probe tensor name into ``(site, step, kind)``; ``ProbeError`` if it does not parse."""
    m = _TENSOR_NAME.match(name)
    if m is None or m["site"] not in SITE_KEYS:
        raise ProbeError(
            f"tensor name {name!r} is not '<site>.step<NN>.weight|bias' with a known site"
        )
    return m["site"], int(m["step"]), m["kind"]


def _site_order(site: str) -> int:
    return SITE_KEYS.index(site)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


@dataclass(frozen=True)
class ProbeMeta:
    """What a probe bank was fit for and how: checked against the model before the bank is used.

    ``sites`` maps each site key to ``(channels, height, width)`` of its token grid at
    ``image_size`` (pixels, ``(height, width)``). Depth/shading probes predict
    ``(target - target_mean) / target_std``; foreground probes are not normalised (0, 1).
    ``training`` records how the bank was made (method, penalty, number of images, seeds, ...)
    and must be JSON-serialisable.
    """

    task: str
    model_id: str
    image_size: tuple[int, int]
    scheduler: str
    num_steps: int
    sites: dict[str, tuple[int, int, int]]
    target_mean: float = 0.0
    target_std: float = 1.0
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ProbeError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ProbeError("model_id must be a non-empty string")
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise ProbeError("scheduler must be a non-empty string")
        if self.format_version != FORMAT_VERSION:
            raise ProbeError(
                f"format_version {self.format_version!r}; this version of ldm_scene reads {FORMAT_VERSION}"
            )
        try:
            image_size = _as_hw(self.image_size)
        except (TypeError, ValueError) as exc:
            raise ProbeError(f"image_size must be (height, width), got {self.image_size!r}") from exc
        if min(image_size) < 1:
            raise ProbeError(f"image_size must be positive, got {image_size}")
        object.__setattr__(self, "image_size", image_size)
        if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ProbeError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        object.__setattr__(self, "num_steps", int(self.num_steps))
        if not isinstance(self.sites, Mapping):
            raise ProbeError(f"sites must map site keys to (channels, height, width), got {self.sites!r}")
        sites = {}
        for site, sizes in self.sites.items():
            if site not in SITE_KEYS:
                raise ProbeError(f"unknown site {site!r} in sites; known sites: {', '.join(SITE_KEYS)}")
            try:
                c, h, w = (int(v) for v in sizes)
            except (TypeError, ValueError) as exc:
                raise ProbeError(f"site {site}: expected (channels, height, width), got {sizes!r}") from exc
            if min(c, h, w) < 1:
                raise ProbeError(f"site {site}: sizes must be positive, got {(c, h, w)}")
            sites[site] = (c, h, w)
        object.__setattr__(self, "sites", dict(sorted(sites.items(), key=lambda kv: _site_order(kv[0]))))
        mean, std = float(self.target_mean), float(self.target_std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ProbeError(f"target normalisation must be finite with std > 0, got mean={mean}, std={std}")
        if self.task == "foreground" and (mean, std) != (0.0, 1.0):
            raise ProbeError("foreground probes output logits: target_mean/target_std must be 0/1")
        object.__setattr__(self, "target_mean", mean)
        object.__setattr__(self, "target_std", std)
        if not isinstance(self.training, Mapping):
            raise ProbeError(f"training must be a dict, got {type(self.training).__name__}")
        try:
            json.dumps(self.training, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProbeError(f"training must be JSON-serialisable: {exc}") from exc
        # a JSON round trip: a deep copy that compares equal to what a saved file gives back
        object.__setattr__(self, "training", json.loads(json.dumps(self.training)))

    @property
    def outputs(self) -> int:
        """Number of probe outputs K for this task."""
        return task_outputs(self.task)

    def to_json(self) -> str:
        """The JSON string stored in a probe file's metadata."""
        return json.dumps(dataclasses.asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ProbeMeta":
        """Parse :meth:`to_json` output; ``ProbeError`` on bad JSON, unknown or missing fields."""
        if not isinstance(text, str):
            raise ProbeError(f"metadata must be a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProbeError(f"metadata is not valid JSON: {exc}") from exc
        except RecursionError:
            # Python's json recurses once per nesting level: a hostile file could otherwise
            # take down whatever loads it (the app, at start-up).
            raise ProbeError("metadata is not a probe description: its JSON is nested too deeply to read") from None
        if not isinstance(data, dict):
            raise ProbeError(f"metadata must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ProbeError(
                f"format_version {version!r}; this version of ldm_scene reads {FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProbeError(f"unknown metadata field(s) {unknown}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ProbeError(f"metadata lacks field(s) {missing}")
        try:
            return cls(**data)
        except ProbeError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # e.g. a string where a number belongs: int("x") / float({}) inside __post_init__
            raise ProbeError(f"metadata has a value of the wrong kind: {exc}") from exc


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
        out_h, out_w = _as_hw(out_size)
        with torch.no_grad():
            z = self.logits(site, step, act.detach().to(torch.float32))
            if self.meta.task == "foreground":
                z = torch.softmax(z, dim=1)[:, 1:2]
            else:
                z = z * self.meta.target_std + self.meta.target_mean
            z = F.interpolate(z, size=(out_h, out_w), mode="nearest")
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
    ) -> "ProbeBank":
        """Read a bank written by :meth:`save`, refusing anything that does not fit.

        Raises :class:`ProbeError`, naming the file, when it is not a safetensors file (a pickle,
        truncated, empty), lacks or has malformed metadata, has another format version, a tensor
        name that does not parse or a tensor of the wrong shape; and when its sites' channels or
        grids differ from ``expect_sites`` (sites the file has but ``expect_sites`` lacks are not
        checked), or its image size or step count differ from the expected ones.
        """
        path = Path(path)
        try:
            return cls._load(path, expect_sites, expect_image_size, expect_num_steps)
        except ProbeError as exc:
            raise ProbeError(f"{path}: {exc}") from exc.__cause__

    @classmethod
    def _load(
        cls,
        path: Path,
        expect_sites: Sequence[SiteInfo] | None,
        expect_image_size: int | Sequence[int] | None,
        expect_num_steps: int | None,
    ) -> "ProbeBank":
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
        weights, biases = {}, {}
        for name, tensor in tensors.items():
            site, step, kind = parse_tensor_name(name)
            if not tensor.is_floating_point():
                raise ProbeError(f"tensor {name!r} has dtype {tensor.dtype}, expected a float type")
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                # A NaN or infinite weight turns every readout and edit into NaN (a black image).
                raise ProbeError(f"tensor {name!r} has {bad} non-finite value(s) (NaN or infinity) of {tensor.numel()}")
            (weights if kind == "weight" else biases)[(site, step)] = tensor
        bank = cls(meta, weights, biases)
        bank._check_expectations(expect_sites, expect_image_size, expect_num_steps)
        return bank

    def _check_expectations(
        self,
        expect_sites: Sequence[SiteInfo] | None,
        expect_image_size: int | Sequence[int] | None,
        expect_num_steps: int | None,
    ) -> None:
        meta = self.meta
        if expect_image_size is not None:
            want = _as_hw(expect_image_size)
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


def probe_path(directory: str | os.PathLike, task: str) -> Path:
    """Where a task's bank lives in a model's probe directory: ``<directory>/<task>.safetensors``."""
    task_outputs(task)
    return Path(directory) / f"{task}.safetensors"


#: A bank a probe directory may hold beside the task banks: per (site, step) background and
#: foreground mean activations (:func:`class_means_bank`), which steering edits along.
CLASS_MEANS = "foreground_means"
_MEANS_FILES = {CLASS_MEANS: "foreground"}


def load_probe_dir(
    directory: str | os.PathLike,
    expect_sites: Sequence[SiteInfo] | None = None,
    expect_image_size: int | Sequence[int] | None = None,
    expect_num_steps: int | None = None,
    tasks: Sequence[str] = TASKS,
    expect_model_id: str | None = None,
    errors: list[str] | None = None,
    expect_scheduler: str | None = None,
) -> dict[str, ProbeBank]:
    """Load ``<name>.safetensors`` for each of ``tasks`` (task names or :data:`CLASS_MEANS`) that
    exists in ``directory``, a model's probe folder (``weights/<model>/probes``).

    Names without a file are left out. A missing directory raises :class:`ProbeError`. So does a
    file that does not fit (sites, image size, steps, ``expect_model_id``, ``expect_scheduler``
    (a probe reads the activations of one sampler's trajectory), or metadata naming another task),
    unless ``errors`` is given: then that file is left out, its message (which
    names the file) is appended to ``errors``, and the other files are still loaded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ProbeError(f"{directory}: probe directory does not exist")
    banks = {}
    for task in tasks:
        path = directory / f"{task}.safetensors" if task in _MEANS_FILES else probe_path(directory, task)
        if not path.is_file():
            continue
        try:
            bank = ProbeBank.load(path, expect_sites, expect_image_size, expect_num_steps)
            if expect_model_id is not None and bank.meta.model_id != expect_model_id:
                raise ProbeError(f"{path}: fit on model {bank.meta.model_id!r}, the loaded model is {expect_model_id!r}")
            if expect_scheduler is not None and bank.meta.scheduler != expect_scheduler:
                raise ProbeError(f"{path}: fit on runs sampled with {bank.meta.scheduler}, the loaded model samples with "
                                 f"{expect_scheduler}; fit the probes again for this model")
            if bank.meta.task != _MEANS_FILES.get(task, task):
                expected = f"{path.name} must hold task {_MEANS_FILES[task]!r}" if task in _MEANS_FILES else \
                    f"the file name says {task!r}"
                raise ProbeError(f"{path}: metadata says task {bank.meta.task!r}, {expected}")
        except (ProbeError, OSError) as err:
            if errors is None:
                raise
            errors.append(str(err))
            continue
        banks[task] = bank
    return banks


# --- the paper's released checkpoints ---------------------------------------------------------
#
# Read from github.com/yc015/scene-representation-diffusion-model (probing_binary_depth.py,
# probing_continuous_depth.py, probe_src/depth_intervention_utils.py::load_classifiers,
# probe_src/continuous_depth_intervention_utils.py, probe_src/probe_models.py,
# run_probing_experiments.ipynb):
# - A probe is ``probeLinearDense``: ``dense1 = nn.Linear(C, K, bias=use_bias)`` applied per
#   token, then ``view(-1, 512 // factor, 512 // factor, K).permute(0, 3, 1, 2)`` (row-major tokens)
#   and nearest ``interpolate(scale_factor=factor)``. Its state dict is ``{"dense1.weight": [K, C]}``
#   (plus ``"dense1.bias"`` for depth probes trained with ``--probe_type Linear``).
# - Files: ``<root>/at_step_{s}/segmentation_probe_{block}_{i}_attn1_out_{j}{suffix}.pth`` under
#   ``probe_checkpoints/large_syn_dataset`` (foreground) and
#   ``.../regression_probe_{block}_{i}_attn1_out_{j}{suffix}.pth`` under
#   ``probe_checkpoints/large_syn_dataset_continuous`` (depth). ``{block}`` is ``down``/``mid``/``up``,
#   ``{i}`` the block index in ``unet.down_blocks``/``up_blocks`` (down 0-2, up 1-3; ``0`` for
#   the mid block), ``{j}`` the index in that block's ``attentions`` (0-1 down, 0-2 up, 0 mid).
#   The hooked layer is ``{block}_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_out.0``
#   (``mid_block.attentions.0...`` for mid): the self-attention output projection, which is what
#   our sites hook (``attn1``'s output; its ``to_out.1`` is dropout, the identity at inference).
#   ``attn1_out`` is the scripts' default ``--output_dir``.
# - ``s`` is the 0-based denoising-loop index (``features[at_step]``, printed as "step at_step+1";
#   the UNet runs once per step on the stacked ``[uncond, cond]`` batch and the probes were fit on
#   ``[:, 1]``, the conditional half), 0..14 for the 15-step LMS schedule at 512x512.
# - Suffix: ``""`` is the checkpoint with the lowest test loss over the 30 epochs, ``"_final"`` the
#   last epoch. Depth runs append ``weights_postfix``: the published runs used
#   ``--probe_type "Linear-no-bias"`` and no smoothing, i.e. ``"_linear_no_bias_unsmoothed"``
#   (``regression_probe_{layer}_final{weights_postfix}.pth`` for the last epoch), which is also
#   what ``intervention_continuous_depth.py`` loads.
# - Depth targets were ``(depth - 15.740597) / 9.281932`` (``scale_and_norm``).
# - The controlled (randomly permuted UNet) probes live under ``large_syn_dataset_controlled_fully_permuted``
#   and ``large_syn_dataset_continuous_fully_permuted`` with the same file names.
# The released zip itself (probe_checkpoints.zip, Git LFS) was not inspected; the names above are
# the ones the scripts write and read.

#: Our site key -> the paper's ``{block}_{i}_attn1_out_{j}`` name.
PAPER_SITE_NAMES: dict[str, str] = {}
for _site in SITE_KEYS:
    _parts = _site.split(".")  # e.g. ["up_blocks", "1", "attentions", "2"] or ["mid_block", "attentions", "0"]
    if _parts[0] == "mid_block":
        PAPER_SITE_NAMES[_site] = f"mid_0_attn1_out_{_parts[2]}"
    else:
        PAPER_SITE_NAMES[_site] = f"{_parts[0].removesuffix('_blocks')}_{_parts[1]}_attn1_out_{_parts[3]}"
del _site, _parts

_PAPER_TASKS = {
    # task: (subfolder of probe_checkpoints/, file prefix, default suffix, K)
    "foreground": ("large_syn_dataset", "segmentation_probe", "", 2),
    "depth": ("large_syn_dataset_continuous", "regression_probe", "_linear_no_bias_unsmoothed", 1),
}

# SD v1.4's UNet layout (DESIGN.md section 2), enough for ``site_table`` to give the paper's
# channels and grids; the VAE downsamples by 8.
_SD14_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}
_SD14_VAE_FACTOR = 8


def paper_checkpoint_path(root: str | os.PathLike, task: str, site: str, step: int, suffix: str | None = None) -> Path:
    """The path of the paper's checkpoint for ``(task, site, step)`` under an ``at_step_*`` root."""
    if task not in _PAPER_TASKS:
        raise ProbeError(f"the paper released probes for {sorted(_PAPER_TASKS)}, not {task!r}")
    _, prefix, default_suffix, _ = _PAPER_TASKS[task]
    suffix = default_suffix if suffix is None else suffix
    return Path(root) / f"at_step_{int(step)}" / f"{prefix}_{PAPER_SITE_NAMES[site]}{suffix}.pth"


def _paper_root(folder: Path, task: str) -> Path:
    # Accept the folder holding ``at_step_*`` or any ancestor layout the release uses.
    for candidate in (folder, folder / _PAPER_TASKS[task][0], folder / "probe_checkpoints" / _PAPER_TASKS[task][0]):
        if candidate.is_dir() and any(candidate.glob("at_step_*")):
            return candidate
    raise ProbeError(
        f"{folder}: no at_step_<s> folders here or under {_PAPER_TASKS[task][0]}/ "
        f"(expected the unzipped probe_checkpoints of the paper's release)"
    )


def _read_paper_state(path: Path, k: int, channels: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ProbeError(f"{path}: refused or unreadable as a weights-only checkpoint ({exc})") from exc
    if not isinstance(state, Mapping) or "dense1.weight" not in state:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ProbeError(f"{path}: expected a state dict with 'dense1.weight', got {keys}")
    extra = sorted(set(state) - {"dense1.weight", "dense1.bias"})
    if extra:
        raise ProbeError(f"{path}: not a linear probe (unexpected keys {extra})")
    weight = state["dense1.weight"]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (k, channels):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ProbeError(f"{path}: dense1.weight has shape {shape}, expected [{k}, {channels}] for {site}")
    bias = state.get("dense1.bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (k,)):
        raise ProbeError(f"{path}: dense1.bias has shape {getattr(bias, 'shape', None)}, expected [{k}]")
    return weight, bias


def import_paper_checkpoints(
    folder: str | os.PathLike,
    task: str,
    *,
    steps: Sequence[int] | None = None,
    suffix: str | None = None,
    model_id: str = "CompVis/stable-diffusion-v1-4",
    image_size: int | Sequence[int] = (512, 512),
    scheduler: str = "LMSDiscreteScheduler",
    num_steps: int = 15,
    target_mean: float | None = None,
    target_std: float | None = None,
    sites: Sequence[SiteInfo] | None = None,
) -> ProbeBank:
    """Build a :class:`ProbeBank` from the paper's released ``.pth`` probes (see the notes above).

    ``folder`` is the unzipped ``probe_checkpoints`` (or its ``large_syn_dataset[_continuous]``
    subfolder, or any folder of ``at_step_<s>/`` directories, e.g. the controlled runs). ``task`` is
    ``"foreground"`` or ``"depth"``. ``suffix`` picks the file variant (default: best-test-loss
    checkpoints, ``"_linear_no_bias_unsmoothed"`` for depth). ``steps=None`` imports every
    ``at_step_<s>`` present. Files are read with ``torch.load(weights_only=True)`` only; a file
    that is not a plain linear state dict of the right shape raises :class:`ProbeError`.
    Missing files are skipped; finding none at all is an error. ``sites`` defaults to SD v1.4's
    table at ``image_size``; depth normalisation defaults to the paper's mean and std.
    """
    if task not in _PAPER_TASKS:
        raise ProbeError(f"the paper released probes for {sorted(_PAPER_TASKS)}, not {task!r}")
    root = _paper_root(Path(folder), task)
    image_size = _as_hw(image_size)
    if sites is None:
        sites = site_table(_SD14_UNET_CONFIG, image_size, _SD14_VAE_FACTOR)
    k = _PAPER_TASKS[task][3]
    suffix = _PAPER_TASKS[task][2] if suffix is None else suffix
    if steps is None:
        found = []
        for d in root.glob("at_step_*"):
            m = re.fullmatch(r"at_step_(\d+)", d.name)
            if m and d.is_dir():
                found.append(int(m[1]))
        steps = sorted(found)
    weights, biases = {}, {}
    for step in steps:
        if not 0 <= int(step) < num_steps:
            raise ProbeError(f"{root}: at_step_{step} is outside a {num_steps}-step schedule")
        for info in sites:
            path = paper_checkpoint_path(root, task, info.key, step, suffix)
            if not path.is_file():
                continue
            weight, bias = _read_paper_state(path, k, info.channels, info.key)
            weights[(info.key, int(step))] = weight
            if bias is not None:
                biases[(info.key, int(step))] = bias
    if not weights:
        raise ProbeError(
            f"{root}: no {task} checkpoints named like "
            f"{paper_checkpoint_path(root, task, sites[0].key, 0, suffix).name} in at_step_<s>/"
        )
    if task == "depth":
        mean = DEPTH_MEAN if target_mean is None else target_mean
        std = DEPTH_STD if target_std is None else target_std
    else:
        mean = 0.0 if target_mean is None else target_mean
        std = 1.0 if target_std is None else target_std
    used_sites = {s for s, _ in weights}
    meta = ProbeMeta(
        task=task,
        model_id=model_id,
        image_size=image_size,
        scheduler=scheduler,
        num_steps=num_steps,
        sites={i.key: (i.channels, i.height, i.width) for i in sites if i.key in used_sites},
        target_mean=mean,
        target_std=std,
        training={
            "method": "adam",
            "source": "Chen, Viegas & Wattenberg 2023, github.com/yc015/scene-representation-diffusion-model",
            "loss": "cross_entropy" if task == "foreground" else "huber",
            "epochs": 30,
            "lr": 1e-3,
            "batch_size": 4,
            "n_train_images": 246,
            "checkpoint_suffix": suffix,
            "bias": bool(biases),
        },
    )
    return ProbeBank(meta, weights, biases)


def class_means_bank(sums: dict[tuple[str, int], torch.Tensor], counts: dict[tuple[str, int], torch.Tensor],
                     like: ProbeBank) -> ProbeBank:
    """Per (site, step) background and foreground mean activations as a ProbeBank ([2, C] rows bg, fg).

    ``sums[key]`` is [2, C] (activation sums weighted by background / foreground fraction) and
    ``counts[key]`` is [2] (the weights' totals), e.g. read off ridge statistics' X^T Y.
    """
    weights = {k: (sums[k] / counts[k].clamp_min(1e-9)[:, None]).float() for k in sums}
    meta = replace(like.meta, training={"method": "class-means", "source": like.meta.training.get("method", "")})
    return ProbeBank(meta, weights)
