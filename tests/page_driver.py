"""The demo page in a real browser: Debian's Chromium driven by Playwright (skipped where either is missing, an
error under CI), a page on a real server, and what the page tests read from it."""

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from server import running_server

from service.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the browser tests: apt-get install chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


@contextmanager
def launched_browser() -> Iterator:
    """Headless Chromium, for as long as the block runs (the `browser` fixture of conftest.py)."""
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


expect = playwright.expect


@contextmanager
def open_page(browser, models_dir: Path, state_dir: Path) -> Iterator:
    """The page loaded from a real server on `models_dir`; fails on any console error not taken out."""
    settings = Settings(models_dir=models_dir, state_dir=state_dir, device="cpu")
    with running_server(settings) as (base, _):
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        problems: list[str] = []

        def on_console(message) -> None:
            if message.type == "error":
                problems.append(message.text)

        page.on("console", on_console)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(base)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.console_problems = problems  # a test that provokes an error takes its expected line out
        yield page
        context.close()
        assert problems == [], f"console errors: {problems}"


def watch_the_result(page) -> None:
    """Record each text #step shows and each distinct image #result shows from now on, in window.seenSteps and
    window.seenFrames (called again, it starts both afresh)."""
    page.evaluate("""() => {
        const watching = window.seenSteps !== undefined;
        window.seenSteps = []; window.seenFrames = new Set();
        window.watchStartSrc = document.getElementById('result').getAttribute('src');  // shown before: not seen
        if (watching) return;
        // each change's own text: a frame and 'done' arriving in one chunk change #step in one task
        new MutationObserver((changes) => changes.forEach((change) =>
            change.addedNodes.forEach((node) => window.seenSteps.push(node.textContent))))
            .observe(document.getElementById('step'), { childList: true, characterData: true, subtree: true });
        // every image set, though several may land in one task: each change's old value, then the last one
        const result = document.getElementById('result');
        new MutationObserver((changes) => {
            changes.forEach((change) => {
                if (change.oldValue && change.oldValue !== window.watchStartSrc) window.seenFrames.add(change.oldValue);
            });
            window.seenFrames.add(result.src);
        }).observe(result, { attributes: true, attributeFilter: ['src'], attributeOldValue: true });
    }""")


def curl_body(page) -> dict:
    """The JSON body of the curl preview, parsed back."""
    preview = re.search(r"-d '(.*)'", page.inner_text("#curl"))
    assert preview, "the curl preview has no -d '<json>' body"
    return json.loads(preview.group(1))


def wait_until_done(page, timeout: float = 60000) -> None:
    expect(page.locator("#step")).to_have_text(re.compile(r"^done"), timeout=timeout)


def image_is_not_blank(page) -> bool:
    return page.evaluate("""() => new Promise((resolve) => {
        const image = document.getElementById('result');
        const check = () => {
            const canvas = document.createElement('canvas');
            canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
            const context = canvas.getContext('2d');
            context.drawImage(image, 0, 0);
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let low = 255, high = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                low = Math.min(low, pixels[i]); high = Math.max(high, pixels[i]);
            }
            resolve(canvas.width > 0 && high - low > 50);
        };
        image.complete && image.naturalWidth ? check() : image.addEventListener('load', check, { once: true });
    })""")
