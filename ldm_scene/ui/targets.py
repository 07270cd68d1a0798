"""The Intervene tab's targets: the run's object mask shifted, or a mask drawn in the editor.

Plain numpy and PIL; every refusal is a ``ValueError`` whose message is meant for the user.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from .inputs import ServiceError, check_array_image, check_image_size, whole_number
from .views import Run

#: The largest shift offered, as a fraction of the image's side.
MAX_SHIFT_FRACTION = 0.75


def require_complete(run: Run | None) -> Run:
    """``run`` if it finished; else :class:`ServiceError` saying there is none or that it was stopped."""
    if run is None:
        raise ServiceError("generate an image first (Generate tab), then move its object here")
    if not run.complete:
        raise ServiceError(f"the last run was stopped at step {run.num_steps} of {run.config.steps}, before it had "
                           "an image: generate a full run (Generate tab), then move its object here")
    return run


def shifted(run: Run | None, dx: Any, dy: Any) -> np.ndarray:
    """The run's object mask moved ``dx`` px right and ``dy`` px down (bool, image size)."""
    from ..intervention import translate_mask

    run = require_complete(run)
    if run.foreground is None:
        raise ServiceError(
            "the generated image has no foreground mask to move (no labeler and no foreground probe); "
            "draw the target mask instead"
        )
    dx, dy = whole_number(dx, "dx"), whole_number(dy, "dy")
    h, w = run.foreground.shape
    limit_x, limit_y = int(w * MAX_SHIFT_FRACTION), int(h * MAX_SHIFT_FRACTION)
    if abs(dx) > limit_x or abs(dy) > limit_y:
        raise ServiceError(f"shift ({dx}, {dy}) is too far: at most {limit_x} px across and {limit_y} px down")
    if not run.foreground.any():
        raise ServiceError("no object was found in the generated image, so there is nothing to move: draw a mask")
    return translate_mask(run.foreground, dx, dy)


def drawn(layers: Sequence[Any] | None, size: tuple[int, int]) -> np.ndarray:
    """A target mask at ``size`` from the editor's drawing layers (strokes = where the object goes).

    ``layers`` are arrays (or PIL images) of the editor canvas; strokes on any layer count.
    Each is read by :func:`~ldm_scene.intervention.mask_values`: by its alpha where the alpha
    says something (strokes on a transparent layer), else by brightness (white on black), so
    an uploaded greyscale, RGB or opaque RGBA mask means what the hint says. Refuses no
    strokes, strokes that cover everything, layers that are not images or are larger than
    :data:`~.inputs.MAX_IMAGE_SIDE` px a side, and layers of different sizes.
    """
    from ..intervention import InterventionError, mask_values, prepare_target

    if not layers:
        raise InterventionError("the mask is empty: draw where the object should be")
    strength = None
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, Image.Image):
            check_image_size(*layer.size, "drawing layer")
            layer = np.asarray(layer)
        if not isinstance(layer, np.ndarray):
            raise InterventionError(f"a drawing layer is a {type(layer).__name__}; expected an image")
        values = mask_values(check_array_image(layer, "drawing layer"))
        if strength is not None and values.shape != strength.shape:
            raise InterventionError(f"drawing layers differ in size: {strength.shape} vs {values.shape}")
        strength = values if strength is None else np.maximum(strength, values)
    if strength is None:
        raise InterventionError("the mask is empty: draw where the object should be")
    return prepare_target(strength, size)


def check_method(method: str, available: Sequence[str], banks: Mapping[str, Any], run: Run) -> None:
    """Refuse (``InterventionError``) a method that is unknown, lacks its probes in ``banks``, or needs
    the object's mask when ``run`` found none; ``available``: the methods ``banks`` supports."""
    from ..edit_methods import METHOD_BANKS, METHODS, NEEDS_SOURCE, InterventionError

    if method not in available:
        choose = f"choose one of {', '.join(available)}"
        if method in METHODS:
            lacking = ", ".join(b for b in METHOD_BANKS[method] if b not in banks)
            raise InterventionError(f"method {method!r} needs the {lacking} probes, which this model's probe "
                                    f"folder lacks; {choose}")
        raise InterventionError(f"unknown method {method!r}; {choose}")
    if method in NEEDS_SOURCE and (run.foreground is None or not run.foreground.any()):
        others = ", ".join(m for m in available if m not in NEEDS_SOURCE)
        raise InterventionError(f"{method} carries the object it finds in the generated image, and none was found "
                                f"there: choose another method ({others})")
