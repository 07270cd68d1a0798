"""Classifiers that name what an image shows: VGG-16 (ImageNet) for SD, the toy shape classifier for the
toy world, and :func:`classifier_for`, which picks one for a model."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Protocol, Sequence, Union, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .. import bundle
from ..models import Model, default_device

#: An image as classifiers take it: PIL (any mode, converted to RGB) or uint8 [H, W, 3].
ImageLike = Union[Image.Image, np.ndarray]
#: Reference images may also be files, opened only when classified.
ReferenceImage = Union[Image.Image, np.ndarray, str, Path]

#: The files a reference-image folder is read for.
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
        directory = Path(directory)
        if not bundle.has_classifier(directory):
            raise ClassifierLoadError(f"no shape classifier in {directory} (expected {bundle.CLASSIFIER_FILE})")
        self.directory = directory
        self.toy = bundle.load_classifier(directory)
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
    return bundle.model_directory(name) if name else None


def classifier_for(
    model: Model,
    device: str | torch.device | None = None,
    vgg_weights: str | None = "IMAGENET1K_V1",
    download: bool = True,
) -> Classifier:
    """The toy shape classifier when the model's directory has ``labelers/classifier.safetensors``,
    else VGG-16 with ``vgg_weights`` (None: random weights; ``download`` as in :class:`VGGClassifier`)."""
    directory = model_directory(model)
    if bundle.has_classifier(bundle.labelers_dir(directory)):
        return ToyShapeClassifier(bundle.labelers_dir(directory))
    return VGGClassifier(weights=vgg_weights, device=device, download=download)
