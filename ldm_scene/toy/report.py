"""Measure a trained toy model and write ``REPORT.md``, ``report.json``, a sample grid and the model card.

Every figure here is measured by this code: autoencoder PSNR, labeler and classifier accuracy on
held-out renders (exact labels), and, on fresh seeds with fresh prompts, how often a generated
image has an object of the prompted shape, colour and position (judged by the shipped labelers,
as the paper judged SD's images with TRACER and MiDaS), plus the CPU time of one generation.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .. import metrics
from ..models import load_model
from ..sampler import GenerationConfig, sample
from .nets import ToyClassifier, ToyLabeler, to_tensor
from .quality import has_object, mask_colour, mask_position, parse_prompt
from .render import SHAPES, scene_from_seed
from .train import HELDOUT_SEED0, TrainPlan, psnr, render_dataset

#: Fresh generation seeds start here: never used for training or held-out renders.
REPORT_SEED0 = 20_000_000

TARGETS = {
    "object_present": 0.95, "shape_match": 0.90, "colour_match": 0.90, "position_match": 0.80,
    "ae_psnr_db": 30.0, "labeler_dice": 0.95, "labeler_depth_spearman": 0.95,
    "labeler_shading_spearman": 0.90, "classifier_accuracy": 0.97, "seconds_per_generation": 2.0,
}
_HIGHER_IS_BETTER = {k: k != "seconds_per_generation" for k in TARGETS}


def measure_heldout(model_dir: Path, heldout: dict, n: int = 500) -> dict:
    """Autoencoder, labeler and classifier quality on held-out renders with exact labels."""
    model = load_model(str(model_dir), device="cpu")
    labeler = ToyLabeler.load(model_dir / "labelers")
    classifier = ToyClassifier.load(model_dir / "labelers")
    images = heldout["image"][:n]
    vae = model.pipe.vae
    with torch.no_grad():
        x = to_tensor(images)
        rec = torch.cat([((vae.decode(vae.encode(c * 2 - 1).latents).sample + 1) / 2).clamp(0, 1) for c in x.split(100)])
    labels = labeler(images)
    probs = classifier.probabilities(images)
    return {
        "ae_psnr_db": float(psnr(rec, x).mean()),
        "labeler_dice": metrics.mean_dice(labels["mask"], heldout["mask"][:n]),
        "labeler_depth_spearman": metrics.mean_spearman(labels["depth"], heldout["depth"][:n].astype(np.float32)),
        "labeler_shading_spearman": metrics.mean_spearman(labels["shading"], heldout["shading"][:n].astype(np.float32)),
        "classifier_accuracy": float((probs.argmax(1) == heldout["shape"][:n]).mean()),
        "n_heldout": int(len(images)),
    }


def measure_generation(model_dir: Path, n: int, steps: int = 15, guidance: float = 7.5) -> tuple[dict, list]:
    """Generate ``n`` fresh prompts/seeds and judge each image with the shipped labelers."""
    torch.set_num_threads(2)
    model = load_model(str(model_dir), device="cpu")
    labeler = ToyLabeler.load(model_dir / "labelers")
    classifier = ToyClassifier.load(model_dir / "labelers")
    rows, images, seconds = [], [], []
    for i in tqdm(range(n), desc="generate"):
        seed = REPORT_SEED0 + i
        prompt = scene_from_seed(seed).prompt
        t0 = time.perf_counter()
        image = [s.image for s in sample(model, GenerationConfig(prompt, seed, steps, guidance))][-1]
        seconds.append(time.perf_counter() - t0)
        arr = np.asarray(image)
        mask = labeler(arr)["mask"][0]
        words = parse_prompt(prompt)
        shape = SHAPES[int(classifier.probabilities(arr)[0].argmax())]
        rows.append({
            "seed": seed, "prompt": prompt, "object": has_object(mask), "shape": shape,
            "colour": mask_colour(arr, mask), "position": mask_position(mask),
            "shape_ok": shape == words.shape, "colour_ok": mask_colour(arr, mask) == words.colour,
            "position_ok": mask_position(mask) == words.position,
        })
        images.append(image)
    result = {
        "n_generated": n, "steps": steps, "guidance": guidance,
        "object_present": float(np.mean([r["object"] for r in rows])),
        "shape_match": float(np.mean([r["shape_ok"] for r in rows])),
        "colour_match": float(np.mean([r["colour_ok"] for r in rows])),
        "position_match": float(np.mean([r["position_ok"] for r in rows])),
        # The first runs include one-off warm-up; the median is what a user waits.
        "seconds_per_generation": float(np.median(seconds)),
        "torch_threads": torch.get_num_threads(),
    }
    return result, list(zip(rows, images))


def sample_grid(samples: list, cols: int = 6, rows: int = 4, scale: int = 2) -> Image.Image:
    """A grid of generated images with their prompts underneath."""
    cells = samples[: cols * rows]
    w, h = cells[0][1].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * w, rows * (h + 24)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (row, image) in enumerate(cells):
        x, y = (k % cols) * w, (k // cols) * (h + 24)
        grid.paste(image.resize((w, h), Image.NEAREST), (x, y))
        words = row["prompt"].split()
        draw.text((x + 2, y + h + 1), " ".join(words[1:3]), fill="black")
        draw.text((x + 2, y + h + 12), " ".join(words[3:]), fill="black")
    return grid


def _verdict(key: str, value: float) -> str:
    target = TARGETS[key]
    ok = value >= target if _HIGHER_IS_BETTER[key] else value <= target
    return ("met" if ok else "NOT met") + f" (target {'>=' if _HIGHER_IS_BETTER[key] else '<='} {target:g})"


def render_report(report: dict) -> str:
    """REPORT.md text from report.json's content (nothing typed by hand)."""
    fmt = {
        "object_present": "{:.1%}", "shape_match": "{:.1%}", "colour_match": "{:.1%}", "position_match": "{:.1%}",
        "ae_psnr_db": "{:.2f} dB", "labeler_dice": "{:.4f}", "labeler_depth_spearman": "{:.4f}",
        "labeler_shading_spearman": "{:.4f}", "classifier_accuracy": "{:.2%}", "seconds_per_generation": "{:.2f} s",
    }
    lines = [
        "# Toy model report", "",
        f"Measured by `python -m ldm_scene.toy report` on {report['machine']}.",
        f"Generation: {report['n_generated']} fresh seeds/prompts, {report['steps']} LMS steps, guidance "
        f"{report['guidance']}, judged by the shipped labelers. Held-out renders: {report['n_heldout']} (exact labels).",
        "", "| quantity | measured | verdict |", "|---|---|---|",
    ]
    for key in TARGETS:
        lines.append(f"| {key} | {fmt[key].format(report[key])} | {_verdict(key, report[key])} |")
    lines += ["", f"Training time on this machine: {report.get('train_timings', {})}", "",
              "![samples](samples.png)", ""]
    return "\n".join(lines)


def write_report(model_dir: Path, work: Path, n_samples: int = 200) -> dict:
    """Measure ``model_dir`` and write REPORT.md, report.json, samples.png and the model card."""
    model_dir, work = Path(model_dir), Path(work)
    plan_path = model_dir / "train_plan.json"
    n_heldout = json.loads(plan_path.read_text())["n_heldout"] if plan_path.exists() else TrainPlan().n_heldout
    heldout = render_dataset(range(HELDOUT_SEED0, HELDOUT_SEED0 + n_heldout), work / "heldout.npz")
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    report |= measure_heldout(model_dir, heldout)
    gen, samples = measure_generation(model_dir, n_samples)
    report |= gen
    timings = work / "timings.json"
    report["train_timings"] = json.loads(timings.read_text()) if timings.exists() else {}
    report["targets"] = TARGETS
    (model_dir / "report.json").write_text(json.dumps(report, indent=2))
    (model_dir / "report_samples.json").write_text(json.dumps([r for r, _ in samples], indent=1))
    sample_grid(samples).save(model_dir / "samples.png")
    (model_dir / "REPORT.md").write_text(render_report(report))
    return report
