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

from .render import FAR, SHAPES, _screen_coords


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


#: The ground plane is fitted to at least this many of an image's ground pixels, else left as estimated.
MIN_GROUND_PIXELS = 16
#: Each refit of the ground plane keeps the pixels whose residual is within this percentile.
GROUND_INLIER_PERCENTILE = 90


def structure_depth(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Snap per-pixel depth estimates [N, H, W] to the toy world's structure off the object.

    Off the object the renderer's depth is exact geometry (``render.py``): the sky is ``FAR``, one tied
    block, and the ground is a plane seen by a pinhole camera at height h pitched down by p, so along a
    pixel's ray (tangent coordinates r right, d down) its depth is ``h * rho / (sin p + d cos p)``
    with ``rho = sqrt(1 + r^2 + d^2)``: ``rho / depth`` is linear in d. A per-pixel regressor blurs
    both, which a rank correlation counts as misordering; this puts the structure back: sky pixels
    (estimate at or beyond ``SKY_DEPTH_SHARE * FAR``, not object) become ``FAR``; on the other
    pixels off the object the line ``rho / depth = a + b d`` is fitted by least squares (refitted
    three times on the ``GROUND_INLIER_PERCENTILE`` best-fitting pixels), and each takes the plane's
    depth, ``FAR`` where the plane does not reach (above its horizon). Images with fewer than
    ``MIN_GROUND_PIXELS`` ground pixels, or whose fitted plane does not recede upwards (b <= 0), keep
    their ground estimates. The object's pixels are left as estimated.
    """
    out = np.array(depth, dtype=np.float32, copy=True)
    if out.ndim != 3 or out.shape[1] != out.shape[2]:
        raise ValueError(f"depth must be [N, H, H] (square images), got shape {out.shape}")
    right, down = (c.reshape(out.shape[1:]) for c in _screen_coords(out.shape[1]))
    rho = np.sqrt(1 + right**2 + down**2)
    for img, m in zip(out, np.asarray(mask, dtype=bool)):
        sky = (img >= SKY_DEPTH_SHARE * FAR) & ~m
        img[sky] = FAR
        ground = ~sky & ~m
        if ground.sum() < MIN_GROUND_PIXELS:
            continue
        a = np.stack([np.ones(ground.sum()), down[ground]], axis=1)
        y = rho[ground] / np.maximum(img[ground], 1e-3)
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        for _ in range(3):
            residual = np.abs(a @ coef - y)
            keep = residual <= np.percentile(residual, GROUND_INLIER_PERCENTILE)
            coef = np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
        if coef[1] <= 0:
            continue
        den = coef[0] + coef[1] * down[ground]
        img[ground] = np.where(den > 0, np.minimum(rho[ground] / np.maximum(den, 1e-6), FAR), FAR)
    return out


class ToyLabeler:
    """Foreground, depth and shading labels for toy images, from the shipped :class:`LabelerNet`.

    ``structured`` (default): the depth and the shading are the net's estimates snapped to the world's
    structure off the object (:func:`structure_depth`, :func:`structure_shading`); the net's own
    estimates are returned as ``depth_net`` and ``shading_net``.
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
        (and ``depth_net``, ``shading_net``: the net's estimates before :func:`structure_depth` and
        :func:`structure_shading`)."""
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
            "depth": structure_depth(depth, mask) if self.structured else depth,
            "depth_net": depth,
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
