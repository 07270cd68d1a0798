"""Helpers the app's tests share (never imported from one test module into another).

Random probe folders that fit a model, a stand-in classifier, the app launched in-process, and a
PNG header that lies about its size.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_scene.probes import TASKS, ProbeBank, ProbeMeta
from ldm_scene.sites import UP_SITE_KEYS

#: The tiny model's run length in the app tests.
STEPS = 4


def random_banks(model, steps: int = STEPS, seed: int = 0, model_id: str | None = None,
                 scheduler: str = "LMSDiscreteScheduler") -> dict[str, ProbeBank]:
    """Random probes for every (site, step) of ``model`` with metadata that fits it, plus class means."""
    from ldm_scene.intervention import class_means_bank

    sites = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    gen = torch.Generator().manual_seed(seed)
    banks = {}
    norm = {"foreground": (0.0, 1.0), "depth": (12.0, 6.0), "shading": (0.6, 0.2)}
    for task in TASKS:
        k = 2 if task == "foreground" else 1
        meta = ProbeMeta(task, model_id or model.model_id, model.image_size, scheduler, steps, sites,
                         *norm[task], training={"method": "random", "seed": seed})
        weights = {(s, t): torch.randn(k, c, generator=gen) for s, (c, _, _) in sites.items() for t in range(steps)}
        biases = {key: torch.randn(k, generator=gen) * 0.5 for key in weights}
        banks[task] = ProbeBank(meta, weights, biases)
    fg = banks["foreground"]
    sums = {key: torch.randn(2, w.shape[1], generator=gen) for key, w in fg.weights.items()}
    counts = {key: torch.tensor([3.0, 1.0]) for key in fg.weights}
    banks["foreground_means"] = class_means_bank(sums, counts, ProbeBank(fg.meta, fg.weights))
    return banks


def write_probe_dir(model, folder: Path, steps: int = STEPS, seed: int = 0, model_id: str | None = None,
                    scheduler: str = "LMSDiscreteScheduler") -> Path:
    """A probe folder as the app expects one: banks, class means, metrics.json, a README and a figure."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, bank in random_banks(model, steps, seed, model_id, scheduler).items():
        bank.save(folder / f"{name}.safetensors")
    # The layout ldm_scene.training writes: sites per step in best_site_per_step, their scores in best_per_step.
    metrics = {"steps": "0-based denoising-loop indices", "tasks": {
        "foreground": {"best_site": "up_blocks.3.attentions.0", "metric": "dice", "first_step_90pct": 2,
                       "best_site_per_step": [UP_SITE_KEYS[s % len(UP_SITE_KEYS)] for s in range(steps)],
                       "best_per_step": [0.5 + 0.3 * s / max(steps - 1, 1) for s in range(steps)]},
        "depth": {"best_site": "up_blocks.2.attentions.1", "metric": "spearman", "best_per_step": [0.9] * steps},
    }}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "README.md").write_text("# Probe results\n\n| task | dice |\n|---|---|\n| fg | 0.8 |\n\n![curves](emergence.png)\n")
    Image.new("RGB", (40, 30), (200, 100, 50)).save(folder / "emergence.png")
    return folder


class ColourClassifier:
    """A stand-in classifier (the Classifier protocol) that calls an image a cube when it is reddish."""

    name = "colour"
    classes = ("cube", "sphere")

    def probabilities(self, images):
        rows = []
        for image in images:
            rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
            red = float(rgb[..., 0].mean() - rgb[..., 1:].mean()) / 255
            p = 1 / (1 + np.exp(-10 * red))
            rows.append([p, 1 - p])
        return np.asarray(rows, np.float32)

    def class_for_prompt(self, prompt):
        from ldm_scene.classify import match_class

        return match_class(prompt, self.classes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(service):
    import matplotlib

    matplotlib.use("Agg")
    from ldm_scene.ui.blocks import build_demo, launch_options

    demo = build_demo(service)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_options())
    return demo


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data.

    Pillow reads the size from the header and fails only when decoding; so a message about the
    size (not about a truncated file) proves the size was checked before any pixel was decoded.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")

