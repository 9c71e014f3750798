"""Screenshot the demo page after one Watch, for the docs (docs/demo-page.png: docs/index.md, docs/serving.md).

Starts the real server on a models directory, opens the page in Debian's Chromium (Playwright), presses
Watch on the model the page opens on (optionally with a class picked) and saves the page once the
stream is done.

    python scripts/page_screenshot.py --models-dir checkpoints --out docs/demo-page.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402
from server import running_server  # noqa: E402

from service.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "checkpoints", help="default: checkpoints/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo-page.png", help="default: docs/demo-page.png")
    parser.add_argument("--label", default=None, help="a class to pick before Watch (default: any)")
    parser.add_argument("--seed", type=int, default=1, help="the request's seed, so the shot can be redone (default 1)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="default: /usr/bin/chromium")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as state,
        running_server(Settings(models_dir=args.models_dir, state_dir=Path(state), device="cpu")) as (base, _),
        sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(base)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        if args.label is not None:
            page.select_option("#label", label=args.label)
        page.fill("#seed", str(args.seed))
        page.click("#watch")
        page.wait_for_function("document.querySelector('#step').textContent.startsWith('done')", timeout=300_000)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
