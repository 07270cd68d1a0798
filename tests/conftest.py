"""Shared fixtures: offline mode, one thread, and the tiny / empty-weight models built once per session.

diffusers and transformers cost ~10 s to import on this machine, so every test module imports them
through these session fixtures (or after this file has run) and never in a subprocess.
"""
from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: it reads the flag once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models do many tiny matmuls; on 2 cores shared with other jobs, intra-op threads only
# contend (measured: a 4-step tiny generation took ~2 s with 2 threads and ~0.25 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random-weight pipeline (SD v1.4's 16 site names), on the CPU in float32."""
    from ldm_scene.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def sd14_unet():
    """SD v1.4's full-size UNet from its published config, on the meta device (no weights)."""
    from ldm_scene.testing import sd14_unet_empty

    return sd14_unet_empty()


@pytest.fixture(autouse=True)
def _no_hook_leaks(request):
    """Every test that touches the shared tiny model must leave no hook on its UNet."""
    yield
    if "tiny_model" in request.fixturenames:
        from ldm_scene.capture import attached_hooks

        model = request.getfixturevalue("tiny_model")
        assert attached_hooks(model.unet) == 0, "a test left hooks on the shared tiny UNet"
