"""App latency through the HTTP API: the toy model, 15 steps with probe readouts and classifier curves.

Run: ``python benchmarks/bench_app.py [--quick]``. Launches the app in this process on loopback
and drives ``/generate`` with ``gradio_client`` (as a remote user would), measuring the time to
the first streamed step and to the last; in alternation, in the same run, the library's plain
``sample()`` loop for the same prompt and seed (no readouts, no curves, no HTTP) gives the base
line, so the printed ratios say what the app adds on top of the model's own work.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import machine  # noqa: E402

from ldm_scene.sampler import GenerationConfig, sample  # noqa: E402

PROMPT = "a red cube"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    from gradio_client import Client

    from ldm_scene.ui.blocks import build_demo, launch_options
    from ldm_scene.ui.service import Service

    service = Service.load("toy", device="cpu")
    if not service.ready:
        print(service.status_markdown())
        return 1
    steps = service.default_steps
    demo = build_demo(service)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                **launch_options())
    client = Client(demo.local_url, verbose=False, download_files=False)
    config = GenerationConfig(PROMPT, seed=0, steps=steps)

    def library() -> float:
        t0 = time.perf_counter()
        for _ in sample(service.model, config):
            pass
        return time.perf_counter() - t0

    def app() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        job = client.submit(PROMPT, 0, steps, 7.5, None, None, None, api_name="/generate")
        first = None
        while not job.done():
            if first is None and job.outputs():
                first = time.perf_counter() - t0
            time.sleep(0.002)
        job.result()
        total = time.perf_counter() - t0
        return first if first is not None else total, total, len(job.outputs())

    library()
    app()  # warm-up: first request sets up the session and the queue
    repeats = 3 if args.quick else 7
    lib, firsts, totals = [], [], []
    for _ in range(repeats):
        lib.append(library())
        first, total, updates = app()
        assert updates == steps, f"the app streamed {updates} updates for {steps} steps"
        firsts.append(first)
        totals.append(total)
    demo.close()
    lib_s, first_s, total_s = (statistics.median(v) for v in (lib, firsts, totals))
    print(f"machine: {machine()}")
    print(f"toy model, {steps} steps of {service.model.scheduler_name}, {repeats} repeats (medians), readouts of 3 probes + classifier curves in the app")
    print(f"  library sample() loop:            {lib_s:.3f} s")
    print(f"  app via HTTP, first streamed step: {first_s:.3f} s")
    print(f"  app via HTTP, all {steps} steps:       {total_s:.3f} s")
    print(f"  app total / library loop:         {total_s / lib_s:.2f}x")
    print(f"  first step / app total:           {first_s / total_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
