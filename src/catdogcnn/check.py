"""`catdogcnn data check`: counts per split and class, bad files, blank photos (one flat colour, which no class
shows), and exact and near-duplicate pairs (leakage between splits, label conflicts between classes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from catdogcnn.bundle import BLANK_RULE
from catdogcnn.data import (
    BadImageError,
    file_digests,
    flat_photos,
    list_classes,
    load_images,
    resolve_splits,
    scan_folder,
)
from catdogcnn.extras import needs_extra


@dataclass
class DuplicatePair:
    a: str
    b: str
    kind: str  # "within split" | "across splits (leakage)" | "across classes (label conflict)"


@dataclass
class CheckReport:
    counts: dict[str, dict[str, int]]  # split -> class -> good photos
    bad: list[BadImageError]
    blank: list[str]  # paths of photos of one flat colour
    exact_duplicates: list[DuplicatePair]
    near_duplicates: list[DuplicatePair]

    def to_dict(self) -> dict:
        return {"counts": self.counts, "bad_files": [{"path": e.path, "reason": e.reason} for e in self.bad],
                "blank_photos": self.blank,
                "exact_duplicates": [vars(p) for p in self.exact_duplicates],
                "near_duplicates": [vars(p) for p in self.near_duplicates]}


def _pair_kind(a: tuple[str, str], b: tuple[str, str]) -> str:
    (split_a, class_a), (split_b, class_b) = a, b
    if class_a != class_b:
        return "across classes (label conflict)"
    return "across splits (leakage)" if split_a != split_b else "within split"


def _perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit pHash per image (imagehash's DCT hash), as uint64."""
    with needs_extra("data"):
        import imagehash

    out = np.empty(len(images), dtype=np.uint64)
    for i, arr in enumerate(images):
        bits = imagehash.phash(Image.fromarray(np.asarray(arr))).hash.flatten()
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def check_dataset(root: Path, near_distance: int = 4, size: int = 64, cache_dir: Path | None | bool = None,
                  progress: Callable[[int], None] | None = None) -> CheckReport:
    """Counts per split and class, bad files, blank photos, and exact (byte-identical) and near (pHash) duplicate
    pairs."""
    splits = resolve_splits(root)
    classes = sorted({c for folder in splits.values() for c in list_classes(folder)})
    counts: dict[str, dict[str, int]] = {}
    bad: list[BadImageError] = []
    blank: list[str] = []
    where: list[tuple[str, str]] = []
    paths: list[Path] = []
    images = []
    for split, folder in splits.items():
        split_classes, samples = scan_folder(folder, classes)
        found = load_images(samples, split_classes, size, cache_dir=cache_dir, progress=progress)
        counts[split] = found.summary()["per_class"]
        bad.extend(found.bad)
        paths.extend(found.paths)
        where.extend((split, classes[label]) for label in found.labels)
        images.append(found.images)
        flat = flat_photos(found.images, BLANK_RULE["max_std"])
        blank.extend(str(path) for path, is_flat in zip(found.paths, flat, strict=True) if is_flat)

    groups: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(file_digests(paths)):
        if digest:
            groups[digest].append(i)
    exact, exact_set = [], set()
    for members in groups.values():
        for x, i in enumerate(members):
            for j in members[x + 1:]:
                exact.append(DuplicatePair(str(paths[i]), str(paths[j]), _pair_kind(where[i], where[j])))
                exact_set.add((i, j))

    near = []
    if paths:
        hashes = _perceptual_hashes(np.concatenate(images) if len(images) > 1 else images[0])
        for i, j in _close_pairs(hashes, near_distance):
            if (i, j) not in exact_set:
                near.append(DuplicatePair(str(paths[i]), str(paths[j]), _pair_kind(where[i], where[j])))
    return CheckReport(counts, bad, blank, exact, near)


def _close_pairs(hashes: np.ndarray, max_distance: int, block: int = 512) -> Iterable[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit hashes differ in at most `max_distance` bits, in blocks of rows."""
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        distance = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for a, b in zip(*np.nonzero(distance <= max_distance), strict=True):
            i = start + int(a)
            if i < int(b):
                yield i, int(b)
