"""Photos in class folders: scan, decode safely, cache decoded arrays, split, hash file contents.

Two layouts are accepted: the seed's (`DIR/training_set/<class>`, `DIR/test_set/<class>`, optionally
`DIR/extra_set/<class>`) and a plain `DIR/<class>`. Class names are the sorted sub-folder names.
This module needs numpy and Pillow (with pillow-heif for iPhone photos) only: training and inference both decode
through `decode_image`, so a photo becomes the same pixels in both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

from catdogcnn.bundle import atomic_output, atomic_write
from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra
from catdogcnn.pixels import to_rgb

log = logging.getLogger("catdogcnn")

SPLIT_FOLDERS = {"train": "training_set", "test": "test_set", "extra": "extra_set"}
# The most pixels a photo may have (Pillow's own hard limit; a 16k x 10k photo passes). Checked from the header
# before decoding, per call (a server passes a lower cap); Pillow's process-wide setting is left alone.
MAX_IMAGE_PIXELS = 178_956_970
# Larger files are refused before they are read: room for an uncompressed RGBA photo at the pixel limit.
MAX_FILE_BYTES = 4 * MAX_IMAGE_PIXELS
# iPhone photos (HEIC/HEIF) open in Pillow like any other format, wherever photos are read. libheif applies the
# photo's rotation itself and resets its EXIF orientation to 1, so exif_transpose below never turns it twice.
pillow_heif.register_heif_opener()
# Leading bytes of formats we know: a file that starts like one but will not open is corrupt, not "not an image".
MAGIC = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP",
         b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"heif": "HEIF",
               b"avif": "AVIF"}  # ISO base media files: the brand follows "ftyp" at byte 4
CACHE_VERSION = 3
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}

# A photo: a path, its bytes, an open binary file, or already in memory (a Pillow image or a uint8 array).
ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image | np.ndarray


class BadImageError(ValueError):
    """A photo that cannot be used: the message is one line, `path: reason`.

    `kind` sorts the reasons: unreadable, empty, not_image, corrupt, truncated, bomb (too many pixels or bytes).
    """

    def __init__(self, path: str, reason: str, kind: str = "corrupt"):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class ImageSet:
    """Decoded photos of one split: `images[i]` is `paths[i]` with class `labels[i]`."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64, (N,)
    images: np.ndarray  # uint8, (N, S, S, 3); memory-mapped when it comes from the cache
    bad: list[BadImageError] = field(default_factory=list)
    key: str | None = None  # the cache key: names exactly these decoded photos

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> dict:
        counts = Counter(self.labels.tolist())
        return {"n": len(self), "per_class": {c: counts.get(i, 0) for i, c in enumerate(self.classes)},
                "bad_files": len(self.bad)}


# --------------------------------------------------------------------------- decoding

class NotRegularFileError(OSError):
    """A path that names a pipe, socket or device: reading it could wait forever."""


class FileTooLargeError(OSError):
    """A file larger than MAX_FILE_BYTES: no photo we accept is that large, so it is not read into memory."""

    def __init__(self, path: str, size: int):
        super().__init__(f"{path}: {size:,} bytes")
        self.size = size


@contextmanager
def open_regular_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a file for reading; a pipe or device raises NotRegularFileError instead of blocking the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a pipe without a writer never returns
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{os.fspath(path)}: not a regular file")
        yield f


def read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes; a pipe or device raises NotRegularFileError, a file over `max_bytes` FileTooLargeError."""
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLargeError(os.fspath(path), size)
        return f.read()


def source_name(source: ImageSource) -> str:
    """How messages and predictions name a photo: its path, else what kind of object it is."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return "<bytes>" if isinstance(source, bytes) else str(getattr(source, "name", "<stream>"))


def _read_bytes(source: ImageSource) -> tuple[bytes, str]:
    name = source_name(source)
    if isinstance(source, bytes):
        return source, name
    if hasattr(source, "read"):
        data = source.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise BadImageError(name, f"more than {MAX_FILE_BYTES:,} bytes: too large for a photo", "bomb")
        return data, name
    try:
        return read_regular_file(name), name
    except NotRegularFileError:
        raise BadImageError(name, "not a regular file (a pipe, socket or device)", "unreadable") from None
    except FileTooLargeError as e:
        raise BadImageError(name, f"{e.size:,} bytes, more than {MAX_FILE_BYTES:,}: too large for a photo",
                            "bomb") from None
    except PermissionError:
        raise BadImageError(name, "permission denied (cannot read the file)", "unreadable") from None
    except IsADirectoryError:
        raise BadImageError(name, "is a directory, not a photo", "unreadable") from None
    except FileNotFoundError:
        raise BadImageError(name, "no such file", "unreadable") from None
    except OSError as e:
        raise BadImageError(name, f"cannot read the file ({e.strerror or e})", "unreadable") from None


def _image_from_memory(source: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    shape_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))
    if source.dtype != np.uint8 or not shape_ok or source.size == 0:
        raise BadImageError(source_name(source), f"an array photo must be uint8 (H, W), (H, W, 3) or (H, W, 4), "
                                                 f"not {source.dtype} {source.shape}", "not_image")
    return Image.fromarray(source[:, :, 0] if source.ndim == 3 and source.shape[2] == 1 else source)


def flat_photos(images: np.ndarray, max_std: float) -> np.ndarray:
    """For decoded photos (N, H, W, 3): True where every colour channel's standard deviation over the photo is
    at most `max_std` (of 255), a picture of one flat colour with nothing on it. Pillow's ImageStat works from
    each channel's histogram: exact, and about 0.2 ms for a 280 px photo (numpy's float std takes 3 ms)."""
    return np.array([max(ImageStat.Stat(Image.fromarray(np.asarray(image))).stddev) <= max_std
                     for image in images], bool)


def resize_square(img: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """`img` squashed to `size` x `size`: Pillow's resampling as two explicit passes, the rows, then the columns.
    A two-axis Pillow resize picks its own order of passes, which moves some pixels by one level; a fixed order is
    one the page's in-browser port (static/local.js) follows exactly."""
    if img.width != size:
        img = img.resize((size, img.height), RESAMPLE[resample], reducing_gap=None)
    if img.height != size:
        img = img.resize((size, size), RESAMPLE[resample], reducing_gap=None)
    return img


def decode_image(source: ImageSource, size: int | None = None, resample: str = "bilinear",
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one photo to a uint8 RGB array, resized (squashed) to `size` x `size` when given.

    EXIF orientation is applied; the format is taken from the bytes, not the file name. JPEGs are
    decoded at a reduced scale (Pillow's draft mode) when that still covers `size`, which is what
    makes large photos fast. A photo of more than `max_pixels` is refused from its header, before any pixel is
    decoded (kind "bomb", "too large"). Raises BadImageError with a one-line reason for anything unusable.
    """
    in_memory = _image_from_memory(source) if isinstance(source, (Image.Image, np.ndarray)) else None
    data, name = (b"", source_name(source)) if in_memory is not None else _read_bytes(source)
    if not data and in_memory is None:
        raise BadImageError(name, "empty file (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below is ours
            if in_memory is not None:
                img = in_memory
            else:
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > max_pixels:
                    raise BadImageError(name, f"too large: {img.width} x {img.height} pixels, more than the limit "
                                              f"of {max_pixels:,}", "bomb")
                reduce_jpeg(img, size, resample)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img, keep_grey=bool(size))
            if size:
                img = resize_square(img, size, resample)
            arr = np.asarray(img.convert("RGB") if img.mode == "L" else img, dtype=np.uint8)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(name, f"too large: decompression bomb refused ({e})", "bomb") from None
    except UnidentifiedImageError:
        kind = next((fmt for magic, fmt in MAGIC.items() if data.startswith(magic)), None)
        if data[4:8] == b"ftyp":
            kind = HEIF_BRANDS.get(data[8:12], "HEIF")
        if kind:
            raise BadImageError(name, f"corrupt image (starts like {kind} but cannot be read)") from None
        raise BadImageError(name, "not an image (unknown format)", "not_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying "corrupt"
        reason = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in reason.lower() else "corrupt"
        raise BadImageError(name, f"{kind} image ({reason})", kind) from None
    except Exception as e:  # Pillow's parsers can fail otherwise on damaged headers (TypeError, OverflowError, ...)
        raise BadImageError(name, f"corrupt image (the decoder failed: {type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise BadImageError(name, f"unexpected decoded shape {arr.shape}")
    return arr


def reduce_jpeg(img: Image.Image, size: int | None, resample: str) -> None:
    """Have a JPEG not yet loaded decode at the smallest scale that still covers `size` (Pillow's draft mode)."""
    if size and img.format == "JPEG" and resample != "nearest":  # nearest sees every pixel, as Keras does
        img.draft("RGB", (size, size))


def header_pixels(data: bytes, size: int | None = None, resample: str = "bilinear") -> tuple[int, int]:
    """(width x height as a photo's header declares them, the pixels decode_image will hold for it: fewer for a
    baseline JPEG decoded at reduced scale), read without decoding a pixel: what decoding it will cost. (0, 0) when
    Pillow finds no header it reads (decoding then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                declared = img.width * img.height
                if img.info.get("progressive") or img.info.get("progression"):
                    return declared, declared  # libjpeg holds a progressive JPEG's coefficients at full size
                reduce_jpeg(img, size, resample)
                return declared, img.width * img.height
    except Exception:  # any failure to parse is reported by decode_image, with its reason
        return 0, 0


def _try_decode(path: Path, size: int, resample: str) -> np.ndarray | BadImageError:
    try:
        return decode_image(path, size, resample)
    except BadImageError as e:
        return e


def decode_many(paths: Sequence[Path], size: int, resample: str = "bilinear", workers: int | None = None,
                window: int = 256) -> Iterator[np.ndarray | BadImageError]:
    """Decode photos in a thread pool (Pillow releases the GIL), yielding results in input order.

    At most `window` photos are in flight or waiting, so memory stays bounded however long the list,
    and the pool keeps decoding while the caller works on what it was given.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    todo = iter(paths)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(_try_decode, p, size, resample) for p in islice(todo, window))
        while pending:
            result = pending.popleft().result()
            for p in islice(todo, 1):
                pending.append(pool.submit(_try_decode, p, size, resample))
            yield result


# --------------------------------------------------------------------------- scanning and layouts

def is_seed_layout(root: Path) -> bool:
    return (Path(root) / SPLIT_FOLDERS["train"]).is_dir()


def list_classes(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder}: no class sub-folders (expected {folder}/<class>/photo.jpg)")
    return classes


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder` (recursively, hidden folders skipped), sorted; [] when it is not a
    folder."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def scan_folder(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Every non-hidden file under `folder/<class>/` (recursively), labelled by its class folder.

    Files are not filtered by extension: something that is not a photo is reported when decoded,
    never silently ignored.
    """
    folder = Path(folder)
    classes = list(classes) if classes is not None else list_classes(folder)
    samples = [Sample(path, label) for label, name in enumerate(classes) for path in list_files(folder / name)]
    return classes, samples


def resolve_splits(root: Path) -> dict[str, Path]:
    """Split name -> folder: the seed layout's splits that exist, or {"train": root} for a plain folder."""
    root = Path(root)
    if is_seed_layout(root):
        return {split: root / name for split, name in SPLIT_FOLDERS.items() if (root / name).is_dir()}
    list_classes(root)  # raises a clear error when root has no class folders
    return {"train": root}


def evaluation_folder(root: Path) -> Path:
    """The folder to evaluate on: `test_set` in the seed layout, else the folder itself."""
    root = Path(root)
    test = root / SPLIT_FOLDERS["test"]
    return test if is_seed_layout(root) and test.is_dir() else root


def stratified_split(samples: Sequence[Sample], size: float | int, seed: int,
                     folder: Path | None = None) -> tuple[list[Sample], list[Sample]]:
    """Seeded, stratified split of a file list into (kept, held out); `size` is a fraction or a count.

    Splitting the file list, not decoded arrays, lets each part be decoded and cached on its own. Too few
    photos raise a ValueError that names `folder` (where the photos came from) and the counts per class.
    """
    with needs_extra("train"):
        from sklearn.model_selection import train_test_split

    labels = [s.label for s in samples]
    try:
        kept, held_out = train_test_split(list(range(len(samples))), test_size=size, random_state=seed,
                                          stratify=labels)
    except ValueError:  # sklearn's message names its parameters, not the photos
        per_class = Counter(labels)
        share = f"{size:.0%}" if isinstance(size, float) else size
        counts = ", ".join(str(per_class[k]) for k in sorted(per_class))
        raise UserError(f"{f'{folder}: ' if folder else ''}too few photos to hold out {share} of {len(samples)} "
                        f"stratified by class (each class needs 2 or more; per class: {counts})") from None
    return [samples[i] for i in sorted(kept)], [samples[i] for i in sorted(held_out)]


# --------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """`$CATDOGCNN_CACHE`, else `$XDG_CACHE_HOME/catdogcnn` (`~/.cache/catdogcnn`)."""
    if os.environ.get("CATDOGCNN_CACHE"):
        return Path(os.environ["CATDOGCNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "catdogcnn"


def _cache_key(samples: Sequence[Sample], size: int, resample: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{resample}".encode())
    for s in samples:
        try:
            st = s.path.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{s.path.resolve()}|{s.label}|{stamp}".encode())
    return h.hexdigest()[:32]


def load_images(samples: Sequence[Sample], classes: Sequence[str], size: int, resample: str = "bilinear",
                cache_dir: Path | None | bool = None, workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> ImageSet:
    """Decode `samples` to an ImageSet, reusing the on-disk cache when the same files were decoded before.

    The cache key covers the file list (paths, sizes, modification times), the size and the resampling,
    so a changed photo is decoded again. Bad files are logged once per call (path + reason) and kept in
    `ImageSet.bad`. `cache_dir=False` decodes into memory without a cache.
    """
    if cache_dir is False:
        return _decode_set(samples, classes, size, resample, workers, None, progress)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(samples, size, resample)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            images = np.load(array_path, mmap_mode="r")[: meta["n_good"]]
            good = np.asarray(meta["good"], dtype=np.int64)
            bad = [BadImageError(*entry) for entry in meta["bad"]]
            for error in bad:
                log.warning("skipped %s", error)
            if progress:
                progress(len(samples))
            return ImageSet(list(classes), [samples[i].path for i in good],
                            np.array([samples[i].label for i in good], dtype=np.int64), images, bad, key)
        except (OSError, ValueError, KeyError):
            log.warning("cache %s is unreadable; decoding again", array_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = _decode_set(samples, classes, size, resample, workers, (array_path, meta_path), progress)
    found.key = key
    return found


def _decode_set(samples, classes, size, resample, workers, cache_paths, progress) -> ImageSet:
    shape = (max(len(samples), 1), size, size, 3)
    if cache_paths:
        array_path, meta_path = cache_paths
        with atomic_output(array_path) as tmp_array:
            out = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=np.uint8, shape=shape)
            good, bad = _decode_into(out, samples, size, resample, workers, progress)
            out.flush()
            del out
        # The metadata lands last: a cache entry is complete or absent.
        atomic_write(meta_path, json.dumps({"n_good": len(good), "good": good,
                                            "bad": [[e.path, e.reason, e.kind] for e in bad]}).encode())
        images = np.load(array_path, mmap_mode="r")
    else:
        images = np.empty(shape, dtype=np.uint8)
        good, bad = _decode_into(images, samples, size, resample, workers, progress)
    return ImageSet(list(classes), [samples[i].path for i in good],
                    np.array([samples[i].label for i in good], dtype=np.int64), images[: len(good)], bad)


def _decode_into(out: np.ndarray, samples, size, resample, workers, progress) -> tuple[list[int], list]:
    """Decode `samples` into `out`, good photos packed to the front in input order: (their indices, the bad)."""
    n = len(samples)
    good, bad = [], []
    for i, result in enumerate(decode_many([s.path for s in samples], size, resample, workers)):
        if isinstance(result, BadImageError):
            log.warning("skipped %s", result)
            bad.append(result)
        else:
            out[len(good)] = result
            good.append(i)
        if progress and (i + 1) % 64 == 0:
            progress(64)
    if progress:
        progress(n % 64)
    return good, bad


# --------------------------------------------------------------------------- file contents

def _file_digest(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open_regular_file(path) as f:  # in chunks: a huge file is hashed without being held in memory
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def file_digests(paths: Sequence[Path]) -> list[str | None]:
    """sha256 of each file's bytes (None when unreadable), hashed in a thread pool."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_file_digest, paths))
