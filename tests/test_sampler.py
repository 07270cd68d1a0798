"""The step-wise sampler against diffusers' own StableDiffusionPipeline, its states and its input checks."""
from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)

from ldm_scene.sampler import (
    MAX_SEED,
    MAX_STEPS,
    GenerationConfig,
    GenerationError,
    decode,
    generate,
    initial_latent,
    sample,
)
from ldm_scene.sites import SITE_KEYS

PROMPT = "a photo of a red cat"
STEPS = 3


def _pipe_with(model, scheduler=None) -> StableDiffusionPipeline:
    """The model's own components in a fresh pipeline, optionally with another scheduler instance."""
    parts = dict(model.pipe.components)
    if scheduler is not None:
        parts["scheduler"] = scheduler
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, prompt=PROMPT, steps=STEPS, guidance=7.5, seed=1, output_type="pil"):
    out = pipe(
        prompt, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
    )
    return out.images[0] if output_type == "pil" else out.images


# Exact equality is expected, not a tolerance: on the same device and dtype the sampler performs the
# pipeline's own ops in the same order (encode_prompt, the same CPU-generator randn, cat([uncond, cond]),
# scale_model_input, one UNet call on the doubled batch, uncond + g * (cond - uncond), scheduler.step,
# vae.decode of latent / scaling_factor, image_processor.postprocess). Any reordering or extra cast
# would show up as a float difference in the latent, which torch.equal catches.
@pytest.mark.parametrize(
    "scheduler_cls, guidance, compare_image",
    [
        (None, 7.5, True),  # the model's own LMS, the paper's setting
        # DDIM built from the LMS config has clip_sample=True, which the pipeline switches off
        (DDIMScheduler, 7.5, True),
        (DPMSolverMultistepScheduler, 7.5, False),
        # ancestral: the step draws noise, which the pipeline takes from the seed's generator
        (EulerAncestralDiscreteScheduler, 7.5, False),
        (None, 1.0, False),  # guidance <= 1: no uncond half, a batch of one
    ],
    ids=["lms", "ddim", "dpmsolver", "euler-ancestral", "lms-no-guidance"],
)
def test_final_image_equals_diffusers_pipeline(tiny_model, scheduler_cls, guidance, compare_image):
    own = tiny_model.pipe.scheduler
    sched = scheduler_cls.from_config(own.config) if scheduler_cls else None
    ref_pipe = _pipe_with(tiny_model, scheduler_cls.from_config(own.config) if scheduler_cls else None)
    states = generate(
        tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS, guidance=guidance), scheduler=sched,
        decode_final=compare_image,
    )
    ref_latent = _reference(ref_pipe, guidance=guidance, output_type="latent")
    assert torch.equal(states[-1].latent, ref_latent)
    if compare_image:
        ref_image = _reference(ref_pipe, guidance=guidance)
        assert states[-1].image.mode == ref_image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(states[-1].image), np.asarray(ref_image))


def test_pipeline_comparison_is_not_vacuous(tiny_model):
    """The reference moves with the seed and the guidance, so equality above pins both down."""
    pipe = _pipe_with(tiny_model)
    base = _reference(pipe, output_type="latent")
    assert not torch.equal(base, _reference(pipe, seed=2, output_type="latent"))
    assert not torch.equal(base, _reference(pipe, guidance=3.0, output_type="latent"))


def test_states_steps_timesteps_and_last_image(tiny_model):
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=3, steps=5))
    assert [s.step for s in states] == list(range(5))
    assert all(s.num_steps == 5 for s in states)
    timesteps = [s.timestep for s in states]
    assert all(a > b for a, b in zip(timesteps, timesteps[1:])), timesteps
    assert timesteps[0] == pytest.approx(999.0)  # LMS linspace spacing starts at the last train step
    assert [s.is_last for s in states] == [False] * 4 + [True]
    assert all(s.image is None for s in states[:-1]) and states[-1].image.size == (32, 32)
    assert all(s.preview is None for s in states)  # previews are off by default
    for s in states:
        assert s.latent.shape == s.x0.shape == (1, 4, 8, 8)
    # LMS steps to sigma = 0 at the end, so the last x0 prediction is (up to the multistep
    # correction, tiny at the last step) the final latent; an earlier x0 is not.
    last = states[-1]
    assert torch.allclose(last.x0, last.latent, rtol=1e-3, atol=1e-3 * last.latent.abs().max().item())
    assert not torch.allclose(states[0].latent, last.latent, rtol=1e-2)


def _expected_x0_lms(sched, i, t, x, eps):
    # sigma-parameterised latents: x = x0 + sigma * eps
    return x - sched.sigmas[i] * eps


def _expected_x0_vp(sched, i, t, x, eps):
    # variance-preserving latents: x = sqrt(ab) * x0 + sqrt(1 - ab) * eps
    ab = sched.alphas_cumprod[int(t)]
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


@pytest.mark.parametrize(
    "scheduler_cls, expected",
    [(LMSDiscreteScheduler, _expected_x0_lms), (DPMSolverMultistepScheduler, _expected_x0_vp)],
    ids=["lms", "dpmsolver-no-pred-original"],
)
def test_x0_is_the_models_clean_latent_prediction(tiny_model, scheduler_cls, expected):
    """x0 follows from the latent before the step and the UNet's eps (guidance off: eps = UNet output).

    DPMSolver's step returns no ``pred_original_sample``, so this checks the sampler's own fallback.
    """
    config = tiny_model.pipe.scheduler.config
    eps_seen = []
    handle = tiny_model.unet.register_forward_hook(lambda m, a, out: eps_seen.append(out[0].detach().clone()))
    try:
        states = generate(
            tiny_model, GenerationConfig(PROMPT, seed=4, steps=STEPS, guidance=1.0),
            scheduler=scheduler_cls.from_config(config), decode_final=False,
        )
    finally:
        handle.remove()
    ref = scheduler_cls.from_config(config)
    ref.set_timesteps(STEPS)
    x = initial_latent(tiny_model, 4) * ref.init_noise_sigma
    assert len(eps_seen) == STEPS
    for i, (t, state) in enumerate(zip(ref.timesteps, states)):
        want = expected(ref, i, t, x, eps_seen[i])
        scale = want.abs().max().item()
        assert torch.allclose(state.x0, want, rtol=1e-4, atol=1e-5 * scale), (i, (state.x0 - want).abs().max())
        x = state.latent


def test_previews_are_decoded_x0_at_model_size(tiny_model):
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=5, steps=3), previews=True, decode_final=False)
    assert states[-1].image is None
    for s in states:
        assert s.preview.size == (tiny_model.image_size[1], tiny_model.image_size[0]) == (32, 32)
        assert s.preview.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(s.preview), np.asarray(decode(tiny_model, s.x0)[0]))


def test_seed_determines_the_image_and_not_the_global_rng(tiny_model):
    cfg = GenerationConfig(PROMPT, seed=7, steps=3)
    a = generate(tiny_model, cfg)[-1]
    torch.rand(100)  # advance the global RNG: a seeded run must not depend on it
    b = generate(tiny_model, cfg)[-1]
    c = generate(tiny_model, GenerationConfig(PROMPT, seed=8, steps=3))[-1]
    assert torch.equal(a.latent, b.latent)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not torch.equal(a.latent, c.latent)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    # A seed means diffusers' convention: the noise comes from a CPU generator seeded with it.
    want = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(initial_latent(tiny_model, 7), want)


def test_ancestral_scheduler_is_reproducible(tiny_model):
    """An ancestral step draws fresh noise; it must come from the seed, not the global RNG."""
    own = tiny_model.pipe.scheduler.config
    cfg = GenerationConfig(PROMPT, seed=9, steps=3)
    a = generate(tiny_model, cfg, scheduler=EulerAncestralDiscreteScheduler.from_config(own), decode_final=False)
    torch.rand(100)
    b = generate(tiny_model, cfg, scheduler=EulerAncestralDiscreteScheduler.from_config(own), decode_final=False)
    assert torch.equal(a[-1].latent, b[-1].latent)


def test_model_and_given_schedulers_are_not_mutated(tiny_model):
    own = tiny_model.pipe.scheduler
    own.set_timesteps(6)
    before = (own.timesteps.clone(), own.sigmas.clone(), own.num_inference_steps, own.step_index)
    given = DDIMScheduler.from_config(own.config)
    generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=3), decode_final=False)
    generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=3), scheduler=given, decode_final=False)
    assert torch.equal(own.timesteps, before[0]) and torch.equal(own.sigmas, before[1])
    assert (own.num_inference_steps, own.step_index) == before[2:] == (6, None)
    assert given.num_inference_steps is None  # the given one was copied, never set up


def test_interleaved_generators_do_not_share_scheduler_state(tiny_model):
    cfg_a, cfg_b = GenerationConfig(PROMPT, seed=1, steps=2), GenerationConfig("a blue dog", seed=2, steps=2)
    solo_a = generate(tiny_model, cfg_a, decode_final=False)[-1].latent
    solo_b = generate(tiny_model, cfg_b, decode_final=False)[-1].latent
    ga, gb = sample(tiny_model, cfg_a, decode_final=False), sample(tiny_model, cfg_b, decode_final=False)
    for sa, sb in zip(ga, gb):
        last_a, last_b = sa.latent, sb.latent
    assert torch.equal(last_a, solo_a) and torch.equal(last_b, solo_b)


class CountingReader:
    """A reader that logs every call and reports, per step, the sites it saw and their shapes."""

    def __init__(self, name="count", sites=SITE_KEYS, steps=None):
        self.name, self.sites, self.steps = name, tuple(sites), steps
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.collected: list[int] = []

    def read(self, site, step, activation):
        self.calls.append((site, step, tuple(activation.shape)))

    def collect(self, step):
        self.collected.append(step)
        return [(site, shape) for site, s, shape in self.calls if s == step]


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_reader_sees_every_site_and_collects_per_step(tiny_model, guidance):
    reader = CountingReader()
    chosen = CountingReader("chosen", sites=SITE_KEYS[-2:], steps={0, 2})
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=3, guidance=guidance), readers=[reader, chosen])
    table = {info.key: info for info in tiny_model.sites()}
    assert reader.collected == chosen.collected == [0, 1, 2]
    for state in states:
        seen = state.readouts["count"]
        assert [site for site, _ in seen] == list(SITE_KEYS)  # all 16, in network-depth order
        # batch 1 whether or not guidance doubled the UNet batch: only the cond half is read
        assert all(shape == (1, table[site].tokens, table[site].channels) for site, shape in seen)
    assert [len(s.readouts["chosen"]) for s in states] == [2, 0, 2]
    assert {site for site, _, _ in chosen.calls} == set(SITE_KEYS[-2:])


def test_reader_does_not_outlive_a_closed_generator(tiny_model):
    import weakref

    reader = CountingReader()
    ref = weakref.ref(reader)
    gen = sample(tiny_model, GenerationConfig(PROMPT, seed=1, steps=3), readers=[reader])
    next(gen)
    gen.close()
    del gen, reader
    gc.collect()
    assert ref() is None  # no hook closure on the UNet keeps the reader alive


def test_an_editor_naming_a_layer_is_hooked_there_only(tiny_model):
    """An editor with ``layer = "attn2"`` replaces the site's cross-attention output, hooked on that
    module alone while the run streams; a plain editor edits the self-attention; no hook outlives
    the run."""
    from ldm_scene.capture import attached_hooks
    from ldm_scene.sites import module_path

    class Scale:
        def __init__(self, site, layer=None):
            self.sites, self.steps, self.edited = (site,), (0,), []
            if layer is not None:
                self.layer = layer

        def edit(self, site, step, act):
            self.edited.append((site, step))
            return act * 0.5

    site = "mid_block.attentions.0"
    config = GenerationConfig(PROMPT, seed=1, steps=2)
    plain = generate(tiny_model, config)[-1].latent
    cross = Scale(site, "attn2")
    stream = sample(tiny_model, config, editors=[cross])
    next(stream)
    assert len(tiny_model.unet.get_submodule(module_path(site, "attn2"))._forward_hooks) == 1
    assert len(tiny_model.unet.get_submodule(module_path(site, "attn1"))._forward_hooks) == 0
    latent = [s.latent for s in stream][-1]
    assert cross.edited == [(site, 0)] and attached_hooks(tiny_model.unet) == 0
    assert not torch.equal(latent, plain)
    own = Scale(site)
    other = generate(tiny_model, config, editors=[own])[-1].latent
    assert own.edited == [(site, 0)] and not torch.equal(other, plain) and not torch.equal(other, latent)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   \n\t"), "prompt is empty"),
        (dict(prompt=None), "prompt must be text, got NoneType"),
        (dict(prompt=["a cat"]), "prompt must be text, got list"),
        (dict(seed=-1), r"seed must be between 0 and 9223372036854775807, got -1"),
        (dict(seed=MAX_SEED + 1), "seed must be between 0 and"),
        (dict(seed=1.5), "seed must be a whole number, got 1.5"),
        (dict(seed=2.0), "seed must be a whole number, got 2.0"),
        (dict(seed=True), "seed must be a whole number, got True"),
        (dict(seed="3"), "seed must be a whole number"),
        (dict(steps=0), "steps must be between 1 and 200, got 0"),
        (dict(steps=MAX_STEPS + 1), "steps must be between 1 and 200, got 201"),
        (dict(steps=4.0), "steps must be a whole number"),
        (dict(guidance=float("nan")), "guidance must be between 0 and 30, got nan"),
        (dict(guidance=float("inf")), "guidance must be between 0 and 30, got inf"),
        (dict(guidance=-0.5), "guidance must be between 0 and 30, got -0.5"),
        (dict(guidance=30.5), "guidance must be between 0 and 30, got 30.5"),
        (dict(guidance="7.5"), "guidance must be a number"),
        (dict(guidance=False), "guidance must be a number"),
        (dict(late_guidance=-1.0), "late guidance must be a number between 0 and 30, got -1.0"),
        (dict(late_guidance="low"), "late guidance must be a number"),
        (dict(late_from=1.5), "late_from must be a fraction of the steps between 0 and 1, got 1.5"),
        (dict(late_from=None), "late_from must be a fraction"),
    ],
)
def test_generation_config_rejects(kwargs, match):
    args = dict(prompt="a cat", seed=0, steps=15, guidance=7.5) | kwargs
    with pytest.raises(GenerationError, match=match):
        GenerationConfig(**args)


def test_late_guidance_caps_the_scale_from_its_step_on():
    c = GenerationConfig("a cat", steps=15, guidance=7.5, late_guidance=2.5, late_from=0.8)
    assert [c.guidance_at(i) for i in range(15)] == [7.5] * 12 + [2.5] * 3  # round(0.8 * 15) = 12
    assert GenerationConfig("a cat", steps=15, guidance=2.0, late_guidance=4.0).guidance_at(14) == 2.0  # never raised
    assert GenerationConfig("a cat", steps=15).guidance_at(14) == 7.5  # no cap: constant
    assert GenerationConfig("a cat", steps=3, late_guidance=1.0, late_from=0).guidance_at(0) == 1.0
    # in words, as reports and the app print it: a cap that never lowers anything is not mentioned
    assert c.guidance_text == "guidance 7.5, at most 2.5 from 80% of the steps"
    assert GenerationConfig("a cat", guidance=2.0, late_guidance=4.0).guidance_text == "guidance 2"


def test_a_late_cap_changes_only_the_steps_after_it(tiny_model):
    """Steps before the cap are the constant-guidance run's, bit for bit; the cap then changes the
    result; a cap equal to the scale is the constant run exactly."""
    const = generate(tiny_model, GenerationConfig(PROMPT, seed=2, steps=4, guidance=7.5))
    capped = generate(tiny_model, GenerationConfig(PROMPT, seed=2, steps=4, guidance=7.5, late_guidance=1.5, late_from=0.5))
    same = generate(tiny_model, GenerationConfig(PROMPT, seed=2, steps=4, guidance=7.5, late_guidance=7.5, late_from=0.5))
    for a, b in zip(const[:2], capped[:2]):
        assert torch.equal(a.latent, b.latent)
    assert not torch.allclose(const[2].latent, capped[2].latent)
    for a, b in zip(const, same):
        assert torch.equal(a.latent, b.latent)


def test_generation_config_accepts_edges():
    assert GenerationConfig("a cat").steps == 15 and GenerationConfig("a cat").guidance == 7.5  # the paper's
    assert GenerationConfig("a cat", seed=MAX_SEED, steps=MAX_STEPS, guidance=30).seed == MAX_SEED
    assert GenerationConfig("a cat", seed=np.int64(3), steps=np.int32(2)).seed == 3
    assert not GenerationConfig("a cat", guidance=1.0).uses_guidance  # diffusers guides only for > 1
    assert GenerationConfig("a cat", guidance=1.01).uses_guidance
    assert not GenerationConfig("a cat", guidance=0).uses_guidance
    assert math.isclose(GenerationConfig("a cat", guidance=np.float32(2.5)).guidance, 2.5)
    with pytest.raises(Exception):  # frozen
        GenerationConfig("a cat").seed = 2


def test_overlong_prompt_is_refused_not_truncated(tiny_model):
    # The tiny tokenizer reads 16 tokens including start and end: 14 single-token words fit.
    limit = tiny_model.pipe.tokenizer.model_max_length
    assert limit == 16
    fits = " ".join(["cat"] * (limit - 2))
    generate(tiny_model, GenerationConfig(fits, steps=1), decode_final=False)
    too_long = fits + " dog"
    with pytest.raises(GenerationError, match=r"too long: 17 tokens.*at most 16"):
        generate(tiny_model, GenerationConfig(too_long, steps=1))
