"""Per-word cross-attention maps (ldm_scene.attention) on the tiny random SD-layout model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_scene.attention import AttentionError, AttentionReader, WordMaps, attention_reader, grid_of, word_tokens
from ldm_scene.capture import attached_hooks, attention_probabilities, hook_attention
from ldm_scene.sampler import GenerationConfig, generate, sample
from ldm_scene.sites import SITE_KEYS, module_path

PROMPT = "a photo of a blue dog"
STEPS = 3


class Boom(Exception):
    pass


def test_recomputed_probabilities_reproduce_the_modules_own_output(tiny_model):
    """The maps are the ones the UNet used: probs @ V through to_out gives attn2's actual output."""
    seen = {}
    site = "up_blocks.2.attentions.0"
    attn = tiny_model.unet.get_submodule(module_path(site, "attn2"))

    def keep(module, args, kwargs, output):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs.get("encoder_hidden_states")
        seen["output"] = output

    handle = attn.register_forward_hook(keep, with_kwargs=True)
    try:
        generate(tiny_model, GenerationConfig(PROMPT, seed=3, steps=1), decode_final=False)
    finally:
        handle.remove()
    hidden, context = seen["hidden"], seen["context"]
    assert context is not None and context.shape[0] == 2  # [uncond, cond]
    probs = attention_probabilities(attn, hidden, context)  # [2, heads, T, L]
    v = attn.to_v(context)
    b, heads = v.shape[0], attn.heads
    v = v.view(b, -1, heads, v.shape[-1] // heads).transpose(1, 2)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, v.shape[1] * v.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    torch.testing.assert_close(out, seen["output"], rtol=1e-4, atol=1e-5)


def test_probabilities_sum_to_one_over_tokens_and_only_the_conditional_half_is_read(tiny_model):
    got, inputs = {}, {}
    sites = ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.3.attentions.2")

    def keep_inputs(module, args, kwargs):
        inputs[module] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])

    handles = [tiny_model.unet.get_submodule(module_path(s, "attn2")).register_forward_pre_hook(
        keep_inputs, with_kwargs=True) for s in sites]
    try:
        with hook_attention(tiny_model.unet, sites, lambda site, step, p: got.setdefault((site, step), p),
                            steps=[1]) as counter:
            generate(tiny_model, GenerationConfig(PROMPT, seed=4, steps=2), decode_final=False)
    finally:
        for h in handles:
            h.remove()
    assert counter.step == 1
    assert set(got) == {(s, 1) for s in sites}  # the step filter holds
    table = {info.key: info for info in tiny_model.sites()}
    max_len = tiny_model.pipe.tokenizer.model_max_length
    for site in sites:
        p = got[(site, 1)]
        info = table[site]
        attn = tiny_model.unet.get_submodule(module_path(site, "attn2"))
        assert p.shape == (1, attn.heads, info.height * info.width, max_len)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
        hidden, context = inputs[attn]  # the last step's inputs: [uncond, cond]
        cond = attention_probabilities(attn, hidden.chunk(2)[1], context.chunk(2)[1])
        uncond = attention_probabilities(attn, hidden.chunk(2)[0], context.chunk(2)[0])
        torch.testing.assert_close(p, cond)
        assert not torch.allclose(p, uncond)


def test_word_maps_per_step_have_each_sites_grid_and_hold_the_words_share(tiny_model):
    reader = attention_reader(tiny_model, PROMPT)
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=5, steps=STEPS), readers=[reader], decode_final=False)
    table = {info.key: info for info in tiny_model.sites()}
    assert reader.tokens.words == tuple(PROMPT.split())
    assert reader.tokens.positions == tuple((i + 1,) for i in range(len(PROMPT.split())))
    for state in states:
        maps = state.readouts["attention"]
        assert isinstance(maps, WordMaps) and maps.words == tuple(PROMPT.split())
        assert list(maps.per_site) == list(SITE_KEYS)
        for site, m in maps.per_site.items():
            assert m.shape == (6, table[site].height, table[site].width), site
            assert (m >= 0).all() and (m <= 1 + 1e-6).all()
            # the words take part of each image token's attention; start/end/padding take the rest
            assert (m.sum(0) <= 1 + 1e-5).all() and (m.sum(0) < 1 - 1e-3).any()
        mean = maps.mean()
        assert mean.shape == (6, 8, 8)  # the finest grid
        assert maps.mean((32, 32)).shape == (6, 32, 32)
    # the maps change with the step (they are read live, not once)
    first, last = states[0].readouts["attention"], states[-1].readouts["attention"]
    assert not np.allclose(first.per_site["up_blocks.3.attentions.0"], last.per_site["up_blocks.3.attentions.0"])


def test_the_same_word_twice_gets_two_maps_and_words_split_into_pieces_keep_all_of_them(tiny_model):
    tok = tiny_model.pipe.tokenizer
    wt = word_tokens(tok, "a cat a zebra")
    assert wt.words == ("a", "cat", "a", "zebra")
    assert wt.positions[0] == (1,) and wt.positions[2] == (3,)
    zebra = tok("zebra", add_special_tokens=False).input_ids
    assert len(zebra) > 1  # not in the tiny vocabulary: it falls apart into pieces
    assert wt.positions[3] == tuple(range(4, 4 + len(zebra)))


def test_words_past_the_context_are_dropped(tiny_model):
    tok = tiny_model.pipe.tokenizer
    prompt = " ".join(["red"] * (tok.model_max_length + 5))
    wt = word_tokens(tok, prompt)
    assert len(wt.words) == tok.model_max_length - 2  # start and end tokens take two places
    assert max(wt.positions[-1]) == tok.model_max_length - 2


def test_hooks_are_removed_after_an_error_and_after_an_early_close(tiny_model):
    class Failing(AttentionReader):
        def read(self, site, step, probs):
            if step == 1:
                raise Boom("reader failed")
            super().read(site, step, probs)

    reader = Failing(word_tokens(tiny_model.pipe.tokenizer, PROMPT))
    with pytest.raises(Boom):
        generate(tiny_model, GenerationConfig(PROMPT, seed=6, steps=STEPS), readers=[reader], decode_final=False)
    assert attached_hooks(tiny_model.unet) == 0

    stream = sample(tiny_model, GenerationConfig(PROMPT, seed=6, steps=STEPS),
                    readers=[attention_reader(tiny_model, PROMPT)])
    next(stream)
    assert attached_hooks(tiny_model.unet) > 0
    stream.close()
    assert attached_hooks(tiny_model.unet) == 0


def test_unguided_runs_read_the_whole_batch(tiny_model):
    reader = attention_reader(tiny_model, PROMPT, sites=["mid_block.attentions.0"])
    states = generate(tiny_model, GenerationConfig(PROMPT, seed=7, steps=2, guidance=1.0), readers=[reader],
                      decode_final=False)
    assert states[-1].readouts["attention"].per_site["mid_block.attentions.0"].shape == (6, 1, 1)


def test_bad_sites_and_grids_are_refused(tiny_model):
    tokens = word_tokens(tiny_model.pipe.tokenizer, PROMPT)
    with pytest.raises(AttentionError, match="unknown site"):
        AttentionReader(tokens, ["nowhere"])
    with pytest.raises(AttentionError, match="at least one site"):
        AttentionReader(tokens, [])
    with pytest.raises(AttentionError, match="grid"):
        grid_of(7, 1.0)
    assert grid_of(64, 1.0) == (8, 8) and grid_of(32, 2.0) == (4, 8) and grid_of(12, 4 / 3) == (3, 4)


def test_the_sd14_layout_has_a_cross_attention_module_at_every_site(sd14_unet):
    for site in SITE_KEYS:
        attn = sd14_unet.get_submodule(module_path(site, "attn2"))
        assert attn.to_k.in_features == 768 and attn.heads == 8
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross
    with hook_attention(sd14_unet, SITE_KEYS, lambda *a: None):
        assert attached_hooks(sd14_unet) == 17  # 16 sites and the step counter
    assert attached_hooks(sd14_unet) == 0


def test_a_reader_that_reads_something_unknown_is_refused_before_any_hook(tiny_model):
    class Odd:
        name, sites, steps, reads = "odd", ("mid_block.attentions.0",), None, "gradients"

        def read(self, site, step, x):
            pass

        def collect(self, step):
            return None

    with pytest.raises(ValueError, match="reads 'gradients'"):
        generate(tiny_model, GenerationConfig(PROMPT, seed=1, steps=1), readers=[Odd()], decode_final=False)
    assert attached_hooks(tiny_model.unet) == 0
