"""Small networks trained on renders that play the paper's off-the-shelf models for the toy world.

:class:`LabelerNet` plays TRACER (saliency) and MiDaS (depth), plus a shading estimator: one small
encoder-decoder with three per-pixel outputs. :class:`ShapeNet` plays VGG-16: it names the shape.
Both are saved as safetensors plus a JSON config, and loaded only through safetensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .render import FAR, SHAPES


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU(),
    )


@dataclass(frozen=True)
class LabelerConfig:
    width: int = 32
    depth_scale: float = FAR  # depth is predicted as depth / depth_scale

    def __post_init__(self) -> None:
        if self.width % 8 or self.width < 8:
            raise ValueError(f"width must be a positive multiple of 8, got {self.width}")


class LabelerNet(nn.Module):
    """Image [N, 3, H, W] in [0, 1] -> (foreground logit, depth / depth_scale, shading), each [N, H, W]."""

    def __init__(self, config: LabelerConfig = LabelerConfig()):
        super().__init__()
        w = config.width
        self.config = config
        self.enc1 = _block(3, w)
        self.enc2 = _block(w, 2 * w, 2)
        self.enc3 = _block(2 * w, 4 * w, 2)
        self.dec2 = _block(4 * w + 2 * w, 2 * w)
        self.dec1 = _block(2 * w + w, w)
        self.head = nn.Conv2d(w, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return self.head(d1)


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32
    classes: tuple[str, ...] = SHAPES
    # The object covers a few percent of the image: a mean over all positions drowns it in
    # background (a mean-pooled net collapsed to two classes), a max keeps it.
    pool: str = "max"

    def __post_init__(self) -> None:
        if self.pool not in ("max", "mean"):
            raise ValueError(f"pool must be 'max' or 'mean', got {self.pool!r}")


class ShapeNet(nn.Module):
    """Image [N, 3, H, W] in [0, 1] -> logits over ``config.classes``."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        w = config.width
        self.config = config
        self.features = nn.Sequential(_block(3, w), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, len(config.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f.amax(dim=(2, 3)) if self.config.pool == "max" else f.mean(dim=(2, 3)))


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] uint8 or float in [0, 1] (or one [H, W, 3] image) -> float [N, 3, H, W]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return x.float().permute(0, 3, 1, 2).contiguous()


def save_net(net: nn.Module, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"class": type(net).__name__, **asdict(net.config)}, indent=2))


def _load(directory: Path, name: str, cls: type, config_cls: type) -> nn.Module:
    cfg = json.loads((directory / f"{name}.json").read_text())
    if cfg.pop("class") != cls.__name__:
        raise ValueError(f"{directory / name}.json does not describe a {cls.__name__}")
    if "classes" in cfg:
        cfg["classes"] = tuple(cfg["classes"])
    net = cls(config_cls(**cfg))
    net.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
    return net.eval()


#: Off the object, a predicted depth at or beyond this share of ``FAR`` counts as sky.
SKY_DEPTH_SHARE = 0.95
#: The ground's shading is split into shadow and light only where the two levels differ by this much.
SHADOW_GAP = 0.1


def structure_shading(shading: np.ndarray, depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Snap per-pixel shading estimates [N, H, W] to the toy world's structure off the object.

    The renderer's shading is exact and tied in large blocks: the sky is 1 and the ground takes two
    values per scene, ``ambient + (1 - ambient) * light_y`` in light and ``ambient`` in the object's
    shadow (``render.py``). A per-pixel regressor spreads each block into a narrow range, which a
    rank correlation counts as misordering; this puts the ties back: sky pixels (predicted depth at
    or beyond ``SKY_DEPTH_SHARE * FAR``, not object) become 1, and the ground's estimates are split
    by two-means into shadow and light (one level when the two means are closer than
    ``SHADOW_GAP``), each cluster replaced by its median. The object's pixels are left as estimated.
    """
    out = np.array(shading, dtype=np.float32, copy=True)
    for img, d, m in zip(out, np.asarray(depth), np.asarray(mask, dtype=bool)):
        sky = (d >= SKY_DEPTH_SHARE * FAR) & ~m
        img[sky] = 1.0
        ground = ~sky & ~m
        v = img[ground]
        if v.size == 0:
            continue
        lo, hi = np.percentile(v, 5), np.percentile(v, 95)
        for _ in range(20):  # two-means in one dimension, from the spread's ends
            cut = (lo + hi) / 2
            dark, light = v[v < cut], v[v >= cut]
            if dark.size == 0 or light.size == 0:
                break
            lo, hi = float(dark.mean()), float(light.mean())
        cut = (lo + hi) / 2
        if hi - lo > SHADOW_GAP and (v < cut).any() and (v >= cut).any():
            img[ground] = np.where(v < cut, np.median(v[v < cut]), np.median(v[v >= cut]))
        else:
            img[ground] = np.median(v)
    return out


class ToyLabeler:
    """Foreground, depth and shading labels for toy images, from the shipped :class:`LabelerNet`.

    ``structured`` (default): the shading is the net's estimate snapped to the world's exact ties
    off the object (:func:`structure_shading`); the net's own estimate is returned as ``shading_net``.
    """

    def __init__(self, net: LabelerNet, structured: bool = True):
        self.net = net.eval()
        self.structured = structured

    @classmethod
    def load(cls, directory: str | Path, structured: bool = True) -> "ToyLabeler":
        return cls(_load(Path(directory), "labeler", LabelerNet, LabelerConfig), structured)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Label [N, H, W, 3] images: ``mask`` bool, ``foreground`` probability, ``depth``, ``shading``
        (and ``shading_net``, the net's estimate before :func:`structure_shading`)."""
        x = to_tensor(images)
        outs = [self.net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        y = torch.cat(outs) if outs else torch.zeros(0, 3, *x.shape[-2:])
        prob = torch.sigmoid(y[:, 0])
        mask = (prob > 0.5).numpy()
        depth = (y[:, 1] * self.net.config.depth_scale).numpy()
        shading_net = y[:, 2].clamp(0, 1).numpy()
        return {
            "foreground": prob.numpy(),
            "mask": mask,
            "depth": depth,
            "shading": structure_shading(shading_net, depth, mask) if self.structured else shading_net,
            "shading_net": shading_net,
        }


class ToyClassifier:
    """Shape probabilities for toy images, from the shipped :class:`ShapeNet`."""

    def __init__(self, net: ShapeNet):
        self.net = net.eval()
        self.classes = net.config.classes

    @classmethod
    def load(cls, directory: str | Path) -> "ToyClassifier":
        return cls(_load(Path(directory), "classifier", ShapeNet, ClassifierConfig))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """[N, H, W, 3] images -> [N, len(classes)] softmax probabilities."""
        x = to_tensor(images)
        outs = [self.net(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]
        return (torch.cat(outs) if outs else torch.zeros(0, len(self.classes))).numpy()

    def name(self, image) -> str:
        """The class named for one [H, W, 3] image (array or PIL)."""
        return self.classes[int(self.probabilities(np.asarray(image))[0].argmax())]
