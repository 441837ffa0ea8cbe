"""End to end: the real server on a free loopback port, the page driven in headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium, start_server
from PIL import Image

from catdogcnn.data import decode_image
from catdogcnn.predict import load_classifier

PHOTOS = Path(__file__).parent / "fixtures" / "photos"


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
    card = page.wait_for_selector(".card.error", timeout=30_000)
    assert card.query_selector(".label").inner_text() == "Not a photo"
    card.query_selector("summary").click()
    message = card.query_selector(".details p").inner_text()
    assert "notes.jpg" in message and "not an image" in message
    page.close()


def test_results_in_order_with_a_summary_a_csv_and_plain_words_for_neither(server, browser, tmp_path, a_photo):
    """Photos listed as given; "neither" said in words with no heat map; limits read from the server."""
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)  # a flat colour: "neither", with certainty
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page = browser.new_page()
    page.goto(server)
    page.wait_for_function("document.getElementById('limits').textContent.includes('megapixels')")
    assert "32 photos at a time" in page.inner_text("#limits") and "10 MB" in page.inner_text("#limits")
    page.set_input_files("#files", [str(a_photo[0]), str(blank), str(notes)])
    page.wait_for_function("document.querySelectorAll('#results .card:not(.pending)').length === 3", timeout=60_000)
    cards = page.query_selector_all("#results .card")
    assert [c.query_selector(".file").inner_text().split(" \u00b7 ")[-1] for c in cards] == \
        [a_photo[0].name, "blank.png", "notes.txt"]
    assert cards[1].query_selector(".label").inner_text() == "This doesn't look like a cat or a dog"
    assert cards[1].query_selector("figure, img + img") is None  # no heat map of a pet that is not there
    assert "not labelled" in page.inner_text("#counts") and "1 neither" in page.inner_text("#counts")
    with page.expect_download() as download:
        page.click("#csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [r["file"] for r in rows] == [a_photo[0].name, "blank.png", "notes.txt"]
    assert rows[1]["label"] == "neither" and rows[2]["error"] and not rows[2]["label"]
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


LOCAL_RUN = """async ({photos}) => {
  const { loadLocalModel } = await import("./static/local.js");
  const local = await loadLocalModel(fetch);
  const out = [];
  for (const [name, data] of photos) {
    const blob = new Blob([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))]);
    const image = await local.preprocess(blob);
    const outputs = await local.run(image);
    const answer = await local.label(new File([blob], name));
    let binary = "";
    for (const byte of image) binary += String.fromCharCode(byte);
    out.push({ name, tensor: btoa(binary), probabilities: outputs.probabilities, label: answer.label,
               neither: answer.neither_probability });
  }
  return { out, threads: local.threads, isolated: self.crossOriginIsolated };
}"""


def local_mode_available(server: str) -> None:
    import urllib.request

    try:
        urllib.request.urlopen(f"{server}/static/ort/ort.wasm.min.mjs", timeout=10).close()
    except OSError:
        pytest.skip("the page's runtime is not installed (`make web` fetches onnxruntime-web from npm)")


def test_local_mode_gives_the_servers_input_tensors_outputs_and_labels(server, browser):
    """On photos of every kind, the browser's input tensor is decode_image's byte for byte, the outputs within
    1e-5 of Python's onnxruntime and the labels equal; 2 threads, cross-origin isolated."""
    local_mode_available(server)
    photos = sorted(PHOTOS.iterdir())
    page = browser.new_page()
    page.goto(server)
    result = page.evaluate(LOCAL_RUN, {"photos": [[p.name, base64.b64encode(p.read_bytes()).decode()]
                                                  for p in photos]})
    page.close()
    assert result["isolated"] and result["threads"] == min(4, max(2, result["threads"]))
    clf = load_classifier()
    size = clf.image_size
    for photo, answer in zip(photos, result["out"], strict=True):
        tensor = np.frombuffer(base64.b64decode(answer["tensor"]), np.uint8).reshape(size, size, 3)
        expected = decode_image(photo, size)
        if photo.name == "large_draft.jpg":  # decoded at reduced scale by Pillow, in full by the browser
            assert np.abs(tensor.astype(int) - expected).mean() < 2, photo.name
        else:
            assert np.array_equal(tensor, expected), photo.name
        prediction = clf.predict(photo)
        assert answer["label"] == prediction.label, photo.name
        if photo.name != "large_draft.jpg":
            outputs = clf.predict_arrays(expected[None])[0]
            assert np.abs(np.array(answer["probabilities"]) - outputs).max() <= 1e-5, photo.name
            assert answer["neither"] == pytest.approx(prediction.neither_probability, abs=1e-5), photo.name


def test_local_mode_uploads_no_photo(server, browser, a_photo):
    local_mode_available(server)
    page = browser.new_page()
    sent = []
    page.on("request", lambda request: sent.append((request.method, request.url, request.post_data_buffer)))
    page.goto(server)
    page.check("#local")
    page.wait_for_selector("#local-status:has-text('Ready')", timeout=60_000)
    threads = re.search(r"Ready: (\d+) thread", page.inner_text("#local-status"))
    assert threads and int(threads.group(1)) >= min(2, os.cpu_count() or 1)
    page.set_input_files("#files", str(a_photo[0]))
    label = page.wait_for_selector(".card:not(.pending) .label", timeout=60_000).inner_text()
    photo = a_photo[0].read_bytes()
    assert not [url for method, url, body in sent if method != "GET" or (body and photo[:4096] in body)]
    assert label.lower() in ("cat", "dog") or label.startswith("This doesn't look")
    page.close()


def test_the_exported_page_labels_photos_from_any_static_host(browser, tmp_path, a_photo, run_cli):
    import functools
    import http.server
    import threading

    site = tmp_path / "site"
    exported = run_cli("export-web", site)
    if exported.returncode != 0 and "make web" in exported.stderr:
        pytest.skip("the page's runtime is not installed (`make web` fetches onnxruntime-web from npm)")
    assert exported.returncode == 0, exported.stderr

    class IsolatedHandler(http.server.SimpleHTTPRequestHandler):  # a static host that sends the isolation headers
        def end_headers(self):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(IsolatedHandler, directory=site))
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        sent = []
        page.on("request", lambda request: sent.append(request.method))
        page.goto(f"http://127.0.0.1:{host.server_port}/")
        page.wait_for_selector("#local-status:has-text('Ready')", timeout=60_000)
        assert page.is_checked("#local") and page.is_disabled("#local")
        page.set_input_files("#files", str(a_photo[0]))
        label = page.wait_for_selector(".card:not(.pending) .label", timeout=60_000).inner_text().lower()
        if a_photo[1]:
            assert label == a_photo[1]
        assert set(sent) == {"GET"}
        page.close()
    finally:
        host.shutdown()
