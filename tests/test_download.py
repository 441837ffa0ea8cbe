"""`data download` against a local HTTP server on loopback (never the internet), and `data split`."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from catdogcnn.download import DownloadError, download, split


@pytest.fixture(scope="module")
def archive(jpeg_bytes) -> bytes:
    def jpeg(seed: int, mode: str = "RGB") -> bytes:
        return jpeg_bytes(seed, 40, mode)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i in range(12):
            z.writestr(f"PetImages/Cat/{i}.jpg", jpeg(i))
            z.writestr(f"PetImages/Dog/{i}.jpg", jpeg(100 + i))
        z.writestr("PetImages/Cat/666.jpg", b"\xff\xd8 this is not really a jpeg")
        z.writestr("PetImages/Dog/cmyk.jpg", jpeg(7, "CMYK"))
        png = io.BytesIO()
        Image.new("RGB", (20, 20)).save(png, "PNG")
        z.writestr("PetImages/Dog/png.jpg", png.getvalue())
        z.writestr("PetImages/Cat/Thumbs.db", b"\x00" * 64)
    return buffer.getvalue()


class Server:
    """Serves one archive with Range support; the first `drops` requests close the connection half-way."""

    def __init__(self, payload: bytes, drops: int = 1):
        self.payload, self.drops, self.requests = payload, drops, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.headers.get("Range"))
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drops > 0:
                    outer.drops -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/kagglecatsanddogs_5340.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(archive):
    s = Server(archive)
    yield s
    s.close()


def test_download_resumes_checks_extracts_and_moves_bad_files_aside(server, tmp_path):
    expected = hashlib.sha256(server.payload).hexdigest()
    root, moved = download(tmp_path, server.url, expected)
    assert server.requests[0] is None and server.requests[1].startswith("bytes=")  # resumed with Range
    assert root == tmp_path / "PetImages"
    assert sorted(p.name for p in (root / "Cat").iterdir()) == sorted(f"{i}.jpg" for i in range(12))
    reasons = {str(path): reason for path, reason in moved}
    assert set(reasons) == {"Cat/666.jpg", "Cat/Thumbs.db", "Dog/cmyk.jpg", "Dog/png.jpg"}
    assert "CMYK" in reasons["Dog/cmyk.jpg"] and "PNG" in reasons["Dog/png.jpg"]
    assert (tmp_path / "rejected" / "Dog" / "cmyk.jpg").exists()  # moved aside, not deleted
    assert len((tmp_path / "rejected" / "reasons.tsv").read_text().splitlines()) == 4

    counts = split(root, tmp_path / "seed", train=8, test=2)
    assert counts == {"training_set": {"cats": 8, "dogs": 8}, "test_set": {"cats": 2, "dogs": 2},
                      "extra_set": {"cats": 2, "dogs": 2}}
    again = tmp_path / "seed2"
    split(root, again, train=8, test=2)
    assert sorted(p.name for p in (again / "test_set" / "cats").iterdir()) == \
        sorted(p.name for p in (tmp_path / "seed" / "test_set" / "cats").iterdir())  # seeded


def test_wrong_checksum_is_refused_and_kept(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256"):
        download(tmp_path, server.url, "0" * 64)
    assert (tmp_path / "kagglecatsanddogs_5340.zip.bad").exists()


def test_unreachable_server_is_a_one_line_error(tmp_path):
    with pytest.raises(DownloadError) as info:
        download(tmp_path, "http://127.0.0.1:9/nothing.zip")
    assert "\n" not in str(info.value) and "127.0.0.1:9" in str(info.value)


def test_zip_slip_is_refused(tmp_path):
    from catdogcnn.download import extract

    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../../outside.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract(bad, tmp_path / "dest")
    assert not Path(tmp_path / "outside.txt").exists()
