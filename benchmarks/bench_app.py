"""App latency through the HTTP API, and app start-up.

Run: ``python benchmarks/bench_app.py [--quick] [--threads N]``. Starts ``python app.py`` (the toy
model, offline) in its own process on loopback, as a user's browser meets it, and drives
``/generate`` with ``gradio_client``, measuring the time to the first streamed step and to the
last; in alternation, in the same run and this process, plain diffusers (the pipeline's
``__call__``, same prompt, seed and guidance) and the library's ``sample()`` loop (no readouts, no
HTTP) give the base lines, so the printed ratios say what the app adds on top of the model's own
work. 15 steps with three probe readouts every step. ``--in-process`` serves the app from the
benchmark's own process instead (then the client's polling shares the server's interpreter lock).
``--before DIR`` serves another checkout's ``app.py`` too (e.g. a ``git archive`` of an older commit,
with ``weights/`` beside it), alternated with the rest in the same run.

``python benchmarks/bench_app.py --startup [--repeats N] [--before DIR]``: start-up instead. Times
``python app.py`` (the toy model, offline) from launch to the first HTTP 200 on ``/`` and to the
app itself (``/config`` answers 200: Gradio serves the loaded model), against ``python -c "import
torch"``, in alternation. ``--before DIR`` adds another checkout's ``app.py`` (e.g. a ``git archive``
of an older commit, with ``weights/`` beside it) to the same alternation.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine  # noqa: E402

from ldm_scene.sampler import GenerationConfig, sample  # noqa: E402

PROMPT = "a red cube"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None  # nothing listens yet (or the port is changing hands)


def _app_env() -> dict[str, str]:
    """The environment ``python app.py`` runs in here: the toy model, offline, the app's own defaults."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "LDM_SCENE_MODEL": "toy"}
    for name in ("LDM_SCENE_PROBES", "LDM_SCENE_THREADS"):
        env.pop(name, None)
    return env


def _time_app(checkout: Path, env: dict, limit: float = 300.0) -> tuple[float, float]:
    """Seconds from starting ``python app.py`` in ``checkout`` to the first 200 on ``/`` and on ``/config``."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=checkout,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    page = ready = None
    try:
        while ready is None and time.perf_counter() - t0 < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py in {checkout} exited with {proc.returncode}")
            if page is None and _status(base + "/") == 200:
                page = time.perf_counter() - t0
            if page is not None and _status(base + "/config") == 200:
                ready = time.perf_counter() - t0
            else:
                time.sleep(0.02)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if ready is None:
        raise RuntimeError(f"app.py in {checkout} did not serve /config within {limit:.0f} s")
    return page, ready


def startup(repeats: int, before: Path | None) -> int:
    env = _app_env()
    apps = {"app.py": REPO, **({f"app.py in {before}": before} if before else {})}

    def bare_torch() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
        return time.perf_counter() - t0

    bare_torch()  # warm-up: file cache, byte-code caches
    for checkout in apps.values():
        _time_app(checkout, env)
    torch_s: list[float] = []
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
    for i in range(repeats):
        order = [None, *apps] if i % 2 == 0 else [*apps, None][::-1]
        for name in order:
            if name is None:
                torch_s.append(bare_torch())
            else:
                times[name].append(_time_app(apps[name], env))
    base = statistics.median(torch_s)
    print(f"machine: {machine()}")
    print(f"start-up, {repeats} alternations (medians; all runs in brackets)")
    print(f"  python -c 'import torch': {base:.2f} s  {[round(t, 2) for t in torch_s]}")
    for name, runs in times.items():
        page = statistics.median(r[0] for r in runs)
        ready = statistics.median(r[1] for r in runs)
        print(f"  {name}: first HTTP 200 {page:.2f} s = {page / base:.2f}x import torch {[round(r[0], 2) for r in runs]}; "
              f"app serving the model {ready:.2f} s = {ready / base:.2f}x {[round(r[1], 2) for r in runs]}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--startup", action="store_true", help="time app.py's start-up instead (see above)")
    parser.add_argument("--repeats", type=int, default=None, help="alternations for --startup (default 5; 3 with --quick)")
    parser.add_argument("--before", type=Path, default=None, help="another checkout (with weights/) whose app.py is timed alike, in the same alternation")
    parser.add_argument("--in-process", action="store_true",
                        help="serve the app from this process (the client then shares its interpreter)")
    args = parser.parse_args(argv)
    if args.startup:
        return startup(args.repeats or (3 if args.quick else 5), args.before)
    return streamed(args.threads, 3 if args.quick else 7, args.in_process, args.before)


def _serve(checkout: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """``python app.py`` (the toy model, offline) from ``checkout`` on a free loopback port, once it serves."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**_app_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    server = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=checkout,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while _status(url + "config") != 200:
        if server.poll() is not None or time.perf_counter() - t0 > 300:
            server.kill()
            raise RuntimeError(f"app.py in {checkout} did not come up")
        time.sleep(0.2)
    return server, url


def streamed(threads: int, repeats: int, in_process: bool, before: Path | None = None) -> int:
    """A 15-step run streamed through ``/generate`` against plain diffusers and the library loop."""
    torch.set_num_threads(threads)
    from gradio_client import Client

    from ldm_scene.models import load_model

    model = load_model("toy", device="cpu")
    servers: list[subprocess.Popen] = []
    urls: dict[str, str] = {}
    demo = None
    try:
        if in_process:
            import matplotlib

            matplotlib.use("Agg")
            from ldm_scene.ui.blocks import build_demo, launch_options
            from ldm_scene.ui.service import Service

            service = Service.load("toy", device="cpu")
            if not service.ready:
                print(service.status_markdown())
                return 1
            demo = build_demo(service)
            demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                        **launch_options())
            urls["app (in this process)"] = demo.local_url
        else:
            # As a remote user meets it: the app in its own process (the client's work is not the server's).
            for name, checkout in {"app.py": REPO, **({f"app.py in {before}": before} if before else {})}.items():
                server, url = _serve(checkout, threads)
                servers.append(server)
                urls[name] = url
        clients = {name: Client(url, verbose=False, download_files=False) for name, url in urls.items()}
        steps = 15
        config = GenerationConfig(PROMPT, seed=0, steps=steps)

        def library() -> float:
            t0 = time.perf_counter()
            for _ in sample(model, config):
                pass
            return time.perf_counter() - t0

        def plain() -> float:
            t0 = time.perf_counter()
            model.pipe(PROMPT, num_inference_steps=steps, guidance_scale=config.guidance,
                       generator=torch.Generator().manual_seed(config.seed), output_type="pil")
            return time.perf_counter() - t0

        def app(client) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            job = client.submit(PROMPT, 0, steps, config.guidance, None, None, None, api_name="/generate")
            first = None
            while not job.done():
                if first is None and job.outputs():
                    first = time.perf_counter() - t0
                time.sleep(0.002)
            job.result()
            total = time.perf_counter() - t0
            return first if first is not None else total, total, len(job.outputs())

        library(), plain()  # warm-up; the first request to an app sets up its session and queue
        for client in clients.values():
            app(client)
        lib, diffusers = [], []
        firsts: dict[str, list[float]] = {name: [] for name in clients}
        totals: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(repeats):
            lib.append(library())
            diffusers.append(plain())
            for name in (list(clients) if i % 2 == 0 else list(clients)[::-1]):
                first, total, updates = app(clients[name])
                assert updates == steps, f"{name} streamed {updates} updates for {steps} steps"
                firsts[name].append(first)
                totals[name].append(total)
    finally:
        if demo is not None:
            demo.close()
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    lib_s, plain_s = statistics.median(lib), statistics.median(diffusers)
    print(f"machine: {machine()}")
    print(f"toy model, {steps} steps of {model.scheduler_name}, {threads} torch thread(s) here and OMP_NUM_THREADS="
          f"{threads} for the app, {repeats} alternations (medians); 3 probe readouts every step")
    print(f"  plain diffusers pipe():  {plain_s:.3f} s  {[round(v, 3) for v in diffusers]}")
    print(f"  library sample() loop:   {lib_s:.3f} s  {[round(v, 3) for v in lib]}")
    for name in clients:
        total_s, first_s = statistics.median(totals[name]), statistics.median(firsts[name])
        print(f"  {name} via HTTP, all {steps} steps: {total_s:.3f} s = {total_s / plain_s:.2f}x plain diffusers, "
              f"{total_s / lib_s:.2f}x the library loop; first step {first_s:.3f} s  {[round(v, 3) for v in totals[name]]}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
