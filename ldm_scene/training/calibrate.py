"""Foreground decision thresholds, chosen on the validation images and folded into the probes' biases."""
from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from . import controls as ctl
from . import evaluate as ev
from .config import LATENT, PERMUTED, UNET
from .context import RunContext, write_text
from .solve import Solution, save_solution
from .stacked import StackedReadout
from .trace import generate_trace, label_images, latent_tokens, permuted_acts


#: Thresholds on the ridge foreground prediction p (targets are cell fractions in [0, 1]) that
#: the calibration tries; 0.5 is the uncalibrated argmax.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 13))


def calibrate_foreground(ctx: RunContext, sol: Solution, progress: bool = True) -> None:
    """Choose each foreground probe's decision threshold on the validation images and fold it into the bias.

    A ridge probe regresses each token's foreground fraction; objects cover a small part of the
    image, so its predictions shrink towards the background and ``p > 0.5`` under-segments. The
    threshold that maximises mean Dice on the validation images (never the test split) is chosen
    per (site, step), for the latent and permuted-UNet baselines too, so every row of the table
    gets the same treatment; the prediction is upsampled bilinearly to the labels' resolution
    before thresholding (:func:`~.evaluate.foreground_mask`), as on the test images. The
    prompt-only baseline's threshold is chosen on the same images by the same rule, from the
    train images' per-prompt means (a validation image never votes for its own map). The
    thresholds go to ``work/calibration.json``; a resumed run reuses them. Edits ``sol`` in place
    and saves it.
    """
    if "foreground" not in ctx.layout.tasks:
        return
    path = ctx.work / "calibration.json"
    groups = [g for g in (UNET, PERMUTED) if g in sol.weights]
    if path.exists():
        saved = json.loads(path.read_text())
        thresholds = {g: {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): v for k, v in saved[g].items()} for g in groups}
        prompt_threshold = saved["prompt_only"]
    else:
        grid = torch.tensor(THRESHOLD_GRID, dtype=torch.float64)
        size = ctx.image_size
        sums = {g: {} for g in groups}
        readouts = {g: StackedReadout(ctx, {"foreground": sol.weights[g]["foreground"]}, sol) for g in groups}
        records = [r for r in ctx.records if r.split == "val"]
        index = {p: k for k, p in enumerate(sol.prompts)}
        prompt_maps, masks = [], []
        for record in tqdm(records, desc="calibrate foreground", disable=not progress, unit="img"):
            trace = generate_trace(ctx, record)
            label = torch.from_numpy(label_images(ctx, trace.image[None], [record.seed])["foreground"][0] > 0.5)
            masks.append(label)
            prompt_maps.append(ctl.prompt_map(record.prompt, index, sol.train_prompt_maps["foreground"],
                                              sol.train_priors["foreground"])[0])
            sources = {UNET: {**trace.acts, **({LATENT: latent_tokens(trace.inputs)} if ctx.config.latent_baseline else {})}}
            if PERMUTED in groups:
                sources[PERMUTED] = permuted_acts(ctx, trace)
            for group, acts in sources.items():
                for key, x in acts.items():
                    hw = ctx.latent_hw if key == LATENT else next((i.height, i.width) for i in ctx.sites if i.key == key)
                    z = readouts[group].logits(key, x).cpu().to(torch.float64)  # [S, T, 2]
                    p = ((z[..., 1] - z[..., 0] + 1) / 2).reshape(-1, *hw)  # the ridge prediction of the cell fraction
                    full = ev.upsample(p, size)  # [S, H, W]
                    for step in range(x.shape[0]):
                        dice = torch.from_numpy(ev.dice_rows(full[step][None] > grid[:, None, None], label))
                        sums[group][(key, step)] = sums[group].get((key, step), 0) + dice
        thresholds = {g: {k: THRESHOLD_GRID[int(torch.argmax(v))] for k, v in sums[g].items()} for g in groups}
        prompt_threshold, _ = ctl.choose_threshold(torch.stack(prompt_maps).to(torch.float64),
                                                   torch.stack(masks).to(torch.float64), THRESHOLD_GRID)
        saved = {g: {f"{k}@{t}": v for (k, t), v in thresholds[g].items()} for g in groups}
        write_text(path, json.dumps({**saved, "prompt_only": prompt_threshold}, indent=1))
    for group in groups:
        for key, tau in thresholds[group].items():
            w, b = sol.weights[group]["foreground"][key]
            shift = (2 * tau - 1) / 2  # margin z1 - z0 = 2p - 1 must exceed 2 * tau - 1
            sol.weights[group]["foreground"][key] = (w, b + torch.tensor([shift, -shift], dtype=b.dtype))
    sol.thresholds = thresholds
    sol.prompt_threshold = float(prompt_threshold)
    save_solution(ctx, sol)
