"""``python -m ldm_scene.classify``: an alias of ``ldm-scene classify``."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
