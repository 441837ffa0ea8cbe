"""End to end: the real server on a free loopback port, the page driven in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import chromium, start_server


@pytest.fixture(scope="module")
def server():
    process, url = start_server()
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


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
