"""Probe fitting: peak memory at N and 4N images, and fitting cost as a fraction of generation.

Usage: ``python benchmarks/bench_fitting.py [--quick] [--model toy|tiny|PATH] [--n N] [--steps S]``

Each measurement runs in a fresh subprocess (so its peak resident memory, ``ru_maxrss``, is its
own): the fit pass's per-image steps (:mod:`ldm_scene.training.pipeline`) over N, then 4N fitting images, without
the permuted control or the Adam comparison (they are separate, optional experiments). The peak
must not grow with N: statistics are O(sites x steps x C^2) and only one image's activations are
held at a time. The cost ratio compares, per image, the statistics updates (and the capture hooks'
overhead) with a plain generation of the same image without hooks; the issue's goal is <= 0.2.
All numbers are printed side by side from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(args: argparse.Namespace) -> None:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    from ldm_scene.sampler import sample
    from ldm_scene.training.config import RunConfig
    from ldm_scene.training.context import prepare
    from ldm_scene.training.fit_pass import fit_image, new_fit_state

    labeler, prompts = None, None
    if args.model == "tiny":
        import numpy as np

        class Luma:  # the tiny model has no labeler of its own
            name, tasks, labels_any_image = "luma", ("foreground", "depth", "shading"), True

            def __call__(self, images, seeds=None):
                x = images.astype(np.float32) / 255.0
                luma = x.mean(-1)
                return {"foreground": (luma > luma.mean()).astype(np.float32), "depth": luma, "shading": x[..., 0]}

        labeler = Luma()
        prompts = Path(args.out) / "prompts.txt"  # the tiny tokenizer knows only a few words
        prompts.write_text("a red cat\na blue dog\na green cube\n")
    n_total = int(args.n / 0.4) + 3  # enough records that at least n of them are fitting images
    config = RunConfig(model=args.model, n=n_total, out=args.out, steps=args.steps, permuted=False, adam_keys=(),
                       checkpoint_every=10**9, device="cpu", prompts=str(prompts) if prompts else None)
    ctx = prepare(config, labeler)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The fit pass's own per-image steps (generate keeping activations, label the final image,
    # update the statistics), each image interleaved with a plain generation of the same image
    # without hooks, so that load drifting on a shared machine hits both alike.
    state = new_fit_state(ctx)
    plain = 0.0
    t_fit = time.perf_counter()
    for record in ctx.fit_records[: args.n]:
        t0 = time.perf_counter()
        for _ in sample(ctx.model, ctx.generation(record)):  # the fit pass's own guidance schedule
            pass
        plain += time.perf_counter() - t0
        fit_image(ctx, state, record)
    fit_s = time.perf_counter() - t_fit - plain
    stats_bytes = sum(s.xtx.numel() * 8 + s.xty.numel() * 8 for g in state.stats.values()
                      for sp in g.values() for s in sp.values())
    print(json.dumps({
        "n": state.n_images, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded / 1024, "stats_mb": stats_bytes / 2**20, "fit_s": fit_s,
        "generate_with_capture_s": state.seconds["generate"], "update_s": state.seconds["update"],
        "label_s": state.seconds["label"], "plain_generate_s": plain, "model": ctx.model.model_id,
    }))


def _measure(model: str, n: int, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--n", str(n), "--steps", str(steps),
               "--threads", str(threads), "--out", out]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model, few images (a smoke run)")
    parser.add_argument("--model", default=None, help="default: the toy model if its weights exist, else tiny")
    parser.add_argument("--n", type=int, default=None, help="fitting images of the small run (the large one has 4x)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.model is None:
        toy = ROOT / "weights" / "toy-scenes" / "model_index.json"
        args.model = "tiny" if args.quick or not toy.exists() else "toy"
    n = args.n or (3 if args.quick else 8)
    print(f"fitting probes on {args.model!r}, {args.steps} steps, {args.threads} thread(s): N={n} vs 4N={4 * n} images")
    small = _measure(args.model, n, args.steps, args.threads)
    large = _measure(args.model, 4 * n, args.steps, args.threads)
    rows = [
        ("images fitted", "n", "{:.0f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.1f}"),
        ("RSS after model load (MB)", "rss_after_load_mb", "{:.1f}"),
        ("ridge statistics (MB)", "stats_mb", "{:.2f}"),
        ("plain generation (s/img)", None, None),
        ("generation with capture (s/img)", None, None),
        ("statistics updates (s/img)", None, None),
        ("labeling (s/img)", None, None),
    ]
    per = lambda r, k: r[k] / r["n"]  # noqa: E731
    print(f"{'':34s}{'N':>12s}{'4N':>12s}{'4N / N':>10s}")
    for label, key, fmt in rows:
        if key is None:
            key = {"plain generation (s/img)": "plain_generate_s", "generation with capture (s/img)": "generate_with_capture_s",
                   "statistics updates (s/img)": "update_s", "labeling (s/img)": "label_s"}[label]
            a, b = per(small, key), per(large, key)
            print(f"{label:34s}{a:12.3f}{b:12.3f}{b / a if a else float('nan'):10.2f}")
        else:
            a, b = small[key], large[key]
            print(f"{label:34s}{fmt.format(a):>12s}{fmt.format(b):>12s}{b / a if a else float('nan'):10.2f}")
    for name, r in (("N", small), ("4N", large)):
        plain = r["plain_generate_s"]
        upd = r["update_s"] / plain
        hooks = (r["generate_with_capture_s"] - plain) / plain
        print(f"fitting cost / generation at {name}: updates {upd:.3f} + capture hooks {hooks:+.3f} = {upd + hooks:.3f} "
              f"(goal <= 0.2)")
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    print(f"peak memory growth from N to 4N: {growth:+.1f} MB ({large['peak_rss_mb'] / small['peak_rss_mb']:.3f}x)")


if __name__ == "__main__":
    main()
