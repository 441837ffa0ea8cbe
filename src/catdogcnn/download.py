"""The real data set on a fresh machine: download Microsoft's "Cats and Dogs" archive, check it, extract it,
move its known bad files aside, and lay it out like the seed (`training_set` / `test_set` / `extra_set`).

    catdogcnn data download [--dest data/] [--url URL] [--sha256 HEX]
    catdogcnn data split data/PetImages --dest data/cats_vs_dogs [--train 4000 --test 1000 --seed 0]

Downloads resume where they stopped (HTTP Range), also after a dropped connection; nothing is deleted:
unusable photos go to `DEST/rejected/` with the reason in `DEST/rejected/reasons.tsv`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from catdogcnn.data import BadImageError, decode_image, list_classes
from catdogcnn.errors import UserError

DEFAULT_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
               "kagglecatsanddogs_5340.zip")
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that cannot complete; one line, naming the URL or file."""


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
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as e:
            if attempt == attempts:
                raise DownloadError(f"{url}: download failed after {attempts} attempts ({e})") from None
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
