"""The playground (`/`) in a real browser (Debian's chromium, driven by Playwright) against the
session server, whose API wants a key: search, steer, compare, hover, copy, and a refused strength.

Screenshots land in the test's temporary directory (printed), at 1280x800 and at phone width."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import ADMIN_KEY

REPO = Path(__file__).parents[2]
PROMPT = "Write a sentence about breakfast."
DONE = "#{}-column .message.assistant[data-state=done], #{}-column .message.assistant[data-state=error]"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, server, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{server.url}/")
    page.fill("#key", ADMIN_KEY)  # the server wants a key: the page asks once
    page.click("#key-dialog button[type=submit]")
    page.wait_for_function("document.querySelector('#status').textContent === 'ready'", timeout=60_000)
    return page


def _answers(page) -> dict[str, str | None]:
    page.wait_for_selector(DONE.format("default", "default"), timeout=600_000)
    page.wait_for_selector(DONE.format("steered", "steered"), timeout=600_000)
    return {c: page.locator(f"#{c}-column .message.assistant").last.get_attribute("data-text") for c in ("default", "steered")}


def _steer_the_top_bridge_feature(page, strength: str) -> None:
    page.fill("#query", "bridge")
    page.press("#query", "Enter")
    page.locator("#results li button").first.click()
    page.fill(".intervention input.strength", strength)


def test_search_steer_compare_hover_and_copy(server, browser, tmp_path):
    page = _open(browser, server, 1280, 800)
    page.fill("#query", "qwzx vbnm")  # nothing close: said so, beside no results, not as an error
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelector('#search-note').textContent.includes('no feature')", timeout=60_000)
    assert page.locator("#results li").count() == 0 and page.inner_text("#search-error") == ""
    _steer_the_top_bridge_feature(page, "4")
    page.locator("#results summary").first.click()  # the feature's card: top contexts, activating token marked
    page.wait_for_selector("#results .card mark", timeout=60_000)
    page.select_option("#colour", index=1)  # colour the answers by the steered feature
    page.fill("#prompt", PROMPT)
    page.click("#send")
    answers = _answers(page)
    assert answers["default"] and answers["steered"], answers
    assert answers["steered"] != answers["default"]

    values = [float(v) for v in page.locator("#steered-column .token").evaluate_all("spans => spans.map(s => s.dataset.value)")]
    assert values and max(values) > 0, "the steered answer is coloured by its clamped feature"
    token = page.locator("#steered-column .token").first
    token.hover()
    assert page.locator("#tooltip").is_visible()
    assert "#" in page.inner_text("#tooltip"), "the token's top features, by index"
    page.keyboard.press("Escape")
    token.focus()  # keyboard: a token takes focus and shows the same
    assert page.locator("#tooltip").is_visible()
    page.screenshot(path=tmp_path / "playground-1280x800.png", full_page=True)
    print(f"screenshots in {tmp_path}")

    page.click("[data-copy=curl]")
    curl = subprocess.run(["bash", "-c", page.input_value("#copied")], capture_output=True, text=True, timeout=600, check=True)
    assert json.loads(curl.stdout)["choices"][0]["message"]["content"] == answers["steered"]

    page.click("[data-copy=python]")
    script = tmp_path / "steered.py"
    script.write_text(page.input_value("#copied"))
    python = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True)
    assert python.stdout.rstrip("\n") == answers["steered"]

    page.click("[data-copy=yaml]")
    presets = tmp_path / "presets.yaml"
    presets.write_text(page.input_value("#copied"))
    check = [sys.executable, "-m", "server.cli", "presets", "check", str(presets), "--sae", f"default={REPO / 'features/default'}"]
    checked = subprocess.run(check, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert checked.returncode == 0, checked.stderr


def test_a_bad_strength_shows_the_servers_message_by_its_slider(server, browser, tmp_path):
    page = _open(browser, server, 1280, 800)
    _steer_the_top_bridge_feature(page, "5000")
    page.fill("#prompt", PROMPT)
    page.click("#send")
    _answers(page)
    error = page.inner_text("#intervention-error-0")
    assert "steering.features[0].strength" in error and "at most" in error, error
    assert page.locator("#steered-column .message.assistant").last.get_attribute("data-state") == "error"
    assert page.locator("#default-column .message.assistant").last.get_attribute("data-text"), "the default column still answers"


def test_readable_at_phone_width(server, browser, tmp_path):
    page = _open(browser, server, 390, 844)
    _steer_the_top_bridge_feature(page, "2")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone's screen"
    page.screenshot(path=tmp_path / "playground-390x844.png", full_page=True)
