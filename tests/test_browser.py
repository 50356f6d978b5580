"""End to end in a real browser: draw digits on the page with the mouse, watch the guess appear.

Runs Debian's Chromium (``apt-get install chromium``) headless, driven by the ``playwright``
Python package (never ``playwright install``: its browser download cannot work offline).
Set ``XPNET_UPDATE_DOCS=1`` to also write the screenshot to docs/draw.png.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.draw.server import DrawServer

CHROMIUM = os.environ.get("XPNET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _cannot_run(reason):
    """Skip without a browser; on CI (``CI`` set), where .ci/run installs one, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test, but it {reason}", pytrace=False)
    pytest.skip(f"this test {reason}", allow_module_level=True)


try:
    from playwright import sync_api
except ImportError:
    _cannot_run("needs the playwright package (pip install playwright; never `playwright install`)")
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    _cannot_run(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")

# Strokes in canvas pixels (the canvas is 280x280), as lists of polylines.
DIGITS = {
    1: [[(140, 40), (140, 240)]],
    7: [[(70, 50), (210, 50), (120, 245)]],
    0: [[(140, 40), (85, 70), (70, 140), (85, 210), (140, 240), (195, 210), (210, 140), (195, 70), (140, 40)]],
}


@pytest.fixture(scope="module")
def server(drawing_model):
    srv = DrawServer(drawing_model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 760, "height": 460}, device_scale_factor=1)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    yield page
    page.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def draw(page, strokes, pause_ms=10):
    """Draw polylines with the mouse at about a hand's pace (a move every ``pause_ms``)."""
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / 280
    for line in strokes:
        (x0, y0), rest = line[0], line[1:]
        page.mouse.move(box["x"] + x0 * scale, box["y"] + y0 * scale)
        page.mouse.down()
        for x1, y1 in rest:
            for t in np.linspace(0, 1, 13)[1:]:
                x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)
                page.wait_for_timeout(pause_ms)
            x0, y0 = x1, y1
        page.mouse.up()


def settle(page):
    """Wait until the guess on the page is the one for the canvas as it is now."""
    page.wait_for_selector("#result[data-state=ready]", timeout=15_000)


def shown(page):
    digit = page.locator("#digit").get_attribute("data-digit")
    bars = [float(page.locator(f"#bar-{d}").get_attribute("aria-valuenow")) for d in range(10)]
    return digit, bars


def test_the_page_starts_empty(page):
    digit, bars = shown(page)
    assert digit == "" and bars == [0.0] * 10
    assert page.locator(".bar").count() == 10


@pytest.mark.parametrize("digit", sorted(DIGITS))
def test_drawing_a_digit_shows_the_guess_and_ten_bars(page, digit):
    answers = []
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/predict") else None)
    draw(page, DIGITS[digit])
    settle(page)
    page.wait_for_timeout(150)  # let the bars' 80 ms transition finish
    shown_digit, bars = shown(page)
    assert shown_digit == str(digit), f"drew a {digit}, the page shows {shown_digit}, bars {bars}"
    assert sum(bars) == pytest.approx(1.0, abs=1e-3) and int(np.argmax(bars)) == digit
    # The bars are as long as the probabilities, and the page shows what the server answered last.
    widths = page.evaluate("[...document.querySelectorAll('.bar')].map(b => b.getBoundingClientRect().width / "
                           "b.parentElement.getBoundingClientRect().width)")
    np.testing.assert_allclose(widths, bars, atol=0.01)
    last = json.loads(answers[-1].body())
    assert last["digit"] == digit and last["probabilities"] == pytest.approx(bars, abs=1e-4)
    # Live: predictions kept coming while the mouse moved, not once at the end.
    moves = 12 * sum(len(line) - 1 for line in DIGITS[digit])
    print(f"digit {digit}: {len(answers)} predictions during {moves} mouse moves")
    assert len(answers) >= moves // 6, f"only {len(answers)} predictions during {moves} mouse moves"


def test_clear_and_erase(page):
    draw(page, DIGITS[1])
    settle(page)
    assert shown(page)[0] == "1"
    page.click("#erase")
    assert page.locator("#erase").get_attribute("aria-pressed") == "true"
    draw(page, [[(140, 30), (140, 250)]])  # erase the whole stroke: the canvas is empty again
    settle(page)
    assert shown(page) == ("", [0.0] * 10)
    page.click("#draw")
    draw(page, DIGITS[7])
    settle(page)
    assert shown(page)[0] == "7"
    page.click("#clear")
    digit, bars = shown(page)
    assert digit == "" and bars == [0.0] * 10
    ink = page.evaluate("Array.from(document.getElementById('canvas').getContext('2d')"
                        ".getImageData(0, 0, 280, 280).data).some((v, i) => i % 4 === 0 && v > 0)")
    assert ink is False


def test_screenshot(page, tmp_path):
    draw(page, DIGITS[7])
    settle(page)
    assert shown(page)[0] == "7"
    page.wait_for_timeout(200)  # let the bars' 80 ms transition finish
    path = tmp_path / "draw.png"
    page.screenshot(path=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    if os.environ.get("XPNET_UPDATE_DOCS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / "draw.png")


def test_drawing_with_a_finger(browser, server):
    """Touch input (a phone or tablet): real touch events through the DevTools protocol."""
    context = browser.new_context(viewport={"width": 400, "height": 800}, has_touch=True, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(server.url)
        box = page.locator("#canvas").bounding_box()
        cdp = context.new_cdp_session(page)
        x = box["x"] + box["width"] / 2
        points = [(x, box["y"] + box["height"] * t) for t in np.linspace(0.15, 0.85, 25)]
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0], "y": points[0][1]}]})
        for px, py in points[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": px, "y": py}]})
            page.wait_for_timeout(10)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        settle(page)
        assert shown(page)[0] == "1"
        assert page.evaluate("window.scrollY") == 0  # the stroke drew instead of scrolling the page
    finally:
        context.close()
