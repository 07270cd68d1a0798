"""The app in a real headless browser (Playwright driving Debian's Chromium), as a user walks it.

One session, in order: the page at load, bad inputs, a generation watched step by step (with the
per-word attention and the compare strip), the scrubber (typed and dragged), the Classifier tab,
the Intervene tab (shift, draw, Stop), a stopped generation and what every tab then says, a rerun,
and the Results tab's links and tables. At each point it asserts what a user sees: texts, which
buttons can be pressed, pictures whole inside their frames, links that lead somewhere on the page.
Screenshots go to ``artifacts/`` (git-ignored); ``LDM_SCENE_SCREENSHOTS=DIR`` also writes the
README's four tab screenshots there (``docs/screenshots`` for the shipped ones).

Runs on the shipped toy model when its weights exist, else on the tiny random model with random
probes (``LDM_SCENE_BROWSER_MODEL`` picks another model directory). Skipped when Chromium or
Playwright is missing, unless ``LDM_SCENE_BROWSER=1`` (as in CI), where that is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ldm_scene.testing import ColourClassifier, write_probe_dir

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
def served(tmp_path_factory, launch_app):
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
    demo = launch_app(svc)
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


# -- what a user sees ------------------------------------------------------------------------------

def _shot(page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"browser_{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    docs = os.environ.get("LDM_SCENE_SCREENSHOTS")
    if docs and name in DOC_SHOTS:
        Path(docs).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(docs) / f"{DOC_SHOTS[name]}.png"), full_page=full_page)
    return path


#: Which walk screenshots become the README's (``LDM_SCENE_SCREENSHOTS``).
DOC_SHOTS = {"02_generated": "generate", "04_classifier": "classifier", "06_intervened_drawn": "intervene",
             "10_results": "results"}


def _text(page, selector: str) -> str:
    """What a user reads in ``selector``: a markdown block's text (not its hidden status timer)."""
    shown = page.query_selector(f"{selector} [data-testid='markdown']")
    return shown.inner_text() if shown is not None else page.inner_text(selector)


def _enabled(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "e => !e.disabled")


def _wait_text(page, selector: str, text: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s + \" [data-testid='markdown']\") || document.querySelector(s);"
        " return e && e.innerText.includes(t); }", arg=[selector, text], timeout=timeout)


def _src(page, selector: str) -> str | None:
    img = page.query_selector(f"{selector} img")
    return img.get_attribute("src") if img else None


def _whole_picture(page, selector: str) -> dict:
    """The picture in ``selector`` is loaded, has a size, and lies inside its frame (not cropped)."""
    frame = page.query_selector(selector)
    assert frame is not None, f"{selector} is not on the page"
    img = page.query_selector(f"{selector} img")
    assert img is not None, f"{selector} shows no picture"
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img, timeout=10_000)
    box, outer = img.bounding_box(), frame.bounding_box()
    assert box["width"] > 20 and box["height"] > 20, (selector, box)
    for a, b in (("x", "width"), ("y", "height")):
        assert box[a] >= outer[a] - 1 and box[a] + box[b] <= outer[a] + outer[b] + 1, (selector, box, outer)
    fit = img.evaluate("e => getComputedStyle(e).objectFit")
    if fit not in ("contain", "scale-down", "fill", "none"):
        # a plain <img> keeps its aspect only if the box has it
        natural = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        assert abs(box["width"] / box["height"] - natural[0] / natural[1]) < 0.05, (selector, box, natural)
    return box


def _toast(page, text: "str | re.Pattern", timeout: float = 30_000) -> None:
    page.get_by_text(text).filter(visible=True).first.wait_for(timeout=timeout)


def _close_toasts(page) -> None:
    for button in page.query_selector_all(".toast-close"):
        try:
            button.click(timeout=1000)
        except Exception:  # noqa: BLE001 - a toast that closed by itself
            pass


def _generate(page, prompt: str, seed: int, steps: int) -> None:
    page.fill("#prompt textarea", prompt)
    page.fill("#seed input", str(seed))
    page.fill("#steps input[type='number']", str(steps))
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    # the slider follows its number box once the box commits the value
    page.wait_for_function("n => document.querySelector(\"#steps input[type='range']\").value == n", arg=str(steps),
                           timeout=10_000)
    page.click("#generate-btn")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


# -- the walk ----------------------------------------------------------------------------------------

def test_a_whole_session(page, served):
    try:
        _walk(page, served)
    except BaseException:
        _shot(page, "failed")  # what the page showed when the walk stopped
        raise


def _walk(page, served) -> None:
    _, demo, svc = served
    steps = svc.default_steps
    size = svc.display_size

    # 1. At load: what is loaded, the words the model knows, Generate pressable and Stop not.
    assert "probes:" in _text(page, "#status")
    vocabulary = _text(page, "#vocabulary")
    if svc.vocabulary():
        assert "This model knows" in vocabulary and "cube" in vocabulary
    assert _enabled(page, "#generate-btn") and not _enabled(page, "#stop-btn")
    _shot(page, "00_start")

    # 2. Bad input: an empty prompt is refused with a message; nothing runs.
    page.fill("#prompt textarea", "   ")
    page.click("#generate-btn")
    _toast(page, "prompt is empty")
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=10_000)
    assert "step" not in _text(page, "#gen-progress")
    _shot(page, "01_bad_prompt")
    _close_toasts(page)

    # 3. Generate, watching the steps arrive one by one; Generate cannot be pressed twice.
    _generate(page, "a green torus", 7, steps)
    page.wait_for_function("document.querySelector('#generate-btn').disabled", timeout=10_000)
    assert "Running" in _text(page, "#generate-btn") and _enabled(page, "#stop-btn")
    seen_steps, seen_attention = set(), set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for s in map(int, re.findall(rf"step (\d+) of {steps}", _text(page, "#gen-progress"))):
            seen_steps.add(s)
        if (src := _src(page, "#word-attention")) is not None:
            seen_attention.add(src)
        if steps in seen_steps:
            break
        time.sleep(0.05)
    assert steps in seen_steps, f"the run did not finish: {_text(page, '#gen-progress')!r}"
    assert len(seen_steps) >= 2 and len(seen_attention) >= 2, (seen_steps, len(seen_attention))
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=20_000)
    assert _text(page, "#generate-btn").strip() == "Generate" and not _enabled(page, "#stop-btn")
    for selector in ["#preview", *[f"#readout-{t}" for t in svc.banks], "#word-attention", "#compare-strip"]:
        _whole_picture(page, selector)
    # the per-word maps have one tile per prompt word, beside the x0 estimate
    natural = page.eval_on_selector("#word-attention img", "e => [e.naturalWidth, e.naturalHeight]")
    from ldm_scene.ui.drawing import STRIP_TILE

    assert natural[0] >= 4 * STRIP_TILE, natural  # x0 + "a", "green", "torus"
    page.wait_for_timeout(300)
    _shot(page, "02_generated")

    # 4. Scrub: typing a step into the box shows it (counted from 1); the slider's keys move it.
    last_attention = _src(page, "#word-attention")
    page.fill("#scrub input[type='number']", "2")
    _wait_text(page, "#gen-progress", f"step 2 of {steps}")
    assert _src(page, "#word-attention") != last_attention  # the stored maps of step 2
    page.focus("#scrub input[type='range']")
    page.keyboard.press("ArrowRight")
    _wait_text(page, "#gen-progress", f"step 3 of {steps}")
    page.fill("#scrub input[type='number']", str(steps + 5))  # past the end: clamped or refused, never 0-based
    page.keyboard.press("Enter")
    page.wait_for_timeout(1000)
    assert f"step {steps + 5}" not in _text(page, "#gen-progress")
    assert "between 0" not in page.inner_text("body")
    _close_toasts(page)
    _shot(page, "03_scrubbed")

    # 5. Classifier: the same run's curves and probe emergence, no label chip over the titles.
    _tab(page, "Classifier")
    for plot in ("#classifier-curves", "#emergence"):
        # line plots drawn in the browser (Vega-Lite): a canvas or an SVG with the run's points
        page.wait_for_selector(f"{plot} canvas, {plot} svg.marks", timeout=30_000)
        # the figure carries its title: Gradio's label chip is not drawn over it (only for screen readers)
        label = page.query_selector(f"{plot} [data-testid='block-label']")
        assert label is None or "sr-only" in (label.get_attribute("class") or ""), f"{plot}: a label chip covers the title"
        # the legend (which line is which) lies inside the plot's frame, not cut off below it
        frame = page.query_selector(plot).bounding_box()
        legends = [leg.bounding_box() for leg in page.query_selector_all(f"{plot} .role-legend")]
        assert legends, f"{plot}: no legend"
        for box in legends:
            assert box["y"] + box["height"] <= frame["y"] + frame["height"] + 1, (plot, box, frame)
            assert box["x"] + box["width"] <= frame["x"] + frame["width"] + 1, (plot, box, frame)
    assert "Prompt: a green torus" in _text(page, "#classifier-summary").replace("*", "")
    _shot(page, "04_classifier")

    # 6. Intervene, shift: the Target pane already shows the default shift; the result is whole and clean.
    _tab(page, "Intervene")
    _whole_picture(page, "#iv-original")
    _whole_picture(page, "#iv-target")
    assert _text(page, "#iv-target-note").strip() == ""
    assert "new run is going" not in _text(page, "#iv-summary")
    assert _enabled(page, "#intervene-btn") and not _enabled(page, "#iv-stop-btn")
    page.click("#intervene-btn")
    _wait_text(page, "#iv-summary", "IoU", timeout=180_000)
    page.wait_for_function("!document.querySelector('#intervene-btn').disabled", timeout=20_000)
    images = page.query_selector_all("#iv-gallery img")
    assert len(images) == 3, "original, target and result are shown"
    frame = page.query_selector("#iv-gallery").bounding_box()
    for img in images:  # whole pictures: scaled to fit, never cropped, inside the gallery
        box = img.bounding_box()
        assert img.evaluate("e => getComputedStyle(e).objectFit") == "contain"
        assert box["y"] >= frame["y"] - 1 and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1, (box, frame)
        assert box["height"] >= min(size, 250) - 2, box
    result = _whole_picture(page, "#iv-live")
    assert result["width"] >= min(size, 250) - 2
    # the result pane shows the result itself, not an overlay: the same pixels as the gallery's "result"
    live_png = page.request.get(_absolute(demo, _src(page, "#iv-live"))).body()
    gallery_png = page.request.get(_absolute(demo, images[2].get_attribute("src"))).body()
    assert _pixels(live_png) == _pixels(gallery_png)
    _shot(page, "05_intervened_shift")

    # 7. Draw: the editor's canvas fits the picture; a stroke past its edge is reported, not lost silently.
    page.get_by_label("draw a new mask").check()
    editor = page.query_selector("#mask-editor").bounding_box()
    assert editor["width"] <= size + 160 and editor["height"] <= size + 160, editor
    page.click("#mask-editor button[aria-label='Brush']")
    canvas = page.query_selector("#mask-editor canvas").bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx - 20, cy)
    page.mouse.down()
    for i in range(40):  # rightwards, past the picture's right edge
        page.mouse.move(cx - 20 + 6 * i, cy + (i % 2) * 6, steps=2)
    page.mouse.up()
    _wait_text(page, "#iv-target-note", "covers", timeout=30_000)
    note = _text(page, "#iv-target-note")
    assert "edge" in note and "not part of the target" in note, note
    _whole_picture(page, "#iv-target")
    page.click("#intervene-btn")
    page.wait_for_function("document.querySelector('#iv-summary').innerText.includes('Intervening') || "
                           "document.querySelector('#iv-summary').innerText.includes('Edited run')", timeout=30_000)
    _wait_text(page, "#iv-summary", "IoU", timeout=180_000)
    page.wait_for_timeout(300)
    _shot(page, "06_intervened_drawn")

    # 7b. Stop an intervention: it says where, the old result is gone, Intervene can be pressed again.
    # (probe-gradient: 128 Adam iterations per edited site and step, slow enough to stop mid-run)
    methods = svc.methods
    if "probe-gradient" in methods:
        page.click("#iv-method input")
        page.get_by_role("option", name="probe-gradient").click()
    page.click("#intervene-btn")
    _wait_text(page, "#iv-summary", "Edited run: step", timeout=60_000)
    page.click("#iv-stop-btn")
    _wait_text(page, "#iv-summary", "Stopped", timeout=30_000)
    assert re.search(r"Stopped at step \d+ of \d+|Stopped\.", _text(page, "#iv-summary"))
    assert not page.query_selector_all("#iv-gallery img"), "a stopped intervention still shows the old result"
    page.wait_for_function("!document.querySelector('#intervene-btn').disabled", timeout=10_000)
    assert not _enabled(page, "#iv-stop-btn")
    if "probe-gradient" in methods:
        page.click("#iv-method input")
        page.get_by_role("option", name=methods[0]).click()

    # 8. Stop a long generation: where it stopped, Generate back, and every tab says what is stale.
    _tab(page, "Generate")
    _generate(page, "a blue sphere", 1, 50)
    page.wait_for_function("document.querySelector('#generate-btn').disabled", timeout=10_000)
    _wait_text(page, "#gen-progress", " of 50", timeout=120_000)  # the first step is in: stop it
    page.click("#stop-btn")
    _wait_text(page, "#gen-progress", "Stopped at step", timeout=30_000)
    said = _text(page, "#gen-progress")
    found = re.search(r"Stopped at step (\d+) of 50", said)
    assert found, said
    stopped = int(found[1])
    assert 1 <= stopped < 50
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=10_000)
    assert not _enabled(page, "#stop-btn")
    _shot(page, "07_stopped")
    _tab(page, "Classifier")
    assert "stopped" in _text(page, "#classifier-summary")
    assert page.query_selector("#emergence canvas, #emergence svg.marks") is None
    _tab(page, "Intervene")
    assert "stopped" in _text(page, "#iv-summary")
    assert not page.query_selector_all("#iv-gallery img"), "the previous intervention's result is still shown"
    page.get_by_label("shift its mask").check()
    page.click("#intervene-btn")
    # refused, with why: the run was stopped (the toast's own words: the summary already says "before it had an image")
    _toast(page, re.compile(r"stopped at step \d+ of 50, before it had an image"))
    assert re.search(r"stopped at step \d+ of 50", page.inner_text("body"))
    assert "Error" not in _text(page, "#iv-live") and "Intervening" not in _text(page, "#iv-summary")
    _close_toasts(page)
    _shot(page, "08_stopped_intervene")

    # 9. Rerun: a full run makes every tab current again; an unknown word warns but still runs.
    _tab(page, "Generate")
    _generate(page, "a pink torus", 4, steps)
    if svc.vocabulary():
        _toast(page, "not in this model's vocabulary")
    _wait_text(page, "#gen-progress", f"step {steps} of {steps}", timeout=180_000)
    page.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=20_000)
    _close_toasts(page)
    _tab(page, "Intervene")
    _whole_picture(page, "#iv-original")
    _whole_picture(page, "#iv-target")
    assert "stopped" not in _text(page, "#iv-summary") and "going" not in _text(page, "#iv-summary")
    _shot(page, "09_rerun")

    # 10. Results: every link leads to a place on this page, tables do not break words, figures load.
    _tab(page, "Results")
    page.wait_for_selector("#results-text", timeout=10_000)
    links = page.eval_on_selector_all("#results-text a[href]", "els => els.map(e => e.getAttribute('href'))")
    for href in links:
        if href.startswith("http"):
            continue
        assert href.startswith("#"), f"a link the app cannot serve: {href}"
        assert page.query_selector(f"[id='{href[1:]}']") is not None, f"{href} leads nowhere"
    internal = [h for h in links if h.startswith("#")]
    if internal:
        page.click(f"#results-text a[href='{internal[0]}']")
        page.wait_for_function(
            "id => { const r = document.getElementById(id).getBoundingClientRect(); "
            "return r.top >= -5 && r.top < window.innerHeight; }", arg=internal[0][1:], timeout=10_000)
    for cell in page.query_selector_all("#results-text th"):
        assert cell.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
    for img in page.query_selector_all("#results-text img"):
        img.scroll_into_view_if_needed()
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img, timeout=10_000)
    assert "{'" not in _text(page, "#results-text")  # no raw Python dicts
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, "10_results", full_page=False)


def _absolute(demo, src: str) -> str:
    return src if src.startswith("http") else demo.local_url.rstrip("/") + "/" + src.lstrip("/")


def _pixels(png: bytes) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").tobytes()
