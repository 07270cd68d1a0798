"""capture()/edit() on the tiny UNet: shapes, the conditional half, step filters, edits, hook cleanup."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from ldm_scene.capture import attached_hooks, capture, edit, hook_sites
from ldm_scene.sampler import GenerationConfig, generate, sample
from ldm_scene.sites import SITE_KEYS

PROMPT = "a photo of a blue dog"
STEPS = 3


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def embeds(tiny_model):
    """(uncond, cond) prompt embeddings from the pipeline's own encoder, each [1, 16, 16]."""
    cond, uncond = tiny_model.pipe.encode_prompt(PROMPT, tiny_model.device, 1, True, None)
    return uncond, cond


@pytest.fixture(scope="module")
def plain_run(tiny_model):
    """An unhooked guided run, for comparing edited runs against."""
    return generate(tiny_model, GenerationConfig(PROMPT, seed=2, steps=STEPS))


def _unet_call(model, embeds, latent, guided=True, t=500):
    uncond, cond = embeds
    with torch.no_grad():
        if guided:
            return model.unet(torch.cat([latent] * 2), t, encoder_hidden_states=torch.cat([uncond, cond]))[0]
        return model.unet(latent, t, encoder_hidden_states=cond)[0]


def test_shapes_at_every_step_and_site_match_the_site_table(tiny_model):
    table = {info.key: info for info in tiny_model.sites()}
    assert len(table) == 16
    with capture(tiny_model.unet) as cap:
        # the sampler's own guided loop: a UNet batch of 2 per step
        generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), decode_final=False)
    assert set(cap.values) == {(site, step) for site in SITE_KEYS for step in range(STEPS)}
    for (site, step), act in cap.values.items():
        info = table[site]
        assert act.shape == (1, info.height * info.width, info.channels), (site, step)
        assert act.dtype == torch.float32 and act.device.type == "cpu" and not act.requires_grad
    assert cap.counter.step == STEPS - 1
    assert list(cap.at(1)) == list(SITE_KEYS)  # recorded in network-depth order
    # the tiny model's grids: 8x8 latent, halved per level, 1x1 in the mid block
    assert [table[k].height for k in SITE_KEYS] == [8, 8, 4, 4, 2, 2, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]


def test_kept_half_is_the_conditional_one(tiny_model, embeds):
    """Recorded activations of a [uncond, cond] batch equal a batch-1 run on the cond prompt only."""
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with capture(tiny_model.unet) as guided:
        _unet_call(tiny_model, embeds, latent, guided=True)
    with capture(tiny_model.unet, split_guidance=False) as cond_only:
        _unet_call(tiny_model, embeds, latent, guided=False)
    with capture(tiny_model.unet, split_guidance=False) as uncond_only:
        _unet_call(tiny_model, (None, embeds[0]), latent, guided=False)
    assert len(guided.values) == 16
    for (site, step), act in guided.values.items():
        # batch 2 vs batch 1 may round differently (~1e-7); cond and uncond differ by far more
        assert torch.allclose(act, cond_only.values[(site, step)], atol=1e-5, rtol=1e-4), site
        gap = (act - uncond_only.values[(site, step)]).abs().max()
        if site == SITE_KEYS[0]:
            # the very first self-attention runs before any cross-attention: no text has entered yet
            assert gap < 1e-5
        else:
            assert gap > 1e-2, site


def test_split_guidance_keeps_the_second_half_of_the_raw_output(tiny_model, embeds):
    raw = {}
    module = tiny_model.unet.get_submodule("up_blocks.3.attentions.2.transformer_blocks.0.attn1")
    handle = module.register_forward_hook(lambda m, a, out: raw.setdefault("out", out.detach().clone()))
    try:
        with capture(tiny_model.unet, ["up_blocks.3.attentions.2"]) as cap:
            _unet_call(tiny_model, embeds, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)))
    finally:
        handle.remove()
    assert raw["out"].shape[0] == 2
    assert torch.equal(cap.values[("up_blocks.3.attentions.2", 0)], raw["out"][1:])


def test_odd_batch_with_split_guidance_is_refused(tiny_model, embeds):
    with pytest.raises(RuntimeError, match="batch of 1 cannot be split.*split_guidance=False"):
        with capture(tiny_model.unet, ["mid_block.attentions.0"]):
            _unet_call(tiny_model, embeds, torch.zeros((1, 4, 8, 8)), guided=False)
    assert attached_hooks(tiny_model.unet) == 0


def test_reduce_is_applied_inside_the_forward_pass(tiny_model):
    calls = []

    def reduce(site, step, act):
        calls.append((site, step, tuple(act.shape)))
        return act.mean(dim=1)  # [1, C]: a per-channel summary instead of the activation

    gen = sample(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), decode_final=False)
    with capture(tiny_model.unet, reduce=reduce) as cap:
        next(gen)  # exactly one UNet call has run
        # already reduced for step 0, before the next step starts: nothing raw is kept
        assert len(calls) == 16 and {s for _, s, _ in calls} == {0}
        assert all(v.shape == (1, tiny_model.site(site).channels) for (site, _), v in cap.values.items())
        for _ in gen:
            pass
    assert len(cap.values) == 16 * STEPS
    assert all(shape[0] == 1 for _, _, shape in calls)  # reduce saw the cond half only


def test_reduce_result_matches_raw_capture(tiny_model):
    cfg = GenerationConfig(PROMPT, seed=5, steps=2)
    with capture(tiny_model.unet, ["down_blocks.1.attentions.0"]) as raw:
        generate(tiny_model, cfg, decode_final=False)
    with capture(tiny_model.unet, ["down_blocks.1.attentions.0"], reduce=lambda s, t, a: a.norm()) as red:
        generate(tiny_model, cfg, decode_final=False)
    for key, act in raw.values.items():
        assert red.values[key] == pytest.approx(act.norm().item(), rel=1e-6)


@pytest.mark.parametrize("steps, expected", [({1}, {1}), ([0, 2], {0, 2}), ({7}, set()), (range(STEPS), {0, 1, 2})])
def test_steps_filter(tiny_model, steps, expected):
    with capture(tiny_model.unet, SITE_KEYS[:3], steps=steps) as cap:
        generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), decode_final=False)
    assert {step for _, step in cap.values} == expected
    assert len(cap.values) == 3 * len(expected)
    assert cap.counter.step == STEPS - 1  # steps are counted whether recorded or not


def test_unknown_site_attaches_nothing(tiny_model):
    with pytest.raises(KeyError, match="unknown site"):
        with capture(tiny_model.unet, ["down_blocks.0.attentions.0", "mid_block.attentions.1"]):
            pass
    assert attached_hooks(tiny_model.unet) == 0


# ---------------------------------------------------------------- no hook outlives its with


def test_hooks_removed_after_normal_exit(tiny_model):
    assert attached_hooks(tiny_model.unet) == 0
    with capture(tiny_model.unet):
        assert attached_hooks(tiny_model.unet) == 16 + 1  # 16 sites + the step-counting pre-hook
        with edit(tiny_model.unet, ["mid_block.attentions.0"], lambda s, t, a: a):
            assert attached_hooks(tiny_model.unet) == 16 + 1 + 2
    assert attached_hooks(tiny_model.unet) == 0


def test_hooks_removed_after_exception_in_with_body(tiny_model):
    with pytest.raises(Boom):
        with capture(tiny_model.unet):
            raise Boom()
    assert attached_hooks(tiny_model.unet) == 0


def test_hooks_removed_after_exception_in_callback_during_forward(tiny_model):
    def explode(site, step, act):
        if step == 1 and site == "up_blocks.2.attentions.1":
            raise Boom(site)
        return None

    with pytest.raises(Boom, match="up_blocks.2.attentions.1"):
        with capture(tiny_model.unet, reduce=explode):
            generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), decode_final=False)
    assert attached_hooks(tiny_model.unet) == 0
    # and through the sampler's own readers
    with pytest.raises(Boom):
        generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), readers=[_Reader(explode)])
    assert attached_hooks(tiny_model.unet) == 0


class _Reader:
    name = "r"
    sites = SITE_KEYS
    steps = None

    def __init__(self, fn=None):
        self.fn = fn or (lambda site, step, act: None)

    def read(self, site, step, act):
        self.fn(site, step, act)

    def collect(self, step):
        return step


class _Editor:
    def __init__(self, fn, sites=SITE_KEYS, steps=None):
        self.edit, self.sites, self.steps = fn, tuple(sites), steps


def test_hooks_removed_when_sampler_generator_is_closed_early(tiny_model):
    gen = sample(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), readers=[_Reader()],
                 editors=[_Editor(lambda s, t, a: a)])
    next(gen)
    assert attached_hooks(tiny_model.unet) == 2 * (16 + 1)  # the run is live: reader + editor hooks
    gen.close()
    assert attached_hooks(tiny_model.unet) == 0


def test_hooks_removed_when_sampler_generator_is_garbage_collected(tiny_model):
    gen = sample(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS), readers=[_Reader()])
    next(gen)
    assert attached_hooks(tiny_model.unet) == 17
    del gen
    gc.collect()
    assert attached_hooks(tiny_model.unet) == 0


def test_capture_held_by_a_closed_generator_is_removed(tiny_model):
    """A capture opened inside a generator (as a streaming app would) goes when the stream is cancelled."""

    def stream():
        with capture(tiny_model.unet) as cap:
            for state in sample(tiny_model, GenerationConfig(PROMPT, seed=1, steps=STEPS)):
                yield state, cap

    gen = stream()
    next(gen)
    assert attached_hooks(tiny_model.unet) == 17
    gen.close()
    assert attached_hooks(tiny_model.unet) == 0


# ---------------------------------------------------------------- edits


def test_identity_edit_reproduces_the_unedited_image_exactly(tiny_model, plain_run):
    # Writing the same values back into the cond half (cat of the unchanged halves) is exact.
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=2, steps=STEPS), editors=[_Editor(lambda s, t, a: a)])
    assert torch.equal(states[-1].latent, plain_run[-1].latent)
    np.testing.assert_array_equal(np.asarray(states[-1].image), np.asarray(plain_run[-1].image))


def test_edit_at_one_site_and_step_changes_only_what_follows(tiny_model, plain_run):
    edited = generate(
        tiny_model, GenerationConfig(PROMPT, seed=2, steps=STEPS),
        editors=[_Editor(lambda s, t, a: -3 * a, sites=["mid_block.attentions.0"], steps={1})],
    )
    assert torch.equal(edited[0].latent, plain_run[0].latent)  # step 0 ran unedited
    for step in (1, 2):
        assert (edited[step].latent - plain_run[step].latent).abs().max() > 1e-3, step


def test_edit_on_steps_that_never_run_changes_nothing(tiny_model, plain_run):
    edited = generate(
        tiny_model, GenerationConfig(PROMPT, seed=2, steps=STEPS),
        editors=[_Editor(lambda s, t, a: torch.zeros_like(a), steps={STEPS, 100})],
    )
    assert torch.equal(edited[-1].latent, plain_run[-1].latent)


def test_edit_writes_only_the_cond_half_in_the_original_dtype(tiny_model, embeds):
    site = "up_blocks.1.attentions.1"
    module = tiny_model.unet.get_submodule(f"{site}.transformer_blocks.0.attn1")
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    seen = []
    with edit(tiny_model.unet, [site], lambda s, t, a: torch.full(a.shape, 0.5, dtype=torch.float64)):
        # registered after the edit's hook, so it sees the output the rest of the UNet gets
        handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        try:
            _unet_call(tiny_model, embeds, latent)
        finally:
            handle.remove()
    with capture(tiny_model.unet, [site], split_guidance=False) as plain:
        _unet_call(tiny_model, embeds, latent)
    out = seen[0]
    assert out.dtype == torch.float32 and out.shape[0] == 2
    assert torch.equal(out[1], torch.full_like(out[1], 0.5))
    assert torch.equal(out[0], plain.values[(site, 0)][0])  # uncond half untouched


def test_edit_returning_the_wrong_shape_raises(tiny_model):
    with pytest.raises(RuntimeError, match=r"down_blocks.0.attentions.0: edit returned shape \(1, 63, 8\), expected \(1, 64, 8\)"):
        generate(
            tiny_model, GenerationConfig(PROMPT, seed=2, steps=STEPS),
            editors=[_Editor(lambda s, t, a: a[:, 1:], sites=["down_blocks.0.attentions.0"])],
        )
    assert attached_hooks(tiny_model.unet) == 0


def test_hook_sites_counts_unet_calls(tiny_model, embeds):
    steps_seen = []
    with hook_sites(tiny_model.unet, ["mid_block.attentions.0"], lambda s, t, a: steps_seen.append(t)) as counter:
        assert counter.step == -1
        for _ in range(3):
            _unet_call(tiny_model, embeds, torch.zeros((1, 4, 8, 8)))
    assert steps_seen == [0, 1, 2] and counter.step == 2
