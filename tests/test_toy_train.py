"""``python -m ldm_scene.toy train`` end to end at a tiny size: every stage runs, the result loads as
a model with SD v1.4's site names, an interrupted UNet stage resumes from its checkpoint, and the
timings keep what finished stages cost."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_scene.sites import SITE_KEYS

pytestmark = pytest.mark.slow


def _plan(**kw):
    from ldm_scene.toy.train import TrainPlan

    return TrainPlan(**({"n_train": 40, "n_heldout": 8, "ae_steps": 2, "ae_batch": 4, "decoder_steps": 2, "labeler_steps": 1,
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
