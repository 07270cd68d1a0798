"""The toy model's UNet training step (forward, backward, AdamW, EMA) per batch size and device.

Usage: ``python benchmarks/bench_unet_train.py [--batches 32,128] [--devices cpu,cuda] [--steps N]
[--threads T] [--json PATH]``

Times the same step that ``python -m ldm_scene.toy train --stages unet`` runs, on random latents
and token ids of the toy model's sizes, after a few warm-up steps, and prints milliseconds per
step and images per second side by side, with each row's throughput relative to the first row.
A GPU leg of the toy model's training reads ``--json`` to choose how many steps fit its budget.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm_scene.toy.model import ToyArch, build_text_encoder, build_tokenizer, build_unet  # noqa: E402


def time_steps(device: str, batch: int, steps: int, warmup: int = 5) -> float:
    """Mean seconds per training step over ``steps`` steps after ``warmup``."""
    arch = ToyArch()
    torch.manual_seed(0)
    dev = torch.device(device)
    unet = build_unet(arch).to(dev).train()
    text = build_text_encoder(arch, len(build_tokenizer(arch))).to(dev).train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    size = arch.image_size // 4
    z = torch.randn(batch, 4, size, size)
    ids = torch.randint(0, 100, (batch, arch.max_tokens))
    t = torch.randint(0, 1000, (batch,))

    def step() -> torch.Tensor:
        zt, tok, tt = z.to(dev, non_blocking=True), ids.to(dev, non_blocking=True), t.to(dev, non_blocking=True)
        loss = (unet(zt, tt, encoder_hidden_states=text(tok)[0]).sample - zt).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)
        return loss.detach()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    last.item()  # waits for the device
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for device in args.devices.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            steps = args.steps if device == "cuda" else max(3, args.steps // 10)
            s = time_steps(device, batch, steps)
            rows.append({"device": device, "batch": batch, "ms_per_step": 1000 * s, "images_per_s": batch / s})
    base = rows[0]["images_per_s"]
    print(f"toy UNet training step, torch {torch.__version__}, {args.threads} CPU thread(s)"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"{'device':>8} {'batch':>6} {'ms/step':>9} {'images/s':>10} {'x first row':>12}")
    for r in rows:
        print(f"{r['device']:>8} {r['batch']:>6} {r['ms_per_step']:>9.1f} {r['images_per_s']:>10.0f} "
              f"{r['images_per_s'] / base:>11.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
