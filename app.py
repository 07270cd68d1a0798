"""Serve the ldm-scene app: ``python app.py [--model M] [--probes DIR] [--port P] [--host H] [--threads N]``.

Flags fall back to environment variables, so a Hugging Face Space (or Docker) can configure it:
``LDM_SCENE_MODEL`` (default ``toy``, the embedded toy model; ``sd14`` for SD v1.4 from the Hub),
``LDM_SCENE_PROBES`` (default: the ``probes/`` folder shipped beside the model),
``LDM_SCENE_DEVICE``, ``LDM_SCENE_THREADS`` (PyTorch threads; default one for a small model on a
multi-core CPU, so another core serves the page), ``PORT`` (default 7860) and ``HOST`` (default
127.0.0.1; 0.0.0.0 in Docker).

The port answers at once: until the model is loaded and the app built (seconds on a CPU, minutes
when SD v1.4 is first downloaded), ``/`` is a page that says so and reloads itself when the app is
up, and every other path answers 503. Nothing heavy (torch, Gradio, diffusers) is imported before
that page is served.
"""
from __future__ import annotations

import argparse
import html
import os
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LOADING_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ldm-scene (loading)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="3"></noscript>
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#333}}</style>
</head><body>
<h1>ldm-scene</h1>
<p id="status">Loading the model <code>{model}</code>&hellip; this page opens the app when it is ready.</p>
<script>
(function poll() {{
  fetch("config", {{cache: "no-store"}})
    .then(function (r) {{ if (r.ok) {{ location.reload(); }} else {{ setTimeout(poll, 1000); }} }})
    .catch(function () {{ setTimeout(poll, 1000); }});  // the port changes hands: try again
}})();
</script>
</body></html>
"""


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
    parser.add_argument("--threads", type=int, default=int(env["LDM_SCENE_THREADS"]) if env.get("LDM_SCENE_THREADS")
                        else None, help="PyTorch threads (env LDM_SCENE_THREADS; default: see model_threads)")
    return parser.parse_args(argv)


#: A UNet smaller than this (parameters) runs on one CPU thread: its ops are too small to share out.
SMALL_UNET = 50_000_000


def model_threads(model, asked: int | None) -> int | None:
    """PyTorch's thread count for the app: ``asked`` if given; one thread for a small model on a CPU
    with more than one core (the toy model's 15 steps take as long on one thread as on two, and the
    other core then serves the page: ``benchmarks/bench_app.py``); else None (PyTorch's default)."""
    if asked is not None:
        if asked < 1:
            raise SystemExit(f"--threads must be at least 1, got {asked}")
        return asked
    if model is None or model.device.type != "cpu" or (os.cpu_count() or 1) < 2:
        return None
    size = sum(p.numel() for p in model.unet.parameters())
    return 1 if size < SMALL_UNET else None


class LoadingPage:
    """A standard-library HTTP server on the app's address while the app loads (a context manager).

    Binds in the constructor, so a taken port fails at once instead of after the model has loaded;
    serves from a daemon thread inside the ``with``; lets the port go on exit, for Gradio to bind.
    """

    def __init__(self, host: str, port: int, model: str) -> None:
        page = LOADING_HTML.format(model=html.escape(str(model))).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

            def _answer(self, body: bool) -> None:
                ready = urlsplit(self.path).path in ("", "/")
                content = page if ready else b"the app is loading; try again in a moment\n"
                self.send_response(200 if ready else 503)
                if not ready:
                    self.send_header("Retry-After", "2")
                self.send_header("Content-Type", "text/html; charset=utf-8" if ready else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

            def server_bind(self) -> None:
                # HTTPServer's own also looks up the host's FQDN, a DNS query that can stall offline.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = host, port

        self.server = Server((host, port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loading-page", daemon=True)

    def __enter__(self) -> "LoadingPage":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        page = LoadingPage(args.host, args.port, args.model)
    except OSError as err:
        print(f"cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    with page:
        print(f"Loading {args.model}; http://{args.host}:{args.port}/ says so until the app is up.", flush=True)
        import matplotlib

        matplotlib.use("Agg")  # figures are drawn off-screen, from worker threads
        from ldm_scene.ui.blocks import build_demo, launch_options
        from ldm_scene.ui.service import Service

        service = Service.load(args.model, args.probes, device=args.device)
        threads = model_threads(service.model, args.threads)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if not service.ready or service.problems:
            print(service.status_markdown(), file=sys.stderr)
        demo = build_demo(service)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
