"""load_model: the tiny alias, and errors that say what to do; the offline word tokenizer; lazy imports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_scene.models import ALIASES, PAPER_GUIDANCE, SD14_ID, SETTINGS_FILE, ModelLoadError, load_model, word_tokenizer
from ldm_scene.sites import SITE_KEYS
from ldm_scene.testing import TINY_WORDS, tiny_pipeline


def test_tiny_alias_is_float32_on_cpu(tiny_model):
    assert tiny_model.model_id == "tiny"
    assert tiny_model.device.type == "cpu" and tiny_model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tiny_model.pipe.vae.parameters())
    assert tiny_model.pipe.text_encoder.dtype == torch.float32
    assert tiny_model.vae_scale_factor == 4 and tiny_model.image_size == (32, 32)  # 3 VAE levels, 8x8 latent
    assert type(tiny_model.pipe.scheduler).__name__ == "LMSDiscreteScheduler"  # the paper's
    assert tiny_model.pipe.safety_checker is None
    assert [i.key for i in tiny_model.sites()] == list(SITE_KEYS)
    assert tiny_model.site("up_blocks.2.attentions.1").tokens == 16


def test_tiny_models_are_reproducible_without_the_global_rng():
    torch.manual_seed(123)
    a = tiny_pipeline()
    torch.manual_seed(456)
    b = tiny_pipeline()
    for (name, pa), pb in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(next(tiny_pipeline(seed=1).unet.parameters()), next(a.unet.parameters()))
    # the same function too, not only the same weights: the tokenizer's ids must not move either
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    emb_a = a.encode_prompt("a red cat", "cpu", 1, False)[0]
    emb_b = b.encode_prompt("a red cat", "cpu", 1, False)[0]
    assert torch.equal(emb_a, emb_b)


def test_dtype_argument_is_applied():
    model = load_model("tiny", device="cpu", dtype=torch.float64)
    assert model.dtype == torch.float64 and model.pipe.vae.dtype == torch.float64


def test_aliases():
    assert ALIASES["sd14"] == SD14_ID == "CompVis/stable-diffusion-v1-4"
    assert Path(ALIASES["toy"]).name == "toy-scenes"


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name(name):
    with pytest.raises(ModelLoadError, match="model name is empty: give a Hub id, a local directory"):
        load_model(name, device="cpu")


def test_missing_local_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist or is not a directory"):
        load_model(str(missing), device="cpu")


def test_dir_without_model_index_says_what_a_model_dir_holds(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a diffusers model directory \(no model_index.json\).*unet/, vae/"):
        load_model(str(tmp_path), device="cpu")


def test_broken_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json is not valid JSON"):
        load_model(str(tmp_path), device="cpu")


def test_local_dir_round_trip(tmp_path, tiny_model):
    """A saved pipeline loads from its directory; its id is the directory name, not the checkout path."""
    target = tmp_path / "my-model"
    tiny_model.pipe.save_pretrained(target)
    loaded = load_model(str(target), device="cpu")
    assert loaded.model_id == "my-model"
    assert loaded.pipe.safety_checker is None and loaded.dtype == torch.float32
    for (name, pa), pb in zip(tiny_model.unet.named_parameters(), loaded.unet.parameters()):
        assert torch.equal(pa, pb), name
    # an incomplete directory fails with the local message, not the Hub one
    shutil.rmtree(target / "unet")
    with pytest.raises(ModelLoadError, match="could not load the model in"):
        load_model(str(target), device="cpu")


def test_a_model_directory_may_recommend_its_guidance(tmp_path, tiny_model):
    """Without ldm_scene.json a model generates at the paper's 7.5; with one, at the scale it names;
    a broken or out-of-range file is refused with the file's name, not silently ignored."""
    target = tmp_path / "m"
    tiny_model.pipe.save_pretrained(target)
    assert tiny_model.default_guidance == PAPER_GUIDANCE == 7.5
    assert load_model(str(target), device="cpu").default_guidance == 7.5
    assert tiny_model.late_guidance is None
    (target / SETTINGS_FILE).write_text(json.dumps({"guidance": 4}))
    loaded = load_model(str(target), device="cpu")
    assert (loaded.default_guidance, loaded.late_guidance) == (4.0, None)
    (target / SETTINGS_FILE).write_text(json.dumps({"guidance": 7.5, "late_guidance": 2.5, "late_from": 0.8}))
    loaded = load_model(str(target), device="cpu")
    assert (loaded.default_guidance, loaded.late_guidance, loaded.late_from) == (7.5, 2.5, 0.8)
    for text, message in (("{oops", "not valid JSON"), ("[4]", "must hold a JSON object"),
                          ('{"guidance": 31}', "guidance must be a number between 0 and 30"),
                          ('{"guidance": "high"}', "between 0 and 30"),
                          ('{"late_guidance": -1}', "late_guidance must be a number between 0 and 30"),
                          ('{"late_from": 2}', "late_from must be a number between 0 and 1")):
        (target / SETTINGS_FILE).write_text(text)
        with pytest.raises(ModelLoadError, match=message) as info:
            load_model(str(target), device="cpu")
        assert SETTINGS_FILE in str(info.value)


def test_the_toy_model_ships_the_guidance_its_sweep_chose():
    """weights/toy-scenes/ldm_scene.json holds the row of its guidance sweep (guidance.json, seeds apart
    from the report's) that the sweep's stated rule picks, and the loaded toy model generates with it."""
    from ldm_scene.toy.report import sweep_choice

    toy = Path(ALIASES["toy"])
    pick = sweep_choice(json.loads((toy / "guidance.json").read_text()))
    settings = json.loads((toy / SETTINGS_FILE).read_text())
    model = load_model("toy", device="cpu")
    assert settings["guidance"] == pick["guidance"] == model.default_guidance
    assert settings["late_guidance"] == pick["late_guidance"] == model.late_guidance
    if pick["late_guidance"] is not None:
        assert settings["late_from"] == pytest.approx(pick["late_from"]) and model.late_from == pytest.approx(pick["late_from"])


def test_hub_id_offline_says_how_to_get_weights_and_offers_the_toy_model():
    name = "ldm-scene-tests/no-such-model"  # never in a cache, so this cannot start a 4 GB load
    with pytest.raises(ModelLoadError) as info:
        load_model(name, device="cpu")
    msg = str(info.value)
    assert f"weights for '{name}' are not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg  # conftest set it: the message names the cause
    assert f"hf download {name}" in msg and "--model toy" in msg
    # the command the message tells the user to run exists in this environment
    assert (Path(sys.executable).parent / "hf").exists()


def test_word_tokenizer_makes_each_word_one_token():
    words = TINY_WORDS + ["sphere", "cylinder", "torus", "yellow"]
    tok = word_tokenizer(words, max_length=20)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos) == (0, 1) and tok.model_max_length == 20
    ids = tok(" ".join(words)).input_ids
    assert ids[0] == bos and ids[-1] == eos and len(ids) == len(words) + 2
    assert len(set(ids[1:-1])) == len(set(words))  # distinct words, distinct tokens
    for word in words:
        assert len(tok(word).input_ids) == 3, word
        assert tok.decode(tok(word).input_ids[1:-1]).strip() == word
    assert tok("Red CUBE").input_ids == tok("red cube").input_ids  # CLIP lowercases


def test_word_tokenizer_splits_unknown_words_but_never_fails():
    tok = word_tokenizer(["cat", "dog"], max_length=77)
    ids = tok("zebra 42").input_ids[1:-1]
    assert len(ids) > 2  # falls apart into pieces
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == "zebra42"


def test_word_tokenizer_is_deterministic():
    a = word_tokenizer(["red", "cube", "on", "left"], 16)
    b = word_tokenizer(["left", "on", "cube", "red", "red"], 16)
    assert a.get_vocab() == b.get_vocab()
    assert json.dumps(a("a red cube").input_ids) == json.dumps(b("a red cube").input_ids)


def test_word_tokenizer_one_token_per_word_with_overlapping_words():
    """Words that share prefixes, suffixes and inner pairs ("at", "cat", "cabc", "bca") still come out whole."""
    import random

    rng = random.Random(0)
    for _ in range(30):
        words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 25))]
        tok = word_tokenizer(words, 77)
        split = [w for w in set(words) if len(tok(w).input_ids) != 3]
        assert not split, (sorted(set(words)), split)


def test_pndm_as_sd14_ships_it_is_replaced_by_the_papers_lms(tmp_path, tiny_model):
    """SD v1.4's repository ships PNDM, which calls the UNet 16 times for 15 steps; loading swaps in LMS
    (the paper's) so that step i is the i-th UNet call, and keeps any other scheduler."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    from ldm_scene.sampler import GenerationConfig, sample

    pndm = PNDMScheduler.from_config(tiny_model.pipe.scheduler.config, skip_prk_steps=True)
    pndm.set_timesteps(15)
    assert len(pndm.timesteps) == 16  # why it must not stay
    def ship(scheduler) -> Path:
        scheduler.save_pretrained(tmp_path / "sd-like" / "scheduler")
        index = json.loads((tmp_path / "sd-like" / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (tmp_path / "sd-like" / "model_index.json").write_text(json.dumps(index))
        return tmp_path / "sd-like"

    tiny_model.pipe.save_pretrained(tmp_path / "sd-like")
    from diffusers import StableDiffusionPipeline

    assert type(StableDiffusionPipeline.from_pretrained(ship(pndm)).scheduler) is PNDMScheduler  # as diffusers loads it
    loaded = load_model(str(tmp_path / "sd-like"), device="cpu")
    assert type(loaded.pipe.scheduler).__name__ == "LMSDiscreteScheduler"
    assert loaded.pipe.scheduler.config.beta_schedule == pndm.config.beta_schedule
    assert len(list(sample(loaded, GenerationConfig("a cube", 0, 15), previews=False))) == 15

    euler = ship(EulerDiscreteScheduler.from_config(pndm.config))
    assert type(load_model(str(euler), device="cpu").pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_importing_the_core_imports_neither_diffusers_nor_transformers():
    # They take seconds to import (diffusers reaches torch._dynamo); they are imported where a model
    # is built, so importing the package stays cheap. A fresh interpreter: this one has them already.
    code = ("import sys, ldm_scene, ldm_scene.models, ldm_scene.capture, ldm_scene.readout; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'gradio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_testing_imports_nothing_from_models():
    """ldm_scene.testing builds the tiny model that models.load_model("tiny") returns: no import cycle."""
    import ast
    from pathlib import Path

    import ldm_scene.testing

    tree = ast.parse(Path(ldm_scene.testing.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "models" not in imported and "ldm_scene.models" not in imported, imported
