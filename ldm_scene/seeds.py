"""Where each experiment draws its seeds: every seed base in one table, so ranges never collide by accident.

A seed names both a toy scene (its prompt and layout) and a generation's noise. Training renders use
seeds from 0 on; each measurement starts far from them. Ranges that share a base are different
experiments that may reuse the same seeds on purpose (each is compared only with itself).
"""
from __future__ import annotations

__all__ = [
    "TRAIN_SEED0",
    "HELDOUT_SEED0",
    "REPORT_SEED0",
    "LAYOUT_SEED0",
    "LAYOUT_RENDER_SEED0",
    "CLASSIFY_SEED0",
    "REFERENCE_SEED0",
    "TRIAL_SEED0",
    "SWEEP_SEED0",
    "GUIDANCE_SEED0",
    "ATLAS_SEED0",
]

#: Training renders of the toy world, and probe runs by default (``--seed 0``).
TRAIN_SEED0 = 0
#: Held-out renders (autoencoder, labelers and classifier measured on them), far from the training seeds.
HELDOUT_SEED0 = 10_000_000
#: The toy report's fresh generations: never used for training or held-out renders.
REPORT_SEED0 = 20_000_000
#: The toy report's layout section (a few prompts, many seeds each) and its renderer reference.
LAYOUT_SEED0 = 30_000_000
LAYOUT_RENDER_SEED0 = 40_000_000
#: Classifier-curve runs on the toy model (their scenes' prompts and noise), and the reference renders.
CLASSIFY_SEED0 = 30_000_000
REFERENCE_SEED0 = 31_000_000
#: Intervention trials: unused by training, held-out renders, probes and the report.
TRIAL_SEED0 = 30_000_000
#: The sweep that chooses the intervention methods' defaults, apart from the evaluation's trials.
SWEEP_SEED0 = 40_000_000
#: The guidance sweep that chose the toy model's guidance, apart from the report's seeds.
GUIDANCE_SEED0 = 60_000_000
ATLAS_SEED0 = 45_000_000
