"""The app in a real headless browser (Playwright driving Debian's Chromium).

Open the page, type a prompt, generate and watch the step images arrive, look at the classifier
curves, draw a stroke on the mask editor, intervene and see the result; screenshots of every tab go
to ``artifacts/`` (git-ignored) for a person to look at.

Runs on the shipped toy model when its weights exist, else on the tiny random model with random
probes (``LDM_SCENE_BROWSER_MODEL`` picks another model directory). Skipped when Chromium or
Playwright is missing, unless ``LDM_SCENE_BROWSER=1`` (as in CI), where that is a failure.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_app_api import _launch
from test_service import ColourClassifier, write_probe_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
TOY_DIR = REPO / "weights" / "toy-scenes"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _require_browser() -> str:
    required = os.environ.get("LDM_SCENE_BROWSER") == "1"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("LDM_SCENE_BROWSER=1 but playwright is not installed")
        pytest.skip("playwright is not installed (set LDM_SCENE_BROWSER=1 to make this a failure)")
    path = _chromium()
    if path is None:
        if required:
            pytest.fail("LDM_SCENE_BROWSER=1 but no chromium at /usr/bin/chromium (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium; LDM_SCENE_BROWSER=1 makes this a failure)")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    chromium = _require_browser()
    from ldm_scene.ui.service import Service

    chosen = os.environ.get("LDM_SCENE_BROWSER_MODEL")
    if chosen or (TOY_DIR / "model_index.json").is_file():
        name = chosen or "toy"
        svc = Service.load(name, device="cpu")
        if not svc.banks and svc.model is not None:  # no shipped probes yet: random ones that fit
            folder = write_probe_dir(svc.model, tmp_path_factory.mktemp("probes"), steps=15,
                                     scheduler=svc.model.scheduler_name)
            svc = Service.load(name, folder, device="cpu")
    else:
        from ldm_scene.models import load_model

        folder = write_probe_dir(load_model("tiny", device="cpu"), tmp_path_factory.mktemp("probes"))
        svc = Service.load("tiny", folder, device="cpu", classifier=ColourClassifier())
    assert svc.ready, svc.status_markdown()
    demo = _launch(svc)
    yield chromium, demo, svc
    demo.close()


@pytest.fixture()
def page(served):
    from playwright.sync_api import sync_playwright

    chromium, demo, _ = served
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(demo.local_url, wait_until="domcontentloaded")
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            yield page
        finally:
            browser.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"browser_{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _progress(page) -> str:
    return page.inner_text("#gen-progress")


def _src(page, selector: str) -> str | None:
    img = page.query_selector(f"{selector} img")
    return img.get_attribute("src") if img else None


def test_generate_classify_draw_and_intervene(page, served):
    _, _, svc = served
    steps = svc.default_steps
    assert "probes:" in page.inner_text("#status")
    _shot(page, "0_start")

    # Generate: type a prompt and watch the steps arrive one by one.
    page.fill("#prompt textarea", "a red cube")
    page.click("#generate-btn")
    seen_steps, seen_previews = set(), set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = _progress(page)
        for s in range(1, steps + 1):
            if f"step {s} of {steps}" in text:
                seen_steps.add(s)
        if (src := _src(page, "#preview")) is not None:
            seen_previews.add(src)
        if f"step {steps} of {steps}" in text:
            break
        time.sleep(0.05)
    assert steps in seen_steps, f"the run did not finish: {_progress(page)!r}"
    assert len(seen_steps) >= 2 and len(seen_previews) >= 2, (seen_steps, len(seen_previews))
    for task in svc.banks:
        assert _src(page, f"#readout-{task}"), f"no {task} readout shown"
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=10_000)
    page.wait_for_timeout(500)
    _shot(page, "1_generate")

    # Typing a step into the step box shows that step (steps are counted from 1 on the page).
    page.fill("#scrub input[type='number']", "2")
    page.wait_for_function(
        f"document.querySelector('#gen-progress').innerText.includes('step 2 of {steps}')", timeout=30_000)

    # Classifier: the curves for the same run and the probe emergence for that image.
    page.get_by_role("tab", name="Classifier").click()
    page.wait_for_selector("#emergence img, #emergence svg, #emergence canvas", timeout=30_000)
    assert "Prompt:" in page.inner_text("#classifier-summary")
    _shot(page, "2_classifier")

    # Intervene: draw where the object should go, then run the edit.
    page.get_by_role("tab", name="Intervene").click()
    page.wait_for_selector("#iv-original img", timeout=30_000)
    # the Target pane already shows the default shift: nothing had to be touched
    page.wait_for_selector("#iv-target img", timeout=30_000)
    page.get_by_label("draw a new mask").check()
    page.click("#mask-editor button[aria-label='Brush']")
    canvas = page.query_selector("#mask-editor canvas")
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 50, cy)
    page.mouse.down()
    for i in range(21):
        page.mouse.move(cx - 50 + 5 * i, cy + (i % 2) * 10, steps=2)
    page.mouse.up()
    page.wait_for_function(
        "document.querySelector('#iv-target img') !== null", timeout=30_000
    )
    assert "empty" not in page.inner_text("#iv-target-note")
    _shot(page, "3_mask_drawn")
    page.click("#intervene-btn")
    page.wait_for_function("document.querySelector('#iv-summary').innerText.includes('IoU')", timeout=180_000)
    images = page.query_selector_all("#iv-gallery img")
    assert images, "no original/target/result shown"
    for img in images:  # whole pictures: scaled to fit, never cropped
        assert img.evaluate("e => getComputedStyle(e).objectFit") == "contain"
    page.wait_for_timeout(500)
    _shot(page, "4_intervene")

    page.get_by_role("tab", name="Results").click()
    page.wait_for_selector("#results-text", timeout=10_000)
    _shot(page, "5_results")


def test_bad_input_shows_a_message(page):
    page.fill("#prompt textarea", "   ")
    page.click("#generate-btn")
    page.get_by_text("prompt is empty").first.wait_for(timeout=30_000)
    page.wait_for_timeout(800)  # let the toast finish fading in
    _shot(page, "6_error")


def test_generate_is_disabled_while_running_and_stop_says_where(page):
    """A click on Generate mid-run cannot go unnoticed: the button is disabled and says so; Stop
    re-enables it and the progress line says at which step the run stopped."""
    page.fill("#prompt textarea", "a blue sphere")
    page.fill("#steps input[type='number']", "50")
    page.keyboard.press("Tab")
    page.click("#generate-btn")
    page.wait_for_function("document.querySelector('#generate-btn').disabled", timeout=10_000)
    assert "Running" in page.inner_text("#generate-btn")
    page.wait_for_function("document.querySelector('#gen-progress').innerText.includes('step 2 of 50')",
                           timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_function("document.querySelector('#gen-progress').innerText.includes('Stopped at step')",
                           timeout=30_000)
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=10_000)
    _shot(page, "7_stopped")
