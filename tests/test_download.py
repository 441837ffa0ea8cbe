"""`data download` against a local HTTP server on loopback (never the internet), and `data split`."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from catdogcnn.download import (
    COLLECTIONS,
    RAW_URL,
    DownloadError,
    download,
    download_collection,
    read_manifest,
    shipped_manifest,
    source_url,
    split,
)


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
    """Serves files at `/{path}` with Range support (the archive; originals at `/{repo}/{commit}/{path}` as
    GitHub's raw host does); a path in `drop` has its first response cut off half-way, one in `busy` is first
    answered 503. Records each request's (path, Range)."""

    def __init__(self, files: dict[str, bytes], drop: set[str] = frozenset(), busy: set[str] = frozenset()):
        self.files, self.drop, self.busy, self.requests = dict(files), set(drop), set(busy), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urllib.parse.unquote(self.path.lstrip("/"))
                outer.requests.append((path, self.headers.get("Range")))
                if path not in outer.files:
                    self.send_error(404)
                    return
                if path in outer.busy:
                    outer.busy.discard(path)
                    self.send_error(503)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                body = outer.files[path][start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in outer.drop:
                    outer.drop.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self) -> set[str]:
        return {path for path, _ in self.requests}

    def close(self):
        self.httpd.shutdown()


ARCHIVE = "kagglecatsanddogs_5340.zip"


@pytest.fixture
def server(archive):
    s = Server({ARCHIVE: archive}, drop={ARCHIVE})
    s.payload, s.url = archive, f"{s.url}/{ARCHIVE}"
    yield s
    s.close()


def test_download_resumes_checks_extracts_and_moves_bad_files_aside(server, tmp_path):
    expected = hashlib.sha256(server.payload).hexdigest()
    root, moved = download(tmp_path, server.url, expected)
    assert server.requests[0][1] is None and server.requests[1][1].startswith("bytes=")  # resumed with Range
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


# --------------------------------------------------------------------------- not_pets and pet_breeds

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FIELDS = ("file", "source_repo", "source_commit", "source_path", "source_sha1")


def photo(width: int, height: int, exif_orientation: int | None = None, mode: str = "RGB") -> bytes:
    """A JPEG whose left half is red and right half blue as stored (so a turn shows), with EXIF when asked."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    extra = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra["exif"] = exif.tobytes()
    img.convert(mode).save(buffer, "JPEG", quality=95, **extra)
    return buffer.getvalue()


def collection_fixture(tmp_path: Path, rows: list[dict]) -> tuple[Path, dict[str, bytes]]:
    """Write a manifest of `rows` (each with `file`, `data` and optionally `path`, `sha1` to lie about the bytes);
    returns it and the server's files."""
    served = {}
    lines = [",".join((*FIELDS, "category"))]
    for row in rows:
        source_path = row.get("path", f"photos/{row['file']}")
        if row.get("data") is not None:
            served[f"owner/repo/{COMMIT}/{source_path}"] = row["data"]
        sha1 = row.get("sha1") or hashlib.sha1(row.get("data") or b"").hexdigest()
        lines.append(",".join((row["file"], "owner/repo", COMMIT, source_path, sha1, "x")))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, served


@pytest.fixture
def raw_server():
    servers = []

    def start(files: dict[str, bytes], drop: set[str] = frozenset(), busy: set[str] = frozenset()) -> Server:
        servers.append(Server(files, drop, busy))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_not_pets_are_checked_turned_resized_and_resumed(tmp_path, raw_server, jpeg_bytes):
    rows = [{"file": "big_0001.jpg", "data": photo(600, 300)},
            {"file": "small_0001.jpg", "data": photo(100, 80)},  # under the cap: never enlarged
            {"file": "turned_0001.jpg", "data": photo(300, 200, exif_orientation=6)},
            {"file": "cmyk_0001.jpg", "data": jpeg_bytes(3, 300, "CMYK")},
            {"file": "dropped_0001.jpg", "data": photo(400, 400), "path": "odd dir/a:b é.jpg"},
            {"file": "lying_0001.jpg", "data": photo(50, 50), "sha1": "f" * 40},
            {"file": "gone_0001.jpg", "data": None},
            {"file": "junk_0001.jpg", "data": b"this is not a photo at all"}]
    manifest, served = collection_fixture(tmp_path, rows)
    server = raw_server(served, drop={f"owner/repo/{COMMIT}/odd dir/a:b é.jpg"})
    dest = tmp_path / "data"
    done = []
    result = download_collection("not_pets", dest, server.url, manifest, workers=3,
                                 progress=lambda n, total: done.append((n, total)))

    folder = dest / "not_pets"
    assert result.folder == folder and result.present == []
    assert result.fetched == sorted(["big_0001.jpg", "small_0001.jpg", "turned_0001.jpg", "cmyk_0001.jpg",
                                     "dropped_0001.jpg"])
    reasons = dict(result.failed)
    assert set(reasons) == {"lying_0001.jpg", "gone_0001.jpg", "junk_0001.jpg"}
    assert "sha1" in reasons["lying_0001.jpg"] and "404" in reasons["gone_0001.jpg"]
    assert "decode" in reasons["junk_0001.jpg"]
    assert all("\n" not in reason for reason in reasons.values())
    assert done[-1] == (8, 8)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*result.fetched, "manifest.csv"])  # nothing partial
    assert (folder / "manifest.csv").read_text() == manifest.read_text()
    assert not (dest / ".downloads").exists()

    def opened(name: str) -> Image.Image:
        img = Image.open(folder / name)
        assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
        assert "exif" not in img.info and "icc_profile" not in img.info
        return img

    assert opened("big_0001.jpg").size == (256, 128)  # the longer side to 256, aspect kept
    assert opened("small_0001.jpg").size == (100, 80)
    assert opened("cmyk_0001.jpg").size == (256, 256)
    turned = opened("turned_0001.jpg")
    assert turned.size == (171, 256)  # upright: 200 x 300, then the longer side to 256
    top, bottom = turned.getpixel((85, 20)), turned.getpixel((85, 235))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # stored left (red) is now on top
    dropped = [r for p, r in server.requests if p.endswith("a:b é.jpg")]
    assert dropped[0] is None and dropped[1].startswith("bytes=")  # the dropped connection resumed with Range

    # A rerun asks only for what is missing; the fixed original then completes the folder.
    server.requests.clear()
    again = download_collection("not_pets", dest, server.url, manifest)
    assert sorted(again.present) == result.fetched and again.fetched == []
    assert server.paths() == {f"owner/repo/{COMMIT}/photos/{name}" for name in reasons}
    manifest.write_text(manifest.read_text().replace("f" * 40, hashlib.sha1(photo(50, 50)).hexdigest()))
    server.requests.clear()
    last = download_collection("not_pets", dest, server.url, manifest)
    assert last.fetched == ["lying_0001.jpg"] and len(last.present) == 5
    assert server.paths() == {f"owner/repo/{COMMIT}/photos/{name}" for name in ("lying_0001.jpg", "gone_0001.jpg",
                                                                                "junk_0001.jpg")}


def test_pet_breeds_cap_the_shorter_side_in_class_folders(tmp_path, raw_server, monkeypatch):
    rows = [{"file": "dogs/samoyed_0001.jpg", "data": photo(500, 400)},
            {"file": "cats/bengal_0001.jpg", "data": photo(900, 640)},
            {"file": "cats/tall_0001.jpg", "data": photo(200, 900)}]  # shorter side under 320: kept
    manifest, served = collection_fixture(tmp_path, rows)
    server = raw_server(served, busy={f"owner/repo/{COMMIT}/photos/cats/bengal_0001.jpg"})  # 503, then fine
    monkeypatch.setenv("CATDOGCNN_COLLECTIONS_URL", server.url + "/")  # the base from the environment
    result = download_collection("pet_breeds", tmp_path / "data", manifest=manifest)
    folder = tmp_path / "data" / "pet_breeds"
    assert result.failed == [] and len(result.fetched) == 3
    sizes = {p.relative_to(folder).as_posix(): Image.open(p).size for p in folder.rglob("*.jpg")}
    assert sizes == {"dogs/samoyed_0001.jpg": (400, 320), "cats/bengal_0001.jpg": (450, 320),
                     "cats/tall_0001.jpg": (200, 900)}
    assert (folder / "manifest.csv").is_file()
    assert [p for p, _ in server.requests].count(f"owner/repo/{COMMIT}/photos/cats/bengal_0001.jpg") == 2


def test_collection_command_summarises_and_fails_on_missing_photos(tmp_path, raw_server, monkeypatch):
    from typer.testing import CliRunner

    import catdogcnn.download as download_module
    from catdogcnn.cli import app

    manifest, served = collection_fixture(tmp_path, [{"file": "cats/a_0001.jpg", "data": photo(40, 30)},
                                                     {"file": "dogs/b_0001.jpg", "data": None}])
    server = raw_server(served)
    monkeypatch.setattr(download_module, "shipped_manifest", lambda name: manifest.read_text())
    monkeypatch.setenv("CATDOGCNN_COLLECTIONS_URL", server.url)
    result = CliRunner().invoke(app, ["data", "download", "--collection", "pet_breeds", "--dest", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stdout.strip() == f"{tmp_path / 'pet_breeds'}: 1 fetched, 0 already there, 1 failed"
    assert result.stderr.startswith("error: dogs/b_0001.jpg: ") and "404" in result.stderr
    served[f"owner/repo/{COMMIT}/photos/dogs/b_0001.jpg"] = photo(30, 40)
    server.files.update(served)
    manifest.write_text(manifest.read_text().replace(hashlib.sha1(b"").hexdigest(),
                                                     hashlib.sha1(photo(30, 40)).hexdigest()))
    result = CliRunner().invoke(app, ["data", "download", "--collection", "pet_breeds", "--dest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{tmp_path / 'pet_breeds'}: 1 fetched, 1 already there, 0 failed"


def test_with_the_host_unreachable_the_rest_are_not_tried(tmp_path):
    """No network: after MAX_UNREACHABLE_IN_A_ROW photos in a row could not connect, the run stops trying."""
    from catdogcnn.download import MAX_UNREACHABLE_IN_A_ROW

    rows = [{"file": f"x_{i:04d}.jpg", "data": b"%d" % i} for i in range(60)]
    manifest, _ = collection_fixture(tmp_path, rows)
    result = download_collection("not_pets", tmp_path / "data", "http://127.0.0.1:9", manifest, workers=2,
                                 attempts=1)
    assert result.fetched == [] and len(result.failed) == 60
    tried = [reason for _, reason in result.failed if not reason.startswith("not tried")]
    # Workers already at a photo when the count is reached still try it: how many depends on the machine's load.
    assert MAX_UNREACHABLE_IN_A_ROW <= len(tried) <= 40
    assert all("127.0.0.1:9" in reason for _, reason in result.failed)
    assert sorted((tmp_path / "data" / "not_pets").iterdir()) == [tmp_path / "data" / "not_pets" / "manifest.csv"]


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_shipped_manifests_name_every_source(name):
    rows = read_manifest(shipped_manifest(name))
    assert len(rows) == {"not_pets": 2442, "pet_breeds": 684}[name]
    for row in rows:
        assert all(row[field].strip() for field in FIELDS)
        assert re.fullmatch(r"[0-9a-f]{40}", row["source_sha1"]) and re.fullmatch(r"[0-9a-f]{40}",
                                                                                   row["source_commit"])
        assert row["file"].endswith(".jpg") and row["source_repo"].count("/") == 1
        assert ("/" not in row["file"]) if name == "not_pets" else row["file"].split("/")[0] in ("cats", "dogs")
    assert source_url(RAW_URL, rows[0]).startswith(f"https://raw.githubusercontent.com/{rows[0]['source_repo']}/")


@pytest.mark.parametrize(("file", "sha1", "words"), [("../outside.jpg", "a" * 40, "outside"),
                                                     ("/etc/x.jpg", "a" * 40, "outside"),
                                                     ("fine.jpg", "not-a-sha1", "40 hex")])
def test_a_manifest_that_would_write_outside_or_lacks_a_sha1_is_refused(file, sha1, words):
    from catdogcnn.errors import UserError

    text = ",".join(FIELDS) + f"\n{file},o/r,{COMMIT},p.jpg,{sha1}\n"
    with pytest.raises(UserError, match=words):
        read_manifest(text)
