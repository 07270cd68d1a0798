"""The toy world v2 as a user meets it: prompts never say where, the noise places the object, the
model runs unchanged through plain diffusers with its own guidance schedule, and the labelers that
judge generated images hold their floors on fresh renders with exact labels."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_scene import metrics
from ldm_scene.models import TOY_MODEL_DIR, load_model
from ldm_scene.toy.render import PLACE_WORDS, PROMPT_WORDS

pytestmark = pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").exists(), reason="toy model not shipped")

#: Fresh seeds, apart from training (0..39,999), held-out (10M), reports (20M-60M) and test_toy_model (40M).
FRESH_SEED0 = 70_000_000


@pytest.fixture(scope="module")
def toy():
    return load_model("toy", device="cpu")


def test_the_shipped_vocabulary_has_no_place_word():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOY_MODEL_DIR / "tokenizer")
    # Word-final tokens include BPE pieces ("ellow", "phere"), so ask the tokenizer how it splits words:
    # every prompt word is one token of its own, and no place word is (it falls apart into letters).
    for word in PROMPT_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    for word in PLACE_WORDS:
        assert tokenizer.tokenize(word) != [word + "</w>"], word
        assert word + "</w>" not in tokenizer.get_vocab(), word


def test_plain_diffusers_with_the_models_guidance_schedule_equals_the_generate_command(toy, tmp_path):
    """``python -m ldm_scene generate`` is plain diffusers: StableDiffusionPipeline with a step-end
    callback that lowers guidance as the model's ldm_scene.json says draws the same image."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ldm_scene.__main__ import main

    settings = json.loads((TOY_MODEL_DIR / "ldm_scene.json").read_text())
    steps, seed, prompt = 15, FRESH_SEED0, "a green cone"
    assert main(["generate", "--model", "toy", "--prompt", prompt, "--seed", str(seed), "--out", str(tmp_path)]) == 0
    ours = np.asarray(Image.open(tmp_path / "image.png")).astype(int)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["guidance"], summary["late_guidance"]) == (settings["guidance"], settings.get("late_guidance"))

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    late_step = round(settings.get("late_from", 1.0) * steps)
    lowered = []

    def lower_late(pipeline, step, timestep, kwargs):
        # Runs after step ``step``; what it sets is the scale of step + 1.
        if settings.get("late_guidance") is not None and step + 1 >= late_step:
            pipeline._guidance_scale = min(settings["guidance"], settings["late_guidance"])
            lowered.append(step + 1)
        return kwargs

    generator = torch.Generator().manual_seed(seed)
    plain = pipe(prompt, num_inference_steps=steps, guidance_scale=settings["guidance"], generator=generator,
                 callback_on_step_end=lower_late, output_type="np").images[0]
    plain = np.round(plain * 255).astype(int)
    if settings.get("late_guidance") is not None:
        assert lowered and lowered[0] == late_step
    assert np.abs(plain - ours).max() <= 2, np.abs(plain - ours).max()
    # Without the schedule the image differs: the comparison has power.
    generator = torch.Generator().manual_seed(seed)
    constant = pipe(prompt, num_inference_steps=steps, guidance_scale=settings["guidance"], generator=generator,
                    output_type="np").images[0]
    if settings.get("late_guidance") is not None:
        assert np.abs(np.round(constant * 255).astype(int) - ours).max() > 2


def test_the_noise_not_the_prompt_places_the_object(toy):
    """The issue's done criterion: one prompt, different seeds, the object in different places."""
    from ldm_scene.sampler import config_for, sample
    from ldm_scene.toy.nets import ToyLabeler
    from ldm_scene.toy.quality import mask_centroid

    labeler = ToyLabeler.load(TOY_MODEL_DIR / "labelers")
    centroids = []
    for seed in range(FRESH_SEED0, FRESH_SEED0 + 10):
        image = np.asarray([s.image for s in sample(toy, config_for(toy, "a red cube", seed))][-1])
        centroid = mask_centroid(labeler(image)["mask"][0])
        assert centroid is not None, f"seed {seed}: no object"
        centroids.append(centroid)
    x = np.array([c[0] for c in centroids])
    # The renderer's own centroid x has sd ~0.19; a prompt that decides the place gives ~0.02 (v1).
    assert x.std() > 0.08, x
    assert len(set(np.minimum((x * 3).astype(int), 2))) >= 2, x


@pytest.fixture(scope="module")
def renders():
    from ldm_scene.toy.render import render_batch

    return render_batch(range(FRESH_SEED0, FRESH_SEED0 + 80))


def test_labelers_hold_their_floors_on_fresh_renders(renders):
    """The report's targets, with margin for 80 images: Dice >= 0.95, depth and shading Spearman
    >= 0.95 and >= 0.9 (REPORT.md measures 500), shape classifier >= 95%."""
    from ldm_scene.toy.nets import ToyClassifier, ToyLabeler

    labels = ToyLabeler.load(TOY_MODEL_DIR / "labelers")(renders["image"])
    assert metrics.mean_dice(labels["mask"], renders["mask"]) >= 0.93
    assert metrics.mean_spearman(labels["depth"], renders["depth"]) >= 0.92
    assert metrics.mean_spearman(labels["shading"], renders["shading"]) >= 0.88
    probs = ToyClassifier.load(TOY_MODEL_DIR / "labelers").probabilities(renders["image"])
    assert (probs.argmax(1) == renders["shape"]).mean() >= 0.93
