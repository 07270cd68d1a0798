"""Readout overhead: the plain denoising loop vs the same loop with all 16 sites read by all 3 probes.

Run: ``python benchmarks/bench_readout.py [--quick] [--no-sd]``. Prints, for each model, the median
time of each loop measured in alternation in this one run and its ratio to the plain loop (goal
<= 1.03x for the fused readout). The loops: plain; *unfused*, the readout as it was (48 one-probe
readouts a step, each upsampled to the image and copied to the host on its own); *fused*, one
matmul per site over all probes, maps at the sites' grids (what the app keeps); *fused, upsampled*,
the same upsampled to the image on the device, once per site; *group*, the app's default foreground
readout, one :class:`~ldm_scene.probes.GroupProbe` over the 9 up-block sites read together
(bilinear to the image size, then its threshold).
(a) the shipped toy model, 15 steps; (b) SD v1.4's full-size UNet from its published config with
random weights at 512 px, a couple of steps (no download: a tiny VAE and text encoder of SD's
widths stand in, and no image is decoded); (c) the same on CUDA when a GPU is present.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import AllSitesReader, UnfusedReader, interleaved_clocks, machine, paired_ratio, random_banks  # noqa: E402

from ldm_scene.models import TOY_MODEL_DIR, Model, load_model  # noqa: E402
from ldm_scene.readout import ProbeReader  # noqa: E402
from ldm_scene.sampler import GenerationConfig, sample  # noqa: E402
from ldm_scene.testing import random_group_probe  # noqa: E402


def sd14_random(device: str) -> Model:
    """SD v1.4's UNet (random weights, published config) in a pipeline with tiny stand-ins."""
    from diffusers import AutoencoderKL, LMSDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_scene.models import word_tokenizer
    from ldm_scene.testing import SD14_UNET_CONFIG, SD_SCHEDULER_CONFIG

    unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = word_tokenizer(["a", "photo", "of", "lemon"], max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=LMSDiscreteScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, "sd14-random")


def measure(model: Model, prompt: str, steps: int, repeats: int, warm_all: bool = True) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each loop per round, alternated, after a warm-up run of each (or of the plain one)."""
    config = GenerationConfig(prompt, seed=0, steps=steps)
    banks = random_banks(model, steps)
    group = random_group_probe(model, steps).to(model.device)
    readers = {"plain": None, "unfused": UnfusedReader(banks, model.image_size), "fused": AllSitesReader(banks),
               "fused, upsampled": AllSitesReader(banks, model.image_size),
               "group": ProbeReader({}, {"foreground": group})}

    def loop(reader):
        def run():
            for _ in sample(model, config, readers=[reader] if reader else [], decode_final=False):
                pass
        return run

    fns = {name: loop(reader) for name, reader in readers.items()}
    for fn in fns.values() if warm_all else [fns["plain"]]:  # allocations, kernel selection, stacked weights
        fn()
    return interleaved_clocks(fns, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 1 SD step")
    parser.add_argument("--no-sd", action="store_true", help="skip the full-size SD v1.4 UNet (minutes on a CPU)")
    parser.add_argument("--no-toy", action="store_true", help="skip the toy model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="alternations of the toy loops (default 9; 3 with --quick)")
    parser.add_argument("--sd-repeats", type=int, default=None, help="alternations of the SD loops (default 2; 1 with --quick)")
    parser.add_argument("--sd-steps", type=int, default=None, help="steps of the SD loops on the CPU (default 2; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if not args.no_toy:
        toy = load_model(str(TOY_MODEL_DIR) if (TOY_MODEL_DIR / "model_index.json").exists() else "tiny", device="cpu")
        rows.append((f"{toy.model_id} (CPU, 15 steps)", measure(toy, "a red cube", 15, args.repeats or (3 if args.quick else 9))))
    if not args.no_sd:
        sd = sd14_random("cpu")
        steps = args.sd_steps or (1 if args.quick else 2)
        rows.append((f"SD v1.4 UNet, random weights, 512 px (CPU, {steps} steps)",
                     measure(sd, "a photo of a lemon", steps, args.sd_repeats or (1 if args.quick else 2), warm_all=False)))
        del sd
    if torch.cuda.is_available():
        sd = sd14_random("cuda")
        rows.append(("SD v1.4 UNet, random weights, 512 px (CUDA fp16, 15 steps)", measure(sd, "a photo of a lemon", 15, 5)))
    names = ("unfused", "fused", "fused, upsampled", "group")
    print(f"machine: {machine()}")
    print("Median seconds, wall clock (this process's CPU time); ratios: median over rounds of loop / plain loop")
    print("in the same round, wall (CPU). On a CPU shared with other jobs the CPU clock is the steadier; on CUDA only wall counts.")
    print("| model | plain loop | unfused (before) | fused | fused, upsampled | group | ratio to plain: unfused / fused / "
          "fused, upsampled / group (goal <= 1.03 fused and group) |")
    print("|---|---|---|---|---|---|---|")
    for name, t in rows:
        cells = [f"{statistics.median(w for w, _ in t[k]):.3f} s ({statistics.median(c for _, c in t[k]):.3f} s)"
                 for k in ("plain", *names)]
        ratios = " / ".join(f"{paired_ratio(t[k], t['plain'], 0):.3f}x ({paired_ratio(t[k], t['plain'], 1):.3f}x)" for k in names)
        print(f"| {name} | {' | '.join(cells)} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
