"""docs/page.png: the real page, served by `catdogcnn serve` (shipped model), with real photos dropped on it.

    python benchmarks/page_screenshot.py [--out docs/page.png]

The photos are the test fixtures' (scikit-image's sample photos: Chelsea the cat, coffee, a rocket, an astronaut)
and a text file, so the picture shows a label, "neither" in words and an error card as a user sees them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve_load import start_server  # a sibling script's helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402  (the tests' way to start the browser)

PHOTOS = ["jpeg_baseline.jpg", "webp_lossy.webp", "jpeg_exif_6.jpg", "png_rgb.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    notes = Path("/tmp") / "notes.txt" if Path("/tmp").is_dir() else Path("notes.txt")
    notes.write_text("a shopping list, not a photo\n")
    files = [str(ROOT / "tests" / "fixtures" / "photos" / name) for name in PHOTOS] + [str(notes)]
    server, url, _ = start_server([])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('Model')")
            page.set_input_files("#files", files)
            page.wait_for_function(f"document.querySelectorAll('#results .card:not(.pending)').length === {len(files)}",
                                   timeout=120_000)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{args.out} written")


if __name__ == "__main__":
    main()
