"""The app over HTTP: launched on 127.0.0.1 in-process, driven with gradio_client and raw requests.

A generation streams one update per step; bad input comes back as a clear error; an intervention
returns a moved mask; cancelling frees the model; and the server serves no file it did not make
(path traversal attempts through the file route and through an API input are refused).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.testing import APP_STEPS as STEPS, png_header

REPO = Path(__file__).resolve().parents[1]
SECRET = "ldm-scene-secret-7c1e"


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


@pytest.fixture(scope="module")
def app(service, launch_app):
    demo = launch_app(service)
    yield demo
    demo.close()


@pytest.fixture()
def client(app):
    from gradio_client import Client

    return Client(app.local_url, verbose=False, download_files=False)


def _generate(client, prompt="a red cube", seed=3, steps=STEPS, guidance=7.5):
    return client.submit(prompt, seed, steps, guidance, None, None, None, api_name="/generate")


# -- queue and endpoints ---------------------------------------------------------------------------

def test_model_events_share_one_queue(app):
    fns = {fn.api_name: fn for fn in app.fns.values() if fn.api_name}
    assert {"generate", "intervene", "classify", "scrub"} <= set(fns)
    for name in ("generate", "intervene", "classify"):
        assert fns[name].concurrency_id == "model" and fns[name].concurrency_limit == 1
    assert app._queue.max_size and app._queue.max_size > 0


def test_generation_streams_one_update_per_step(client, service, tiny_model, wait_idle):
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
    assert wait_idle(service, tiny_model)


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
        ("a red cube", -5, STEPS, "seed must be at least 0, got -5"),
        ("a red cube", 3, 0, "steps must be between 1 and 50, got 0"),
        ("a red cube", 3, 500, "steps must be between 1 and 50, got 500"),
        ("a red cube", 2**70, STEPS, "seed must be between"),
    ],
)
def test_bad_input_returns_a_clear_error(client, prompt, seed, steps, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt, seed, steps, 7.5, None, None, None, api_name="/generate")


def test_intervention_returns_a_moved_mask(client, service, tiny_model, wait_idle):
    _generate(client, seed=3).result(timeout=120)
    result = client.predict("shift its mask", 6, 0, None, "steer", 1.0, api_name="/intervene")
    live, target, gallery, summary, numbers = result
    assert "IoU" in summary and len(gallery) == 3
    original, moved = numbers["original_centroid"], numbers["target_centroid"]
    assert original is not None and moved is not None
    assert moved[0] > original[0]  # moved right (pixels pushed past the edge drop out, so not by exactly dx)
    assert 0.0 <= numbers["iou_result_target"] <= 1.0
    assert wait_idle(service, tiny_model)


def test_intervening_before_generating_is_explained(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="generate an image first"):
        client.predict("shift its mask", 6, 0, None, "steer", 1.0, api_name="/intervene")


def test_cancel_frees_the_model(client, service, tiny_model, wait_idle):
    job = client.submit("a red cube", 1, 40, 7.5, None, None, None, api_name="/generate")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(job.outputs()) >= 2
    job.cancel()
    assert wait_idle(service, tiny_model), "the cancelled run kept the model locked or hooked"
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

def test_missing_model_is_explained_in_the_page(tmp_path, launch_app):
    from ldm_scene.ui.service import Service

    demo = launch_app(Service.load(str(tmp_path / "no-model-here"), device="cpu"))
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


def test_app_runs_a_small_model_on_one_thread(monkeypatch, tiny_model):
    """A small UNet on a multi-core CPU runs on one PyTorch thread (the other core serves the page);
    a large one keeps PyTorch's default; --threads / LDM_SCENE_THREADS override both."""
    from types import SimpleNamespace

    import app

    monkeypatch.setattr(app.os, "cpu_count", lambda: 2)
    assert app.model_threads(tiny_model, None) == 1
    big = SimpleNamespace(device=torch.device("cpu"),
                          unet=torch.nn.Linear(app.SMALL_UNET, 1, bias=False, device="meta"))
    assert app.model_threads(big, None) is None
    assert app.model_threads(SimpleNamespace(device=torch.device("cuda")), None) is None
    assert app.model_threads(tiny_model, 3) == 3
    monkeypatch.setattr(app.os, "cpu_count", lambda: 1)
    assert app.model_threads(tiny_model, None) is None
    monkeypatch.setenv("LDM_SCENE_THREADS", "2")
    assert app.parse_args([]).threads == 2
    with pytest.raises(SystemExit, match="at least 1"):
        app.model_threads(tiny_model, 0)


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


# -- bad input over the API: every refusal names the field, none is Gradio's generic error ------------

GENERIC = "upstream Gradio app has raised an exception"




def _editor_upload(path) -> dict:
    from gradio_client import handle_file

    return {"background": None, "layers": [handle_file(str(path))], "composite": None}


def _app_error(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert GENERIC not in message, f"a generic error instead of a message: {message}"
    return message


@pytest.mark.parametrize("seed, steps, guidance, message", [
    (1.5, STEPS, 7.5, r"seed must be a whole number, got 1\.5"),  # was rounded: 1.5 and 2.5 both ran seed 2
    (2.5, STEPS, 7.5, r"seed must be a whole number, got 2\.5"),
    ("seven", STEPS, 7.5, "seed must be a whole number, got 'seven'"),
    (3, "four", 7.5, "steps must be a whole number, got 'four'"),
    (3, 2.5, 7.5, r"steps must be a whole number, got 2\.5"),
    (3, STEPS, "high", "guidance must be a number, got 'high'"),
])
def test_numbers_are_refused_by_name_not_rounded(client, seed, steps, guidance, message):
    assert re.search(message, _app_error(client, "a red cube", seed, steps, guidance, None, None, None,
                                         api_name="/generate"))


def _raw_error(app, api_name: str, body: str) -> str:
    """POST a raw JSON body (which may hold NaN, as Python's json writes it) to an endpoint; the
    error message it streams back."""
    base = app.local_url.rstrip("/")
    r = httpx.post(f"{base}/gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"},
                   timeout=10)
    assert r.status_code == 200, r.text
    stream = httpx.get(f"{base}/gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=60).text
    assert "event: error" in stream and GENERIC not in stream, stream
    return stream


def test_nan_is_refused_by_name(app):
    """NaN passes both of Gradio's bound checks; it used to reach int() and show Python's own
    'cannot convert float NaN to integer'."""
    assert "step must be a whole number, got nan" in _raw_error(app, "scrub", '{"data": [NaN]}')
    body = '{"data": ["a red cube", 3, %d, NaN, null, null, null, null, 3]}' % STEPS
    assert "guidance must be a number, got nan" in _raw_error(app, "generate", body)


def test_scrub_counts_from_one_and_explains_bad_steps(client):
    """After a 1-step run the only step is 1; asking for 2 is refused in the page's numbers (1-based),
    not as "step must be between 0 and 0, got 1"."""
    _generate(client, steps=1).result(timeout=120)
    assert "step 1 of 1" in client.predict(1, api_name="/scrub")[4]
    assert "step must be between 1 and 1 for this run, got 2" in _app_error(client, 2, api_name="/scrub")


def test_scrub_listens_to_typing_and_a_one_step_run_has_nothing_to_scrub(app):
    from ldm_scene.ui.tab_generate import scrub_update

    scrub = next(fn for fn in app.fns.values() if fn.api_name == "scrub")
    # "input" fires when the slider is dragged and when a number is typed into its box
    # ("release" alone missed typing: the box fires no release until it loses focus).
    assert "input" in {event for _, event in scrub.targets}
    # Gradio refuses a slider whose minimum equals its maximum: a 1-step run hides it (the
    # progress line says "step 1 of 1") instead of offering a range of 1-2.
    one = scrub_update(1)
    assert one.visible is False and one.interactive is False
    four = scrub_update(4)
    assert (four.minimum, four.maximum, four.value, four.interactive, four.visible) == (1, 4, 4, True, True)


def test_upload_handlers_have_a_concurrency_limit(app):
    """Every event that decodes the drawing (target previews, the intervention) waits its turn in a
    bounded queue: a burst of large uploads cannot decode all at once."""
    editor_fns = [fn for fn in app.fns.values() if any(getattr(b, "elem_id", None) == "mask-editor" for b in fn.inputs)]
    assert len(editor_fns) >= 3
    for fn in editor_fns:
        assert fn.concurrency_limit is not None and fn.concurrency_limit <= 2, (fn.name, fn.concurrency_limit)
        assert fn.concurrency_id in ("model", "view"), (fn.name, fn.concurrency_id)


def test_bad_uploads_are_explained_before_decoding(client, tmp_path):
    _generate(client).result(timeout=120)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    big = tmp_path / "big.png"  # a real, small file that decodes to 8000x8000 (~256 MB as RGBA)
    Image.new("1", (8000, 8000)).save(big, optimize=True)
    assert big.stat().st_size < 200_000
    header_only = tmp_path / "huge.png"
    header_only.write_bytes(png_header(13_000, 13_000))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))  # over Pillow's own bomb limit
    cases = [
        (text, "the drawing is not an image"),
        (big, "the drawing is 8000x8000 px; the largest accepted is 4096 px a side"),
        (header_only, "the drawing is 13000x13000 px; the largest accepted is 4096 px a side"),
        (bomb, "the drawing declares more pixels than an image may have"),
    ]
    for path, message in cases:
        got = _app_error(client, "draw a new mask", 0, 0, _editor_upload(path), "steer", 1.0, api_name="/intervene")
        assert message in got, (path.name, got)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_a_white_on_black_mask_means_white_is_the_object(client, tmp_path, mode):
    """A mask as the hint describes it (white = foreground), greyscale, RGB or opaque RGBA: the
    white box is the target, not "covers the whole image" (an opaque alpha says nothing)."""
    _generate(client).result(timeout=120)
    arr = np.zeros((64, 64), np.uint8)
    arr[8:24, 32:56] = 255  # a box in the upper right: centre (43.5, 15.5) at 64 px
    image = Image.fromarray(arr).convert(mode)
    path = tmp_path / f"mask_{mode}.png"
    image.save(path)
    _live, _target, _gallery, summary, numbers = client.predict(
        "draw a new mask", 0, 0, _editor_upload(path), "steer", 1.0, api_name="/intervene")
    x, y = numbers["target_centroid"]
    scale = 32 / 64  # the tiny model draws 32x32
    assert abs(x - 43.5 * scale) < 1.5 and abs(y - 15.5 * scale) < 1.5, numbers
    assert "IoU" in summary


def test_api_names_say_what_each_value_is(app):
    """No parameter is named param_N and no output value_N: every API-visible component has a label."""
    from gradio_client import Client

    info = Client(app.local_url, verbose=False, download_files=False).view_api(return_format="dict", print_info=False)
    endpoints = info["named_endpoints"]
    assert {"/generate", "/scrub", "/intervene", "/classify"} <= set(endpoints)
    for name, endpoint in endpoints.items():
        for p in endpoint["parameters"]:
            assert not re.fullmatch(r"param_\d+", p["parameter_name"]), (name, p)
            assert p.get("label"), (name, p)
        for r in endpoint["returns"]:
            assert r.get("label") and not re.fullmatch(r"value_\d+", r["label"]), (name, r)
    generate = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert generate == ["prompt", "seed", "steps", "guidance", "foreground_site", "depth_site", "shading_site",
                        "attention_sites", "preview_every"]


def test_prompt_warnings_reach_the_page_without_refusing(app):
    """Unknown words and place words warn (the run still happens); the vocabulary is on the page."""
    generate = next(fn for fn in app.fns.values() if fn.api_name == "generate")
    with pytest.warns(UserWarning) as caught:
        updates = list(generate.fn("a red truck on the left", 3, STEPS, 7.5, None, None, None))
    texts = [str(w.message) for w in caught]
    assert any("'truck'" in t and "not in this model's vocabulary" in t for t in texts), texts
    assert any("'left'" in t and "never say where" in t for t in texts), texts
    assert len(updates) == STEPS
    config = json.dumps(httpx.get(app.local_url.rstrip("/") + "/config", timeout=10).json())
    assert "This model knows" in config and "cube" in config


def test_run_controls_are_chained_so_a_click_mid_run_is_visible(app):
    """A refused request changes nothing (check, no outputs); otherwise Generate disables itself (and
    enables Stop) before the run, re-enables after it (also after an error), and Stop says where it
    stopped: the chain check -> start -> generate (each on success) -> finish, with Stop cancelling."""
    fns = list(app.fns.values())
    by_id = {fn._id: fn for fn in fns}
    generate = next(fn for fn in fns if fn.api_name == "generate")
    start = by_id[generate.trigger_after]
    check = by_id[start.trigger_after]
    assert generate.trigger_only_on_success and start.trigger_only_on_success
    button = next(b for b in start.outputs if getattr(b, "elem_id", None) == "generate-btn")
    assert any(target[0] == button._id and target[1] == "click" for target in check.targets)
    assert not check.outputs and check.queue and check.concurrency_id != "model"  # a message, never a wait
    assert not start.queue  # runs at once, not behind the model's queue
    finishers = [fn for fn in fns if fn.trigger_after == generate._id]
    assert {fn.trigger_only_on_failure for fn in finishers} == {False, True}  # after success and after an error
    assert all(button in fn.outputs for fn in finishers)
    cancel = next(fn for fn in fns if fn.is_cancel_function and generate._id in fn.cancels)
    # Stop's text comes after the cancel, so a step already on its way cannot overwrite it
    clicked = [fn._id for fn in fns if fn.targets == cancel.targets]
    stop = next(fn for fn in fns if fn.trigger_after in clicked and fn.fn is not None)
    assert button in stop.outputs and any(getattr(b, "elem_id", None) == "gen-progress" for b in stop.outputs)
    # the panels of the previous run are cleared when a run starts
    cleared = {getattr(b, "elem_id", None) for b in start.outputs}
    assert {"classifier-curves", "emergence", "iv-gallery", "iv-summary", "iv-original"} <= cleared


def test_an_evicted_run_is_explained(service, tiny_model, launch_app, wait_idle):
    """Gradio keeps the state of its most recent sessions only; a session pushed out is told so."""
    from gradio_client import Client

    demo = launch_app(service, state_session_capacity=2)
    try:
        first = Client(demo.local_url, verbose=False, download_files=False)
        first.submit("a red cube", 3, STEPS, 7.5, None, None, None, api_name="/generate").result(timeout=120)
        assert "step 2 of" in first.predict(2, api_name="/scrub")[4]
        for _ in range(2):  # two newer sessions push the first out
            other = Client(demo.local_url, verbose=False, download_files=False)
            assert "generate an image first" in _app_error(other, 1, api_name="/scrub")
        message = _app_error(first, 2, api_name="/scrub")
        assert "evicted" in message and "2 most recent sessions" in message, message
        assert "evicted" in _app_error(first, "shift its mask", 6, 0, None, "steer", 1.0, api_name="/intervene")
    finally:
        demo.close()
    assert wait_idle(service, tiny_model)
