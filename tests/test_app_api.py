"""The app over HTTP: launched on 127.0.0.1 in-process, driven with gradio_client and raw requests.

A generation streams one update per step; bad input comes back as a clear error; an intervention
returns a moved mask; cancelling frees the model; and the server serves no file it did not make
(path traversal attempts through the file route and through an API input are refused).
"""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ldm_scene.capture import attached_hooks

from test_service import STEPS, ColourClassifier, write_probe_dir

REPO = Path(__file__).resolve().parents[1]
SECRET = "ldm-scene-secret-7c1e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(service):
    import matplotlib

    matplotlib.use("Agg")
    from ldm_scene.ui.blocks import build_demo, launch_options

    demo = build_demo(service)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                **launch_options())
    return demo


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    from ldm_scene.ui.service import Service

    svc = Service.load("tiny", write_probe_dir(tiny_model, tmp_path_factory.mktemp("probes")), device="cpu",
                       classifier=ColourClassifier())
    svc.model = tiny_model  # the session's tiny model, so the hook-leak check covers the server's work
    return svc


def serving(service):
    """Fixture body: the app launched on ``service`` for the fixture's scope, then closed."""
    demo = _launch(service)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def app(service):
    yield from serving(service)


@pytest.fixture()
def client(app):
    from gradio_client import Client

    return Client(app.local_url, verbose=False, download_files=False)


def _generate(client, prompt="a red cube", seed=3, steps=STEPS, guidance=7.5):
    return client.submit(prompt, seed, steps, guidance, None, None, None, api_name="/generate")


def _wait_idle(service, model, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service._lock.locked() and attached_hooks(model.unet) == 0:
            return True
        time.sleep(0.05)
    return False


# -- queue and endpoints ---------------------------------------------------------------------------

def test_model_events_share_one_queue(app):
    fns = {fn.api_name: fn for fn in app.fns.values() if fn.api_name}
    assert {"generate", "intervene", "classify", "scrub"} <= set(fns)
    for name in ("generate", "intervene", "classify"):
        assert fns[name].concurrency_id == "model" and fns[name].concurrency_limit == 1
    assert app._queue.max_size and app._queue.max_size > 0


def test_generation_streams_one_update_per_step(client, service, tiny_model):
    job = _generate(client)
    job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) == STEPS
    progress = [out[4] for out in outputs]
    assert [re.search(r"step (\d+) of (\d+)", p).groups() for p in progress] == [(str(s), str(STEPS)) for s in range(1, STEPS + 1)]
    last = outputs[-1]
    for image in last[:4]:  # preview + foreground, depth, shading
        assert image and image["url"], last
    # the run's outputs are served, as PNG
    r = httpx.get(last[0]["url"], timeout=10)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert _wait_idle(service, tiny_model)


def test_scrub_after_the_run(client):
    _generate(client).result(timeout=120)
    out = client.predict(2, api_name="/scrub")
    assert "step 2 of 4" in out[4]


@pytest.mark.parametrize(
    "prompt, seed, steps, message",
    [
        ("", 3, STEPS, "prompt is empty"),
        ("   ", 3, STEPS, "prompt is empty"),
        ("red " * 40, 3, STEPS, "prompt is too long"),
        ("a red cube", -5, STEPS, "less than minimum value 0|seed must be between"),
        ("a red cube", 3, 0, "less than minimum value 1|steps must be between 1 and"),
        ("a red cube", 3, 500, "greater than maximum value 50|steps must be between 1 and"),
        ("a red cube", 2**70, STEPS, "seed must be between"),
    ],
)
def test_bad_input_returns_a_clear_error(client, prompt, seed, steps, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt, seed, steps, 7.5, None, None, None, api_name="/generate")


def test_intervention_returns_a_moved_mask(client, service, tiny_model):
    _generate(client, seed=3).result(timeout=120)
    result = client.predict("shift its mask", 6, 0, None, "steer", 1.0, api_name="/intervene")
    live, target, gallery, summary, numbers = result
    assert "IoU" in summary and len(gallery) == 3
    original, moved = numbers["original_centroid"], numbers["target_centroid"]
    assert original is not None and moved is not None
    assert moved[0] > original[0]  # moved right (pixels pushed past the edge drop out, so not by exactly dx)
    assert 0.0 <= numbers["iou_result_target"] <= 1.0
    assert _wait_idle(service, tiny_model)


def test_intervening_before_generating_is_explained(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="generate an image first"):
        client.predict("shift its mask", 6, 0, None, "steer", 1.0, api_name="/intervene")


def test_cancel_frees_the_model(client, service, tiny_model):
    job = client.submit("a red cube", 1, 40, 7.5, None, None, None, api_name="/generate")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(job.outputs()) >= 2
    job.cancel()
    assert _wait_idle(service, tiny_model), "the cancelled run kept the model locked or hooked"
    assert len(job.outputs()) < 40
    job = _generate(client)
    job.result(timeout=120)
    assert len(job.outputs()) == STEPS


# -- serving files -----------------------------------------------------------------------------------

@pytest.fixture()
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def test_file_route_refuses_files_it_did_not_make(app, secret_file):
    base = app.local_url.rstrip("/")
    attempts = [
        f"/gradio_api/file={secret_file}",
        "/gradio_api/file=/etc/passwd",
        f"/gradio_api/file={REPO / 'app.py'}",
        f"/gradio_api/file={REPO / 'weights'}",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/file=/etc/passwd",
        "/gradio_api/file=app.py",
    ]
    for path in attempts:
        r = httpx.get(base + path, timeout=10)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert SECRET not in r.text and "root:" not in r.text, path


def test_api_input_cannot_point_at_a_server_file(app, client, secret_file):
    """An ImageEditor input that names a server path instead of an upload must be refused."""
    _generate(client).result(timeout=120)
    base = app.local_url.rstrip("/")
    fake = {"path": str(secret_file), "url": None, "meta": {"_type": "gradio.FileData"}}
    editor = {"background": fake, "layers": [fake], "composite": fake, "id": None}
    r = httpx.post(f"{base}/gradio_api/call/intervene",
                   json={"data": ["draw a new mask", 0, 0, editor, "steer", 1.0]}, timeout=10)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/intervene/{event}", timeout=60).text
    assert "event: error" in stream and SECRET not in stream


# -- start-up messages and configuration ------------------------------------------------------------

def test_missing_model_is_explained_in_the_page(tmp_path):
    from ldm_scene.ui.service import Service

    demo = _launch(Service.load(str(tmp_path / "no-model-here"), device="cpu"))
    try:
        config = httpx.get(demo.local_url.rstrip("/") + "/config", timeout=10).json()
        text = json.dumps(config)
        assert "could not start its model" in text and "no-model-here" in text
        from gradio_client import Client
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="no model is loaded"):
            Client(demo.local_url, verbose=False).predict("a red cube", 0, 4, 7.5, None, None, None,
                                                          api_name="/generate")
    finally:
        demo.close()


def test_app_reads_flags_and_environment(monkeypatch):
    import app

    monkeypatch.setenv("LDM_SCENE_MODEL", "/models/x")
    monkeypatch.setenv("LDM_SCENE_PROBES", "/models/x/probes")
    monkeypatch.setenv("PORT", "7999")
    monkeypatch.delenv("HOST", raising=False)
    args = app.parse_args([])
    assert (args.model, args.probes, args.port, args.host) == ("/models/x", "/models/x/probes", 7999, "127.0.0.1")
    args = app.parse_args(["--model", "toy", "--port", "1234", "--host", "0.0.0.0"])
    assert (args.model, args.port, args.host) == ("toy", 1234, "0.0.0.0")


def test_dockerfile_runs_the_app_as_uid_1000_on_7860():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert any(re.search(r"useradd .*(-u|--uid) 1000", line) for line in lines)
    assert "USER 1000" in lines or any(line.startswith("USER user") for line in lines)
    assert "EXPOSE 7860" in lines
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert "app.py" in cmd and "0.0.0.0" in text and "7860" in text
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                if source.startswith("--"):
                    continue
                assert (REPO / source).exists(), f"COPY source {source} is missing"
                assert source.rstrip("/") not in ignored, f"COPY source {source} is excluded by .dockerignore"
    for must in (".venv", "runs", ".git", "artifacts"):
        assert any(entry.strip("/") == must for entry in ignored), f".dockerignore should exclude {must}"


def test_generated_image_is_an_image(client):
    job = _generate(client)
    job.result(timeout=120)
    url = job.outputs()[-1][0]["url"]
    from io import BytesIO

    image = Image.open(BytesIO(httpx.get(url, timeout=10).content))
    assert image.size[0] >= 32 and np.asarray(image).ndim == 3
