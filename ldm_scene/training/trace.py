"""One generated image with every site's activations kept (:class:`ImageTrace`), the permuted-UNet
control, and the labels at each site's grid."""
from __future__ import annotations

import copy
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import capture, hook_sites
from ..sampler import sample
from ..sites import SITE_KEYS
from .dataset import Record
from .labelers import check_labels

if TYPE_CHECKING:
    from .context import RunContext


# --- the permuted control -------------------------------------------------------------------

@torch.no_grad()
def permuted_copy(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``unet`` whose every parameter tensor has its entries randomly shuffled.

    The permutation of each tensor is drawn, in ``named_parameters`` order, from one CPU
    generator seeded with ``seed``: the same seed gives the same network. Each tensor keeps its
    own values (so the weight statistics of every layer are unchanged), but all learned structure
    is gone.
    """
    gen = torch.Generator("cpu").manual_seed(int(seed))
    out = copy.deepcopy(unet).eval()
    for module in out.modules():
        # a copy made while someone's hooks were attached must not carry them
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for _, p in out.named_parameters():
        perm = torch.randperm(p.numel(), generator=gen).to(p.device)
        p.copy_(p.reshape(-1)[perm].reshape(p.shape))
        p.requires_grad_(False)
    return out


# --- one image --------------------------------------------------------------------------------

@dataclass
class ImageTrace:
    """One generated image with what the fit and evaluation need of it.

    ``acts[site]`` is ``[S, T, C]`` (conditional half, the model's dtype and device), ``inputs``
    the UNet input of the conditional half per step ``[S, 4, h, w]``, ``timesteps`` ``[S]``,
    ``embeds`` the conditional text embedding ``[1, L, D]``, ``x0`` ``[S, 4, h, w]`` and
    ``image`` uint8 ``[H, W, 3]``.
    """

    record: Record
    acts: dict[str, torch.Tensor]
    inputs: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    x0: torch.Tensor
    image: np.ndarray
    seconds: float = 0.0


@contextmanager
def unet_inputs(unet: torch.nn.Module, guided: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Record ``(sample, timestep, encoder_hidden_states)`` of the conditional half of each UNet call."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        e = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        if guided:
            x, e = x.chunk(2)[1], e.chunk(2)[1]
        t = torch.as_tensor(t).reshape(-1)[:1]
        calls.append((x.detach().clone(), t.detach().clone(), e.detach().clone()))

    with ExitStack() as stack:
        stack.callback(unet.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield calls


def generate_trace(ctx: RunContext, record: Record, previews: bool = False) -> ImageTrace:
    """Generate ``record``'s image keeping every site's conditional activation at every step."""
    config = ctx.generation(record)
    unet = ctx.model.unet
    start = time.perf_counter()
    x0s, image = [], None
    with capture(unet, SITE_KEYS, split_guidance=config.uses_guidance, to_cpu=False) as cap, unet_inputs(
        unet, config.uses_guidance
    ) as calls:
        for state in sample(ctx.model, config):
            x0s.append(state.x0)
            if state.image is not None:
                image = np.asarray(state.image.convert("RGB"), dtype=np.uint8)
    steps = len(x0s)
    acts = {site: torch.cat([cap.values[(site, s)] for s in range(steps)]) for site in SITE_KEYS}
    trace = ImageTrace(
        record=record,
        acts=acts,
        inputs=torch.cat([x for x, _, _ in calls]),
        timesteps=torch.cat([t for _, t, _ in calls]),
        embeds=calls[0][2],
        x0=torch.cat(x0s),
        image=image,
    )
    trace.seconds = time.perf_counter() - start
    return trace


@torch.no_grad()
def permuted_acts(ctx: RunContext, trace: ImageTrace) -> dict[str, torch.Tensor]:
    """The permuted UNet's site activations ``[S, T, C]`` on the trace's inputs, all steps in one batch."""
    unet = ctx.permuted_unet
    kept: dict[str, torch.Tensor] = {}

    def keep(site: str, step: int, act: torch.Tensor) -> None:
        kept[site] = act.detach().clone()

    steps = trace.inputs.shape[0]
    embeds = trace.embeds.expand(steps, *trace.embeds.shape[1:])
    with hook_sites(unet, SITE_KEYS, keep, split_guidance=False):
        unet(trace.inputs, trace.timesteps.to(trace.inputs.device), encoder_hidden_states=embeds, return_dict=False)
    return kept


def label_images(ctx: RunContext, images: np.ndarray, seeds: Sequence[int] | None) -> dict[str, np.ndarray]:
    """The labeler's maps ``{task: [N, H, W]}`` at the image size, validated."""
    raw = ctx.labeler(images, seeds=seeds)
    return check_labels(raw, ctx.layout.tasks, len(images), ctx.image_size)


def site_targets(labels: dict[str, np.ndarray], hw: tuple[int, int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Each label map ``[H, W]`` area-averaged to the token grid ``hw`` and flattened row-major: ``{task: [h*w]}``.

    For foreground (a 0/1 mask) the average is the fraction of the token's cell that is foreground.
    """
    out = {}
    for task, y in labels.items():
        t = torch.as_tensor(np.asarray(y), dtype=torch.float64)[None, None]
        out[task] = F.adaptive_avg_pool2d(t, hw).reshape(-1).to(device)
    return out


def latent_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[S, 4, h, w]`` -> ``[S, h*w, 4]`` (row-major tokens, as the UNet flattens its grids)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
