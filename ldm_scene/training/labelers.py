"""Labelers: per-pixel labels (foreground, depth, shading) for generated images, behind one interface.

Generated images have no ground truth, so, as in the paper, other models label them: TRACER-like
saliency for the foreground and MiDaS (DPT) for depth on Stable Diffusion images; the shipped
labeler network for toy images. Every labeler is a :class:`Labeler`: called with uint8 images
``[N, H, W, 3]`` (and, optionally, the seeds that identify them), it returns a float32 ``[N, H, W]``
map per task it provides, at the images' resolution:

- ``"foreground"``: 1.0 on the salient object, 0.0 elsewhere (binarised);
- ``"depth"``: the labeler's own depth units (the toy labeler: distance along the ray, larger is
  farther; MiDaS/DPT: relative inverse depth, larger is *nearer*, as the paper used it);
- ``"shading"``: the shading term (toy: ``n.l`` with ambient, in [0, 1]).

The networks that need the Hugging Face Hub (DPT) or a pip package (``transparent-background``)
are imported and loaded lazily, on first use, and say clearly what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .. import bundle
from ..probes import TASKS

__all__ = [
    "Labeler",
    "LabelerError",
    "ToyLabels",
    "DPTDepth",
    "Saliency",
    "FolderLabels",
    "Combined",
    "check_labels",
    "build_labeler",
]


class LabelerError(RuntimeError):
    """A labeler cannot be built or run; the message says what is missing and how to get it."""


@runtime_checkable
class Labeler(Protocol):
    """Labels images. ``tasks`` lists what it provides; ``name`` goes into probe metadata.

    ``labels_any_image`` is False for a labeler that can only label the run's own images (a folder
    of label files keyed by seed): it cannot label intermediate x0 previews.
    """

    name: str
    tasks: tuple[str, ...]
    labels_any_image: bool

    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]: ...


def _as_uint8_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def check_labels(labels: dict[str, np.ndarray], tasks: Sequence[str], n: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Validate a labeler's output and bring each map to ``size`` (float32 ``[n, H, W]``).

    Continuous maps are resized bilinearly; a foreground map is resized by area and binarised at
    0.5. Missing tasks or non-finite values raise :class:`LabelerError`.
    """
    out = {}
    for task in tasks:
        if task not in labels:
            raise LabelerError(f"labeler gave no {task!r} labels (it gave {sorted(labels)})")
        y = np.asarray(labels[task], dtype=np.float32)
        if y.ndim != 3 or y.shape[0] != n:
            raise LabelerError(f"{task} labels must be [{n}, H, W], got {y.shape}")
        if not np.isfinite(y).all():
            raise LabelerError(f"{task} labels contain nan or inf")
        if y.shape[1:] != tuple(size):
            t = torch.from_numpy(y)[:, None]
            if task == "foreground":
                t = (F.interpolate(t, size=size, mode="area") > 0.5).float()
            else:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            y = t[:, 0].numpy()
        out[task] = np.ascontiguousarray(y, dtype=np.float32)
    return out


class ToyLabels:
    """The toy world's labeler network (``<model dir>/labelers/``): foreground, depth, shading."""

    tasks = TASKS
    labels_any_image = True

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if not bundle.has_labeler(directory):
            raise LabelerError(
                f"no toy labeler in {directory} (expected {bundle.LABELER_FILE} and its .json, "
                "written by `python -m ldm_scene.toy train`)"
            )
        self.net = bundle.load_labeler(directory)
        self.name = f"toy-labeler ({directory.parent.name}/{directory.name})"

    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        out = self.net(_as_uint8_batch(images))
        return {
            "foreground": out["mask"].astype(np.float32),
            "depth": out["depth"].astype(np.float32),
            "shading": out["shading"].astype(np.float32),
        }


class DPTDepth:
    """MiDaS v3 depth through transformers' ``DPTForDepthEstimation`` (downloads from the Hub once).

    Returns the model's relative inverse depth, upsampled bicubically to the image size, as the
    paper used MiDaS's output (and its normalisation, ``probes.DEPTH_MEAN``/``DEPTH_STD``, was of
    these values).
    """

    tasks = ("depth",)
    labels_any_image = True

    def __init__(self, model_id: str = "Intel/dpt-hybrid-midas", device: str | torch.device | None = None, batch_size: int = 8):
        self.model_id = model_id
        self.name = model_id
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        self._net = None
        self._processor = None

    def _load(self) -> None:
        if self._net is not None:
            return
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        try:
            self._processor = AutoImageProcessor.from_pretrained(self.model_id)
            self._net = DPTForDepthEstimation.from_pretrained(self.model_id).to(self.device).eval()
        except OSError as exc:
            raise LabelerError(
                f"could not load {self.model_id!r} ({exc}). On a machine with network run "
                f"`hf download {self.model_id}` once, or pass a local directory (dpt:PATH)."
            ) from exc

    @torch.no_grad()
    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        from PIL import Image

        self._load()
        images = _as_uint8_batch(images)
        size = images.shape[1:3]
        outs = []
        for i in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(im) for im in images[i : i + self.batch_size]]
            inputs = self._processor(images=batch, return_tensors="pt").to(self.device)
            pred = self._net(**inputs).predicted_depth  # [b, h, w]
            pred = F.interpolate(pred[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
            outs.append(pred.cpu().numpy())
        return {"depth": np.concatenate(outs).astype(np.float32)}


class Saliency:
    """Salient-object foreground from the ``transparent-background`` package (InSPyReNet).

    ``pip install transparent-background`` (not a project requirement); it downloads its
    checkpoint on first use. The saliency map in [0, 1] is binarised at ``threshold``.
    """

    tasks = ("foreground",)
    labels_any_image = True

    def __init__(self, mode: str = "base", device: str | torch.device | None = None, threshold: float = 0.5):
        self.mode = mode
        self.device = str(device) if device is not None else "cpu"
        self.threshold = float(threshold)
        self.name = f"transparent-background ({mode}) > {threshold}"
        self._remover = None

    def _load(self) -> None:
        if self._remover is not None:
            return
        try:
            from transparent_background import Remover
        except ImportError as exc:
            raise LabelerError(
                "the saliency labeler needs the transparent-background package: "
                "`pip install transparent-background` (or label foreground another way, e.g. folder:foreground=PATH)"
            ) from exc
        self._remover = Remover(mode=self.mode, device=self.device)

    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        from PIL import Image

        self._load()
        maps = []
        for im in _as_uint8_batch(images):
            out = np.asarray(self._remover.process(Image.fromarray(im), type="map"), dtype=np.float32)
            if out.ndim == 3:
                out = out[..., 0]
            maps.append(out / 255.0 if out.max() > 1.0 else out)
        return {"foreground": (np.stack(maps) > self.threshold).astype(np.float32)}


class FolderLabels:
    """Labels read from files named by seed: ``<dir>/<seed>.npy`` (float [H, W]) or ``<seed>.png``.

    PNGs are grey images scaled to [0, 1] (8-bit by 255, 16-bit by 65535); a foreground file is
    binarised at 0.5. Only the run's own images have files, so ``labels_any_image`` is False.
    """

    labels_any_image = False

    def __init__(self, directory: str | Path, task: str = "shading"):
        if task not in TASKS:
            raise LabelerError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LabelerError(f"label folder {self.directory} does not exist")
        self.task = task
        self.tasks = (task,)
        self.name = f"folder {self.directory.name} ({task})"

    def _read(self, seed: int) -> np.ndarray:
        from PIL import Image

        npy, png = self.directory / f"{seed}.npy", self.directory / f"{seed}.png"
        if npy.is_file():
            y = np.load(npy, allow_pickle=False).astype(np.float32)
        elif png.is_file():
            raw = np.asarray(Image.open(png))
            if raw.ndim == 3:
                raw = raw[..., 0]
            y = raw.astype(np.float32) / (65535.0 if raw.dtype == np.uint16 or raw.max() > 255 else 255.0)
        else:
            raise LabelerError(f"no label file for seed {seed} in {self.directory} ({npy.name} or {png.name})")
        if y.ndim != 2:
            raise LabelerError(f"label file for seed {seed} must be one [H, W] map, got shape {y.shape}")
        return (y > 0.5).astype(np.float32) if self.task == "foreground" else y

    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        images = _as_uint8_batch(images)
        if seeds is None or len(seeds) != len(images):
            raise LabelerError(f"{self.name} labels only the run's own images: it needs their seeds")
        maps = [self._read(int(s)) for s in seeds]
        size = images.shape[1:3]
        return check_labels({self.task: np.stack([_resize(m, size, self.task) for m in maps])}, self.tasks, len(maps), size)


def _resize(y: np.ndarray, size: tuple[int, int], task: str) -> np.ndarray:
    if y.shape == tuple(size):
        return y
    return check_labels({task: y[None]}, (task,), 1, size)[task][0]


class Combined:
    """Several labelers as one; each task comes from the first labeler that provides it."""

    def __init__(self, parts: Sequence[Labeler]):
        if not parts:
            raise LabelerError("no labelers to combine")
        self.parts = list(parts)
        owner: dict[str, Labeler] = {}
        for part in self.parts:
            for task in part.tasks:
                owner.setdefault(task, part)
        self._owner = owner
        self.tasks = tuple(t for t in TASKS if t in owner)
        self.labels_any_image = all(getattr(p, "labels_any_image", True) for p in self.parts)
        self.name = " + ".join(p.name for p in self.parts)

    def __call__(self, images: np.ndarray, seeds: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for part in self.parts:
            wanted = [t for t in part.tasks if self._owner[t] is part]
            if wanted:
                labels = part(images, seeds=seeds)
                out.update({t: labels[t] for t in wanted})
        return out


def build_labeler(spec: str, model_dir: str | Path | None = None, device: str | torch.device | None = None) -> Labeler:
    """Build a labeler from a command-line spec: parts joined by ``+``.

    Parts: ``toy`` (the model directory's ``labelers/``) or ``toy:DIR``; ``dpt`` (Intel/dpt-hybrid-
    midas), ``dpt-large`` (Intel/dpt-large) or ``dpt:ID_OR_PATH``; ``tracer`` / ``saliency``
    (transparent-background); ``folder:PATH`` (shading labels) or ``folder:TASK=PATH``. Example:
    ``dpt+tracer+folder:shading=labels/shading``.
    """
    parts: list[Labeler] = []
    for part in [p.strip() for p in spec.split("+") if p.strip()]:
        kind, _, arg = part.partition(":")
        if kind == "toy":
            if arg:
                directory = Path(arg)
            elif model_dir is not None:
                directory = bundle.labelers_dir(model_dir)
            else:
                raise LabelerError("labeler 'toy' needs a local model directory with labelers/ (or toy:DIR)")
            parts.append(ToyLabels(directory))
        elif kind == "dpt":
            parts.append(DPTDepth(arg or "Intel/dpt-hybrid-midas", device=device))
        elif kind == "dpt-large":
            parts.append(DPTDepth("Intel/dpt-large", device=device))
        elif kind in ("tracer", "saliency", "transparent-background"):
            parts.append(Saliency(arg or "base", device=device))
        elif kind == "folder":
            task, eq, path = arg.partition("=")
            if not eq:
                task, path = "shading", arg
            if not path:
                raise LabelerError("folder labeler needs a path: folder:PATH or folder:TASK=PATH")
            parts.append(FolderLabels(path, task))
        else:
            raise LabelerError(
                f"unknown labeler {part!r}; use toy, toy:DIR, dpt, dpt-large, dpt:ID, tracer, folder:PATH, "
                "folder:TASK=PATH, joined by '+'"
            )
    if not parts:
        raise LabelerError(f"empty labeler spec {spec!r}")
    return parts[0] if len(parts) == 1 else Combined(parts)
