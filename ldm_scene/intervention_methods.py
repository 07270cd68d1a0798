"""Readout guidance: steer the denoising latent so the foreground probe reads the target mask.

The activation edits of :mod:`ldm_scene.activation_editors` rewrite what a site outputs and hope the
rest of the UNet follows. Readout guidance instead moves the *latent*, the one input every later
step computes from, along the gradient that makes the foreground probe's readout at a few sites
match the target (as classifier guidance does with a classifier, and Readout Guidance, Luo et al.
2024, with trained readout heads). At each guided step:

1. the UNet's input is made a leaf that requires grad, so the step's one forward pass builds a
   graph (the sampler runs under ``no_grad``; grad mode is switched on for this pass only);
2. the sampler's editor hooks hand the conditional half of each loss site's activation to
   :meth:`ReadoutGuidanceEditor.edit`, which applies the probe;
3. after the pass, the loss (class-balanced binary cross-entropy between the probe's foreground
   logit on the site's grid and the target's foreground fraction per cell) is differentiated with
   respect to the input, weighted by where the probe's readout disagrees with the target, each
   latent channel's mean removed (no global tint), and the noise prediction is shifted along it,
   normalised to a fixed RMS: ``eps += gain * g / rms(g)``. For an eps-predicting model ``x0 = x - sigma * eps``,
   so this moves the predicted image down the loss; the scheduler's step then carries the change
   into the latent, and every later step denoises from there.

Nothing here knows about the toy world: the method reads only the probe bank (sites, grids,
steps) and the target mask, so it runs on SD v1.4 unchanged. Its cost is one backward pass per
guided step (no extra forward pass). ``random_seed`` gives its control: the same shift along a
random direction of the same RMS, drawn per step (no gradient is computed then).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .activation_editors import grid_target
from .probes import ProbeBank
from .sampler import GenerationConfig, StepState, sample


def readout_loss(probe: ProbeBank, site: str, step: int, act: torch.Tensor, target: np.ndarray) -> torch.Tensor:
    """Class-balanced BCE between the probe's foreground logit on ``site``'s grid and the target.

    The logit is the difference of the probe's two outputs (foreground minus background), so the
    probe's own decision (probability > 0.5) is logit > 0. Foreground and background cells are
    averaged separately and the two means added, so a small target weighs as much as the rest of
    the image. ``act`` is ``[B, T, C]``; returns a scalar, differentiable in ``act``.
    """
    logits = probe.logits(site, step, act.float())  # [B, 2, h, w]
    fg = logits[:, 1] - logits[:, 0]
    goal = grid_target(target, tuple(fg.shape[-2:]), fg.device).expand_as(fg)
    per_cell = F.binary_cross_entropy_with_logits(fg, goal, reduction="none")
    inside = goal.sum().clamp_min(1e-6)
    outside = (1 - goal).sum().clamp_min(1e-6)
    return (per_cell * goal).sum() / inside + (per_cell * (1 - goal)).sum() / outside


@dataclass
class ReadoutGuidanceEditor:
    """Shift the noise prediction along the gradient of the probe-readout loss, at chosen steps.

    ``sites``: where the loss is read (those with a probe at the step); ``steps``: the guided
    steps; ``gain``: the shift's RMS in units of the noise prediction's (about 1 for an
    eps-predicting model). Use it through :func:`guided_sample` (or
    :func:`ldm_scene.intervention.intervene`), which adds the UNet-level hooks it needs for the
    stream's lifetime; the sampler alone only calls :meth:`edit`, which then changes nothing.
    """

    probe: ProbeBank
    target: np.ndarray
    sites: Sequence[str]
    steps: Collection[int]
    gain: float = 1.0
    random_seed: int | None = None
    #: If set, the push is low-passed to at most this grid (cells across) before it is normalised;
    #: None (the default: it moved objects closer on the toy model) keeps it at the latent's resolution.
    layout_grid: int | None = None
    #: Weight the push by where the probe's readout disagrees with the target (both the method and its control).
    confine: bool = True
    #: Remove each latent channel's spatial mean from the push (no global tint).
    zero_mean: bool = True
    #: Per guided step: (step, loss before the shift) (nan for the random control).
    losses: list[tuple[int, float]] = field(default_factory=list)
    edited: list[tuple[str, int]] = field(default_factory=list)
    _acts: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def needs_gradient(self) -> bool:
        return self.random_seed is None and self.gain != 0.0

    def edit(self, site: str, step: int, act: torch.Tensor) -> None:
        """The sampler's editor hook: keep the loss site's conditional activation (with its graph)."""
        if self._acts is not None and (site, step) in self.probe:
            self._acts[site] = act
        return None

    def _disagreement(self, step: int, acts: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """|target - probe's foreground probability|, averaged over the loss sites, on a [1, 1, *size] grid."""
        maps = []
        with torch.no_grad():
            for site, a in acts.items():
                p = self.probe.logits(site, step, a.detach().float()).softmax(1)[:, 1:2].mean(0, keepdim=True)
                goal = grid_target(self.target, tuple(p.shape[-2:]), p.device)[None, None]
                maps.append(F.interpolate((goal - p).abs(), size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)

    def _shift(self, step: int, x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The shift of the noise prediction at ``step`` ([1, ...] like one latent), or None."""
        acts, self._acts = self._acts or {}, None
        if self.random_seed is not None:
            gen = torch.Generator().manual_seed(self.random_seed * 100_003 + step)
            g = torch.randn(like.shape[1:], generator=gen, dtype=torch.float32)[None].to(like.device)
            self.losses.append((step, float("nan")))
        else:
            if x is None or not acts:
                return None
            loss = sum(readout_loss(self.probe, site, step, a, self.target) for site, a in acts.items()) / len(acts)
            (grad,) = torch.autograd.grad(loss, x)
            # The guidance batch stacks [uncond, cond] copies of one latent: their gradients add up.
            g = grad.float().sum(0, keepdim=True)
            self.losses.append((step, float(loss.detach())))
            self.edited += [(site, step) for site in acts]
        if self.confine and acts:
            # Push only where the probe and the target disagree (where the object is and where it
            # should be), so the rest of the scene keeps its noise, hence its look.
            g = g * self._disagreement(step, acts, tuple(g.shape[-2:]))
        if self.layout_grid:
            # Only the layout-scale part of the push.
            h, w = g.shape[-2:]
            small = (max(1, min(h, self.layout_grid)), max(1, min(w, self.layout_grid)))
            g = F.interpolate(F.adaptive_avg_pool2d(g, small), size=(h, w), mode="bilinear", align_corners=False)
        if self.zero_mean:
            # No change to each channel's mean over the image: a uniform shift tints the whole scene.
            g = g - g.mean(dim=(-2, -1), keepdim=True)
        rms = g.pow(2).mean().sqrt().clamp_min(1e-12)
        return self.gain * g / rms

    @contextmanager
    def attached(self, unet: torch.nn.Module) -> Iterator[None]:
        """Hook ``unet`` so each guided step's forward pass builds a graph and its output is shifted.

        The hooks count UNet calls themselves (one per step, as the sampler's counter does) and
        are removed on exit, error or an early close of the stream. Grad mode is switched on for
        a guided pass only and restored after it, also when the pass fails.
        """
        wanted = frozenset(int(s) for s in self.steps)
        state: dict[str, Any] = {"step": -1, "x": None, "grad_mode": None}

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state["step"] += 1
            state["x"] = None
            if state["step"] not in wanted:
                return None
            self._acts = {}
            if not self.needs_gradient:
                return None
            state["grad_mode"] = torch.is_grad_enabled()
            torch.set_grad_enabled(True)
            if args:
                x = args[0].detach().requires_grad_(True)
                args = (x, *args[1:])
            else:
                x = kwargs["sample"].detach().requires_grad_(True)
                kwargs = {**kwargs, "sample": x}
            state["x"] = x
            return args, kwargs

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            step = state["step"]
            if step not in wanted:
                return None
            try:
                eps = output[0] if isinstance(output, tuple) else output.sample
                shift = self._shift(step, state["x"], eps)
            finally:
                if state["grad_mode"] is not None:
                    torch.set_grad_enabled(state["grad_mode"])
                    state["grad_mode"] = None
                state["x"] = None
                self._acts = None
            if shift is None:
                return None
            new = (eps.detach() + shift.to(eps.dtype)).detach()
            if isinstance(output, tuple):
                return (new, *output[1:])
            output.sample = new
            return output

        def failed_pass_cleanup() -> None:
            if state["grad_mode"] is not None:
                torch.set_grad_enabled(state["grad_mode"])
            self._acts = None

        with ExitStack() as stack:
            stack.callback(failed_pass_cleanup)
            stack.callback(unet.register_forward_pre_hook(before, with_kwargs=True).remove)
            stack.callback(unet.register_forward_hook(after, with_kwargs=True).remove)
            yield


def free_cells(free: np.ndarray, grid: tuple[int, int], margin: int) -> torch.Tensor:
    """``[1, 1, *grid]`` float: 1 on every latent cell that touches ``free`` (a bool image-size
    mask), grown by ``margin`` cells in each direction; 0 elsewhere."""
    t = torch.from_numpy(np.asarray(free, np.float32))[None, None]
    cells = F.adaptive_max_pool2d(t, grid)
    if margin > 0:
        cells = F.max_pool2d(cells, 2 * margin + 1, stride=1, padding=margin)
    return cells


@dataclass
class KeepBackground:
    """Keep the unedited run's latents outside the region an edit may change.

    As in blended latent diffusion (Avrahami et al. 2023): after every denoising step of the edited
    run, each latent cell outside ``free`` (the object's old mask and its target, as a bool
    image-size mask), grown by ``margin`` cells, is set back to the unedited run's latent at that
    step (``reference[step]``, the sampler's ``StepState.latent`` of the same prompt and seed).
    The edit then repaints only where the object was and where it goes; the rest of the scene is
    the unedited run's, up to what the decoder spreads across a cell's border. Given ``image`` (the
    unedited run's final image), :meth:`paste_back` removes that spread too: outside the free cells
    the edited image takes the unedited one's pixels, with a ramp of ``2 * feather`` pixels (``feather``
    by default half a cell) beyond them, so no seam shows (as an inpainting pipeline pastes its input
    back outside the mask). Nothing here knows the model: it reads latent shapes only, so it runs on
    SD v1.4 as it is.
    """

    reference: Sequence[torch.Tensor]
    free: np.ndarray
    margin: int = 1
    #: A second region left free with its own margin (a move's vacated place: see
    #: :attr:`~ldm_scene.latent_move.LatentMoveEditor.vacated_margin`); None: none.
    vacated: np.ndarray | None = None
    vacated_margin: int = 0
    #: The unedited run's final image; None: :meth:`paste_back` leaves the edited image as it is.
    image: Image.Image | None = None
    #: Half the pixels the paste-back ramps over beyond the free cells; None: half a latent cell.
    feather: int | None = None
    _cells: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        free = np.asarray(self.free)
        if free.ndim != 2 or not free.any():
            raise ValueError("KeepBackground needs a 2-D mask with some region free to change")
        if not self.reference:
            raise ValueError("KeepBackground needs the unedited run's latent at every step")
        if self.image is not None and self.image.size != (free.shape[1], free.shape[0]):
            raise ValueError(f"the unedited image is {self.image.size[0]}x{self.image.size[1]}, "
                             f"the region to keep {free.shape[1]}x{free.shape[0]}: they must match")

    def cells(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, 1, *grid]`` float: 1 on the latent cells the edit may change, 0 on those held."""
        cells = free_cells(self.free, grid, self.margin)
        if self.vacated is not None:
            cells = torch.maximum(cells, free_cells(self.vacated, grid, self.vacated_margin))
        return cells

    def alpha(self, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """``[H, W]`` float in 0..1 at the image ``size``: 1 on the free cells' pixels, falling linearly
        to 0 over the ``2 * feather + 1`` pixels beyond them (the edited image's share in :meth:`paste_back`)."""
        cells = self.cells(grid)
        free = F.interpolate(cells, size=size, mode="nearest")
        r = max(1, size[0] // grid[0] // 2) if self.feather is None else int(self.feather)
        if r > 0:
            # grown by r, then a box mean of the same radius: 1 up to the free cells' edge, then falling by
            # 1 / (2r + 1) a pixel, 0 from 2r + 1 beyond (the mean taken over the frame only at its edge)
            free = F.avg_pool2d(F.max_pool2d(free, 2 * r + 1, stride=1, padding=r), 2 * r + 1, stride=1, padding=r,
                                count_include_pad=False)
        return free[0, 0].clamp(0, 1).numpy()

    def paste_back(self, edited: Image.Image, grid: tuple[int, int]) -> Image.Image:
        """``edited`` (the edited run's final image) with the unedited ``image``'s pixels outside the
        free cells of the latent ``grid`` (feathered, :meth:`alpha`); ``edited`` itself without ``image``."""
        if self.image is None:
            return edited
        if self.image.size != edited.size:
            raise ValueError(f"the unedited image is {self.image.size}, the edited one {edited.size}")
        a = self.alpha(grid, (edited.size[1], edited.size[0]))[..., None]
        mine, theirs = (np.asarray(im.convert("RGB"), np.float32) for im in (edited, self.image))
        mixed = a * mine + (1 - a) * theirs
        return Image.fromarray(np.clip(np.round(mixed), 0, 255).astype(np.uint8))

    def __call__(self, step: int, latent: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        if step >= len(self.reference):
            raise ValueError(f"no unedited latent for step {step + 1}: the reference run has {len(self.reference)} steps")
        ref = self.reference[step].to(latent.device, latent.dtype)
        if ref.shape != latent.shape:
            raise ValueError(f"the unedited latent is {tuple(ref.shape)}, the edited run's {tuple(latent.shape)}")
        if self._cells is None or self._cells.shape[-2:] != latent.shape[-2:]:
            self._cells = self.cells(tuple(latent.shape[-2:]))
        m = self._cells.to(latent.device, latent.dtype)
        return m * latent + (1 - m) * ref


def guided_sample(
    model: Any, config: GenerationConfig, editors: Sequence[Any], previews: bool = False, decode_final: bool = True,
    readers: Sequence[Any] = (), keep: KeepBackground | None = None,
) -> Iterator[StepState]:
    """:func:`~ldm_scene.sampler.sample` with ``editors``, hooking the UNet for those that guide it.

    An editor with an ``attached(unet)`` context manager (:class:`ReadoutGuidanceEditor`) is
    attached for exactly the lifetime of the stream; one with ``after_step(step, latent, x0)``
    (:class:`~ldm_scene.latent_move.LatentMoveEditor`) rewrites the latent after each step;
    other editors pass through unchanged. ``readers`` go to the sampler as they are; ``keep``
    blends each step's latent with the unedited run's outside the region the edit may change
    (after any ``after_step`` editor), and pastes the unedited image back there on the final image
    when it holds one (:meth:`KeepBackground.paste_back`).
    """
    movers = [e for e in editors if hasattr(e, "after_step")]
    if movers and float(model.pipe.scheduler.init_noise_sigma) <= 1.0:
        raise ValueError(f"{type(movers[0]).__name__} splits the latent as x0 + sigma * eps, which needs a "
                         f"sigma-parameterised scheduler (Euler, LMS); this model samples with {model.scheduler_name}")
    blend = keep
    if movers:
        def blend(step: int, latent: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            for mover in movers:
                latent = mover.after_step(step, latent, x0)
            return latent if keep is None else keep(step, latent, x0)
    with ExitStack() as stack:
        for editor in editors:
            attach = getattr(editor, "attached", None)
            if attach is not None:
                stack.enter_context(attach(model.unet))
        for state in sample(model, config, readers=readers, editors=[e for e in editors if e.sites],
                            previews=previews, decode_final=decode_final, blend=blend):
            if state.image is not None and keep is not None:
                state = replace(state, image=keep.paste_back(state.image, tuple(state.latent.shape[-2:])))
            yield state
