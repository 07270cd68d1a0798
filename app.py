"""Serve the ldm-scene app: ``python app.py [--model M] [--probes DIR] [--port P] [--host H]``.

Flags fall back to environment variables, so a Hugging Face Space (or Docker) can configure it:
``LDM_SCENE_MODEL`` (default ``toy``, the embedded toy model; ``sd14`` for SD v1.4 from the Hub),
``LDM_SCENE_PROBES`` (default: the ``probes/`` folder shipped beside the model),
``LDM_SCENE_DEVICE``, ``PORT`` (default 7860) and ``HOST`` (default 127.0.0.1; 0.0.0.0 in Docker).
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=env.get("LDM_SCENE_MODEL", "toy"),
                        help="'toy', 'sd14', a Hub id or a local diffusers directory (env LDM_SCENE_MODEL)")
    parser.add_argument("--probes", default=env.get("LDM_SCENE_PROBES") or None,
                        help="probe folder (env LDM_SCENE_PROBES; default: <model>/probes)")
    parser.add_argument("--device", default=env.get("LDM_SCENE_DEVICE") or None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--port", type=int, default=int(env.get("PORT", 7860)), help="env PORT")
    parser.add_argument("--host", default=env.get("HOST", "127.0.0.1"), help="env HOST; 0.0.0.0 to serve a network")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # figures are drawn off-screen, from worker threads
    from ldm_scene.ui.blocks import build_demo, launch_options
    from ldm_scene.ui.service import Service

    service = Service.load(args.model, args.probes, device=args.device)
    if not service.ready or service.problems:
        print(service.status_markdown(), file=sys.stderr)
    demo = build_demo(service)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
