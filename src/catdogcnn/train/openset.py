"""Photos that show none of the classes ("neither"), and the cut that turns a "neither" score into an answer.

The photos are split by kind, so that what is reported says whether "neither" generalises: whole kinds are
kept out of training (the answer on kinds never seen), and a share of each trained kind's photos too (the
answer on kinds seen). A photo's kind is its sub-folder, else its file name before the last "_"
(`fox_0012.jpg` is a fox).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from catdogcnn import data as D
from catdogcnn.errors import UserError

log = logging.getLogger("catdogcnn")


@dataclass
class NeitherPhotos:
    """Decoded "neither" photos by role: `train`, `seen` (held-out photos of trained kinds), `unseen` (kinds
    never trained on), with their kinds, and a summary for the bundle."""

    images: dict[str, np.ndarray]
    kinds: dict[str, list[str]]
    summary: dict


def kind_of(path: Path, folder: Path) -> str:
    relative = path.relative_to(folder)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem.rsplit("_", 1)[0]


def split_by_kind(files: list[Path], folder: Path, holdout_kinds: float, holdout_photos: float,
                  seed: int) -> dict[str, list[Path]]:
    """{"train", "seen", "unseen"} -> files: a seeded draw of whole kinds for "unseen", then of each remaining
    kind's photos for "seen"."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[Path]] = {}
    for path in files:
        by_kind.setdefault(kind_of(path, folder), []).append(path)
    kinds = sorted(by_kind)
    unseen = set(rng.choice(kinds, round(holdout_kinds * len(kinds)), replace=False).tolist()) if kinds else set()
    parts: dict[str, list[Path]] = {"train": [], "seen": [], "unseen": []}
    for kind in kinds:
        paths = by_kind[kind]
        if kind in unseen:
            parts["unseen"] += paths
            continue
        held = set(rng.permutation(len(paths))[: round(holdout_photos * len(paths))].tolist())
        for i, path in enumerate(paths):
            parts["seen" if i in held else "train"].append(path)
    return parts


def typical_size(paths: list[Path], sample: int = 200) -> int:
    """The median longer side of (a sample of) the training photos, read from their headers."""
    sizes = []
    for path in paths[:: max(1, len(paths) // sample)]:
        try:
            with Image.open(path) as img:
                sizes.append(max(img.size))
        except (OSError, ValueError):  # a bad photo is reported where it is decoded, not here
            continue
    return int(statistics.median(sizes)) if sizes else 0


def decode_neither(paths: list[Path], image_size: int, resample: str, presize: int) -> tuple[np.ndarray, list[Path]]:
    """Photos resized first to at most `presize` (no sharper than the training photos, so that sharpness does
    not tell the classes from "neither"), then to `image_size`; bad files are logged and skipped."""
    images, kept = [], []
    for path, result in zip(paths, D.decode_many(paths, None), strict=True):
        if isinstance(result, D.BadImageError):
            log.warning("skipped %s", result)
            continue
        img = Image.fromarray(result)
        if presize and max(img.size) > presize:
            img = img.resize((presize, presize), D.RESAMPLE[resample], reducing_gap=None)
        images.append(np.asarray(img.resize((image_size, image_size), D.RESAMPLE[resample], reducing_gap=None)))
        kept.append(path)
    return (np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)), kept


def load_neither(folder: Path, training_paths: list[Path], image_size: int, resample: str, holdout_kinds: float,
                 holdout_photos: float, seed: int) -> NeitherPhotos:
    """Decode every file of `folder` (what is not a photo is reported and skipped), then split the photos by
    kind."""
    folder = Path(folder)
    files = D.list_files(folder)
    presize = typical_size(training_paths)
    decoded, good = decode_neither(files, image_size, resample, presize)
    if not good:
        raise FileNotFoundError(f"{folder}: no photos for 'neither'")
    row = {path: i for i, path in enumerate(good)}
    parts = split_by_kind(good, folder, holdout_kinds, holdout_photos, seed)
    images = {role: decoded[[row[p] for p in paths]] for role, paths in parts.items()}
    kinds = {role: [kind_of(p, folder) for p in paths] for role, paths in parts.items()}
    if not len(images["train"]):
        raise UserError(f"{folder}: no 'neither' photos left to train on")
    listing = "\n".join(str(p.relative_to(folder)) for p in good).encode()
    summary = {"folder": folder.name, "photos_sha256": hashlib.sha256(listing).hexdigest(),
               "photos": {role: len(paths) for role, paths in parts.items()}, "skipped_files": len(files) - len(good),
               "presize": presize, "unseen_kinds": sorted(set(kinds["unseen"])),
               "trained_kinds": sorted(set(kinds["train"])), "seed": seed}
    return NeitherPhotos(images, kinds, summary)


def neither_for(config, training_paths: list[Path], image_size: int, resample: str) -> NeitherPhotos | None:
    """The run's "neither" photos (`config.neither_photos`, split as its settings say), or None without them."""
    if not config.neither_photos:
        return None
    return load_neither(Path(config.neither_photos), training_paths, image_size, resample,
                        config.neither_holdout_kinds, config.neither_holdout_photos, config.seed)
