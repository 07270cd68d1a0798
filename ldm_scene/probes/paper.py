"""Import of the paper's released ``torch.save`` probe checkpoints (read with ``weights_only=True``)."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..sites import SD14_UNET_CONFIG, SD_VAE_FACTOR, SITE_KEYS, SiteInfo, as_hw, site_table
from .bank import ProbeBank
from .meta import DEPTH_MEAN, DEPTH_STD, ProbeError, ProbeMeta

# --- the paper's released checkpoints ---------------------------------------------------------
#
# Read from github.com/yc015/scene-representation-diffusion-model (probing_binary_depth.py,
# probing_continuous_depth.py, probe_src/depth_intervention_utils.py::load_classifiers,
# probe_src/continuous_depth_intervention_utils.py, probe_src/probe_models.py,
# run_probing_experiments.ipynb):
# - A probe is ``probeLinearDense``: ``dense1 = nn.Linear(C, K, bias=use_bias)`` applied per
#   token, then ``view(-1, 512 // factor, 512 // factor, K).permute(0, 3, 1, 2)`` (row-major tokens)
#   and nearest ``interpolate(scale_factor=factor)``. Its state dict is ``{"dense1.weight": [K, C]}``
#   (plus ``"dense1.bias"`` for depth probes trained with ``--probe_type Linear``).
# - Files: ``<root>/at_step_{s}/segmentation_probe_{block}_{i}_attn1_out_{j}{suffix}.pth`` under
#   ``probe_checkpoints/large_syn_dataset`` (foreground) and
#   ``.../regression_probe_{block}_{i}_attn1_out_{j}{suffix}.pth`` under
#   ``probe_checkpoints/large_syn_dataset_continuous`` (depth). ``{block}`` is ``down``/``mid``/``up``,
#   ``{i}`` the block index in ``unet.down_blocks``/``up_blocks`` (down 0-2, up 1-3; ``0`` for
#   the mid block), ``{j}`` the index in that block's ``attentions`` (0-1 down, 0-2 up, 0 mid).
#   The hooked layer is ``{block}_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_out.0``
#   (``mid_block.attentions.0...`` for mid): the self-attention output projection, which is what
#   our sites hook (``attn1``'s output; its ``to_out.1`` is dropout, the identity at inference).
#   ``attn1_out`` is the scripts' default ``--output_dir``.
# - ``s`` is the 0-based denoising-loop index (``features[at_step]``, printed as "step at_step+1";
#   the UNet runs once per step on the stacked ``[uncond, cond]`` batch and the probes were fit on
#   ``[:, 1]``, the conditional half), 0..14 for the 15-step LMS schedule at 512x512.
# - Suffix: ``""`` is the checkpoint with the lowest test loss over the 30 epochs, ``"_final"`` the
#   last epoch. Depth runs append ``weights_postfix``: the published runs used
#   ``--probe_type "Linear-no-bias"`` and no smoothing, i.e. ``"_linear_no_bias_unsmoothed"``
#   (``regression_probe_{layer}_final{weights_postfix}.pth`` for the last epoch), which is also
#   what ``intervention_continuous_depth.py`` loads.
# - Depth targets were ``(depth - 15.740597) / 9.281932`` (``scale_and_norm``).
# - The controlled (randomly permuted UNet) probes live under ``large_syn_dataset_controlled_fully_permuted``
#   and ``large_syn_dataset_continuous_fully_permuted`` with the same file names.
# The released zip itself (probe_checkpoints.zip, Git LFS) was not inspected; the names above are
# the ones the scripts write and read.

#: Our site key -> the paper's ``{block}_{i}_attn1_out_{j}`` name.
PAPER_SITE_NAMES: dict[str, str] = {}
for _site in SITE_KEYS:
    _parts = _site.split(".")  # e.g. ["up_blocks", "1", "attentions", "2"] or ["mid_block", "attentions", "0"]
    if _parts[0] == "mid_block":
        PAPER_SITE_NAMES[_site] = f"mid_0_attn1_out_{_parts[2]}"
    else:
        PAPER_SITE_NAMES[_site] = f"{_parts[0].removesuffix('_blocks')}_{_parts[1]}_attn1_out_{_parts[3]}"
del _site, _parts

_PAPER_TASKS = {
    # task: (subfolder of probe_checkpoints/, file prefix, default suffix, K)
    "foreground": ("large_syn_dataset", "segmentation_probe", "", 2),
    "depth": ("large_syn_dataset_continuous", "regression_probe", "_linear_no_bias_unsmoothed", 1),
}



def paper_checkpoint_path(root: str | os.PathLike, task: str, site: str, step: int, suffix: str | None = None) -> Path:
    """The path of the paper's checkpoint for ``(task, site, step)`` under an ``at_step_*`` root."""
    if task not in _PAPER_TASKS:
        raise ProbeError(f"the paper released probes for {sorted(_PAPER_TASKS)}, not {task!r}")
    _, prefix, default_suffix, _ = _PAPER_TASKS[task]
    suffix = default_suffix if suffix is None else suffix
    return Path(root) / f"at_step_{int(step)}" / f"{prefix}_{PAPER_SITE_NAMES[site]}{suffix}.pth"


def _paper_root(folder: Path, task: str) -> Path:
    # Accept the folder holding ``at_step_*`` or any ancestor layout the release uses.
    for candidate in (folder, folder / _PAPER_TASKS[task][0], folder / "probe_checkpoints" / _PAPER_TASKS[task][0]):
        if candidate.is_dir() and any(candidate.glob("at_step_*")):
            return candidate
    raise ProbeError(
        f"{folder}: no at_step_<s> folders here or under {_PAPER_TASKS[task][0]}/ "
        f"(expected the unzipped probe_checkpoints of the paper's release)"
    )


def _read_paper_state(path: Path, k: int, channels: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ProbeError(f"{path}: refused or unreadable as a weights-only checkpoint ({exc})") from exc
    if not isinstance(state, Mapping) or "dense1.weight" not in state:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ProbeError(f"{path}: expected a state dict with 'dense1.weight', got {keys}")
    extra = sorted(set(state) - {"dense1.weight", "dense1.bias"})
    if extra:
        raise ProbeError(f"{path}: not a linear probe (unexpected keys {extra})")
    weight = state["dense1.weight"]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (k, channels):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ProbeError(f"{path}: dense1.weight has shape {shape}, expected [{k}, {channels}] for {site}")
    bias = state.get("dense1.bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (k,)):
        raise ProbeError(f"{path}: dense1.bias has shape {getattr(bias, 'shape', None)}, expected [{k}]")
    return weight, bias


def import_paper_checkpoints(
    folder: str | os.PathLike,
    task: str,
    *,
    steps: Sequence[int] | None = None,
    suffix: str | None = None,
    model_id: str = "CompVis/stable-diffusion-v1-4",
    image_size: int | Sequence[int] = (512, 512),
    scheduler: str = "LMSDiscreteScheduler",
    num_steps: int = 15,
    target_mean: float | None = None,
    target_std: float | None = None,
    sites: Sequence[SiteInfo] | None = None,
) -> ProbeBank:
    """Build a :class:`ProbeBank` from the paper's released ``.pth`` probes (see the notes above).

    ``folder`` is the unzipped ``probe_checkpoints`` (or its ``large_syn_dataset[_continuous]``
    subfolder, or any folder of ``at_step_<s>/`` directories, e.g. the controlled runs). ``task`` is
    ``"foreground"`` or ``"depth"``. ``suffix`` picks the file variant (default: best-test-loss
    checkpoints, ``"_linear_no_bias_unsmoothed"`` for depth). ``steps=None`` imports every
    ``at_step_<s>`` present. Files are read with ``torch.load(weights_only=True)`` only; a file
    that is not a plain linear state dict of the right shape raises :class:`ProbeError`.
    Missing files are skipped; finding none at all is an error. ``sites`` defaults to SD v1.4's
    table at ``image_size``; depth normalisation defaults to the paper's mean and std.
    """
    if task not in _PAPER_TASKS:
        raise ProbeError(f"the paper released probes for {sorted(_PAPER_TASKS)}, not {task!r}")
    root = _paper_root(Path(folder), task)
    image_size = as_hw(image_size)
    if sites is None:
        sites = site_table(SD14_UNET_CONFIG, image_size, SD_VAE_FACTOR)
    k = _PAPER_TASKS[task][3]
    suffix = _PAPER_TASKS[task][2] if suffix is None else suffix
    if steps is None:
        found = []
        for d in root.glob("at_step_*"):
            m = re.fullmatch(r"at_step_(\d+)", d.name)
            if m and d.is_dir():
                found.append(int(m[1]))
        steps = sorted(found)
    weights, biases = {}, {}
    for step in steps:
        if not 0 <= int(step) < num_steps:
            raise ProbeError(f"{root}: at_step_{step} is outside a {num_steps}-step schedule")
        for info in sites:
            path = paper_checkpoint_path(root, task, info.key, step, suffix)
            if not path.is_file():
                continue
            weight, bias = _read_paper_state(path, k, info.channels, info.key)
            weights[(info.key, int(step))] = weight
            if bias is not None:
                biases[(info.key, int(step))] = bias
    if not weights:
        raise ProbeError(
            f"{root}: no {task} checkpoints named like "
            f"{paper_checkpoint_path(root, task, sites[0].key, 0, suffix).name} in at_step_<s>/"
        )
    if task == "depth":
        mean = DEPTH_MEAN if target_mean is None else target_mean
        std = DEPTH_STD if target_std is None else target_std
    else:
        mean = 0.0 if target_mean is None else target_mean
        std = 1.0 if target_std is None else target_std
    used_sites = {s for s, _ in weights}
    meta = ProbeMeta(
        task=task,
        model_id=model_id,
        image_size=image_size,
        scheduler=scheduler,
        num_steps=num_steps,
        sites={i.key: (i.channels, i.height, i.width) for i in sites if i.key in used_sites},
        target_mean=mean,
        target_std=std,
        training={
            "method": "adam",
            "source": "Chen, Viegas & Wattenberg 2023, github.com/yc015/scene-representation-diffusion-model",
            "loss": "cross_entropy" if task == "foreground" else "huber",
            "epochs": 30,
            "lr": 1e-3,
            "batch_size": 4,
            "n_train_images": 246,
            "checkpoint_suffix": suffix,
            "bias": bool(biases),
        },
    )
    return ProbeBank(meta, weights, biases)
