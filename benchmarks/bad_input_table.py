"""The bad-input table: what a user sees for each bad request, written into benchmarks/README.md.

Run: ``python benchmarks/bad_input_table.py [--model toy] [--print]``. Each bad input goes through
what the app calls, without a Gradio server: the service (generate, scrub, shift, draw, intervene,
classify), the checked form fields (:mod:`ldm_scene.ui.fields`, what Gradio runs before a handler)
and the upload check (:mod:`ldm_scene.ui.inputs`). The table lands in ``benchmarks/README.md``
between ``<!-- bad-input-table -->`` and ``<!-- /bad-input-table -->`` (added at the end if missing);
``--print`` prints it instead. The default is the shipped toy model and its probes.
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- bad-input-table -->", "<!-- /bad-input-table -->"
HEADING = "## What the app says to bad input"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _outcome(action: Callable[[], Any]) -> str:
    """What the user sees: the message of the refusal (``ValueError`` or ``gr.Error``)."""
    import gradio as gr

    try:
        result = action()
        if hasattr(result, "__next__"):
            next(result)
            result.close()
    except gr.Error as err:
        return err.message
    except ValueError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a crash is what this table exists to catch
        return f"CRASH {type(err).__name__}: {err}"
    return "(accepted)"


def rows(service: Any) -> list[tuple[str, str]]:
    """``(input, what the user sees)`` for every bad input."""
    from ldm_scene.ui import fields
    from ldm_scene.ui.inputs import open_image
    from ldm_scene.ui.runs import RunLedger
    from ldm_scene.ui.service import Run

    steps = service.default_steps
    run = None
    for seed in range(20):  # a finished run with an object to move
        view = list(service.generate_stream("a red cube", seed, steps, track_classes=False))[-1]
        if view.run.foreground is not None and view.run.foreground.any():
            run = view.run
            break
    h, w = service.model.image_size
    box = np.zeros((64, 64), np.uint8)
    box[8:24, 32:56] = 255
    stopped = Run(run.config, run.sites, previews=run.previews[:3], readouts=run.readouts[:3]) if run else None
    now = [0.0]
    ledger = RunLedger(lambda: 200, 3600, clock=lambda: now[0])
    ledger.stored("s")
    now[0] = 120.0

    def gen(prompt: Any = "a red cube", seed: Any = 0, n: Any = steps, guidance: Any = 7.5):
        return lambda: service.generate_stream(prompt, seed, n, guidance)

    seed_field = fields.number("seed", whole=True, minimum=0, precision=0)
    steps_field = fields.slider("steps", whole=True, minimum=1, maximum=50, step=1)
    guidance_field = fields.slider("guidance", minimum=0, maximum=15)
    table: list[tuple[str, Callable[[], Any]]] = [
        ("empty prompt", gen("")),
        ("prompt of 200 words", gen("red " * 200)),
        ("prompt is a number (API)", gen(42)),
        ("seed -1", lambda: seed_field.preprocess(-1)),
        ("seed 1.5 (was rounded to 2)", lambda: seed_field.preprocess(1.5)),
        ("seed 'seven' (API)", lambda: seed_field.preprocess("seven")),
        ("seed 2^80", gen(seed=2**80)),
        ("steps 0", lambda: steps_field.preprocess(0)),
        ("steps 2.5", lambda: steps_field.preprocess(2.5)),
        ("steps 'four' (API)", lambda: steps_field.preprocess("four")),
        ("guidance NaN (API)", lambda: guidance_field.preprocess(float("nan"))),
        ("guidance 'high' (API)", lambda: guidance_field.preprocess("high")),
        ("scrub to a step past the end", lambda: service.view_of(run, run.num_steps)),
        ("scrub to NaN (API)", lambda: service.view_of(run, float("nan"))),
        ("scrub before any run", lambda: service.view_of(None, 0)),
        ("a run evicted by 200 newer sessions", lambda: (_ for _ in ()).throw(ValueError(ledger.missing("s")))),
        ("shift 10000 px", lambda: service.shift_target(run, 10_000, 0)),
        ("shift 'left' (API)", lambda: service.shift_target(run, "left", 0)),
        ("shift a stopped run", lambda: service.shift_target(stopped, 8, 0)),
        ("intervene before generating", lambda: service.intervene_stream(None, np.ones((h, w), bool))),
        ("no drawing", lambda: service.drawn_target([])),
        ("blank drawing", lambda: service.drawn_target([np.zeros((64, 64, 4), np.uint8)])),
        ("drawing covers everything", lambda: service.drawn_target([np.full((64, 64, 4), 255, np.uint8)])),
        ("white-on-black greyscale mask (fine)", lambda: service.drawn_target([box]).sum()),
        ("white-on-black opaque RGBA mask (fine)",
         lambda: service.drawn_target([np.asarray(Image.fromarray(box).convert("RGBA"))]).sum()),
        ("upload: a text file named .png", lambda: open_image(b"not an image at all", "drawing")),
        ("upload: 8000x8000 PNG (a few kB)", lambda: open_image(png_header(8000, 8000), "drawing")),
        ("upload: 13000x13000 PNG", lambda: open_image(png_header(13_000, 13_000), "drawing")),
        ("upload: 20000x20000 PNG (decompression bomb)", lambda: open_image(png_header(20_000, 20_000), "drawing")),
        ("upload: PNG cut short", lambda: open_image(png_header(64, 64), "drawing")),
        ("unknown intervention method", lambda: service.intervene_stream(run, service.shift_target(run, 8, 0), "teleport")),
        ("strength 99", lambda: service.intervene_stream(run, service.shift_target(run, 8, 0), "steer", 99)),
        ("classify before generating", lambda: service.classify(None)),
    ]
    out = []
    for label, action in table:
        seen = _outcome(action)
        if re.fullmatch(r"\d+", seen) or seen == "(accepted)":
            seen = "(accepted: the white box is the target)" if "mask" in label else seen
        out.append((label, seen))
    return out


def markdown(service: Any, table: list[tuple[str, str]]) -> str:
    lines = [f"Model `{service.model.model_id}`; written by `python benchmarks/bad_input_table.py`. Every "
             "refusal leaves no hook on the UNet and the model lock free (checked after the table); none crashes.", "",
             "| input | what the user sees |", "|---|---|"]
    for label, seen in table:
        seen = seen.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {label} | {seen} |")
    return "\n".join(lines)


def write(text: str, readme: Path = README) -> None:
    """Put ``text`` between the markers in ``readme`` (markers and heading appended if missing)."""
    body = readme.read_text() if readme.is_file() else "# Benchmarks\n"
    block = f"{START}\n{text}\n{END}"
    if START in body and END in body:
        body = body[: body.index(START)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    readme.write_text(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--print", action="store_true", help="print the table instead of writing the README")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from ldm_scene.capture import attached_hooks
    from ldm_scene.ui.service import Service

    service = Service.load(args.model, device="cpu", classifier=False)
    if not service.ready:
        print(service.status_markdown(), file=sys.stderr)
        return 1
    table = rows(service)
    assert attached_hooks(service.model.unet) == 0 and not service._lock.locked()
    crashes = [label for label, seen in table if seen.startswith("CRASH")]
    text = markdown(service, table)
    if args.print:
        print(text)
    else:
        write(text)
        print(f"wrote {len(table)} rows to {README}")
    if crashes:
        print(f"crashed: {crashes}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
