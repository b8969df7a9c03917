"""Screenshot an HTML page (a file or a loopback URL) with Debian's chromium through Playwright.

Used for the README's picture of `moe-lab compare` (the report of scripts/demo.sh). Nothing off the
machine is fetched: requests that leave loopback are blocked.
Run: python scripts/screenshot.py compare/router_ablation_small/report.html docs/img/compare_report.png
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.parse
from pathlib import Path

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(page_or_url: str, out: Path, width: int = 1300, chromium: str = "/usr/bin/chromium",
               full_page: bool = True) -> Path:
    from playwright.sync_api import sync_playwright

    url = page_or_url if "://" in page_or_url else Path(page_or_url).resolve().as_uri()
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=FLAGS,
            viewport={"width": width, "height": 900})
        context.route("**/*", _only_loopback)
        page = context.new_page()
        page.goto(url, wait_until="networkidle")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=full_page)
        context.close()
    return Path(out)


def _only_loopback(route) -> None:
    url = urllib.parse.urlparse(route.request.url)
    if url.scheme in ("file", "data", "blob") or url.hostname in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="HTML file or http://127.0.0.1:... URL")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1300, help="viewport width in pixels")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable")
    args = parser.parse_args()
    print(screenshot(args.page, args.out, args.width, args.chromium))


if __name__ == "__main__":
    main()
