"""Intervention cost: each method at the app's default settings vs a plain generation, side by side.

Run: ``python benchmarks/bench_intervention.py [--quick]``. Uses the shipped toy model and its
probes (random probe banks of the same sizes when probes are missing: the cost does not depend on
the values). Goal: an interactive intervention costs <= 2x a plain generation.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import interleaved, machine, random_banks  # noqa: E402

from ldm_scene import bundle  # noqa: E402
from ldm_scene.intervention import (  # noqa: E402
    METHODS, NEEDS_SOURCE, class_means_bank, current_foreground, intervene, load_intervention_banks, model_locator,
)
from ldm_scene.models import TOY_MODEL_DIR, load_model  # noqa: E402
from ldm_scene.sampler import GenerationConfig, sample  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    have_toy = (TOY_MODEL_DIR / "model_index.json").exists()
    model = load_model(str(TOY_MODEL_DIR) if have_toy else "tiny", device="cpu")
    banks = load_intervention_banks(bundle.probes_dir(TOY_MODEL_DIR), model.sites()) if have_toy else {}
    if set(banks) != {"foreground", "foreground_means"}:
        fg = random_banks(model, 15)["foreground"]
        sums = {k: torch.randn(2, w.shape[1]) for k, w in fg.weights.items()}
        banks = {"foreground": fg, "foreground_means": class_means_bank(sums, {k: torch.ones(2) for k in sums}, fg)}
    config = GenerationConfig("a red cube", seed=0, steps=15)
    h, w = model.image_size
    target = np.zeros((h, w), bool)
    target[h // 2 :, w // 2 :] = True

    def plain():
        for _ in sample(model, config, previews=True):
            pass

    # The moves carry the object from its mask (the labeler's on the plain image; the top-left quadrant
    # for the tiny model) and, with the model's labeler, correct themselves as the app's do.
    image = [s.image for s in sample(model, config)][-1]
    source = current_foreground(model, image, banks, config)
    if not source.any():  # a random probe on the tiny model may find nothing: any mask will do for timing
        source = np.zeros((h, w), bool)
        source[: h // 2, : w // 2] = True
    locate = model_locator(model)

    def run(method):
        moves = method in NEEDS_SOURCE

        def fn():
            for _ in intervene(model, config, target, method, banks, previews=True,
                               source=source if moves else None, locate=locate if moves else None):
                pass
        return fn

    plain()
    times = interleaved({"plain": plain, **{m: run(m) for m in METHODS}}, 2 if args.quick else 5)
    from ldm_scene.intervention import METHOD_DEFAULTS

    defaults = "; ".join(f"{m}: {d.sites} sites, first {d.steps_fraction:.2f} of the steps, gain {d.gain:g}"
                         for m, d in METHOD_DEFAULTS.items())
    print(f"machine: {machine()}; model: {model.model_id}; 15 steps with previews, app defaults ({defaults})")
    print("| run | seconds | vs plain (goal <= 2x) |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / times['plain']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
