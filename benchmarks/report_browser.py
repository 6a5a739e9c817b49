"""Render a report in a real browser (headless Chromium) and check that it displays: a full-page
screenshot, every image decoded, nothing wider than the window.

    python benchmarks/report_browser.py runs/demo/report.html            # writes runs/demo/report.png
    python benchmarks/report_browser.py runs/demo/report.html --out shot.png --width 1280

Browsers, in order: Playwright's Chromium (``pip install playwright && playwright install chromium``),
Playwright driving a system Chromium, or a system Chromium / Chrome alone (``--headless --screenshot``;
then only the screenshot is checked, not the images one by one). Exits with status 2 when no browser is
found, 1 when the page does not display properly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHECK_JS = """() => {
  const imgs = Array.from(document.images);
  return {
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    external: imgs.filter(i => !i.src.startsWith('data:')).map(i => i.src),
    height: document.documentElement.scrollHeight,
    overflow: document.documentElement.scrollWidth > window.innerWidth + 1,
    sections: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  };
}"""


def system_browser() -> str | None:
    """A Chromium-family executable on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def available() -> bool:
    """Whether a browser can be driven here (Playwright with its Chromium, or a system one)."""
    return system_browser() is not None or _playwright_chromium() is not None


def _playwright_chromium() -> str | None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:
        return None
    return path if Path(path).exists() else None


def screenshot(html: str | Path, out: str | Path, width: int = 1200) -> dict[str, Any]:
    """Open ``html`` in headless Chromium, save a full-page PNG to ``out`` and return what the page
    reports (images, broken ones, external sources, page height, overflow, section titles)."""
    html, out = Path(html).resolve(), Path(out)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return _cli_screenshot(html, out, width)
    executable = None if _playwright_chromium() else system_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        facts = page.evaluate(CHECK_JS)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return {"browser": "playwright", **facts}


def _cli_screenshot(html: Path, out: Path, width: int) -> dict[str, Any]:
    """Chromium's own headless screenshot (no page facts: the window is made tall enough instead)."""
    browser = system_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium-family browser found (install chromium, or playwright)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},6000", f"--screenshot={out.resolve()}",
             html.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return {"browser": browser}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a report.html")
    ap.add_argument("--out", help="PNG to write (default: next to the report, report.png)")
    ap.add_argument("--width", type=int, default=1200, help="window width in CSS pixels")
    args = ap.parse_args()
    if not available():
        print("no browser: install chromium, or `pip install playwright && playwright install chromium`")
        return 2
    out = Path(args.out or Path(args.report).with_suffix(".png"))
    facts = screenshot(args.report, out, args.width)
    print(json.dumps(facts, indent=1))
    print(f"screenshot: {out}")
    bad = facts.get("broken") or facts.get("external") or facts.get("overflow")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
