"""Gradio components that refuse bad input with a clear message before any handler runs.

Gradio's own ``Number`` and ``Slider`` compare the payload with their bounds and round it: text
from the API ("seven") then fails inside Gradio with a generic "the upstream Gradio app has raised
an exception", NaN slips through both bounds, and ``precision=0`` rounds 1.5 and 2.5 both to 2.
``ImageEditor`` decodes every upload in full before anything can look at its size, and a file
that is not an image fails as generically. These templates (same front end, ``is_template``)
check first and raise :class:`gradio.Error` with a message that names the field. The service
checks everything again: these only make the API's answers as clear as the service's.
"""
from __future__ import annotations

import math
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from .inputs import InputError, open_image

#: The queue every event that runs the model joins, one job at a time (the probes and edits hook
#: the one shared UNet).
MODEL_QUEUE = "model"
#: The queue of cheap views of a stored run (scrubbing, target previews, which decode uploaded
#: drawings): a few at a time, so a burst of them cannot take the server's memory.
VIEW_QUEUE = "view"
VIEW_CONCURRENCY = 2


def _error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)


def checked_value(payload: Any, what: str, minimum: float | None, maximum: float | None, whole: bool) -> float | int | None:
    """A number field's payload, or :class:`gradio.Error` saying what is wrong with it."""
    if payload is None:
        return None
    kind = "a whole number" if whole else "a number"
    if isinstance(payload, bool) or not isinstance(payload, (int, float)):
        raise _error(f"{what} must be {kind}, got {payload!r}"[:200])
    if not math.isfinite(payload):
        raise _error(f"{what} must be {kind}, got {payload!r}")
    if whole and payload != int(payload):
        # Refused, not rounded: 1.5 and 2.5 would both become 2.
        raise _error(f"{what} must be {kind}, got {payload!r}")
    if (minimum is not None and payload < minimum) or (maximum is not None and payload > maximum):
        if minimum is not None and maximum is not None:
            allowed = f"between {minimum:g} and {maximum:g}"
        else:
            allowed = f"at least {minimum:g}" if minimum is not None else f"at most {maximum:g}"
        raise _error(f"{what} must be {allowed}, got {payload!r}")
    return int(payload) if whole else payload


class Number(gr.Number):
    """``gr.Number`` that refuses text, NaN and (``whole``) fractions by name instead of rounding."""

    is_template = True
    what = "the number"
    whole = False

    def preprocess(self, payload: Any) -> float | int | None:
        return checked_value(payload, self.what, self.minimum, self.maximum, self.whole)


class Slider(gr.Slider):
    """``gr.Slider`` that refuses text, NaN and (``whole``) fractions by name."""

    is_template = True
    what = "the value"
    whole = False

    def preprocess(self, payload: Any) -> float | int:
        return checked_value(payload, self.what, self.minimum, self.maximum, self.whole)


def number(what: str, whole: bool = False, **kwargs: Any) -> Number:
    """A checked number box; ``what`` names it in messages ("seed must be a whole number ...")."""
    field = Number(**kwargs)
    field.what, field.whole = what, whole
    return field


def slider(what: str, whole: bool = False, **kwargs: Any) -> Slider:
    """A checked slider; ``what`` names it in messages."""
    field = Slider(**kwargs)
    field.what, field.whole = what, whole
    return field


class MaskEditor(gr.ImageEditor):
    """``gr.ImageEditor`` that checks each uploaded image's header before decoding it.

    Refuses (by message) files that are not images, images over
    :data:`~.inputs.MAX_IMAGE_SIDE` px a side and decompression bombs, before Gradio decodes them.
    """

    is_template = True

    def convert_and_format_image(self, file: FileData | None | bytes, flatten_on_white: bool = False) -> Any:
        if file is None:
            return None
        source = file.path if isinstance(file, FileData) else bytes(file)
        try:
            open_image(source, "drawing", decode=False).close()
        except InputError as err:
            raise _error(str(err)) from None
        try:
            return super().convert_and_format_image(file, flatten_on_white)
        except (OSError, ValueError, SyntaxError) as err:
            raise _error(f"the drawing is damaged or cut short and could not be decoded ({err})") from None
