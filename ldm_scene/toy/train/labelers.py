"""The labelers stage: the labeler network (mask, depth, shading) and the shape classifier, trained on
renders and on their autoencoder reconstructions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from safetensors.torch import load_file
from tqdm import tqdm

from ... import bundle
from ..nets import ClassifierConfig, LabelerConfig, LabelerNet, ShapeNet, save_net, to_tensor
from ..render import FAR
from .autoencoder import reconstructions
from .data import warmup_cosine
from .plan import TrainPlan


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Generated images are a little noisier and blurrier than renders: make the labelers robust.
    noise = torch.randn(x.shape, generator=gen) * torch.rand(len(x), 1, 1, 1, generator=gen) * 0.04
    return (x + noise).clamp(0, 1)


def train_labelers(plan: TrainPlan, data: dict, ae: AutoencoderTiny, out: Path, init: Path | None = None) -> None:
    """Train the labeler (mask, depth, shading) and the shape classifier on renders and AE reconstructions.

    ``init``: a ``labelers/`` directory whose nets each fit starts from (a fine-tune on new renders).
    """
    gen = torch.Generator().manual_seed(plan.seed + 2)
    n = len(data["image"])
    mask = torch.from_numpy(data["mask"]).float()
    depth = torch.from_numpy(data["depth"].astype(np.float32)) / FAR
    shading = torch.from_numpy(data["shading"].astype(np.float32))
    shapes = torch.from_numpy(data["shape"])

    def batch() -> tuple[torch.Tensor, np.ndarray]:
        idx = torch.randint(0, n, (plan.aux_batch,), generator=gen).numpy()
        half = plan.aux_batch // 2
        # Half the batch as rendered, half through the autoencoder, as generated images are.
        x = torch.cat([to_tensor(data["image"][idx[:half]]), reconstructions(ae, data, idx[half:])])
        return _augment(x, gen), idx

    def fit(net: torch.nn.Module, name: str, steps: int, lr: float, loss_of) -> None:
        if init is not None and (Path(init) / f"{name}.safetensors").exists():
            net.load_state_dict(load_file(str(Path(init) / f"{name}.safetensors")))
            lr = lr / 4  # a fine-tune: start from what the nets know
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        sched = warmup_cosine(opt, steps)
        for _ in tqdm(range(steps), desc=name):
            x, idx = batch()
            loss = loss_of(net(x), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        save_net(net.eval(), out, name)

    if not (out / bundle.LABELER_FILE).exists():
        torch.manual_seed(plan.seed + 3)
        fit(LabelerNet(LabelerConfig()), "labeler", plan.labeler_steps, 2e-3, lambda y, idx: (
            F.binary_cross_entropy_with_logits(y[:, 0], mask[idx])
            + 10 * F.smooth_l1_loss(y[:, 1], depth[idx], beta=0.05)
            + 10 * F.smooth_l1_loss(y[:, 2], shading[idx], beta=0.05)
        ))
    if not (out / bundle.CLASSIFIER_FILE).exists():
        torch.manual_seed(plan.seed + 4)
        fit(ShapeNet(ClassifierConfig()), "classifier", plan.classifier_steps, 1e-3,
            lambda logits, idx: F.cross_entropy(logits, shapes[idx]))
