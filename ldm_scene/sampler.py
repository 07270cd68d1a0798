"""The denoising loop as a generator of per-step states.

:func:`sample` reproduces ``diffusers.StableDiffusionPipeline.__call__`` for one prompt
(classifier-free guidance with an empty negative prompt, the pipeline's own ``encode_prompt``),
but yields after every step: the step index, the scheduler timestep, the latent, the model's x0
prediction, optional decoded previews, and what attached readers produced. Readers and editors
hook the UNet through :mod:`ldm_scene.capture` for the lifetime of the generator only: closing it
early (a cancelled stream) removes every hook.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .capture import hook_attention, hook_sites
from .models import DEFAULT_LATE_FROM, PAPER_GUIDANCE, Model

#: The paper's generation settings (Chen et al. 2023): LMS, 15 steps, guidance 7.5. A model may
#: recommend its own guidance (:attr:`Model.default_guidance`), which callers that know the model use.
DEFAULT_STEPS = 15
DEFAULT_GUIDANCE = PAPER_GUIDANCE
MAX_STEPS = 200
MAX_SEED = 2**63 - 1


def describe_guidance(guidance: float, late_guidance: float | None = None, late_from: float | None = None) -> str:
    """``"guidance 7.5"``, or ``"guidance 7.5, at most 2.5 from 80% of the steps"`` when a late cap lowers it."""
    text = f"guidance {guidance:g}"
    late_from = DEFAULT_LATE_FROM if late_from is None else late_from
    if late_guidance is not None and late_guidance < guidance and late_from < 1:
        text += f", at most {late_guidance:g} from {late_from:.0%} of the steps"
    return text


class GenerationError(ValueError):
    """Bad generation input; the message says which value and what is allowed."""


@dataclass(frozen=True)
class GenerationConfig:
    """One generation request, validated on construction."""

    prompt: str
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    #: From step ``round(late_from * steps)`` on, guidance is lowered to this (never raised); None
    #: keeps ``guidance`` throughout. Strong guidance late in the run over-saturates colours (the toy
    #: model draws orange as red); the layout and the shape are decided earlier.
    late_guidance: float | None = None
    late_from: float = DEFAULT_LATE_FROM

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise GenerationError(f"prompt must be text, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise GenerationError("prompt is empty: describe the image to generate")
        for name, value in (("seed", self.seed), ("steps", self.steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise GenerationError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise GenerationError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise GenerationError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float, np.floating)):
            raise GenerationError(f"guidance must be a number, got {self.guidance!r}")
        if not (0.0 <= float(self.guidance) <= 30.0) or not np.isfinite(self.guidance):
            raise GenerationError(f"guidance must be between 0 and 30, got {self.guidance}")
        if self.late_guidance is not None:
            late = self.late_guidance
            if isinstance(late, bool) or not isinstance(late, (int, float, np.floating)) \
                    or not 0.0 <= float(late) <= 30.0:
                raise GenerationError(f"late guidance must be a number between 0 and 30, got {late!r}")
        if isinstance(self.late_from, bool) or not isinstance(self.late_from, (int, float, np.floating)) \
                or not 0.0 <= float(self.late_from) <= 1.0:
            raise GenerationError(f"late_from must be a fraction of the steps between 0 and 1, got {self.late_from!r}")

    @property
    def guidance_text(self) -> str:
        """This request's guidance in words (:func:`describe_guidance`)."""
        return describe_guidance(float(self.guidance), self.late_guidance, self.late_from)

    def guidance_at(self, step: int) -> float:
        """The guidance scale of 0-based ``step``: ``guidance``, capped at ``late_guidance`` from ``late_from`` on."""
        if self.late_guidance is not None and step >= round(self.late_from * self.steps):
            return min(float(self.guidance), float(self.late_guidance))
        return float(self.guidance)

    @property
    def uses_guidance(self) -> bool:
        """Whether classifier-free guidance doubles the batch (as diffusers decides: scale > 1)."""
        return float(self.guidance) > 1.0


class Reader(Protocol):
    """Reads site activations during a step and reports once the step is done.

    A reader may also say what it ``reads``: ``"output"`` (when absent: each site's self-attention
    output ``[B, T, C]``, see :func:`~ldm_scene.capture.hook_sites`) or ``"attention"`` (the
    cross-attention probabilities ``[B, heads, T, L]``, see :func:`~ldm_scene.capture.hook_attention`).
    """

    name: str
    sites: Sequence[str]
    steps: Collection[int] | None

    def read(self, site: str, step: int, activation: torch.Tensor) -> None: ...

    def collect(self, step: int) -> Any: ...


class Editor(Protocol):
    """Replaces site activations during chosen steps.

    An editor may also say which attention ``layer`` it edits (``"attn1"`` when absent, see
    :func:`~ldm_scene.capture.hook_sites`).
    """

    sites: Sequence[str]
    steps: Collection[int] | None

    def edit(self, site: str, step: int, activation: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepState:
    """What the sampler knows after one denoising step."""

    step: int
    num_steps: int
    timestep: float
    latent: torch.Tensor
    x0: torch.Tensor
    readouts: dict[str, Any] = field(default_factory=dict)
    preview: Image.Image | None = None
    image: Image.Image | None = None  # the final decoded image, on the last step only

    @property
    def is_last(self) -> bool:
        return self.step == self.num_steps - 1


def check_prompt(model: Model, prompt: str) -> None:
    """Refuse a prompt longer than the text encoder's context instead of truncating it silently."""
    tok = model.pipe.tokenizer
    n = len(tok(prompt, truncation=False).input_ids)
    if n > tok.model_max_length:
        raise GenerationError(
            f"prompt is too long: {n} tokens, this model reads at most {tok.model_max_length} "
            "(including start and end tokens)"
        )


def fresh_scheduler(model: Model, scheduler: Any = None) -> Any:
    """A private scheduler instance, so concurrent runs never share mutable scheduler state.

    Applies the two config corrections ``StableDiffusionPipeline.__init__`` makes to any scheduler
    it is given (``steps_offset=1``, ``clip_sample=False``), so that e.g. a DDIM scheduler built from
    the LMS config behaves here as it would in the pipeline instead of clipping x0 to [-1, 1].
    """
    source = scheduler if scheduler is not None else model.pipe.scheduler
    fixes: dict[str, Any] = {}
    if getattr(source.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(source.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    return type(source).from_config(source.config, **fixes)


def initial_latent(
    model: Model, seed: int, batch: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The seed's starting noise, drawn on the CPU as diffusers users expect (same on any device).

    ``generator`` (a CPU generator already seeded with ``seed``) lets the caller keep drawing from
    the same stream afterwards, as the pipeline does for an ancestral scheduler's step noise.
    """
    h, w = model.image_size
    f = model.vae_scale_factor
    shape = (batch, model.unet.config.in_channels, h // f, w // f)
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=model.dtype).to(model.device)


@torch.no_grad()
def decode(model: Model, latents: torch.Tensor) -> list[Image.Image]:
    """Decode a batch of latents ``[N, 4, h, w]`` into PIL images in one VAE call."""
    vae = model.pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return model.pipe.image_processor.postprocess(images, output_type="pil")


def _x0_prediction(scheduler: Any, out: Any, latent: torch.Tensor, eps: torch.Tensor, t: Any) -> torch.Tensor:
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is not None:
        return x0
    if hasattr(scheduler, "sigmas") and getattr(scheduler, "step_index", None) is not None:
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(latent.device, latent.dtype)
        if float(scheduler.init_noise_sigma) > 1.0:
            # Sigma-parameterised (VE) latents, scaled by init_noise_sigma: x = x0 + sigma * eps.
            return latent - sigma * eps
        # Variance-preserving latents (DPM-Solver, UniPC, DEIS), sigma = sqrt((1 - ab) / ab):
        # x = (x0 + sigma * eps) / sqrt(1 + sigma^2).
        return latent * (1 + sigma**2).sqrt() - sigma * eps
    ab = scheduler.alphas_cumprod[int(t)].to(latent.device, latent.dtype)
    return (latent - (1 - ab).sqrt() * eps) / ab.sqrt()


@torch.no_grad()
def sample(
    model: Model,
    config: GenerationConfig,
    readers: Sequence[Reader] = (),
    editors: Sequence[Editor] = (),
    scheduler: Any = None,
    previews: bool = False,
    decode_final: bool = True,
    blend: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[StepState]:
    """Denoise ``config.prompt`` from ``config.seed``, yielding a :class:`StepState` per step.

    ``scheduler`` (any diffusers scheduler; default the model's own) is copied so the model's is
    never mutated. ``previews`` decodes each step's x0 prediction. Readers see, and editors
    replace, the conditional half of their sites' activations; their hooks live exactly as long
    as the generator, so closing it early (a cancelled stream) removes them. ``blend(step, latent)``,
    if given, replaces each step's new latent before anything reads it (e.g.
    :class:`~ldm_scene.intervention_methods.KeepBackground`).
    """
    check_prompt(model, config.prompt)
    pipe = model.pipe
    sched = fresh_scheduler(model, scheduler)
    guided = config.uses_guidance
    cond, uncond = pipe.encode_prompt(config.prompt, model.device, 1, guided, None)
    embeds = torch.cat([uncond, cond]) if guided else cond
    sched.set_timesteps(config.steps, device=model.device)
    # One CPU generator for the initial noise and any noise the scheduler's step draws, as the
    # pipeline does: an ancestral scheduler is then seeded too, never the global RNG.
    generator = torch.Generator("cpu").manual_seed(int(config.seed))
    latent = initial_latent(model, config.seed, generator=generator) * sched.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    num_steps = len(sched.timesteps)

    with ExitStack() as stack:
        for reader in readers:
            stack.enter_context(reader_hooks(pipe.unet, reader, guided))
        for editor in editors:
            stack.enter_context(hook_sites(pipe.unet, editor.sites, editor.edit, editor.steps, guided,
                                           getattr(editor, "layer", "attn1")))
        for step, t in enumerate(sched.timesteps):
            model_in = torch.cat([latent] * 2) if guided else latent
            model_in = sched.scale_model_input(model_in, t)
            eps = pipe.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + config.guidance_at(step) * (eps_cond - eps_uncond)
            out = sched.step(eps, t, latent, return_dict=True, **step_kwargs)
            x0 = _x0_prediction(sched, out, latent, eps, t)
            latent = out.prev_sample
            if blend is not None:
                latent = blend(step, latent, x0)
            state = StepState(step, num_steps, float(t), latent, x0)
            state.readouts = {r.name: r.collect(step) for r in readers}
            if previews:
                state.preview = decode(model, x0)[0]
            if step == num_steps - 1 and decode_final:
                state.image = decode(model, latent)[0]
            yield state


def config_for(
    model: Model,
    prompt: str,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,
    late_guidance: float | None = None,
    late_from: float | None = None,
) -> GenerationConfig:
    """A :class:`GenerationConfig` with the model's own guidance settings wherever an argument is None.

    The model's settings come from its directory's ``ldm_scene.json`` (:func:`ldm_scene.models.read_settings`);
    without one: guidance 7.5 throughout, the paper's. Pass ``late_guidance=guidance`` for a
    constant scale on a model that lowers it late.
    """
    return GenerationConfig(
        prompt, seed, steps,
        model.default_guidance if guidance is None else guidance,
        model.late_guidance if late_guidance is None else late_guidance,
        model.late_from if late_from is None else late_from,
    )


def reader_hooks(unet: Any, reader: Reader, split_guidance: bool) -> Any:
    """The context manager that hooks ``unet`` for ``reader`` (by what it ``reads``) until it exits."""
    reads = getattr(reader, "reads", "output")
    if reads == "attention":
        return hook_attention(unet, reader.sites, reader.read, reader.steps, split_guidance)
    if reads != "output":
        raise ValueError(f"reader {reader.name!r} reads {reads!r}; readers read 'output' or 'attention'")
    return hook_sites(unet, reader.sites, _reading(reader), reader.steps, split_guidance)


def _reading(reader: Reader):
    def fn(site: str, step: int, act: torch.Tensor) -> None:
        reader.read(site, step, act)
        return None

    return fn


def generate(model: Model, config: GenerationConfig, **kwargs: Any) -> list[StepState]:
    """Run :func:`sample` to the end and return every step's state."""
    return list(sample(model, config, **kwargs))
