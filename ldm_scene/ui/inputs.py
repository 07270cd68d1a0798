"""Parse and refuse bad input: numbers from form fields and the API, and uploaded images.

Plain Python, numpy and PIL (no Gradio), so the service uses it and the tests call it directly.
Every refusal is an :class:`InputError` (a ``ValueError``) whose message is meant for the user:
it names the field, says what is allowed and repeats what was given.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

#: The largest side, in pixels, of an uploaded image (a drawn mask). A mask is resized to the
#: model's grid anyway; a 4096 px RGBA canvas already takes 64 MB once decoded.
MAX_IMAGE_SIDE = 4096


class InputError(ValueError):
    """A value the app cannot use; the message says which field, what is allowed and what came."""


class ServiceError(ValueError):
    """A request the service cannot serve (no run yet, a stopped run, a busy model); meant for the user."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def finite_number(value: Any, name: str) -> float:
    """A real, finite number from a UI or API value (ints and floats; not bools, text or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {_shown(value)}")
    if not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number, got {_shown(value)}")
    return float(value)


def whole_number(value: Any, name: str) -> int:
    """An integer from a UI value: ints, integral floats (3.0) and numeric strings ("3").

    Fractions are refused, not rounded: seeds 1.5 and 2.5 would otherwise both run seed 2.
    """
    if value is None or isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be a whole number, got {_shown(value)}") from None
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise InputError(f"{name} must be a whole number, got {_shown(value)}")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    return int(value)


def check_image_size(width: int, height: int, what: str) -> None:
    """Refuse an image larger than :data:`MAX_IMAGE_SIDE` on a side."""
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(f"the {what} is {width}x{height} px; the largest accepted is {MAX_IMAGE_SIDE} px a side "
                         "(it is scaled to the model's size anyway, so upload a smaller one)")


def open_image(source: str | os.PathLike | bytes, what: str = "image", decode: bool = True) -> Image.Image:
    """Open an uploaded image, checking its size from the header before a pixel is decoded.

    ``source`` is a path or the file's bytes. Refused with a clear :class:`InputError`: files
    that are not images, images over :data:`MAX_IMAGE_SIDE` px a side (a small PNG can declare
    13000x13000 px, which would take ~700 MB to decode), Pillow's decompression bombs, and (when
    ``decode``) files that are damaged or cut short. With ``decode`` the returned image is fully
    loaded and its file closed; without, it is the unread image (close it, or use it in ``with``).
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        # Reads the header only. (Pillow merely warns from 89M pixels; the size check below
        # refuses those, as everything over MAX_IMAGE_SIDE.)
        image = Image.open(stream)
    except Image.DecompressionBombError:
        raise InputError(f"the {what} declares more pixels than an image may have (a decompression bomb?); "
                         f"the largest accepted is {MAX_IMAGE_SIDE} px a side") from None
    except UnidentifiedImageError:
        raise InputError(f"the {what} is not an image: upload a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"the {what} could not be read as an image ({err})") from None
    try:
        check_image_size(*image.size, what)
        if decode:
            try:
                image.load()
            except (OSError, ValueError, SyntaxError, EOFError) as err:
                # Pillow raises SyntaxError for some malformed chunks and OSError for cut-off data
                raise InputError(f"the {what} is damaged or cut short and could not be decoded ({err})") from None
    except BaseException:
        image.close()
        raise
    return image


def check_array_image(array: Any, what: str) -> np.ndarray:
    """An image handed over as an array (a drawing layer): 2-D or HxWxC, within the size limit."""
    arr = np.asarray(array)
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise InputError(f"the {what} has shape {arr.shape}; expected an image (height x width, optionally x channels)")
    check_image_size(arr.shape[1], arr.shape[0], what)
    return arr
