"""What the service hands out: a user's :class:`Run`, one step's :class:`StepView`, an intervention's
:class:`Comparison`. Plain data (numpy, PIL); the Gradio tabs turn them into component values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..readout import ProbeReader, SiteChoice, emergence, upsample_nearest
from ..sampler import GenerationConfig


@dataclass
class Run:
    """One user's generation (or edited generation), kept by the caller between requests.

    ``previews[s]`` is the decoded x0 prediction after step ``s``, or None where the live stream did
    not decode it (it decodes every few steps; ``latents[s]``, the x0 prediction itself, lets the
    service decode it later: :meth:`~.service.Service.decode_previews`); ``readouts[s]`` the probe
    maps at their sites' grids (a group probe's at the image size). ``foreground`` is the finished
    image's object mask at image size (from the model's labeler, else the foreground probe at the
    last step), which the Intervene tab moves. ``reference`` holds what each step is scored against for the emergence curves.
    ``started`` is the wall-clock time the run began (the page tells a stopped run from an old one).
    ``attention_sites`` are the cross-attention sites read for the per-word maps.
    """

    config: GenerationConfig
    sites: dict[str, SiteChoice]
    kind: str = "generate"
    attention_sites: tuple[str, ...] = ()
    previews: list[Image.Image | None] = field(default_factory=list)
    latents: list[Any] = field(default_factory=list)
    #: The latent after each step (what the next step denoises): an edit keeps it outside its region.
    trajectory: list[Any] = field(default_factory=list)
    readouts: list[dict[str, np.ndarray]] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    image: Image.Image | None = None
    foreground: np.ndarray | None = None
    foreground_source: str = ""
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    reference_source: str = ""
    emergence: dict[str, list[float]] = field(default_factory=dict)
    curves: Any = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: Per step, the prompt words' cross-attention maps (:class:`~ldm_scene.attention.WordMaps`; None
    #: where none were read) and the labeler's maps of that step's x0 preview (None without a labeler).
    attention: list[Any] = field(default_factory=list)
    preview_labels: list[dict[str, np.ndarray] | None] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.image is not None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def shown_step(self, step: int) -> int:
        """The step whose decoded preview stands for ``step``: itself if decoded, else the latest
        decoded step before it (``step`` itself when none is)."""
        for s in range(step, -1, -1):
            if s < len(self.previews) and self.previews[s] is not None:
                return s
        return step

    #: The lists that hold one entry per step.
    PER_STEP = ("previews", "latents", "trajectory", "readouts", "timesteps", "attention", "preview_labels")

    def record(self, state: Any, preview: Image.Image | None) -> None:
        """Keep the model's part of one step (a sampler ``StepState``): the x0 latent, the latent after
        the step, ``preview`` (None until decoded), the probe maps and the word maps. The labeler's
        view of the preview (``preview_labels``) is appended by whoever labels it."""
        self.latents.append(state.x0[0].detach().to("cpu"))
        self.trajectory.append(state.latent.detach().to("cpu"))
        self.previews.append(preview)
        self.timesteps.append(float(state.timestep))
        self.readouts.append(dict(state.readouts.get(ProbeReader.name, {})))
        self.attention.append(state.readouts.get("attention"))

    def keep_steps(self, n: int) -> None:
        """Forget every step after the first ``n`` (a stream closed early keeps the steps it handed out)."""
        for name in self.PER_STEP:
            del getattr(self, name)[n:]

    def finish(self, labels: dict[str, np.ndarray] | None, size: tuple[int, int], emergence_curves: bool = True) -> None:
        """Find the finished image's object and score every step against the final labels.

        ``labels``: the model's labeler on the finished image (None without one: the probes' own
        readout at the last step stands in); ``size``: the image's (h, w).
        """
        h, w = size
        last = self.readouts[-1] if self.readouts else {}
        if labels is not None:
            self.foreground, self.foreground_source = labels["foreground"] > 0.5, "the model's labeler"
            self.reference, self.reference_source = labels, "the labeler's labels of the finished image"
        else:
            if "foreground" in last:
                self.foreground = upsample_nearest(last["foreground"], (h, w)) > 0.5
                self.foreground_source = "the foreground probe at the last step"
            self.reference = {t: upsample_nearest(v, (h, w)) for t, v in last.items()}
            self.reference_source = "the probes' own readout at the last step"
        if emergence_curves and self.reference:
            ref = {t: v for t, v in self.reference.items() if any(t in m for m in self.readouts)}
            self.emergence = emergence(self.readouts, ref)

    def missing_previews(self, steps: Any = None) -> list[int]:
        """The steps among ``steps`` (default: all) whose preview was not decoded yet."""
        wanted = range(self.num_steps) if steps is None else steps
        return [s for s in wanted if self.previews[s] is None]


@dataclass
class StepView:
    """What one step looks like: the preview, each task's picture and map, and where the run is.

    ``overlays``: foreground as the outline of ``p > 0.5`` over the clean preview; depth and
    shading as colour maps with a colour bar over a fixed range. ``foreground_heat`` is the
    foreground probability as a heat map with its colour bar (None without a foreground readout).
    ``step`` is 0-based; :attr:`label` counts from 1, as the page does.
    """

    step: int
    num_steps: int
    timestep: float
    preview: Image.Image
    overlays: dict[str, Image.Image]
    readouts: dict[str, np.ndarray]
    run: Run
    image: Image.Image | None = None
    foreground_heat: Image.Image | None = None
    #: The prompt words' cross-attention maps at this step, drawn over the preview (None: not read).
    attention: Image.Image | None = None
    #: Probe readout vs the labeler on the x0 preview vs the final label, one row per task.
    compare: Image.Image | None = None
    #: The step whose decoded x0 ``preview`` shows (``step`` itself, or an earlier one while a
    #: stream decodes every few steps).
    preview_step: int | None = None

    @property
    def decoded(self) -> bool:
        """Whether ``preview`` is this step's own x0 estimate."""
        return self.preview_step is None or self.preview_step == self.step

    @property
    def is_last(self) -> bool:
        return self.step == self.num_steps - 1

    @property
    def label(self) -> str:
        text = f"step {self.step + 1} of {self.num_steps} (scheduler timestep {self.timestep:.0f})"
        if not self.decoded:
            text += f"; x0 image from step {self.preview_step + 1}"
        return text


@dataclass
class Comparison:
    """The end of an intervention: original, target and result, with how well the result fits."""

    original: Image.Image
    target: np.ndarray
    result: Image.Image
    result_mask: np.ndarray
    original_mask: np.ndarray
    iou_target: float
    iou_original_target: float
    mask_source: str
    method: str

    @classmethod
    def of(cls, original: "Run", edited: "Run", target: np.ndarray, method: str) -> "Comparison":
        """Compare a finished edited run with the original and the target (empty masks where none was found)."""
        from ..metrics import iou

        result_mask = edited.foreground if edited.foreground is not None else np.zeros_like(target)
        original_mask = original.foreground if original.foreground is not None else np.zeros_like(target)
        return cls(
            original=original.image, target=target, result=edited.image, result_mask=result_mask,
            original_mask=original_mask, iou_target=iou(result_mask, target),
            iou_original_target=iou(original_mask, target), mask_source=edited.foreground_source or "none",
            method=method,
        )

    def numbers(self) -> dict[str, Any]:
        """The comparison as plain numbers (for the API): IoUs and mask centroids (x, y) in pixels."""
        return {
            "method": self.method,
            "iou_result_target": round(self.iou_target, 4),
            "iou_original_target": round(self.iou_original_target, 4),
            "original_centroid": centroid(self.original_mask),
            "target_centroid": centroid(self.target),
            "result_centroid": centroid(self.result_mask),
            "mask_source": self.mask_source,
        }

    def summary(self) -> str:
        return (
            f"**{self.method}**: IoU of the result's foreground with the target **{self.iou_target:.2f}** "
            f"(the original's was {self.iou_original_target:.2f}; foreground from {self.mask_source})."
        )


@dataclass
class InterventionView(StepView):
    comparison: Comparison | None = None


def centroid(mask: np.ndarray) -> list[float] | None:
    """The (x, y) centre of a mask's pixels, or None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    return [round(float(xs.mean()), 2), round(float(ys.mean()), 2)]
