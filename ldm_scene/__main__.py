"""``python -m ldm_scene <command> ...``: an alias of the ``ldm-scene`` console script (:mod:`ldm_scene.cli`)."""
from __future__ import annotations

import sys

from .cli import build_parser as _build_parser
from .cli import main as _main


def build_parser(only: str | None = None):
    """Every command's parser, under this alias's name (``only``: see :func:`ldm_scene.cli.build_parser`)."""
    return _build_parser("python -m ldm_scene", only=only)


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python -m ldm_scene")


if __name__ == "__main__":
    sys.exit(main())
