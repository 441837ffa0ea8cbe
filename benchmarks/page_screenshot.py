"""A picture of the web page for the README: the server with the shipped default model, three photos uploaded
(a cat, a dog, a photo of neither), their answers on screen, saved as a PNG.

    python benchmarks/page_screenshot.py [--data ../shared/data/cats_vs_dogs] [--not-pets ../shared/data/not_pets] \\
        [--out docs/page.png]

Needs Playwright for Python and Debian's Chromium (`make browser`), like the page's end-to-end tests.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=1):
                return
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stdout.read().decode()[-2000:]}") from None
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cats_vs_dogs")
    parser.add_argument("--not-pets", type=Path, default=ROOT.parent / "shared" / "data" / "not_pets")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    photos = [args.data / "test_set" / "cats" / "cat.4001.jpg", args.data / "test_set" / "dogs" / "dog.4008.jpg",
              args.not_pets / "fox_0001.jpg"]
    missing = [str(p) for p in photos if not p.is_file()]
    if missing:
        raise SystemExit(f"photos not found: {', '.join(missing)}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "catdogcnn", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_up(url, server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            page.set_input_files("#files", [str(p) for p in photos])
            page.wait_for_function(f"document.querySelectorAll('.card .label').length >= {len(photos)}",
                                   timeout=60_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
