"""Measure a trained toy model and write ``REPORT.md``, ``report.json``, a sample grid and the model card.

Every figure here is measured by this code: autoencoder PSNR, labeler and classifier accuracy on
held-out renders (exact labels), and, on fresh seeds with fresh prompts, how often a generated
image has an object of the prompted shape and colour (judged by the shipped labelers,
as the paper judged SD's images with TRACER and MiDaS), where the object lands and how much of the
frame it covers compared with the renderer's own distribution (a prompt never says where: the
noise must), plus the CPU time of one generation beside plain diffusers.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from diffusers import LMSDiscreteScheduler
from scipy import stats

from .. import bundle
from ..models import DEFAULT_LATE_FROM, PAPER_GUIDANCE, load_model
from ..reports import markdown_table
from ..sampler import describe_guidance, sample
from ..seeds import GUIDANCE_SEED0, HELDOUT_SEED0, REPORT_SEED0
from .measure import (  # noqa: F401  (re-exported: the report's measurements)
    LAYOUT_PROMPTS,
    by_prompted_word,
    judge,
    ks_control,
    measure_generation,
    measure_heldout,
    measure_layout,
    renderer_layout,
    sample_grid,
    scenes_layout,
    thirds,
)
from .train import TrainPlan, render_dataset

#: (guidance, late cap or None for constant, late_from) the sweep tries: constant scales (7.5 is
#: SD's and diffusers' default), then 7.5 capped late at 2.5 or 4 from several points of the run.
#: Coverage rises with guidance (objects drawn larger than the renderer's), hence 1.5 and 2.
GUIDANCE_GRID: tuple[tuple[float, float | None, float], ...] = (
    (1.5, None, 1.0), (2.0, None, 1.0), (2.5, None, 1.0), (4.0, None, 1.0), (5.5, None, 1.0), (7.5, None, 1.0),
    (7.5, 2.5, 1 / 3), (7.5, 2.5, 1 / 2), (7.5, 2.5, 2 / 3), (7.5, 2.5, 0.8), (7.5, 4.0, 1 / 3),
    # Stronger early guidance, for the shape (which rises with guidance up to 7.5):
    (10.0, None, 1.0), (10.0, 2.5, 2 / 3), (10.0, 2.5, 0.8), (12.5, 2.5, 0.8), (15.0, 2.5, 0.8),
)


#: What each ``timings.json`` key of a training run names, in the order the stages run.
STAGE_NAMES = {"render_s": "render", "autoencoder_s": "autoencoder", "decoder_s": "decoder",
               "labelers_s": "labelers", "unet_s": "UNet"}


def format_duration(seconds: float) -> str:
    """A duration as people read it: ``"32 s"`` under 90 s, ``"48.7 min"`` under 90 minutes, else hours."""
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_timings(timings: dict) -> str:
    """A training run's recorded time per stage (``{"render_s": 32.0, "unet_s": 2924.3}``) as
    ``"render 32 s, UNet 48.7 min"``: stages in the order they run, unknown keys after them by name;
    ``"not recorded"`` when there are none."""
    keys = [k for k in STAGE_NAMES if k in timings] + sorted(k for k in timings if k not in STAGE_NAMES)
    parts = [f"{STAGE_NAMES.get(k, k.removesuffix('_s'))} {format_duration(timings[k])}" for k in keys]
    return ", ".join(parts) if parts else "not recorded"


def _sweep_targets(row: dict) -> list[tuple[bool, float]]:
    """Per target that guidance moves, whether a sweep row meets it and how far short it falls,
    relative to the threshold (0 where met): shape and colour as prompted, and, where the row measured
    layout, mean coverage within 20% of the renderer's and the centroid-x KS distance (the report's
    thresholds, :data:`TARGETS`)."""
    out = [(row[k] >= TARGETS[k], max(0.0, 1 - row[k] / TARGETS[k])) for k in ("shape_match", "colour_match")]
    if "coverage" in row:
        error, bound = abs(row["coverage"] / row["coverage_renderer"] - 1), TARGETS["layout_coverage_ratio_error"]
        out.append((error <= bound, max(0.0, error - bound)))
    if "ks_x" in row:
        out.append((row["ks_x"] <= TARGETS["layout_ks_x"], max(0.0, row["ks_x"] / TARGETS["layout_ks_x"] - 1)))
    return out


def sweep_targets_met(row: dict) -> int:
    """How many of the report's targets that guidance moves a sweep row meets (:func:`_sweep_targets`)."""
    return sum(met for met, _ in _sweep_targets(row))


def sweep_shortfall(row: dict) -> float:
    """How far a sweep row falls short of the targets guidance moves, summed over them, each relative
    to its threshold (0 where met): a row 53% over the renderer's coverage falls 0.33 short there, one
    at 88.5% shape 0.068. Tells apart rows that meet as many targets, so that a gain within the noise
    on one target cannot buy a large loss on another."""
    return float(sum(short for _, short in _sweep_targets(row)))


def sweep_choice(rows: list[dict]) -> dict:
    """The sweep's pick: the row that meets the most of the targets guidance moves
    (:func:`sweep_targets_met`), ties to the smallest summed shortfall from them
    (:func:`sweep_shortfall`), then to the best worse of shape and colour as prompted, then to the
    better sum of object present, shape and colour."""
    return max(rows, key=lambda r: (sweep_targets_met(r), -round(sweep_shortfall(r), 6),
                                    round(min(r["shape_match"], r["colour_match"]), 6),
                                    round(r["object_present"] + r["shape_match"] + r["colour_match"], 6)))


TARGETS = {
    "object_present": 0.97, "shape_match": 0.95, "colour_match": 0.95,
    "layout_prompts_in_all_thirds": 1.0, "layout_ks_x": 0.15, "layout_coverage_ratio_error": 0.20,
    "ae_psnr_db": 32.0, "labeler_dice": 0.95, "labeler_depth_spearman": 0.95,
    "labeler_shading_spearman": 0.90, "classifier_accuracy": 0.97, "seconds_per_generation": 1.0,
}
_LOWER_IS_BETTER = {"seconds_per_generation", "layout_ks_x", "layout_coverage_ratio_error"}
_HIGHER_IS_BETTER = {k: k not in _LOWER_IS_BETTER for k in TARGETS}
#: What the report measures again under the paper's scheduler when the model ships another one.
_PROMPT_CHECKS = ("object_present", "shape_match", "colour_match")


def _by_word_line(title: str, table: dict) -> str:
    cells = [f"{w} {v['match']:.0%} of {v['n']}" + (f" (else mostly {v['commonest_miss']})" if v["commonest_miss"] else "")
             for w, v in table.items()]
    return f"{title}: " + "; ".join(cells) + "."


def _schedule_of(report: dict) -> str:
    """The guidance a report (or sweep row) was measured with, in words."""
    return describe_guidance(report["guidance"], report.get("late_guidance"), report.get("late_from"))


def _verdict(key: str, value: float) -> str:
    target = TARGETS[key]
    ok = value >= target if _HIGHER_IS_BETTER[key] else value <= target
    return ("met" if ok else "NOT met") + f" (target {'>=' if _HIGHER_IS_BETTER[key] else '<='} {target:g})"


def render_report(report: dict) -> str:
    """REPORT.md text from report.json's content (nothing typed by hand)."""
    fmt = {
        "object_present": "{:.1%}", "shape_match": "{:.1%}", "colour_match": "{:.1%}",
        "layout_prompts_in_all_thirds": "{:.0%}", "layout_ks_x": "{:.3f}", "layout_coverage_ratio_error": "{:.1%}",
        "ae_psnr_db": "{:.2f} dB", "labeler_dice": "{:.4f}", "labeler_depth_spearman": "{:.4f}",
        "labeler_shading_spearman": "{:.4f}", "classifier_accuracy": "{:.2%}", "seconds_per_generation": "{:.2f} s",
    }
    lines = [
        "# Toy model report", "",
        f"Measured by `python -m ldm_scene.toy report` on {report['machine']}.",
        f"Generation: {report['n_generated']} fresh seeds/prompts, {report['steps']} steps of "
        f"{report.get('scheduler', 'LMSDiscreteScheduler')}, {_schedule_of(report)}, judged by the shipped "
        f"labelers. Held-out renders: {report['n_heldout']} (exact labels).",
        "",
    ]
    lines += markdown_table(("quantity", "measured", "verdict"),
                            [(key, fmt[key].format(report[key]), _verdict(key, report[key])) for key in TARGETS])
    if "layout_per_prompt" in report:
        lines += render_layout(report)
    if "seconds_per_generation_plain_diffusers" in report:
        lines += ["", f"Speed, 2 threads, interleaved on the same prompts and seeds: `ldm_scene` sampler "
                  f"{report['seconds_per_generation']:.2f} s, plain diffusers `StableDiffusionPipeline.__call__` "
                  f"{report['seconds_per_generation_plain_diffusers']:.2f} s "
                  f"({report['seconds_per_generation'] / report['seconds_per_generation_plain_diffusers']:.2f}x)."]
    if "shape_by_word" in report:
        lines += ["", _by_word_line("Shape as prompted, per prompted shape", report["shape_by_word"]),
                  "", _by_word_line("Colour as prompted, per prompted colour", report["colour_by_word"])]
    if "paper_scheduler" in report:
        p = report["paper_scheduler"]
        lines += ["", f"The same seeds and prompts with the paper's {p['scheduler']} (same timesteps, fourth-order "
                  f"multistep): object present {p['object_present']:.1%}, shape {p['shape_match']:.1%}, colour "
                  f"{p['colour_match']:.1%}."]
    if "paper_guidance" in report:
        p = report["paper_guidance"]
        worst = {k: min(p[f"{k}_by_word"].items(), key=lambda kv: kv[1]["match"]) for k in ("shape", "colour")}
        lines += ["", f"The same seeds and prompts at constant guidance {p['guidance']:g} (the paper's; this model's own "
                  f"setting is chosen in [guidance.md](guidance.md)): object present {p['object_present']:.1%}, shape "
                  f"{p['shape_match']:.1%}, colour {p['colour_match']:.1%}; worst "
                  + ", ".join(f"{w} {v['match']:.0%}" for w, v in worst.values()) + "."]
    if "labeler_shading_spearman_ceiling" in report:
        lines += ["", "Spearman ceilings: exact labels with 1e-4 noise, i.e. a labeler right everywhere but without the "
                  "labels' exact ties, score depth "
                  f"{report['labeler_depth_spearman_ceiling']:.4f} and shading {report['labeler_shading_spearman_ceiling']:.4f}. "
                  "Shading has large tied blocks (the sky is 1; the ground one value in light and another, the ambient "
                  "term, in the object's shadow), so no labeler with continuous output can reach the 0.9 target under "
                  "this metric"
                  + (f": the labeler net's own per-pixel estimate scores {report['labeler_shading_spearman_net']:.4f} "
                     f"({report['labeler_shading_spearman_net'] / report['labeler_shading_spearman_ceiling']:.1%} of that "
                     "ceiling). The shipped labeler puts the world's ties back (`structure_shading` in "
                     "`ldm_scene/toy/nets.py`: sky pixels, by predicted depth, set to 1; the ground's estimates split "
                     "into shadow and light by two-means, each replaced by its median; the object's pixels as estimated), "
                     f"which gives the {report['labeler_shading_spearman']:.4f} above"
                     if "labeler_shading_spearman_net" in report else
                     f". The shipped labeler reaches {report['labeler_shading_spearman'] / report['labeler_shading_spearman_ceiling']:.1%}"
                     " of that ceiling")
                  + f"; on the object's pixels alone its shading Spearman is {report['labeler_shading_spearman_object']:.4f}."]
    if "labeler_depth_spearman_net" in report:
        lines += ["", "Depth is exact geometry off the object too: the sky is one tied block at the far plane, and the "
                  "ground a plane seen by a pinhole camera, whose depth along a pixel's ray is fixed by two numbers "
                  "per scene (camera height and pitch). The labeler net's own per-pixel depth scores "
                  f"{report['labeler_depth_spearman_net']:.4f}; the shipped labeler puts the structure back "
                  "(`structure_depth` in `ldm_scene/toy/nets.py`: sky pixels, by predicted depth, set to the far "
                  "plane; a plane fitted to the net's ground estimates, two parameters by robust least squares, "
                  "replaces them; the object's pixels as estimated), which gives the "
                  f"{report['labeler_depth_spearman']:.4f} above. On the object's pixels alone its depth Spearman is "
                  f"{report['labeler_depth_spearman_object']:.4f}: the ordering within an object, whose depth spans "
                  "little of the scene's, is what the net reads worst."]
    if "ae_colour_match" in report:
        lines += ["", f"Colour check on autoencoder reconstructions of held-out renders (exact masks): "
                  f"{report['ae_colour_match']:.1%}. Generated colours cannot be judged right more often than the "
                  "decoder draws them."]
    lines += ["", f"Training time on this machine: {format_timings(report.get('train_timings', {}))}", "",
              "![samples](samples.png)", ""]
    return "\n".join(lines)


def render_layout(report: dict) -> list[str]:
    """The layout section: where the noise, not the prompt, puts the object."""
    r = report
    lines = ["", "## Layout: the noise, not the prompt, places the object", "",
             "Prompts name the object's shape and colour, never its place. If the model learned the world, the object's",
             "centroid (from the shipped labeler's mask) spreads over seeds as the renderer's does, for every prompt.",
             f"Pooled over the {r['layout_n']} report images with an object: centroid x spread (sd) {r['layout_x_sd']:.3f} "
             f"(renderer {r['layout_x_sd_renderer']:.3f}), y {r['layout_y_sd']:.3f} (renderer {r['layout_y_sd_renderer']:.3f}); "
             f"thirds left/middle/right {r['layout_thirds']} (renderer's 1000 scenes {r['layout_thirds_renderer']}); "
             f"KS distance to the renderer x {r['layout_ks_x']:.3f}, y {r['layout_ks_y']:.3f}, where the renderer's own "
             f"{r['layout_n']} scenes score x {r['layout_ks_x_control']:.3f}, y {r['layout_ks_y_control']:.3f} (the control: "
             f"sampling noise); mean coverage {r['layout_coverage']:.1%} of the frame (renderer {r['layout_coverage_renderer']:.1%}).",
             "", "Per prompt, many seeds each (renderer: 1000 scenes of the same words):", ""]
    rows = [(prompt, f"{v['n_with_object']}/{v['n']}", "/".join(map(str, v["thirds"])),
             f"{v['x_mean']:.2f} ({v['x_sd']:.2f})", f"{v['x_mean_renderer']:.2f} ({v['x_sd_renderer']:.2f})",
             f"{v['y_mean']:.2f} ({v['y_sd']:.2f})", f"{v['y_mean_renderer']:.2f} ({v['y_sd_renderer']:.2f})",
             f"{v['ks_x']:.2f} ({v['ks_x_control']:.2f})", f"{v['ks_y']:.2f} ({v['ks_y_control']:.2f})",
             f"{v['coverage']:.1%}", f"{v['coverage_renderer']:.1%}") for prompt, v in r["layout_per_prompt"].items()]
    lines += markdown_table(("prompt", "n", "thirds L/M/R", "x mean (sd)", "renderer x mean (sd)", "y mean (sd)",
                             "renderer y mean (sd)", "KS x (control)", "KS y (control)", "coverage", "renderer coverage"), rows)
    return lines


def render_v2_legs(history: list[dict]) -> list[str]:
    """Lines for the model card on how the v2 world (prompts that never say where) was reached:
    the legs of ``train_history.json`` marked ``"world": "v2"``, which continue the v1 weights."""
    legs = [leg for leg in history if leg.get("world") == "v2"]
    if not legs:
        return []
    return ["The v2 world (prompts name the object, never its place; salient objects placed anywhere by the",
            "seed) was reached by fine-tuning the v1 weights below on v2 renders, in the legs marked v2 in the",
            "table: " + "; ".join(f"{leg['stage']} ({leg['steps']})" for leg in legs) + ".",
            "The v1 plan and legs follow (v1 prompts said \"on the left\" and so on).", ""]


def render_history(history: list[dict]) -> list[str]:
    """Lines for the model card from ``train_history.json``: each leg of an interrupted, resumed run."""
    if not history:
        return []
    lines = ["", "The shipped weights came from one resumable run, interrupted and resumed in legs (each leg",
             "continues the checkpoint; `--unet-steps` sets the cosine schedule's end, so a longer plan",
             "warm-restarts the learning rate"
             + ("; a leg whose command sets `--unet-init` instead starts from the shipped weights with a fresh"
                " optimiser, EMA and schedule" if any("--unet-init" in leg.get("command", "") for leg in history) else "")
             + "):", ""]
    rows = [(i, f"{'v2: ' if leg.get('world') == 'v2' else ''}{leg['stage']}", leg["steps"], f"`{leg['command']}`",
             f"{leg['threads']}" + (f" ({leg['device']})" if "device" in leg else ""), leg["minutes"])
            for i, leg in enumerate(history, 1)]
    lines += markdown_table(("leg", "stage", "steps", "command", "torch threads", "minutes (wall clock)"), rows)
    return lines


def render_model_card(report: dict, plan: dict, sizes: dict, history: list[dict] | None = None) -> str:
    """The model card (weights/toy-scenes/README.md), with every number taken from the report."""
    arch = plan.get("arch", {})
    r = report
    gpus = sorted({leg["device"] for leg in history or [] if "device" in leg})  # legs run on a lent GPU
    gpu_legs = {part: [leg for leg in history or [] if "device" in leg and leg.get("stage", "").startswith(part)]
                for part in ("UNet", "decoder")}
    widths = r.get("ae_widths") or {"encoder": arch.get("ae_channels", ()), "decoder": arch.get("ae_channels", ())}
    ae_widths = (f"widths {tuple(widths['encoder'])}" if list(widths["encoder"]) == list(widths["decoder"])
                 else f"encoder widths {tuple(widths['encoder'])}, decoder widths {tuple(widths['decoder'])}")
    decoder_legs = [f", then {'a fresh decoder' if '--decoder-width' in leg.get('command', '') else 'its decoder'}"
                    f" {leg['steps']} on a GPU" for leg in gpu_legs["decoder"]]
    return "\n".join([
        "# toy-scenes: a small text-to-image latent diffusion model of rendered 3D scenes", "",
        "The embedded default model of ldm-scene: a controlled copy of Stable Diffusion v1.4's setting, small",
        "enough to train and run on 2 CPU cores, whose training images come with exact foreground masks,",
        "depth and shading from a ray-casting renderer (`ldm_scene/toy/render.py`).", "",
        "## What it is",
        "- diffusers `StableDiffusionPipeline` directory: `UNet2DConditionModel` with SD v1.4's block types and",
        f"  `layers_per_block=2` (the same 16 self-attention site names), channels {tuple(arch.get('unet_channels', ()))},",
        "  plus a pooled-text term added to the time embedding (`addition_embed_type='text'`);",
        f"  `AutoencoderTiny` (normalisation-free, 4x down-scaling, {ae_widths});",
        f"  a {arch.get('text_layers')}-layer, {arch.get('text_width')}-wide `CLIPTextModel` over a word-level `CLIPTokenizer`;",
        f"  `{r.get('scheduler', 'LMSDiscreteScheduler')}` with SD's scaled-linear betas (0.00085..0.012) and the paper's"
        " 15 timesteps (Euler is the paper's LMS at order 1; see REPORT.md for both).",
        f"- {arch.get('image_size')} px images, {arch.get('image_size', 64) // 4}x{arch.get('image_size', 64) // 4} latents;"
        " the finest probed grid is 16x16.",
        f"- Parameters: {sizes}.",
        "- Prompts: \"a/an <colour> <shape>\", 6 colours x 5 shapes; a prompt never says where the object is: the noise",
        "  decides (the report's layout section measures it against the renderer's own distribution).",
        "- Beside it, `labelers/` holds the labeler (foreground, depth, shading) and the shape classifier that play",
        "  TRACER, MiDaS and VGG-16's roles for this world.", "",
        "## How it was trained",
        *render_v2_legs(history or []),
        f"`python -m ldm_scene.toy train` with the plan in `train_plan.json`: {plan.get('n_train')} rendered scenes",
        f"(mirrored as augmentation), autoencoder {plan.get('ae_steps')} steps"
        + (f" then its decoder alone {plan['decoder_steps']} more (encoder frozen, object pixels weighted"
           f" {1 + plan.get('decoder_object_weight', 0):g}x)" if plan.get("decoder_steps") else "")
        + "".join(decoder_legs) + ", labeler",
        f"{plan.get('labeler_steps')} and classifier {plan.get('classifier_steps')} steps on renders and their autoencoder",
        f"reconstructions, UNet and text encoder {plan.get('unet_steps')} steps of batch {plan.get('unet_batch')}"
        + "".join(f" then {leg['steps'].split(' + ', 1)[-1]} on a GPU" for leg in gpu_legs["UNet"]),
        f"(epsilon prediction, {plan.get('uncond_prob'):.0%} empty prompts for classifier-free guidance, EMA {plan.get('ema_decay')}),",
        *([f"{plan['unet_high_noise_share']:.0%} of each batch drawn from the noisiest 40% of timesteps, where the layout is decided",
           "(in the legs whose command below sets it; in v1, with uniform timesteps the position word was ignored),"]
          if plan.get("unet_high_noise_share") else []),
        *([f"the object's latent cells weighted {1 + plan['unet_object_weight']:g}x in the UNet loss (in the legs whose command below sets it),"]
          if plan.get("unet_object_weight") else []),
        *(["prompts with the words the model confused most drawn more often (in the legs whose command below sets",
           "`--unet-oversample`),"] if any("--unet-oversample" in leg.get("command", "") for leg in history or []) else []),
        (f"on CPU but for the legs on a lent GPU ({', '.join(gpus)})" if gpus else "all on CPU")
        + f" (per stage, as recorded: {format_timings(r.get('train_timings', {}))}; the weights run on CPU).",
        *render_history(history or []), "",
        "## Measured quality (`REPORT.md`)",
        f"- object present {r['object_present']:.1%}, shape as prompted {r['shape_match']:.1%}, colour as prompted "
        f"{r['colour_match']:.1%} ({r['n_generated']} fresh seeds, "
        f"{r['steps']} steps of {r.get('scheduler', 'LMSDiscreteScheduler')}, {_schedule_of(r)})"
        + (f"; with the paper's {r['paper_scheduler']['scheduler']} on the same seeds: shape {r['paper_scheduler']['shape_match']:.1%},"
           f" colour {r['paper_scheduler']['colour_match']:.1%};"
           if "paper_scheduler" in r else ";"),
        *([f"- layout: objects of every layout prompt land in all three thirds ({r['layout_prompts_in_all_thirds']:.0%} of prompts);"
           f" centroid-x KS distance to the renderer's {r['layout_ks_x']:.3f} (the renderer's own sample: {r['layout_ks_x_control']:.3f});"
           f" mean coverage {r['layout_coverage']:.1%} (renderer {r['layout_coverage_renderer']:.1%});"] if "layout_ks_x_control" in r else []),
        f"- autoencoder PSNR {r['ae_psnr_db']:.2f} dB on held-out renders"
        + (f"; the colour check on its reconstructions (exact masks) {r['ae_colour_match']:.1%}, the ceiling for colour as prompted;"
           if "ae_colour_match" in r else ";"),
        f"- labelers on held-out renders: foreground Dice {r['labeler_dice']:.4f}, depth Spearman {r['labeler_depth_spearman']:.4f},"
        f" shading Spearman {r['labeler_shading_spearman']:.4f}"
        + (f" (ceiling {r['labeler_shading_spearman_ceiling']:.4f} for any labeler without the labels' exact ties)"
           if "labeler_shading_spearman_ceiling" in r else "")
        + f"; shape classifier accuracy {r['classifier_accuracy']:.2%};",
        f"- one 15-step generation: {r['seconds_per_generation']:.2f} s on this CPU"
        + (f" (plain diffusers, same run: {r['seconds_per_generation_plain_diffusers']:.2f} s)."
           if "seconds_per_generation_plain_diffusers" in r else "."),
        *([f"- {_schedule_of(r)} is this model's own setting (`ldm_scene.json`), chosen by `python -m ldm_scene.toy",
           "  guidance-sweep --apply` on seeds apart from the report's ([guidance.md](guidance.md))"
           + (f"; as recorded there: {r['guidance_chosen_by']}." if r.get("guidance_chosen_by") else ".")]
          if r["guidance"] != 7.5 or r.get("late_guidance") is not None else []), "",
        "## Limits",
        ("- Trained for hours on a CPU and minutes on a GPU" if gpus else "- Trained for minutes on a CPU") + ": images are 64 px and simpler than renders; the report's targets that are",
        "  not met are marked there.",
        "- Judged by small labelers trained on renders, which can err on generated images as TRACER and MiDaS can on SD's.",
        "- One object per scene, a fixed vocabulary of 13 words (a, an, 6 colours, 5 shapes); anything else falls back to",
        "  letters and is off-distribution.", "",
    ])


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
    report |= measure_layout(model_dir, [r for r, _ in samples])
    if gen["scheduler"] != LMSDiscreteScheduler.__name__:
        paper, _ = measure_generation(model_dir, n_samples, scheduler=LMSDiscreteScheduler, timed=False)
        report["paper_scheduler"] = {k: paper[k] for k in ("scheduler", *_PROMPT_CHECKS)}
    if gen["guidance"] != PAPER_GUIDANCE or gen["late_guidance"] is not None:
        # What the model's own guidance setting changes, on the same seeds: constant 7.5, the paper's.
        const, _ = measure_generation(model_dir, n_samples, guidance=PAPER_GUIDANCE, late_guidance=PAPER_GUIDANCE, timed=False)
        report["paper_guidance"] = {k: const[k] for k in ("guidance", *_PROMPT_CHECKS, "shape_by_word", "colour_by_word")}
    settings = bundle.settings_path(model_dir)
    if settings.exists():
        report["guidance_chosen_by"] = json.loads(settings.read_text()).get("chosen_by")
    timings = work / "timings.json"
    report["train_timings"] = json.loads(timings.read_text()) if timings.exists() else {}
    report["targets"] = TARGETS
    (model_dir / "report.json").write_text(json.dumps(report, indent=2))
    (model_dir / "report_samples.json").write_text(json.dumps([r for r, _ in samples], indent=1))
    sample_grid(samples).save(model_dir / "samples.png")
    (model_dir / "REPORT.md").write_text(render_report(report))
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    model = load_model(str(model_dir), device="cpu")
    sizes = {name: f"{sum(p.numel() for p in getattr(model.pipe, name).parameters()) / 1e6:.2f}M"
             for name in ("unet", "vae", "text_encoder")}
    history_path = model_dir / "train_history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    (model_dir / "README.md").write_text(render_model_card(report, plan, sizes, history))
    return report


def guidance_sweep(model_dir: Path, n: int, grid=GUIDANCE_GRID, out: Path | None = None, apply: bool = False) -> list[dict]:
    """Object, shape and colour as prompted, and where and how big the objects are (mean coverage and
    centroid-x KS distance against the renderer's scenes of the same seeds), per guidance schedule, on
    seeds from :data:`GUIDANCE_SEED0`.

    This is how the toy model's guidance settings (``ldm_scene.json``) are chosen: :func:`sweep_choice`
    picks a row, and ``apply`` writes it there. The seeds are disjoint from the report's, so the
    report does not measure the choice on the seeds that made it. Writes ``guidance.json`` and
    ``guidance.md`` into ``out`` (default: the model directory).
    """
    model_dir = Path(model_dir)
    # The renderer's own scenes for the same seeds (the prompts come from them): where and how big
    # their objects are, exactly; each row's layout is compared with it.
    ref = scenes_layout(range(GUIDANCE_SEED0, GUIDANCE_SEED0 + n))
    ref_x, ref_coverage = ref["x"], float(ref["coverage"].mean())
    rows = []
    for guidance, late, late_from in grid:
        r, samples = measure_generation(model_dir, n, guidance=guidance, timed=False, seed0=GUIDANCE_SEED0,
                                        late_guidance=guidance if late is None else late, late_from=late_from)
        row = {k: r[k] for k in ("guidance", "n_generated", "steps", "scheduler", *_PROMPT_CHECKS, "shape_by_word", "colour_by_word")}
        gx = np.array([g["x"] for g, _ in samples if g["x"] is not None])
        layout = {"coverage": float(np.mean([g["coverage"] for g, _ in samples])), "coverage_renderer": ref_coverage,
                  "ks_x": float(stats.ks_2samp(gx, ref_x).statistic) if len(gx) else 1.0}
        rows.append(row | layout | {"late_guidance": late, "late_from": late_from if late is not None else None})
    if apply:
        apply_sweep_choice(model_dir, rows)
    out = Path(out) if out is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance.json").write_text(json.dumps(rows, indent=1))
    text = render_guidance_sweep(rows, load_model(str(model_dir), device="cpu"))
    (out / "guidance.md").write_text(text)
    print(text)
    return rows


def apply_sweep_choice(model_dir: Path, rows: list[dict]) -> dict:
    """Write :func:`sweep_choice`'s pick among the sweep's ``rows`` into the model's ``ldm_scene.json``."""
    pick = sweep_choice(rows)
    settings = {"guidance": pick["guidance"], "late_guidance": pick["late_guidance"],
                "late_from": pick["late_from"] if pick["late_from"] is not None else DEFAULT_LATE_FROM,
                "chosen_by": f"python -m ldm_scene.toy guidance-sweep --apply ({len(rows)} settings,"
                             f" {rows[0]['n_generated']} seeds from {GUIDANCE_SEED0:,})"}
    bundle.settings_path(model_dir).write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def render_guidance_sweep(rows: list[dict], model=None) -> str:
    """guidance.md from guidance.json's rows (nothing typed by hand); the sweep's pick and the model's setting are marked."""
    if not rows:
        return "# Guidance on the toy model\n\nNo rows.\n"
    r0, pick = rows[0], sweep_choice(rows)
    own = model and describe_guidance(model.default_guidance, model.late_guidance, model.late_from)
    lines = ["# Guidance on the toy model", "",
             f"`python -m ldm_scene.toy guidance-sweep`: {r0['n_generated']} seeds from {GUIDANCE_SEED0:,} (the report's start "
             f"at {REPORT_SEED0:,}), {r0['steps']} steps of {r0['scheduler']}, judged by the shipped labelers. A late cap lowers "
             "guidance to at most that value from the given share of the steps on. The pick (bold) is the row that meets the "
             "most of the report's targets that guidance moves (shape and colour as prompted >= 95%; where measured, coverage "
             "within 20% of the renderer's and centroid-x KS <= 0.15), ties to the smallest shortfall from those targets summed "
             "(each relative to its threshold; column *short*), then the best worse of shape and colour, then the best sum with "
             "object present; * marks the model's own setting (`ldm_scene.json`, written by `--apply`)."
             + (f" Layout, beside it: the objects' mean coverage of the frame (the renderer's own scenes for the same seeds: "
                f"{r0['coverage_renderer']:.1%}) and the KS distance of their centroids' x to those scenes'." if "coverage" in r0 else ""),
             ""]
    table = []
    for r in rows:
        star = " *" if model is not None and _schedule_of(r) == own else ""
        worst = {k: min(r[f"{k}_by_word"].items(), key=lambda kv: kv[1]["match"]) for k in ("shape", "colour")}
        cells = {k: f"{w} {v['match']:.0%}" + (f" (else {v['commonest_miss']})" if v["commonest_miss"] else "")
                 for k, (w, v) in worst.items()}
        late = r.get("late_guidance")
        g = f"**{r['guidance']:g}**" if r is pick else f"{r['guidance']:g}"
        cap, start = ("-", "-") if late is None else (f"{late:g}", f"{r['late_from']:.0%}")
        table.append((f"{g}{star}", cap, start, f"{r['object_present']:.1%}", f"{r['shape_match']:.1%}",
                      f"{r['colour_match']:.1%}", cells["shape"], cells["colour"],
                      f"{r['coverage']:.1%}" if "coverage" in r else "-", f"{r['ks_x']:.3f}" if "ks_x" in r else "-",
                      str(sweep_targets_met(r)), f"{sweep_shortfall(r):.3f}"))
    lines += markdown_table(("guidance", "late cap", "from", "object present", "shape", "colour", "worst shape",
                             "worst colour", "coverage", "KS x", "targets met", "short"), table)
    return "\n".join(lines) + "\n"
