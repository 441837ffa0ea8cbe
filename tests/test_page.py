"""End to end: the real server on a free loopback port, the page driven in headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "catdogcnn", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/v1/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"server exited: {process.stdout.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python drives the browser")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian packages chromium, chromium-driver; `make browser`)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def a_photo(tmp_path, synthetic_photo, real_data_if_present) -> tuple[Path, str | None]:
    """A real dog when the real photos are here, else a synthetic photo; and the label it must get (None: any)."""
    if real_data_if_present:
        return real_data_if_present / "test_set" / "dogs" / "dog.4008.jpg", "dog"
    path = tmp_path / "photo.jpg"
    synthetic_photo(1, np.random.default_rng(0), 180).save(path)
    return path, None


def test_upload_shows_the_label(server, browser, a_photo, artifacts):
    photo, expected = a_photo
    page = browser.new_page()
    page.goto(server)
    assert page.title().startswith("catdogcnn")
    page.set_input_files("#files", str(photo))
    label = page.wait_for_selector(".card .label", timeout=30_000)
    assert label.inner_text().lower() in ("cat", "dog", "neither")
    if expected:
        assert label.inner_text().lower() == expected
    assert page.get_attribute(".card .bar", "role") == "meter"
    page.wait_for_selector("#model:not(:has-text('Loading'))")
    page.screenshot(path=str(artifacts / "page.png"), full_page=True)
    page.close()


def test_rejected_file_gets_a_clear_message(server, browser, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page = browser.new_page()
    page.goto(server)
    page.set_input_files("#files", str(notes))
    message = page.wait_for_selector(".card.error .reason", timeout=30_000).inner_text()
    assert "notes.jpg" in message and "not an image" in message
    page.close()


def test_phone_screen_and_keyboard(server, browser, a_photo, artifacts):
    page = browser.new_page(viewport={"width": 375, "height": 667})
    page.goto(server)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('Model')")  # script ran
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop"  # the drop zone is the first stop
    # Enter on the drop zone opens the file picker (the input's click); the native dialog itself is the OS's.
    page.evaluate("document.getElementById('files').addEventListener('click', e => {"
                  " window.pickerOpened = true; e.preventDefault(); })")
    page.keyboard.press("Enter")
    assert page.evaluate("window.pickerOpened === true")
    page.set_input_files("#files", str(a_photo[0]))
    page.wait_for_selector(".card .label", timeout=30_000)
    page.screenshot(path=str(artifacts / "page_phone.png"), full_page=True)
    page.close()
