"""``python -m ldm_scene.toy train`` end to end at a tiny size: every stage runs, the result loads as
a model with SD v1.4's site names, an interrupted UNet stage resumes from its checkpoint, and the
timings keep what finished stages cost."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ldm_scene.sites import SITE_KEYS



def _plan(**kw):
    from ldm_scene.toy.train import TrainPlan

    return TrainPlan(**({"n_train": 40, "n_heldout": 8, "ae_steps": 2, "ae_batch": 4, "decoder_steps": 2, "decoder_batch": 4, "labeler_steps": 1,
                         "classifier_steps": 1, "aux_batch": 4, "unet_steps": 2, "unet_batch": 4,
                         "checkpoint_every": 1} | kw))


def test_train_all_builds_a_loadable_model_and_resumes(tmp_path):
    from ldm_scene.models import load_model
    from ldm_scene.toy.train import train_all

    work = tmp_path / "work"
    first = train_all(tmp_path / "out-a", work, _plan(unet_steps=2))
    assert {"render_s", "autoencoder_s", "decoder_s", "labelers_s", "unet_s"} <= set(first)
    state = torch.load(work / "unet_checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2 and state["seconds"] > 0

    # A longer plan into a new folder picks up the checkpoint: 2 more steps, not 4, and the
    # cached stages (renders, autoencoder, labelers) add no time.
    second = train_all(tmp_path / "out-b", work, _plan(unet_steps=4), stages=("unet",))
    state = torch.load(work / "unet_checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert second["render_s"] == first["render_s"] and second["autoencoder_s"] == first["autoencoder_s"]
    assert second["decoder_s"] == first["decoder_s"]
    assert second["unet_s"] > first["unet_s"]
    assert len(json.loads((work / "unet_losses.json").read_text())) == 1  # every 10th of 4 losses

    model = load_model(str(tmp_path / "out-b"), device="cpu")
    assert [s.key for s in model.sites()] == list(SITE_KEYS)
    assert (tmp_path / "out-a" / "labelers" / "labeler.safetensors").exists()
    assert json.loads((tmp_path / "out-b" / "train_plan.json").read_text())["unet_steps"] == 4


def test_unknown_stage_is_refused(tmp_path):
    from ldm_scene.toy.train import train_all

    with pytest.raises(ValueError, match="unknown stage"):
        train_all(tmp_path / "out", tmp_path / "work", _plan(), stages=("unet", "paint"))


def test_decoder_finetune_keeps_the_latents_and_ships_the_tuned_decoder(tmp_path):
    """The decoder stage trains the decoder alone: the encoder, hence every latent the UNet was
    trained on, is unchanged, and the shipped model decodes with the tuned decoder."""
    from diffusers import AutoencoderTiny

    from ldm_scene.toy.train import train_all

    work = tmp_path / "work"
    train_all(tmp_path / "out", work, _plan(decoder_steps=3))
    base = AutoencoderTiny.from_pretrained(work / "vae")
    tuned = AutoencoderTiny.from_pretrained(work / "vae_tuned")
    shipped = AutoencoderTiny.from_pretrained(tmp_path / "out" / "vae")
    for name, value in base.encoder.state_dict().items():
        assert torch.equal(value, tuned.encoder.state_dict()[name]), name
    changed = [n for n, v in base.decoder.state_dict().items() if not torch.equal(v, tuned.decoder.state_dict()[n])]
    assert changed, "three optimiser steps left the decoder as it was"
    for name, value in tuned.state_dict().items():
        assert torch.equal(value, shipped.state_dict()[name]), name
    assert torch.load(work / "decoder_checkpoint.pt", weights_only=True)["step"] == 3


def test_decoder_width_trains_a_fresh_wider_decoder_behind_the_same_encoder(tmp_path):
    """``decoder_width`` swaps in a new decoder of that width; the encoder (so the latents) is the
    autoencoder's own, and the result round-trips through diffusers at the model's image size."""
    from diffusers import AutoencoderTiny

    from ldm_scene.toy.train import train_all

    work = tmp_path / "work"
    plan = _plan(decoder_steps=2, decoder_width=48)
    train_all(tmp_path / "out", work, plan, stages=("data", "autoencoder", "decoder"))
    base = AutoencoderTiny.from_pretrained(work / "vae")
    wide = AutoencoderTiny.from_pretrained(work / "vae_tuned")
    assert list(wide.config.decoder_block_out_channels) == [48] * 3
    assert wide.decoder.layers[0].out_channels == 48 != base.decoder.layers[0].out_channels
    for name, value in base.encoder.state_dict().items():
        assert torch.equal(value, wide.encoder.state_dict()[name]), name
    assert wide.config.scaling_factor == base.config.scaling_factor
    size = plan.arch.image_size
    z = torch.randn(1, 4, size // 4, size // 4)
    assert wide.decode(z).sample.shape == (1, 3, size, size)

    # A cached decoder or checkpoint of another width is refused, not silently used.
    with pytest.raises(ValueError, match="vae_tuned holds a decoder 48 channels wide.*64"):
        train_all(tmp_path / "out", work, replace(plan, decoder_width=64), stages=("decoder",))
    (work / "vae_tuned" / "config.json").unlink()
    with pytest.raises(ValueError, match="decoder_checkpoint.pt holds a decoder 48 channels wide.*64"):
        train_all(tmp_path / "out", work, replace(plan, decoder_width=64, decoder_steps=4), stages=("decoder",))


def test_decoder_plan_fields_are_checked():
    from ldm_scene.toy.train import TrainPlan

    with pytest.raises(ValueError, match="decoder_width"):
        TrainPlan(decoder_width=-1)
    with pytest.raises(ValueError, match="decoder_batch"):
        TrainPlan(decoder_batch=0)


def test_high_noise_share_redraws_that_share_of_timesteps_from_the_noisiest_forty_percent():
    from ldm_scene.toy.train import TrainPlan, draw_timesteps

    plain = draw_timesteps(4096, 1000, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(plain, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(1)))
    assert (draw_timesteps(4096, 1000, 1.0, torch.Generator().manual_seed(1)) >= 600).all()
    half = draw_timesteps(4096, 1000, 0.5, torch.Generator().manual_seed(1)).float()
    # 50% from [600, 1000) plus 50% uniform, 40% of which also land there: 70% at t >= 600.
    assert abs((half >= 600).float().mean().item() - 0.7) < 0.03
    with pytest.raises(ValueError, match="unet_high_noise_share"):
        TrainPlan(unet_high_noise_share=1.5)


def test_object_weighted_mse_counts_object_cells_more_and_is_plain_mse_at_zero():
    import torch.nn.functional as F

    from ldm_scene.toy.train import TrainPlan, object_weighted_mse

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    cells = torch.zeros(2, 1, 8, 8)
    cells[..., 2:4, 2:4] = 1.0
    assert torch.allclose(object_weighted_mse(pred, target, cells, 0.0), F.mse_loss(pred, target))
    # An error spread evenly over every cell costs the same at any weight (the loss is normalised).
    even = torch.full_like(pred, 0.5)
    assert torch.allclose(object_weighted_mse(even, torch.zeros_like(pred), cells, 10.0), torch.tensor(0.25))
    # The same error inside the object costs more than outside it, by the weight's ratio.
    inside, outside = torch.zeros_like(pred), torch.zeros_like(pred)
    inside[..., 2, 2] = 1.0
    outside[..., 6, 6] = 1.0
    zero = torch.zeros_like(pred)
    ratio = object_weighted_mse(inside, zero, cells, 10.0) / object_weighted_mse(outside, zero, cells, 10.0)
    assert torch.isclose(ratio, torch.tensor(11.0))
    with pytest.raises(ValueError, match="unet_object_weight"):
        TrainPlan(unet_object_weight=-1.0)


PROMPTS = ["a red cube", "an orange cylinder", "a blue cylinder"]


def test_sampling_weights_multiply_the_factor_per_chosen_word_and_refuse_unknown_words():
    from ldm_scene.toy.train import sampling_weights

    # No word (or only separators) means uniform draws, so runs before oversampling are unchanged.
    assert sampling_weights(PROMPTS, "", 2.0) is None
    assert sampling_weights(PROMPTS, " , ", 2.0) is None
    # Neither word; "cylinder" and "orange" (factor**2); "cylinder" alone.
    weights = sampling_weights(PROMPTS, "cylinder, orange", 2.0)
    assert weights.tolist() == [1.0, 4.0, 2.0]
    # A typo would otherwise silently train uniformly; only the unknown word is named.
    with pytest.raises(ValueError, match=r"\['purple'\]"):
        sampling_weights(PROMPTS, "cylinder,purple", 2.0)

    # The training loop draws with multinomial: each image comes up in proportion to its weight.
    # 20000 draws give a standard error of at most sqrt(0.25 / 20000) = 0.0035 per share, so 0.02
    # is over 5 standard errors, while uniform draws (1/3 each) would miss 4/7 by 0.24.
    draws = torch.multinomial(weights, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(draws, minlength=3).double() / 20_000
    assert torch.allclose(shares, weights / weights.sum(), atol=0.02), shares


def test_train_plan_checks_the_new_options():
    from ldm_scene.toy.train import TrainPlan

    with pytest.raises(ValueError, match="unet_oversample_factor"):
        TrainPlan(unet_oversample_factor=0.0)
    with pytest.raises(ValueError, match="unet_oversample_factor"):
        TrainPlan(unet_oversample_factor=-2.0)
    with pytest.raises(ValueError, match="device"):
        TrainPlan(device="tpu")
    with pytest.raises(ValueError, match="render_processes"):
        TrainPlan(render_processes=0)
    # The plan names a device without touching it, so a CUDA plan can be written (and checked) anywhere.
    for device in ("cpu", "cuda", "cuda:1"):
        assert TrainPlan(device=device).device == device


def test_unet_init_fine_tunes_from_the_shipped_model(tmp_path):
    """One step at a learning rate of ~0 from the shipped model exports the shipped UNet and text
    encoder again, and its first loss is the trained model's, not a random one's."""
    import shutil
    from pathlib import Path

    import numpy as np
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm_scene.toy.model import ToyArch, build_unet
    from ldm_scene.toy.train import HELDOUT_SEED0, _render_chunk, train_all

    shipped = Path("weights/toy-scenes")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    # Renders written where train_all caches them: a spawned render pool costs ~6 s to start here.
    np.savez(work / "train.npz", **_render_chunk(list(range(32))))
    np.savez(work / "heldout.npz", **_render_chunk(list(range(HELDOUT_SEED0, HELDOUT_SEED0 + 8))))
    # The shipped autoencoder as both the base and the tuned one, so no autoencoder stage trains
    # and the latents are those the shipped UNet was trained on.
    for name in ("vae", "vae_tuned"):
        shutil.copytree(shipped / "vae", work / name)
    plan = _plan(n_train=32, n_heldout=8, unet_steps=1, unet_batch=8, unet_lr=1e-12, unet_threads=1)
    train_all(out, work, plan, ("unet",), unet_init=shipped)

    def max_diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    unet = UNet2DConditionModel.from_pretrained(shipped / "unet").state_dict()
    text = CLIPTextModel.from_pretrained(shipped / "text_encoder").state_dict()
    # The EMA starts at the init weights and the step is ~1e-14 in size: float32 cannot tell.
    assert max_diff(UNet2DConditionModel.from_pretrained(out / "unet").state_dict(), unet) < 1e-6
    assert max_diff(CLIPTextModel.from_pretrained(out / "text_encoder").state_dict(), text) < 1e-6
    # The comparison has power: a fresh UNet of the same layout is nowhere near the shipped one.
    with torch.random.fork_rng():
        assert max_diff(build_unet(ToyArch()).state_dict(), unet) > 1e-2

    # Measured with this plan: the shipped model's first loss is ~0.02, a random init's ~1.1.
    first_loss = json.loads((work / "unet_losses.json").read_text())[0]
    assert first_loss < 0.2

    # Once a checkpoint exists the run resumes from it and ignores ``init``: a folder that does not
    # exist would fail to load if it were read.
    shutil.rmtree(out)
    train_all(out, work, replace(plan, unet_steps=2), ("unet",), unet_init=tmp_path / "missing")
    assert torch.load(work / "unet_checkpoint.pt", weights_only=True)["step"] == 2


def test_cli_passes_unet_init_and_string_plan_fields_to_train_all(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from ldm_scene.toy import __main__ as cli
    from ldm_scene.toy import command

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--unet-init", "--unet-oversample", "--unet-oversample-factor", "--device", "--render-processes"):
        assert flag in usage, flag

    calls = []
    monkeypatch.setattr(command, "train_all", lambda out, work, plan, stages, unet_init=None, labelers_init=None: calls.append((plan, unet_init)) or {})
    common = ["train", "--no-report", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert cli.main(common + ["--unet-init", "weights/toy-scenes", "--unet-oversample", "cylinder,orange",
                              "--unet-oversample-factor", "3", "--device", "cuda:1"]) == 0
    assert cli.main(common) == 0
    (tuned, init), (plain, no_init) = calls
    assert (tuned.unet_oversample, tuned.unet_oversample_factor, tuned.device) == ("cylinder,orange", 3.0, "cuda:1")
    assert init == Path("weights/toy-scenes")
    # Without the flags the plan keeps its defaults and the UNet starts from scratch.
    assert (plain.unet_oversample, plain.device, no_init) == ("", "cpu", None)


def test_text_encoder_init_carries_each_word_over_to_another_vocabulary(tmp_path):
    """A v1 text encoder (with place words) starts a v2 one (without): every word both tokenizers
    know keeps its learned embedding under its new id; the rest of the weights load unchanged."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_scene.models import word_tokenizer
    from ldm_scene.toy.train import load_text_encoder_by_word

    def encoder(vocab_size: int) -> CLIPTextModel:
        return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    old_tok = word_tokenizer(["a", "red", "cube", "on", "the", "left"], max_length=8)
    new_tok = word_tokenizer(["a", "red", "cube", "blue"], max_length=8)
    torch.manual_seed(0)
    old = encoder(len(old_tok))
    old.save_pretrained(tmp_path / "text_encoder")
    old_tok.save_pretrained(tmp_path / "tokenizer")
    new = encoder(len(new_tok))
    key = next(k for k in new.state_dict() if k.endswith("token_embedding.weight"))
    fresh = new.state_dict()[key].clone()
    load_text_encoder_by_word(new, new_tok, tmp_path)
    old_rows, new_rows = old.state_dict()[key], new.state_dict()[key]
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    for word in ("red</w>", "cube</w>", "a</w>"):
        assert torch.equal(new_rows[new_vocab[word]], old_rows[old_vocab[word]]), word
    assert torch.equal(new_rows[new_vocab["blue</w>"]], fresh[new_vocab["blue</w>"]])  # unknown before: kept fresh
    assert new_vocab["red</w>"] != old_vocab["red</w>"]  # the ids did move: the test has power
    other = {k: v for k, v in new.state_dict().items() if k != key}
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in other.items())
