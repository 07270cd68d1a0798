"""Classifiers over each step's decoded x0 preview, and the per-step confidence curves they give.

Chen et al. report that VGG-16 names the prompted object only late in denoising (after step 11 of
15), while linear probes read the scene's layout by step 3. This module is the classifier side of
that comparison. A :class:`Classifier` maps images to class probabilities and a prompt to the class
it asks for: :class:`VGGClassifier` (torchvision's VGG-16, ImageNet classes) for Stable Diffusion,
:class:`ToyShapeClassifier` (the shipped shape classifier) for the toy world; :func:`classifier_for`
picks one for a model. :func:`classify_run` and :class:`CurveTracker` turn one run's previews into
:class:`RunCurves`; :func:`evaluate` aggregates many runs, with the same classifier on real images
as the reference line; the figure functions draw curves with matplotlib (no pyplot state).

Command line: ``python -m ldm_scene.classify --model toy --n 100 --out DIR``.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .models import Model, default_device
from .sampler import DEFAULT_STEPS, config_for, describe_guidance, sample

#: An image as classifiers take it: PIL (any mode, converted to RGB) or uint8 [H, W, 3].
ImageLike = Union[Image.Image, np.ndarray]
#: Reference images may also be files, opened only when classified.
ReferenceImage = Union[Image.Image, np.ndarray, str, Path]

#: Toy evaluation runs draw their scenes (prompts) and noise from seeds here on, and reference
#: renders from REFERENCE_SEED0 on: far from the training (0..), held-out (10M) and report (20M) seeds.
CLASSIFY_SEED0 = 30_000_000
REFERENCE_SEED0 = 31_000_000
#: Where the toy world's labelers and shape classifier sit inside a model directory.
LABELERS_DIR = "labelers"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClassifierLoadError(RuntimeError):
    """A classifier's weights could not be loaded; the message says why and what to do."""


@runtime_checkable
class Classifier(Protocol):
    """Names what an image shows, out of a fixed list of classes."""

    name: str
    classes: tuple[str, ...]

    def probabilities(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Images (a list, or uint8 [N, H, W, 3]) -> float [N, len(classes)], rows summing to 1."""
        ...

    def class_for_prompt(self, prompt: str) -> int | None:
        """The index of the class ``prompt`` asks for, or None when it names none of them."""
        ...


# --------------------------------------------------------------------------------------------
# Images and prompts
# --------------------------------------------------------------------------------------------


def as_uint8_images(images: Sequence[ReferenceImage] | np.ndarray) -> list[np.ndarray]:
    """PIL images, uint8 [H, W, 3] arrays, image files or a uint8 [N, H, W, 3] batch -> list of [H, W, 3].

    Float arrays are refused rather than guessed at ([0, 1] or [0, 255]?): convert them with
    ``(x * 255).round().astype(np.uint8)`` as the toy renders are stored.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        _check_uint8(images, "[N, H, W, 3]")
        return list(images)
    out = []
    for image in images:
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        if isinstance(image, Image.Image):
            out.append(np.array(image.convert("RGB")))  # a writable copy, as torch.as_tensor wants
        elif isinstance(image, np.ndarray):
            _check_uint8(image[None], "[H, W, 3]")
            out.append(image)
        else:
            raise TypeError(f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}")
    return out


def _check_uint8(batch: np.ndarray, what: str) -> None:
    if batch.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 {what} arrays, got {batch.dtype}; convert floats in [0, 1] with "
            "(x * 255).round().astype(np.uint8)"
        )
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"images must be RGB {what}, got shape {tuple(batch.shape[1:])} per image")


@functools.lru_cache(maxsize=8)
def _class_patterns(classes: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    patterns = []
    for name in classes:
        words = r"\s+".join(re.escape(w) for w in name.lower().split())
        patterns.append(re.compile(rf"(?<!\w){words}(?:s|es)?(?!\w)"))
    return tuple(patterns)


def match_class(prompt: str, classes: Sequence[str]) -> int | None:
    """The class whose name occurs in ``prompt`` as whole words, case-insensitively; None if none does.

    "lemon", "a photo of a lemon" and "Two lemons" all name ``lemon`` (a plural ``s``/``es`` is
    allowed; spaces inside a name match any run of whitespace). When several names occur, the
    longest wins, so "a tiger shark" is ``tiger shark``, not ``tiger``; then the earliest in the
    prompt; then the lowest class index. Only the one name per class that torchvision lists is
    known: "a lemon tree" names ``lemon``, and a prompt using another synonym names nothing.
    """
    text = prompt.lower()
    best: tuple[int, int, int] | None = None  # (-length, start, index): smallest wins
    for index, (name, pattern) in enumerate(zip(classes, _class_patterns(tuple(classes)))):
        found = pattern.search(text)
        if found is not None:
            key = (-len(name), found.start(), index)
            best = key if best is None or key < best else best
    return None if best is None else best[2]


# --------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names as torchvision lists them (shipped with it; no download)."""
    from torchvision.models import VGG16_Weights

    return tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


class VGGClassifier:
    """torchvision's VGG-16 over ImageNet's 1000 classes, as the paper classified SD's previews.

    Preprocessing is ImageNet's normalisation after a bilinear (antialiased) resize of the whole
    image to ``input_size`` square. Unlike torchvision's evaluation transform (resize to 256,
    centre-crop 224) nothing is cropped: the object may be anywhere in a generated image.
    ``weights="IMAGENET1K_V1"`` downloads the ImageNet weights (528 MB) on first use into the
    torch hub cache; with ``download=False`` only a cached copy is used and a missing one is an
    immediate :class:`ClassifierLoadError` (offline apps should not wait on a network call).
    ``weights=None`` gives a randomly initialised network, seeded by ``seed``, for tests (class
    names are the same: they ship with torchvision). ``input_size`` below 224 (at least 32, which
    the network's five poolings need) is only for fast tests.
    """

    name = "vgg16"

    def __init__(
        self,
        weights: str | None = "IMAGENET1K_V1",
        device: str | torch.device | None = None,
        input_size: int = 224,
        batch_size: int = 16,
        seed: int = 0,
        download: bool = True,
    ):
        from torchvision.models import VGG16_Weights, vgg16

        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 (VGG-16 pools 5 times), got {input_size}")
        self.device = torch.device(device) if device is not None else default_device()
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self.classes = imagenet_categories()
        self.weights = weights
        # Built on the meta device, then given storage: torchvision's own init of the 138M
        # parameters would be thrown away when weights are loaded, and is slow when they are not.
        with torch.device("meta"):
            net = vgg16(weights=None)
        net = net.to_empty(device="cpu")
        if weights is None:
            _init_like_torchvision(net, torch.Generator("cpu").manual_seed(int(seed)))
        else:
            try:
                enum = VGG16_Weights[weights] if isinstance(weights, str) else VGG16_Weights(weights)
            except (KeyError, ValueError) as err:
                known = ", ".join(w.name for w in VGG16_Weights)
                raise ClassifierLoadError(f"unknown VGG-16 weights {weights!r}; known: {known}") from err
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
            if not download and not cached.is_file():
                raise ClassifierLoadError(
                    f"VGG-16 weights {enum.name} are not in the torch hub cache ({cached}) and downloading is "
                    f"off. On a machine with network, download {enum.url} there, or allow the download."
                )
            try:
                state = enum.get_state_dict(progress=False)
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                raise ClassifierLoadError(
                    f"could not download VGG-16 weights {enum.name} ({enum.url}): {err}. On a machine with "
                    "network run once to fill the torch hub cache, or use weights=None (random) for tests."
                ) from err
            net.load_state_dict(state)
        self.net = net.eval().to(self.device)
        self._mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

    def _preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        batch = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255
            batch.append(torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False))
        return (torch.cat(batch) - self._mean) / self._std

    @torch.inference_mode()
    def probabilities(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Images -> [N, 1000] softmax probabilities over :attr:`classes`."""
        arrays = as_uint8_images(images)
        out = [
            self.net(self._preprocess(arrays[i : i + self.batch_size])).float().softmax(-1).cpu()
            for i in range(0, len(arrays), self.batch_size)
        ]
        return (torch.cat(out) if out else torch.zeros(0, len(self.classes))).numpy()

    def class_for_prompt(self, prompt: str) -> int | None:
        """The ImageNet class named in ``prompt`` (see :func:`match_class`)."""
        return match_class(prompt, self.classes)


def _init_like_torchvision(net: torch.nn.Module, generator: torch.Generator) -> None:
    """torchvision's VGG init (Kaiming-normal convs, N(0, 0.01) linears, zero biases), seeded."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.01, generator=generator)
            else:
                continue
            if module.bias is not None:
                module.bias.zero_()


class ToyShapeClassifier:
    """The toy world's shape classifier (playing VGG-16's role): which of the shapes an image shows.

    Wraps :class:`ldm_scene.toy.nets.ToyClassifier`, loaded from a directory holding
    ``classifier.safetensors`` and ``classifier.json`` (a toy model's ``labelers/``). Images of any
    size are accepted (the network is convolutional with global pooling); it was trained at the
    toy model's resolution.
    """

    name = "toy-shapes"

    def __init__(self, directory: str | Path):
        from .toy.nets import ToyClassifier

        directory = Path(directory)
        if not (directory / "classifier.safetensors").is_file():
            raise ClassifierLoadError(f"no shape classifier in {directory} (expected classifier.safetensors)")
        self.directory = directory
        self.toy = ToyClassifier.load(directory)
        self.classes = tuple(self.toy.classes)

    def probabilities(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Images -> [N, len(classes)] softmax probabilities over the shapes."""
        arrays = as_uint8_images(images)
        if not arrays:
            return np.zeros((0, len(self.classes)), np.float32)
        if len({a.shape for a in arrays}) == 1:
            return self.toy.probabilities(np.stack(arrays))
        return np.concatenate([self.toy.probabilities(a[None]) for a in arrays])

    def class_for_prompt(self, prompt: str) -> int | None:
        """The shape word in ``prompt`` ("a red cone" -> cone)."""
        return match_class(prompt, self.classes)


def model_directory(model: Model) -> Path | None:
    """The local directory ``model`` was loaded from, or None (a Hub id, the tiny model)."""
    name = getattr(model.pipe, "name_or_path", None)
    if not name:
        return None
    path = Path(name)
    return path if path.is_dir() else None


def classifier_for(
    model: Model,
    device: str | torch.device | None = None,
    vgg_weights: str | None = "IMAGENET1K_V1",
    download: bool = True,
) -> Classifier:
    """The toy shape classifier when the model's directory has ``labelers/classifier.safetensors``,
    else VGG-16 with ``vgg_weights`` (None: random weights; ``download`` as in :class:`VGGClassifier`)."""
    directory = model_directory(model)
    if directory is not None and (directory / LABELERS_DIR / "classifier.safetensors").is_file():
        return ToyShapeClassifier(directory / LABELERS_DIR)
    return VGGClassifier(weights=vgg_weights, device=device, download=download)


# --------------------------------------------------------------------------------------------
# Per-run curves
# --------------------------------------------------------------------------------------------


def first_correct_step(correct: Sequence[bool], steps: Sequence[int] | None = None) -> int | None:
    """The first step from which ``correct`` stays True to the end; None if the last is not correct.

    ``correct[i]`` says whether the prompted class was top-1 at the i-th step seen; ``steps`` maps
    positions to step indices (default: the position itself). ``[F, F, F, T, T]`` -> 3;
    ``[F, F, T, F, F, T, T]`` -> 5 (being right at step 2 does not count: it did not stay right).
    """
    flags = [bool(c) for c in correct]
    if steps is not None and len(steps) != len(flags):
        raise ValueError(f"got {len(flags)} flags but {len(steps)} steps")
    if not flags or not flags[-1]:
        return None
    i = len(flags)
    while i > 0 and flags[i - 1]:
        i -= 1
    return int(steps[i]) if steps is not None else i


@dataclass(frozen=True)
class RunCurves:
    """One run's classification at each step seen.

    ``probabilities`` is [S, C] over ``classes`` for ``steps`` (0-based, increasing); ``top_k`` per
    step lists (class name, confidence) best first. ``prompted_class`` is the class the prompt
    names (None when it names none; then the prompted fields are None). ``prompted_rank`` is
    1-based (1 = top-1; ties go to the lower class index, as ``argmax`` does), and
    ``first_correct_step`` the step from which the prompted class stays top-1 (see
    :func:`first_correct_step`) among the steps seen.
    """

    prompt: str
    classes: tuple[str, ...]
    prompted_class: int | None
    steps: tuple[int, ...]
    probabilities: np.ndarray
    top_k: tuple[tuple[tuple[str, float], ...], ...]
    prompted_confidence: np.ndarray | None
    prompted_rank: np.ndarray | None
    first_correct_step: int | None

    @classmethod
    def from_probabilities(
        cls,
        prompt: str,
        classes: Sequence[str],
        prompted_class: int | None,
        steps: Sequence[int],
        probabilities: np.ndarray,
        top_k: int = 5,
    ) -> "RunCurves":
        """Derive every per-step field from the [S, C] probability matrix."""
        probs = np.asarray(probabilities, dtype=np.float32).reshape(len(steps), len(classes))
        steps = tuple(int(s) for s in steps)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase, got {steps}")
        order = np.argsort(-probs, axis=1, kind="stable")  # ties: lower index first, like argmax
        k = max(1, min(int(top_k), len(classes)))
        tops = tuple(tuple((classes[j], float(row[j])) for j in idx[:k]) for row, idx in zip(probs, order))
        if prompted_class is None:
            conf = rank = None
            first = None
        else:
            conf = probs[:, prompted_class].copy()
            rank = np.argmax(order == prompted_class, axis=1).astype(np.int64) + 1
            first = first_correct_step(rank == 1, steps)
        return cls(prompt, tuple(classes), prompted_class, steps, probs, tops, conf, rank, first)

    @property
    def top1(self) -> np.ndarray:
        """The top-1 class index at each step, [S]."""
        return self.probabilities.argmax(axis=1) if len(self.steps) else np.zeros(0, np.int64)

    @property
    def correct(self) -> np.ndarray | None:
        """Whether the prompted class is top-1 at each step, [S] bool (None with no prompted class)."""
        return None if self.prompted_rank is None else self.prompted_rank == 1

    def to_dict(self, with_probabilities: bool = False) -> dict[str, Any]:
        """JSON-ready summary (the full matrix only if asked: 1000 ImageNet classes per step add up)."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "prompted_class": None if self.prompted_class is None else self.classes[self.prompted_class],
            "steps": list(self.steps),
            "first_correct_step": self.first_correct_step,
            "top1": [self.classes[i] for i in self.top1],
            "top_k": [[[name, round(p, 5)] for name, p in step] for step in self.top_k],
            "prompted_confidence": None if self.prompted_confidence is None else _rounded(self.prompted_confidence),
            "prompted_rank": None if self.prompted_rank is None else [int(r) for r in self.prompted_rank],
        }
        if with_probabilities:
            out["classes"] = list(self.classes)
            out["probabilities"] = [_rounded(row) for row in self.probabilities]
        return out


def _rounded(values: Iterable[float], digits: int = 5) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), digits) for v in values]


def classify_run(
    classifier: Classifier,
    previews: Sequence[ImageLike] | np.ndarray,
    prompt: str,
    top_k: int = 5,
    steps: Sequence[int] | None = None,
) -> RunCurves:
    """Classify one run's previews (one image per step, in step order) in one batch.

    ``steps`` are the previews' step indices (default 0, 1, ...).
    """
    steps = list(range(len(previews))) if steps is None else list(steps)
    if len(steps) != len(previews):
        raise ValueError(f"got {len(previews)} previews but {len(steps)} step indices")
    probs = classifier.probabilities(previews)
    return RunCurves.from_probabilities(
        prompt, classifier.classes, classifier.class_for_prompt(prompt), steps, probs, top_k
    )


class CurveTracker:
    """Builds a run's curves one step at a time, for drawing them live while the sampler streams.

    ``update(step, preview)`` classifies one preview and returns the curves so far; a
    ``first_correct_step`` then holds for the steps seen so far and may move later (or vanish)
    as more arrive. Steps must increase; :meth:`reset` starts a new run.
    """

    def __init__(self, classifier: Classifier, prompt: str, top_k: int = 5):
        self.classifier = classifier
        self.prompt = prompt
        self.top_k = top_k
        self.prompted_class = classifier.class_for_prompt(prompt)
        self._steps: list[int] = []
        self._rows: list[np.ndarray] = []

    def reset(self) -> None:
        self._steps.clear()
        self._rows.clear()

    def update(self, step: int, preview: ImageLike) -> RunCurves:
        """Add step ``step``'s preview (PIL or uint8 [H, W, 3]) and return the curves so far."""
        if self._steps and int(step) <= self._steps[-1]:
            raise ValueError(f"steps must increase: got step {step} after step {self._steps[-1]}")
        self._rows.append(self.classifier.probabilities([preview])[0])
        self._steps.append(int(step))
        return self.curves

    @property
    def curves(self) -> RunCurves:
        """The curves over the steps seen so far (empty before the first update)."""
        probs = np.stack(self._rows) if self._rows else np.zeros((0, len(self.classifier.classes)), np.float32)
        return RunCurves.from_probabilities(
            self.prompt, self.classifier.classes, self.prompted_class, self._steps, probs, self.top_k
        )


# --------------------------------------------------------------------------------------------
# Batch evaluation
# --------------------------------------------------------------------------------------------


def toy_prompts_and_seeds(n: int, seed0: int = CLASSIFY_SEED0) -> list[tuple[str, int]]:
    """``n`` toy runs: each seed's scene caption as the prompt, the same seed for the noise."""
    from .toy.render import scene_from_seed

    return [(scene_from_seed(seed).prompt, seed) for seed in range(seed0, seed0 + n)]


def toy_reference(n: int, size: int = 64, seed0: int = REFERENCE_SEED0) -> list[tuple[np.ndarray, str]]:
    """``n`` fresh renders (uint8 [size, size, 3], as the toy model was trained on) with their captions."""
    from .toy.render import render_batch

    batch = render_batch(range(seed0, seed0 + n), size=size)
    images = (batch["image"] * 255).round().astype(np.uint8)
    return list(zip(images, batch["prompt"]))


def photo_reference(folder: str | Path) -> list[tuple[Path, str]]:
    """Photos under ``folder`` with the prompt naming each (images are opened only when classified).

    A photo in a subfolder takes the subfolder's name as its prompt (``photos/lemon/1.jpg`` ->
    "lemon", ImageFolder style); one directly in ``folder`` takes its file name without a trailing
    number, underscores read as spaces (``granny_smith_02.jpg`` -> "granny smith").
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder {folder} does not exist")
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        if path.parent != folder:
            prompt = path.parent.name
        else:
            prompt = re.sub(r"[\s_-]*\d+$", "", path.stem)
        out.append((path, prompt.replace("_", " ").strip()))
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return out


def reference_accuracy(
    classifier: Classifier, reference_images: Sequence[tuple[ReferenceImage, str]], batch_size: int = 64
) -> dict[str, Any]:
    """The classifier's top-1 accuracy and mean prompted-class confidence on real (image, prompt) pairs.

    Pairs whose prompt names no class are counted in ``skipped`` and left out.
    """
    labelled = [(img, classifier.class_for_prompt(p)) for img, p in reference_images]
    kept = [(img, c) for img, c in labelled if c is not None]
    correct, confidence = [], []
    for i in range(0, len(kept), batch_size):
        chunk = kept[i : i + batch_size]
        probs = classifier.probabilities(as_uint8_images([img for img, _ in chunk]))
        labels = np.array([c for _, c in chunk])
        correct.extend(probs.argmax(axis=1) == labels)
        confidence.extend(probs[np.arange(len(chunk)), labels])
    return {
        "n": len(kept),
        "skipped": len(labelled) - len(kept),
        "top1_accuracy": float(np.mean(correct)) if correct else None,
        "mean_confidence": float(np.mean(confidence)) if confidence else None,
    }


def evaluate(
    model: Model,
    classifier: Classifier,
    prompts_and_seeds: Sequence[tuple[str, int]],
    steps: int = DEFAULT_STEPS,
    reference_images: Sequence[tuple[ReferenceImage, str]] | None = None,
    guidance: float | None = None,
    top_k: int = 5,
    reference_source: str = "real images",
    progress: bool = False,
    on_run: Callable[[int, RunCurves], None] | None = None,
) -> dict[str, Any]:
    """Generate each (prompt, seed), classify every step's x0 preview, and aggregate per step.

    Returns a JSON-ready dict: ``per_step`` (step, mean prompted-class confidence, top-1 and
    top-k accuracy), ``first_correct`` (a histogram over steps plus ``never``, and its median),
    ``reference`` (the classifier on ``reference_images``, (image, prompt) pairs: renders for the
    toy world, photos for SD; None when not given), one summary per run in ``runs``, and the
    prompts naming no class in ``skipped`` (not generated). ``on_run(i, curves)`` sees each run's
    full curves (e.g. to draw examples). ``guidance`` defaults to the model's own.
    """
    from tqdm import tqdm

    # The model's own guidance setting wherever the caller gives none; every run shares it.
    setting = config_for(model, "a", 0, steps, guidance)

    runs, skipped, conf, ranks, firsts = [], [], [], [], []
    for i, (prompt, seed) in enumerate(tqdm(prompts_and_seeds, desc="classify", disable=not progress)):
        if classifier.class_for_prompt(prompt) is None:
            skipped.append({"prompt": prompt, "seed": int(seed), "reason": "names no class of the classifier"})
            continue
        config = replace(setting, prompt=prompt, seed=int(seed))
        previews = [s.preview for s in sample(model, config, previews=True, decode_final=False)]
        curves = classify_run(classifier, previews, prompt, top_k=top_k)
        if on_run is not None:
            on_run(i, curves)
        conf.append(curves.prompted_confidence)
        ranks.append(curves.prompted_rank)
        firsts.append(curves.first_correct_step)
        runs.append({"seed": int(seed), **curves.to_dict()})
    if not runs:
        raise ValueError("no prompt names a class of the classifier: nothing to evaluate")
    n_steps = len(conf[0])
    conf_m, rank_m = np.stack(conf), np.stack(ranks)
    histogram = [sum(f == s for f in firsts) for s in range(n_steps)]
    found = [f for f in firsts if f is not None]
    reference = None
    if reference_images is not None:
        reference = {"source": reference_source, **reference_accuracy(classifier, reference_images)}
    return {
        "format": 1,
        "model": model.model_id,
        "classifier": classifier.name,
        "num_classes": len(classifier.classes),
        "steps": n_steps,
        "guidance": float(setting.guidance),
        "late_guidance": setting.late_guidance, "late_from": setting.late_from,
        "top_k": int(top_k),
        "n": len(runs),
        "per_step": {
            "step": list(range(n_steps)),
            "mean_confidence": _rounded(conf_m.mean(axis=0)),
            "top1_accuracy": _rounded((rank_m == 1).mean(axis=0)),
            "topk_accuracy": _rounded((rank_m <= top_k).mean(axis=0)),
        },
        "first_correct": {
            "histogram": histogram,
            "never": len(firsts) - len(found),
            "median": float(np.median(found)) if found else None,
        },
        "reference": reference,
        "runs": runs,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------
# Figures and the report
# --------------------------------------------------------------------------------------------


def plot_run_curves(curves: RunCurves, max_classes: int = 5):
    """Confidence over steps of the classes that matter in one run; the first correct step marked.

    Drawn: the prompted class (thick) and the classes that were ever top-1, topped up with the
    highest-peaking others, ``max_classes`` in all. Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    steps = np.asarray(curves.steps)
    probs = curves.probabilities
    chosen: list[int] = []
    if curves.prompted_class is not None:
        chosen.append(curves.prompted_class)
    peaks = probs.max(axis=0) if len(steps) else np.zeros(len(curves.classes))
    for j in list(dict.fromkeys(curves.top1.tolist())) + list(np.argsort(-peaks, kind="stable")):
        if len(chosen) >= max_classes:
            break
        if int(j) not in chosen:
            chosen.append(int(j))
    for j in chosen:
        prompted = j == curves.prompted_class
        ax.plot(steps, probs[:, j], marker="o", markersize=3, linewidth=2.6 if prompted else 1.2,
                label=curves.classes[j] + (" (prompted)" if prompted else ""), zorder=3 if prompted else 2)
    if curves.first_correct_step is not None:
        ax.axvline(curves.first_correct_step, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(f"top-1 from step {curves.first_correct_step}", (curves.first_correct_step, 0.0),
                    xytext=(4, 4), textcoords="offset points", fontsize=8, color="0.3")
    ax.set(xlabel="denoising step", ylabel="confidence", ylim=(0, 1.05), title=f'"{curves.prompt}"')
    if len(steps):
        ax.set_xticks(steps)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def _load_json(value: Mapping | str | Path | None) -> Mapping | None:
    if value is None or isinstance(value, Mapping):
        return value
    path = Path(value)
    return json.loads(path.read_text()) if path.is_file() else None


def plot_timelines(classify_json: Mapping | str | Path, metrics_json: Mapping | str | Path | None = None):
    """Two timelines on one step axis: when the classifier names the object, when probes read the scene.

    Top: the classifier's top-1 accuracy and mean prompted-class confidence per step, its accuracy
    on real images (dotted line), and each task's best-site probe score per step from a probes
    ``metrics.json`` (``tasks[task]["best_per_step"]``, labelled with ``tasks[task]["metric"]``).
    A missing file, or a task without those keys, just leaves the probe curves out. Bottom: the
    histogram of first-correct steps. Both arguments are dicts or paths. Returns a Figure.
    """
    from matplotlib.figure import Figure

    data = _load_json(classify_json)
    if data is None:
        raise FileNotFoundError(f"no classification results at {classify_json}")
    metrics = _load_json(metrics_json) or {}
    fig = Figure(figsize=(9.6, 5.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    per_step = data["per_step"]
    steps = np.asarray(per_step["step"])
    name = data.get("classifier", "classifier")
    top.plot(steps, per_step["top1_accuracy"], marker="o", linewidth=2.4, color="C3", label=f"{name}: top-1 accuracy")
    top.plot(steps, per_step["mean_confidence"], marker=".", linestyle="--", color="C3", alpha=0.7,
             label=f"{name}: prompted-class confidence")
    ref = data.get("reference") or {}
    if ref.get("top1_accuracy") is not None:
        top.axhline(ref["top1_accuracy"], color="C3", linestyle=":", linewidth=1.2,
                    label=f"{name} on {ref.get('source', 'real images')}")
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    for i, (task, entry) in enumerate(sorted((tasks or {}).items())):
        scores = entry.get("best_per_step") if isinstance(entry, Mapping) else None
        if not scores:
            continue
        metric = entry.get("metric", "score")
        top.plot(np.arange(len(scores)), [np.nan if s is None else s for s in scores], marker="s", markersize=3,
                 color=f"C{i % 3}", label=f"probe {task} ({metric}, best site)")
        residual = entry.get("residual_best_per_step")  # depth after removing the layout prior
        if residual:
            top.plot(np.arange(len(residual)), [np.nan if s is None else s for s in residual], marker="s",
                     markersize=3, linestyle="--", color=f"C{i % 3}", label=f"probe {task}, residual ({metric})")
    top.set(ylabel="accuracy / score", ylim=(0, 1.05), title=f"{data.get('model', '')}: when is the object recognised?")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fc = data["first_correct"]
    bottom.bar(steps, fc["histogram"], color="C3", alpha=0.7)
    bottom.set(xlabel="denoising step", ylabel="runs", title=f"first step from which the prompted class stays top-1 "
               f"(never: {fc['never']} of {data['n']})")
    bottom.title.set_fontsize(9)
    bottom.set_xticks(steps)
    bottom.grid(alpha=0.3, axis="y")
    return fig


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def readme_from_json(data: Mapping, figures: Sequence[str] = ()) -> str:
    """The Markdown report of an :func:`evaluate` result: summary, per-step table, figure links."""
    per_step, fc, ref = data["per_step"], data["first_correct"], data.get("reference")
    lines = [
        f"# Classification curves: {data['model']}",
        "",
        f"Classifier `{data['classifier']}` ({data['num_classes']} classes) on each step's x0 preview, "
        f"{data['n']} runs, {data['steps']} steps, "
        + describe_guidance(data["guidance"], data.get("late_guidance"), data.get("late_from"))
        + (f"; {len(data['skipped'])} prompts naming no class skipped." if data.get("skipped") else "."),
        "",
        f"- Top-1 accuracy at the last step: {_fmt(per_step['top1_accuracy'][-1])}",
        f"- Median first-correct step (runs that end correct): {_fmt(fc['median'], 1)}; "
        f"never correct at the end: {fc['never']} of {data['n']}",
    ]
    if ref:
        lines.append(f"- Reference, the same classifier on {ref['source']} (n={ref['n']}): "
                     f"top-1 accuracy {_fmt(ref['top1_accuracy'])}, mean confidence {_fmt(ref['mean_confidence'])}")
    lines += ["", f"| step | mean prompted-class confidence | top-1 accuracy | top-{data['top_k']} accuracy "
              "| runs first correct here |", "|---:|---:|---:|---:|---:|"]
    for s, c, a1, ak, h in zip(per_step["step"], per_step["mean_confidence"], per_step["top1_accuracy"],
                               per_step["topk_accuracy"], fc["histogram"]):
        lines.append(f"| {s} | {_fmt(c)} | {_fmt(a1)} | {_fmt(ak)} | {h} |")
    lines.append(f"| never | | | | {fc['never']} |")
    if figures:
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", "Written by `python -m ldm_scene.classify` from `classify.json`; steps are 0-based."]
    return "\n".join(lines) + "\n"


def write_report(
    data: Mapping, out: str | Path, examples: Sequence[tuple[int, RunCurves]] = (),
    metrics_json: Mapping | str | Path | None = None,
) -> list[Path]:
    """Write ``classify.json``, the figures and ``README.md`` (rendered from the json) into ``out``."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "classify.json").write_text(json.dumps(data, indent=1) + "\n")
    figures = ["figures/timelines.png"]
    plot_timelines(data, metrics_json).savefig(out / figures[0], dpi=120)
    for i, curves in examples:
        name = f"figures/run{i:03d}.png"
        plot_run_curves(curves).savefig(out / name, dpi=110)
        figures.append(name)
    (out / "README.md").write_text(readme_from_json(data, figures))
    return [out / "classify.json", out / "README.md", *(out / f for f in figures)]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[tuple[str, int | None]]:
    """A prompt file: one prompt a line, optionally ``<TAB>seed``; blank lines and ``#`` comments skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, _, seed = line.partition("\t")
        out.append((prompt.strip(), int(seed) if seed.strip() else None))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ldm_scene.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="Hub id, local model directory, 'toy' or 'tiny'")
    parser.add_argument("--n", type=int, default=100, help="number of runs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", help="prompt file (one a line, optional TAB seed); cycled to --n runs. "
                        "Default: the toy scenes' captions for a toy model, else N ImageNet class names")
    parser.add_argument("--photos", help="folder of real photos (subfolder or file name = prompt) for the reference")
    parser.add_argument("--reference-n", type=int, default=500, help="fresh renders for the toy reference")
    parser.add_argument("--seed0", type=int, default=CLASSIFY_SEED0, help="seed of the first run")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own (7.5 unless its ldm_scene.json says)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--examples", type=int, default=4, help="runs drawn as per-run curve figures")
    parser.add_argument("--metrics", help="probes metrics.json (default: the model's probes/metrics.json)")
    parser.add_argument("--vgg-weights", default="IMAGENET1K_V1", help="'none' for random weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default). "
                        "The toy model's many small ops run fastest on one, far slower when cores are shared")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from .models import ModelLoadError, load_model

    try:
        model = load_model(args.model, device=args.device)
        weights = None if args.vgg_weights.lower() == "none" else args.vgg_weights
        classifier = classifier_for(model, device=args.device, vgg_weights=weights)
    except (ModelLoadError, ClassifierLoadError) as err:
        print(f"error: {err}")
        return 2
    is_toy = isinstance(classifier, ToyShapeClassifier)
    if args.prompts:
        listed = read_prompts(args.prompts)
        pairs = []
        for i in range(args.n):
            prompt, seed = listed[i % len(listed)]
            # A listed seed is used on the first pass only: cycled prompts get fresh seeds.
            pairs.append((prompt, seed if seed is not None and i < len(listed) else args.seed0 + i))
    elif is_toy:
        pairs = toy_prompts_and_seeds(args.n, args.seed0)
    else:
        picks = np.random.default_rng(0).choice(len(classifier.classes), size=min(args.n, len(classifier.classes)), replace=False)
        names = [classifier.classes[j] for j in picks]
        pairs = [(names[i % len(names)], args.seed0 + i) for i in range(args.n)]
    if args.photos:
        reference, source = photo_reference(args.photos), f"photos ({Path(args.photos).name})"
    elif is_toy:
        reference, source = toy_reference(args.reference_n, size=model.image_size[0]), "fresh renders"
    else:
        reference, source = None, ""
        print("no --photos given: the report has no real-image reference line")

    examples: list[tuple[int, RunCurves]] = []

    def keep(i: int, curves: RunCurves) -> None:
        if len(examples) < args.examples:
            examples.append((i, curves))

    data = evaluate(model, classifier, pairs, steps=args.steps, reference_images=reference, guidance=args.guidance,
                    top_k=args.top_k, reference_source=source, progress=True, on_run=keep)
    metrics = args.metrics
    if metrics is None and model_directory(model) is not None:
        metrics = model_directory(model) / "probes" / "metrics.json"
    written = write_report(data, args.out, examples, metrics)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
