"""``python -m ldm_scene.toy ...``: an alias of ``ldm-scene toy ...`` (:mod:`.command`)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(argv, command="toy", prog="python -m ldm_scene.toy")


if __name__ == "__main__":
    sys.exit(main())
