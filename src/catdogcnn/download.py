"""The real data set on a fresh machine: download Microsoft's "Cats and Dogs" archive, check it, extract it,
move its known bad files aside, and lay it out like the seed (`training_set` / `test_set` / `extra_set`); and
rebuild the `not_pets` and `pet_breeds` photo folders from their manifests' pinned GitHub sources.

    catdogcnn data download [--dest data/] [--url URL] [--sha256 HEX]
    catdogcnn data download --collection not_pets|pet_breeds|all [--dest data/]
    catdogcnn data split data/PetImages --dest data/cats_vs_dogs [--train 4000 --test 1000 --seed 0]

Downloads resume where they stopped (HTTP Range), also after a dropped connection; nothing is deleted:
unusable photos go to `DEST/rejected/` with the reason in `DEST/rejected/reasons.tsv`. A collection's photos
are written whole or not at all, so a rerun fetches only the ones still missing.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import os
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from catdogcnn.bundle import atomic_write
from catdogcnn.data import BadImageError, decode_image, list_classes
from catdogcnn.errors import UserError

DEFAULT_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
               "kagglecatsanddogs_5340.zip")
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that cannot complete; one line, naming the URL or file."""


class UnreachableError(DownloadError):
    """The server could not be reached or kept dropping the connection, every attempt: the network, not the file."""


def data_url() -> str:
    return os.environ.get("CATDOGCNN_DATA_URL") or DEFAULT_URL


def fetch(url: str, target: Path, attempts: int = 5, progress: Callable[[int, int | None], None] | None = None,
          timeout: float = 60) -> Path:
    """Download `url` to `target`, resuming a partial `target.part` with HTTP Range; retries dropped connections."""
    target = Path(target)
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # the server ignored the range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else None
                with open(partial, "ab" if have else "wb") as f:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        have += len(chunk)
                        if progress:
                            progress(have, total)
                if total is not None and have < total:
                    raise DownloadError(f"{url}: connection closed after {have} of {total} bytes")
            os.replace(partial, target)
            return target
        except urllib.error.HTTPError as e:
            if e.code == 416 and partial.exists():  # the partial file is already whole
                os.replace(partial, target)
                return target
            if (e.code == 429 or e.code >= 500) and attempt < attempts:  # busy or failing for now: try again
                time.sleep(min(2 ** attempt * 0.1, 5))
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as e:
            if attempt == attempts:
                raise UnreachableError(f"{url}: download failed after {attempts} attempts ({e})") from None
            time.sleep(min(2 ** attempt * 0.1, 5))
    raise AssertionError("unreachable")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip safely (no absolute paths, no `..`); returns the top-level entries written."""
    dest = Path(dest).resolve()
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                path = (dest / member.filename).resolve()
                if not path.is_relative_to(dest):
                    raise DownloadError(f"{archive}: entry {member.filename!r} would land outside {dest}")
            z.extractall(dest)
            return sorted({dest / Path(m.filename).parts[0] for m in z.infolist()})
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a readable zip archive ({e})") from None


def photo_problem(path: Path) -> str | None:
    """Why a photo should be set aside (not decodable, not a JPEG, not 3-channel RGB), or None."""
    from PIL import Image

    try:
        decode_image(path, 32)
        with Image.open(path) as img:
            if img.format != "JPEG":
                return f"not a JPEG ({img.format})"
            if img.mode != "RGB":
                return f"{img.mode} image, not RGB"
    except BadImageError as e:
        return e.reason
    except OSError as e:
        return f"cannot read ({e})"
    return None


def clean(root: Path, rejected: Path) -> list[tuple[Path, str]]:
    """Move every unusable file under `root`'s class folders to `rejected/<class>/`, logging why."""
    moved = []
    rejected.mkdir(parents=True, exist_ok=True)
    for name in list_classes(root):
        for path in sorted((root / name).iterdir()):
            reason = "not a photo file" if not path.is_file() or path.suffix.lower() != ".jpg" else photo_problem(path)
            if reason:
                (rejected / name).mkdir(exist_ok=True)
                shutil.move(path, rejected / name / path.name)
                moved.append((Path(name) / path.name, reason))
    with open(rejected / "reasons.tsv", "a") as f:
        f.writelines(f"{path}\t{reason}\n" for path, reason in moved)
    return moved


def download(dest: Path, url: str | None = None, sha256: str | None = None,
             progress: Callable[[int, int | None], None] | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """Fetch, verify, extract and clean the archive; returns (the photo folder, the files moved aside)."""
    dest = Path(dest)
    url = url or data_url()
    archive = fetch(url, dest / Path(url.split("?")[0]).name, progress=progress)
    actual = sha256_of(archive)
    expected = sha256 or os.environ.get("CATDOGCNN_DATA_SHA256")
    record = dest / (archive.name + ".sha256")
    if not expected and record.exists():
        expected = record.read_text().split()[0]
    if expected and actual != expected.lower():
        archive.rename(archive.with_name(archive.name + ".bad"))
        raise DownloadError(f"{archive}: sha256 {actual} is not the expected {expected}; kept as {archive.name}.bad")
    record.write_text(f"{actual}  {archive.name}\n")
    tops = [p for p in extract(archive, dest) if p.is_dir()]
    root = next((p for p in tops if p.name == "PetImages"), tops[0] if tops else dest)
    return root, clean(root, dest / "rejected")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def split(source: Path, dest: Path, train: int = 4000, test: int = 1000, seed: int = 0,
          extra: bool = True) -> dict[str, dict[str, int]]:
    """Lay out class folders like the seed: `train`/`test` photos a class, seeded; the rest in extra_set.

    Class folders are named in lower case and plural (PetImages' Cat -> cats), as the seed's.
    """
    source, dest = Path(source), Path(dest)
    counts: dict[str, dict[str, int]] = {}
    for name in list_classes(source):
        photos = sorted(p for p in (source / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if len(photos) < train + test:
            raise UserError(f"{source / name}: {len(photos)} photos, fewer than {train} + {test}")
        random.Random(f"{seed}:{name}").shuffle(photos)
        label = name.lower() if name.lower().endswith("s") else name.lower() + "s"
        parts = {"training_set": photos[:train], "test_set": photos[train:train + test]}
        if extra:
            parts["extra_set"] = photos[train + test:]
        for split_name, chosen in parts.items():
            folder = dest / split_name / label
            folder.mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                _link_or_copy(photo, folder / f"{label[:-1]}.{photo.name}")
            counts.setdefault(split_name, {})[label] = len(chosen)
    return counts


# --------------------------------------------------------------------------- not_pets and pet_breeds

RAW_URL = "https://raw.githubusercontent.com"
MANIFEST_FIELDS = ("file", "source_repo", "source_commit", "source_path", "source_sha1")
_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Collection:
    """How a collection's photos were made from their originals: the cap in pixels on the longer side
    (`longer`) or on the shorter one, as its README says; the originals are never enlarged."""

    side: int
    longer: bool


COLLECTIONS = {"not_pets": Collection(256, longer=True), "pet_breeds": Collection(320, longer=False)}
# After this many photos in a row found the host unreachable, the rest are not tried: with no network, a run
# says so in seconds rather than retrying every photo of the manifest.
MAX_UNREACHABLE_IN_A_ROW = 20


@dataclass
class CollectionResult:
    """What one `download_collection` run did, by manifest `file`: failures carry a one-line reason."""

    name: str
    folder: Path
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def collections_url() -> str:
    """Where the originals are, laid out `{base}/{repo}/{commit}/{path}`: `$CATDOGCNN_COLLECTIONS_URL` (a mirror,
    or a test server), else GitHub's raw file host."""
    return (os.environ.get("CATDOGCNN_COLLECTIONS_URL") or RAW_URL).rstrip("/")


def shipped_manifest(name: str) -> str:
    """The text of a collection's manifest as shipped inside the package (so a wheel alone can rebuild it)."""
    if name not in COLLECTIONS:
        raise UserError(f"unknown collection {name!r} (known: {', '.join(COLLECTIONS)})")
    return resources.files("catdogcnn").joinpath("manifests", f"{name}.csv").read_text(encoding="utf-8")


def read_manifest(text: str, origin: str = "manifest") -> list[dict[str, str]]:
    """Parse and check a manifest: every row needs the source fields, a 40-hex sha1 and a `file` that stays
    inside the collection's folder (a manifest given by path is not trusted to)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [name for name in MANIFEST_FIELDS if name not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{origin}: no column {', '.join(missing)} (expected {', '.join(MANIFEST_FIELDS)})")
    rows, seen = [], set()
    for line, row in enumerate(reader, start=2):
        if any(not (row.get(name) or "").strip() for name in MANIFEST_FIELDS):
            raise UserError(f"{origin}, line {line}: an empty field among {', '.join(MANIFEST_FIELDS)}")
        if not _SHA1.fullmatch(row["source_sha1"].lower()):
            raise UserError(f"{origin}, line {line}: source_sha1 {row['source_sha1']!r} is not 40 hex digits")
        file = PurePosixPath(row["file"])
        if file.is_absolute() or ".." in file.parts or "\\" in row["file"] or file.name.startswith("."):
            raise UserError(f"{origin}, line {line}: file {row['file']!r} would land outside the folder")
        if row["file"] in seen:
            raise UserError(f"{origin}, line {line}: file {row['file']!r} is listed twice")
        seen.add(row["file"])
        rows.append(row)
    return rows


def source_url(base: str, row: dict[str, str]) -> str:
    """The original of a manifest row under `base`, its path URL-quoted (spaces, `:`, non-ASCII names)."""
    parts = (row["source_repo"], row["source_commit"], row["source_path"])
    return base.rstrip("/") + "/" + "/".join(urllib.parse.quote(part, safe="/") for part in parts)


def process_photo(data: bytes, side: int, longer: bool) -> bytes:
    """An original as the collection holds it: RGB, upright from its EXIF orientation, resized with Lanczos so
    the longer (or shorter) side is at most `side` px, aspect kept and never enlarged, saved as baseline JPEG
    quality 90 with optimised tables and no metadata. Raises BadImageError for what cannot be decoded."""
    from PIL import Image, ImageOps

    from catdogcnn.data import MAX_IMAGE_PIXELS
    from catdogcnn.pixels import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as original:
            if original.width * original.height > MAX_IMAGE_PIXELS:
                raise BadImageError("original", f"decompression bomb refused ({original.width}x{original.height})",
                                    "bomb")
            original.load()
            img = to_rgb(ImageOps.exif_transpose(original))
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError("original", f"decompression bomb refused ({e})", "bomb") from None
    except Exception as e:  # Pillow's parsers fail in many ways (OSError, SyntaxError, ValueError, ...) on bad bytes
        raise BadImageError("original", f"cannot decode ({type(e).__name__}: {e})") from None
    width, height = img.size
    capped = max(width, height) if longer else min(width, height)
    if capped > side:
        scale = side / capped
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    img.info.clear()  # no EXIF, ICC profile or comment travels into the saved file
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, optimize=True, progressive=False)
    return out.getvalue()


class _RowFailed(Exception):
    """One manifest row that could not be made; the message is its one-line reason."""


class _UnreachableStreak:
    """Photos in a row that found the host unreachable, counted by the workers as they finish (not when the results
    are read, which can lag far behind), so that the rest stop being tried as soon as the count is reached."""

    def __init__(self) -> None:
        self.count, self.lock, self.give_up = 0, threading.Lock(), threading.Event()

    def record(self, unreachable: bool) -> None:
        with self.lock:
            self.count = self.count + 1 if unreachable else 0
            if self.count >= MAX_UNREACHABLE_IN_A_ROW:
                self.give_up.set()


def _make_row(row: dict[str, str], folder: Path, scratch: Path, base: str, spec: Collection, attempts: int,
              streak: _UnreachableStreak) -> None:
    if streak.give_up.is_set():
        raise _RowFailed(f"not tried: the last {MAX_UNREACHABLE_IN_A_ROW} photos found the host unreachable "
                         f"({base})")
    download_to = scratch / row["file"].replace("/", "__")
    try:
        fetch(source_url(base, row), download_to, attempts=attempts)
        streak.record(False)
    except DownloadError as e:  # a `.part` stays behind in the scratch folder: a rerun resumes it
        streak.record(isinstance(e, UnreachableError))
        raise _RowFailed(str(e)) from None
    try:
        data = download_to.read_bytes()
    finally:
        download_to.unlink(missing_ok=True)
    actual = hashlib.sha1(data).hexdigest()
    if actual != row["source_sha1"].lower():
        raise _RowFailed(f"sha1 {actual} of the download is not the manifest's {row['source_sha1']} "
                         f"({len(data)} bytes from {source_url(base, row)})")
    try:
        photo = process_photo(data, spec.side, spec.longer)
    except BadImageError as e:
        raise _RowFailed(e.reason) from None
    target = folder / row["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, photo)


def download_collection(name: str, dest: Path, base_url: str | None = None, manifest: Path | None = None,
                        workers: int = 8, attempts: int = 5,
                        progress: Callable[[int, int], None] | None = None) -> CollectionResult:
    """Rebuild `dest/<name>/` (not_pets or pet_breeds) from its manifest's pinned originals, checking each one's
    sha1 and processing it as the collection's README says; the manifest is copied beside the photos.

    Photos already there are skipped (each is written atomically, so one that exists is whole): a rerun fetches
    only the missing ones. A row that fails (unreachable after `attempts`, wrong sha1, not decodable) is
    reported in the result and nothing is written for it; the others go on. `manifest` replaces the shipped
    one, `base_url` the originals' host; `progress(done, total)` counts the rows fetched or failed.
    """
    if name not in COLLECTIONS:
        raise UserError(f"unknown collection {name!r} (known: {', '.join(COLLECTIONS)})")
    spec = COLLECTIONS[name]
    text = Path(manifest).read_text(encoding="utf-8") if manifest else shipped_manifest(name)
    rows = read_manifest(text, str(manifest) if manifest else f"the shipped {name} manifest")
    folder = Path(dest) / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "manifest.csv", text.encode("utf-8"))
    there = {row["file"] for row in rows if (folder / row["file"]).is_file()}
    todo = [row for row in rows if row["file"] not in there]
    result = CollectionResult(name, folder, present=sorted(there))
    if not todo:
        return result
    base = (base_url or collections_url()).rstrip("/")
    scratch = Path(dest) / ".downloads" / name  # outside the photo folder: readers of it never see a `.part`
    scratch.mkdir(parents=True, exist_ok=True)
    streak = _UnreachableStreak()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_make_row, row, folder, scratch, base, spec, attempts, streak): row["file"]
                   for row in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            file = futures[future]
            try:
                future.result()
                result.fetched.append(file)
            except _RowFailed as e:
                result.failed.append((file, " ".join(str(e).split())))
            except OSError as e:  # the destination, not the source: a full disk, no permission
                result.failed.append((file, f"cannot write ({e.strerror or e})"))
            if progress:
                progress(done, len(todo))
    result.fetched.sort()
    result.failed.sort()
    for empty in (scratch, scratch.parent):
        try:
            empty.rmdir()
        except OSError:  # not empty: `.part` files a rerun resumes
            break
    return result
