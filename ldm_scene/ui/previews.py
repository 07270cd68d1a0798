"""When the live stream decodes a step's x0 estimate, and how a skipped step is decoded later.

Decoding every step cost about as much as the toy model's UNet (benchmarks/bench_app.py), so the
stream decodes (and runs the labeler and the classifier on) the first step, every few steps and
the last; the probes are read at every step. A :class:`~.views.Run` keeps every step's x0 latent,
so the steps between are decoded exactly when someone looks at them (scrubbing, recomputing the
classifier curves).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..sampler import decode
from .inputs import ServiceError, whole_number
from .views import Run

#: The default cadence: decode every this many steps (besides the first and the last).
PREVIEW_EVERY = 3


def decoded_live(step: int, num_steps: int, every: int) -> bool:
    """Whether the live stream decodes 0-based ``step`` of ``num_steps`` when decoding ``every`` steps."""
    return step == 0 or step == num_steps - 1 or (step + 1) % every == 0


def checked_cadence(preview_every: Any, limit: int) -> int:
    """``preview_every`` (None: the default) as a whole number of steps from 1 to ``limit``."""
    every = whole_number(PREVIEW_EVERY if preview_every is None else preview_every, "preview_every")
    if not 1 <= every <= limit:
        raise ServiceError(f"preview_every must be between 1 and {limit}, got {every}")
    return every


def fill_previews(run: Run, model: Any, label: Callable[[Any], Any], steps: Sequence[int] | None = None) -> None:
    """Decode, in one VAE call, the previews of ``steps`` (default: all) that the stream skipped, and
    label each with ``label`` (the service's labeler view); ``run`` is filled in place."""
    missing = run.missing_previews(steps)
    if not missing:
        return
    latents = torch.stack([run.latents[s] for s in missing]).to(model.device)
    for s, preview in zip(missing, decode(model, latents)):
        run.previews[s] = preview
        run.preview_labels[s] = label(preview)
