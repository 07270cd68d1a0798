"""``python -m ldm_scene.training run ...``: an alias of ``ldm-scene probes run ...`` (:mod:`.command`)."""
from __future__ import annotations

import sys

from .command import config_from_args  # noqa: F401  (the alias's callers build configs from its parser)


def build_parser():
    """The ``probes`` command's parser, standalone, under this alias's name."""
    from ..cli import command_parser

    return command_parser("probes", prog="python -m ldm_scene.training")


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(argv, command="probes", prog="python -m ldm_scene.training")


if __name__ == "__main__":
    sys.exit(main())
