"""Shared fixtures and the test tiers: offline mode, one thread, the tiny / empty-weight models built
once per session, and the fast / slow split.

Tiers (as diffusers gates its slow tests with ``RUN_SLOW``):

- **fast** (the default run, ``pytest -q -p no:cacheprovider``): unit tests on tiny random models
  and small integration tests;
- **slow** (marked ``slow`` here, by file or by test): anything that loads the shipped toy model end
  to end, trains, serves the app to concurrent clients, drives a browser or builds the Dockerfile's
  environment. Run them with ``RUN_SLOW=1`` (everything: what CI runs) or ``-m slow`` (only them).

Test modules never import each other: shared helpers are fixtures here or live in
:mod:`ldm_scene.testing`. diffusers and transformers cost ~10 s to import on this machine, so every
test module imports them through these session fixtures (or after this file has run) and never in a
subprocess.
"""
from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="module")
def tiny_service(tiny_model, tmp_path_factory):
    """The app's service on the tiny model with random probes and a colour classifier, one per test
    module (each module's sessions stay its own)."""
    from ldm_scene.testing import ColourClassifier, write_probe_dir
    from ldm_scene.ui.service import Service

    svc = Service.load("tiny", write_probe_dir(tiny_model, tmp_path_factory.mktemp("probes")), device="cpu",
                       classifier=ColourClassifier())
    svc.model = tiny_model  # the session's tiny model, so the hook-leak check covers the service's work
    return svc


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


# --- tiers ------------------------------------------------------------------------------------

#: Whole files in the slow tier: the shipped toy model end to end, training, concurrent clients of
#: the served app, a real browser, the Dockerfile's environment, intervention trials, benchmarks.
SLOW_FILES = frozenset({
    "test_benchmarks.py",
    "test_browser.py",
    "test_dockerfile.py",
    "test_reliability.py",
    "test_toy_model.py",
    "test_toy_world.py",
})
#: Single slow tests in otherwise fast files (``file::name``, any parametrisation).
SLOW_TESTS = frozenset({
    "test_cli.py::test_intervene_on_the_toy_model_writes_masks_that_agree_with_its_summary",
    "test_intervention_eval.py::test_two_trials_write_json_table_and_figure_and_resume",
    "test_service.py::test_toy_model_end_to_end",
    "test_toy_train.py::test_train_all_builds_a_loadable_model_and_resumes",
    "test_toy_train.py::test_decoder_finetune_keeps_the_latents_and_ships_the_tuned_decoder",
    "test_toy_train.py::test_decoder_width_trains_a_fresh_wider_decoder_behind_the_same_encoder",
    "test_toy_train.py::test_unet_init_fine_tunes_from_the_shipped_model",
})


def _run_slow(config: pytest.Config) -> bool:
    return os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes") or config.getoption("--run-slow")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the slow tier too (same as RUN_SLOW=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow tier; leave it out of a default run (kept with RUN_SLOW=1, --run-slow or -m)."""
    for item in items:
        name = Path(str(item.fspath)).name
        if name in SLOW_FILES or f"{name}::{item.originalname}" in SLOW_TESTS or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)
    if _run_slow(config) or config.getoption("-m"):
        return
    kept, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str:
    if _run_slow(config):
        return "tiers: fast and slow (RUN_SLOW=1)"
    if config.getoption("-m"):
        return f"tiers: chosen by -m {config.getoption('-m')!r}"
    return "tiers: fast only (RUN_SLOW=1 runs the slow tier too)"


# --- the app --------------------------------------------------------------------------------------
# (Random probe folders, a stand-in classifier and a lying PNG header live in ldm_scene.testing.)

@pytest.fixture(scope="session")
def wait_idle():
    """A function: whether an app service frees its model lock and leaves no hook on the UNet within
    ``timeout`` seconds (after a cancelled or finished request)."""

    def wait(service, model, timeout: float = 20.0) -> bool:
        import time

        from ldm_scene.capture import attached_hooks

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service._lock.locked() and attached_hooks(model.unet) == 0:
                return True
            time.sleep(0.05)
        return False

    return wait


@pytest.fixture(scope="session")
def free_port():
    """A function: a TCP port on 127.0.0.1 that is free now."""

    def port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def launch_app(free_port):
    """A function: the app's page built on a service and served in this process on a free port
    (``launch_options()`` with ``overrides`` on top); the caller closes it."""

    def launch(service, **overrides):
        import matplotlib

        matplotlib.use("Agg")
        from ldm_scene.ui.blocks import build_demo, launch_options

        demo = build_demo(service)
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                    **{**launch_options(), **overrides})
        return demo

    return launch
