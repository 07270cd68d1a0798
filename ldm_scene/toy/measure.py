"""Measurements of a trained toy model: held-out renders against exact labels, fresh generations judged
by the shipped labelers, and where objects land compared with the renderer's own layout."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np
import torch
from scipy import stats
from PIL import Image, ImageDraw
from tqdm import tqdm

from .. import bundle, metrics
from ..models import load_model
from ..sampler import config_for, sample
from ..seeds import LAYOUT_RENDER_SEED0, LAYOUT_SEED0, REPORT_SEED0
from .nets import ToyClassifier, ToyLabeler, to_tensor
from .quality import has_object, mask_centroid, mask_colour, parse_prompt
from .render import COLOURS, render, sample_scene, scene_from_seed
from .train import psnr

#: One prompt per shape, every colour at least once: each is generated with many seeds.
LAYOUT_PROMPTS: tuple[str, ...] = ("a red cube", "a blue sphere", "a green cylinder", "a yellow cone",
                                   "a purple torus", "an orange cube")


def _object_spearman(pred: np.ndarray, true: np.ndarray, masks: np.ndarray) -> float:
    """Mean per-image Spearman on the object's pixels alone (images with fewer than two skipped)."""
    return metrics.mean_ignore_nan(metrics.spearman(p[m], t[m]) if m.sum() > 1 else np.nan
                                   for p, t, m in zip(pred, true, masks))


def measure_heldout(model_dir: Path, heldout: dict, n: int = 500) -> dict:
    """Autoencoder, labeler and classifier quality on held-out renders with exact labels."""
    model = load_model(str(model_dir), device="cpu")
    labeler = ToyLabeler.load(bundle.labelers_dir(model_dir))
    classifier = ToyClassifier.load(bundle.labelers_dir(model_dir))
    images = heldout["image"][:n]
    vae = model.pipe.vae
    with torch.no_grad():
        x = to_tensor(images)
        rec = torch.cat([((vae.decode(vae.encode(c * 2 - 1).latents).sample + 1) / 2).clamp(0, 1) for c in x.split(100)])
    labels = labeler(images)
    shading = heldout["shading"][:n].astype(np.float32)
    probs = classifier.probabilities(images)
    # The colour check of the report, on reconstructions of renders with their exact masks: what
    # the decoder alone allows "colour as prompted" to reach.
    rec_rgb = rec.permute(0, 2, 3, 1).numpy()
    colours = list(COLOURS)
    ae_colour = [mask_colour(rec_rgb[i], heldout["mask"][i]) == colours[int(heldout["colour"][i])] for i in range(len(images))]
    return {
        "ae_psnr_db": float(psnr(rec, x).mean()),
        "ae_widths": {"encoder": list(vae.config.encoder_block_out_channels),
                      "decoder": list(vae.config.decoder_block_out_channels)},
        "ae_colour_match": float(np.mean(ae_colour)),
        "labeler_dice": metrics.mean_dice(labels["mask"], heldout["mask"][:n]),
        "labeler_depth_spearman": metrics.mean_spearman(labels["depth"], heldout["depth"][:n].astype(np.float32)),
        "labeler_shading_spearman": metrics.mean_spearman(labels["shading"], shading),
        # The net's per-pixel estimates before the world's structure is put back (nets.structure_depth,
        # nets.structure_shading).
        "labeler_depth_spearman_net": metrics.mean_spearman(labels["depth_net"], heldout["depth"][:n].astype(np.float32)),
        "labeler_shading_spearman_net": metrics.mean_spearman(labels["shading_net"], shading),
        # What a labeler right to 1e-4 everywhere, but without the labels' exact ties, would score.
        "labeler_depth_spearman_ceiling": metrics.spearman_tie_ceiling(heldout["depth"][:n]),
        "labeler_shading_spearman_ceiling": metrics.spearman_tie_ceiling(shading),
        "labeler_shading_spearman_object": _object_spearman(labels["shading"], shading, heldout["mask"][:n]),
        "labeler_depth_spearman_object": _object_spearman(labels["depth"], heldout["depth"][:n], heldout["mask"][:n]),
        "classifier_accuracy": float((probs.argmax(1) == heldout["shape"][:n]).mean()),
        "n_heldout": int(len(images)),
    }


def measure_generation(
    model_dir: Path, n: int, steps: int = 15, guidance: float | None = None, scheduler: type | None = None,
    timed: bool = True, seed0: int = REPORT_SEED0, late_guidance: float | None = None, late_from: float | None = None,
) -> tuple[dict, list]:
    """Generate ``n`` fresh prompts/seeds and judge each image with the shipped labelers.

    ``guidance``, ``late_guidance`` and ``late_from`` default to the model's own (``ldm_scene.json``,
    see :func:`~ldm_scene.sampler.config_for`); ``scheduler`` (a
    diffusers scheduler class) replaces the model's own, built from its config; ``timed`` adds the
    2-thread timing of the speed target; ``seed0`` is the first seed (prompts follow the seeds).
    """
    torch.set_num_threads(1)  # many small runs: one thread avoids stalls on a shared machine
    model = load_model(str(model_dir), device="cpu")
    if scheduler is not None:
        model.pipe.scheduler = scheduler.from_config(model.pipe.scheduler.config)
    labeler = ToyLabeler.load(bundle.labelers_dir(model_dir))
    classifier = ToyClassifier.load(bundle.labelers_dir(model_dir))
    c0 = config_for(model, "a", seed0, steps, guidance, late_guidance, late_from)
    rows, images, seconds = [], [], []
    for i in tqdm(range(n), desc=f"generate ({c0.guidance_text})"):
        seed = seed0 + i
        config = replace(c0, prompt=scene_from_seed(seed).prompt, seed=seed)
        prompt = config.prompt
        t0 = time.perf_counter()
        image = [s.image for s in sample(model, config)][-1]
        seconds.append(time.perf_counter() - t0)
        arr = np.asarray(image)
        rows.append(judge(prompt, arr, labeler, classifier) | {"seed": seed})
        images.append(image)
    result = {
        "n_generated": n, "steps": steps, "guidance": c0.guidance, "late_guidance": c0.late_guidance,
        "late_from": c0.late_from, "scheduler": model.scheduler_name,
        "object_present": float(np.mean([r["object"] for r in rows])),
        "shape_match": float(np.mean([r["shape_ok"] for r in rows])),
        "colour_match": float(np.mean([r["colour_ok"] for r in rows])),
        "seconds_per_generation_1_thread": float(np.median(seconds)),
        "shape_by_word": by_prompted_word(rows, "shape"), "colour_by_word": by_prompted_word(rows, "colour"),
    }
    if not timed:
        return result, list(zip(rows, images))
    # The speed target is for 2 threads: time generations that way, interleaved with plain diffusers
    # on the same model, prompt and seed (median of 7 each; the first pair warms up and is dropped).
    torch.set_num_threads(2)
    ours, plain = [], []
    for i in range(8):
        config = replace(c0, prompt=rows[i % len(rows)]["prompt"], seed=seed0 + i)
        t0 = time.perf_counter()
        for _ in sample(model, config):
            pass
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.pipe(config.prompt, num_inference_steps=steps, guidance_scale=c0.guidance,
                   generator=torch.Generator().manual_seed(config.seed), output_type="np")
        plain.append(time.perf_counter() - t0)
    result["seconds_per_generation"] = float(median(ours[1:]))
    result["seconds_per_generation_plain_diffusers"] = float(median(plain[1:]))
    result["torch_threads_timed"] = 2
    return result, list(zip(rows, images))


def judge(prompt: str, image: np.ndarray, labeler, classifier) -> dict:
    """One generated image against its prompt: object, shape, colour, and where and how big the object is."""
    mask = labeler(image)["mask"][0]
    words = parse_prompt(prompt)
    shape, colour = classifier.name(image), mask_colour(image, mask)
    centroid = mask_centroid(mask)
    return {"prompt": prompt, "object": has_object(mask), "shape": shape, "colour": colour,
            "shape_ok": shape == words.shape, "colour_ok": colour == words.colour,
            "x": None if centroid is None else centroid[0], "y": None if centroid is None else centroid[1],
            "coverage": float(mask.mean())}


def renderer_layout(prompt: str, n: int, seed0: int = LAYOUT_RENDER_SEED0) -> dict[str, np.ndarray]:
    """Centroids (x, y fractions) and coverage of the exact masks of ``n`` renderer scenes for ``prompt``'s
    shape and colour: the distribution a model that learned the world's layout should reproduce."""
    words = parse_prompt(prompt)
    xs, ys, cov = [], [], []
    for i in range(n):
        mask = render(sample_scene(np.random.default_rng(seed0 + i), shape=words.shape, colour=words.colour)).mask
        x, y = mask_centroid(mask)
        xs.append(x)
        ys.append(y)
        cov.append(mask.mean())
    return {"x": np.array(xs), "y": np.array(ys), "coverage": np.array(cov)}


def scenes_layout(seeds) -> dict[str, np.ndarray]:
    """Centroids (x, y fractions; scenes with an object) and coverage (every scene) of the exact
    masks of the renderer's scenes for ``seeds``: the layout of the world the prompts of those
    seeds come from."""
    masks = [render(scene_from_seed(s)).mask for s in seeds]
    centroids = [mask_centroid(m) for m in masks if m.any()]
    return {"x": np.array([c[0] for c in centroids]), "y": np.array([c[1] for c in centroids]),
            "coverage": np.array([m.mean() for m in masks])}


def thirds(xs: np.ndarray) -> list[int]:
    """How many centroids fall in the left, middle and right third of the image."""
    return np.bincount(np.clip((np.asarray(xs) * 3).astype(int), 0, 2), minlength=3).tolist()


def ks_control(reference: np.ndarray, n: int, draws: int = 200, seed: int = 0) -> float:
    """The median KS distance between ``n`` of the renderer's own centroids and the rest: what a
    model that draws exactly the renderer's distribution would score with ``n`` images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        pick = rng.permutation(len(reference))
        out.append(stats.ks_2samp(reference[pick[:n]], reference[pick[n:]]).statistic)
    return float(np.median(out))


def measure_layout(model_dir: Path, rows: list[dict], n_per_prompt: int = 24, n_reference: int = 1000) -> dict:
    """Where the noise puts the object: per layout prompt (many seeds each) and pooled over ``rows``
    (the report's fresh seeds), the generated objects' centroids and coverage against the renderer's.

    Per prompt: centroid counts per third, mean and spread of x and y, coverage, and the two-sample
    KS distance on x and on y to the renderer's scenes of the same words, beside the KS distance
    the renderer's own ``n_per_prompt`` scenes would score (the control: KS is noisy for small n).
    """
    torch.set_num_threads(1)
    model = load_model(str(model_dir), device="cpu")
    labeler = ToyLabeler.load(bundle.labelers_dir(model_dir))
    classifier = ToyClassifier.load(bundle.labelers_dir(model_dir))
    c0 = config_for(model, LAYOUT_PROMPTS[0], LAYOUT_SEED0, 15)
    per_prompt = {}
    for k, prompt in enumerate(tqdm(LAYOUT_PROMPTS, desc="layout prompts")):
        gen = []
        for i in range(n_per_prompt):
            seed = LAYOUT_SEED0 + k * 1000 + i
            image = [s.image for s in sample(model, replace(c0, prompt=prompt, seed=seed))][-1]
            gen.append(judge(prompt, np.asarray(image), labeler, classifier))
        ref = renderer_layout(prompt, n_reference)
        found = [r for r in gen if r["x"] is not None]
        gx, gy = np.array([r["x"] for r in found]), np.array([r["y"] for r in found])
        per_prompt[prompt] = {
            "n": n_per_prompt, "n_with_object": len(found), "thirds": thirds(gx), "thirds_renderer": thirds(ref["x"]),
            "x_mean": float(gx.mean()), "x_sd": float(gx.std()), "y_mean": float(gy.mean()), "y_sd": float(gy.std()),
            "x_sd_renderer": float(ref["x"].std()), "y_sd_renderer": float(ref["y"].std()),
            "x_mean_renderer": float(ref["x"].mean()), "y_mean_renderer": float(ref["y"].mean()),
            "coverage": float(np.mean([r["coverage"] for r in gen])), "coverage_renderer": float(ref["coverage"].mean()),
            "ks_x": float(stats.ks_2samp(gx, ref["x"]).statistic), "ks_y": float(stats.ks_2samp(gy, ref["y"]).statistic),
            "ks_x_control": ks_control(ref["x"], len(gx)), "ks_y_control": ks_control(ref["y"], len(gy), seed=1),
        }
    # Pooled over the report's fresh seeds (all prompts), against the renderer's scenes of other seeds.
    found = [r for r in rows if r["x"] is not None]
    ref = scenes_layout(range(LAYOUT_RENDER_SEED0 + 100_000, LAYOUT_RENDER_SEED0 + 100_000 + n_reference))
    rx, ry = ref["x"], ref["y"]
    gx, gy = np.array([r["x"] for r in found]), np.array([r["y"] for r in found])
    cov, cov_ref = float(np.mean([r["coverage"] for r in rows])), float(ref["coverage"].mean())
    return {
        "layout_per_prompt": per_prompt,
        "layout_prompts_in_all_thirds": float(np.mean([min(v["thirds"]) > 0 for v in per_prompt.values()])),
        "layout_ks_x": float(stats.ks_2samp(gx, rx).statistic), "layout_ks_y": float(stats.ks_2samp(gy, ry).statistic),
        "layout_ks_x_control": ks_control(rx, len(gx)), "layout_ks_y_control": ks_control(ry, len(gy), seed=1),
        "layout_thirds": thirds(gx), "layout_thirds_renderer": thirds(rx),
        "layout_coverage": cov, "layout_coverage_renderer": cov_ref,
        "layout_coverage_ratio_error": abs(cov / cov_ref - 1),
        "layout_x_sd": float(gx.std()), "layout_x_sd_renderer": float(rx.std()),
        "layout_y_sd": float(gy.std()), "layout_y_sd_renderer": float(ry.std()),
        "layout_n": len(found),
    }


def by_prompted_word(rows: list[dict], key: str) -> dict[str, dict]:
    """Per prompted ``key`` word ("shape" or "colour"): trials, the share judged right and the commonest wrong call."""
    out = {}
    for word in sorted({getattr(parse_prompt(r["prompt"]), key) for r in rows}):
        mine = [r for r in rows if getattr(parse_prompt(r["prompt"]), key) == word]
        wrong = Counter(str(r[key]) for r in mine if r[key] != word)
        out[word] = {"n": len(mine), "match": float(np.mean([r[key] == word for r in mine])),
                     "commonest_miss": wrong.most_common(1)[0][0] if wrong else None}
    return out


def _by_word_line(title: str, table: dict) -> str:
    cells = [f"{w} {v['match']:.0%} of {v['n']}" + (f" (else mostly {v['commonest_miss']})" if v["commonest_miss"] else "")
             for w, v in table.items()]
    return f"{title}: " + "; ".join(cells) + "."


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
        draw.text((x + 2, y + h + 1), words[1], fill="black")
        draw.text((x + 2, y + h + 12), " ".join(words[2:]), fill="black")
    return grid
