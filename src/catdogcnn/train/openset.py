"""Photos from other collections a run learns from beside its data set: photos that show none of the classes
("neither"), and photos of the classes themselves (pets of many breeds).

Both are split by kind, so that what is reported says whether the answer generalises: whole kinds are kept out
of training (kinds never seen), and a share of each trained kind's photos too (kinds seen). A "neither" photo's
kind is its sub-folder, else its file name before the last "_" (`fox_0012.jpg` is a fox); a class photo's kind
is its class folder and breed (`dogs/samoyed_0001.jpg` is `dogs/samoyed`).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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


@dataclass
class PetPhotos(NeitherPhotos):
    """Decoded photos of the classes from another collection, by the same roles (`seen`: held-out photos of
    trained breeds, which validate; `unseen`: breeds never trained on), with their class indices."""

    labels: dict[str, np.ndarray] = field(default_factory=dict)


def kind_of(path: Path, folder: Path) -> str:
    relative = path.relative_to(folder)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem.rsplit("_", 1)[0]


def breed_of(path: Path, folder: Path) -> str:
    """`dogs/samoyed_0001.jpg` -> `dogs/samoyed`: the class folder and the file name before its last "_"."""
    return f"{path.relative_to(folder).parts[0]}/{path.stem.rsplit('_', 1)[0]}"


def split_by_kind(files: list[Path], folder: Path, holdout_kinds: float, holdout_photos: float,
                  seed: int, kind: Callable[[Path, Path], str] = kind_of) -> dict[str, list[Path]]:
    """{"train", "seen", "unseen"} -> files: a seeded draw of whole kinds for "unseen", then of each remaining
    kind's photos for "seen"."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[Path]] = {}
    for path in files:
        by_kind.setdefault(kind(path, folder), []).append(path)
    kinds = sorted(by_kind)
    unseen = set(rng.choice(kinds, round(holdout_kinds * len(kinds)), replace=False).tolist()) if kinds else set()
    parts: dict[str, list[Path]] = {"train": [], "seen": [], "unseen": []}
    for name in kinds:
        paths = by_kind[name]
        if name in unseen:
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


def decode_presized(paths: list[Path], image_size: int, resample: str, presize: int) -> tuple[np.ndarray, list[Path]]:
    """Photos resized first to at most `presize` (no sharper than the training photos, so that sharpness does
    not tell the classes from "neither"), then to `image_size`; bad files are logged and skipped."""
    images, kept = [], []
    for path, result in zip(paths, D.decode_many(paths, None), strict=True):
        if isinstance(result, D.BadImageError):
            log.warning("skipped %s", result)
            continue
        img = Image.fromarray(result)
        if presize and max(img.size) > presize:
            img = D.resize_square(img, presize, resample)
        images.append(np.asarray(D.resize_square(img, image_size, resample)))
        kept.append(path)
    return (np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)), kept


def decode_split(files: list[Path], folder: Path, image_size: int, resample: str, presize: int,
                 holdout_kinds: float, holdout_photos: float, seed: int,
                 kind: Callable[[Path, Path], str] = kind_of) -> tuple[dict[str, np.ndarray], dict, list[Path]]:
    """The photos of `files` that decode (the others are reported and skipped), split by kind: the training ones
    presized (`decode_presized`), the held-out ones decoded as a user's photo is (`Classifier.preprocess`), since
    they say what users will see. Returns the images and the files by role, and every file that decoded."""
    decoded, good = decode_presized(files, image_size, resample, presize)
    if not good:
        raise FileNotFoundError(f"{folder}: no photos")
    row = {path: i for i, path in enumerate(good)}
    parts = split_by_kind(good, folder, holdout_kinds, holdout_photos, seed, kind=kind)
    images = {"train": decoded[[row[p] for p in parts["train"]]]}
    for role in ("seen", "unseen"):
        as_sent = list(D.decode_many(parts[role], image_size, resample))
        images[role] = np.stack(as_sent) if as_sent else np.zeros((0, image_size, image_size, 3), np.uint8)
    return images, parts, good


def load_neither(folder: Path, training_paths: list[Path], image_size: int, resample: str, holdout_kinds: float,
                 holdout_photos: float, seed: int) -> NeitherPhotos:
    """Decode every file of `folder` (what is not a photo is reported and skipped), then split the photos by
    kind."""
    folder = Path(folder)
    files = D.list_files(folder)
    presize = typical_size(training_paths)
    images, parts, good = decode_split(files, folder, image_size, resample, presize, holdout_kinds, holdout_photos,
                                       seed)
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


def class_folder_index(name: str, classes: list[str]) -> int | None:
    """The class a folder of another collection holds: its name, or that name without a plural "s" (`dog` and
    `dogs` are one class); None for no class."""
    wanted = name.lower().removesuffix("s")
    return next((i for i, c in enumerate(classes) if c.lower().removesuffix("s") == wanted), None)


def load_pets(folder: Path, classes: list[str], training_paths: list[Path], image_size: int, resample: str,
              holdout_breeds: float, holdout_photos: float, seed: int) -> PetPhotos:
    """Decode the class folders of `folder` (`cats/`, `dogs/`: one per class, `<breed>_<n>.jpg` inside; files
    beside them, a README or a manifest, are not photos), then split them by breed as "neither" photos are
    split by kind. Presized like the "neither" photos: sharpness must not tell one collection from another."""
    folder = Path(folder)
    files = [p for p in D.list_files(folder) if len(p.relative_to(folder).parts) > 1]
    unknown = sorted({p.relative_to(folder).parts[0] for p in files
                      if class_folder_index(p.relative_to(folder).parts[0], classes) is None})
    if unknown:
        raise UserError(f"{folder}: folder(s) {', '.join(unknown)} name no class of the data set "
                        f"({', '.join(classes)})")
    images, parts, good = decode_split(files, folder, image_size, resample, typical_size(training_paths),
                                       holdout_breeds, holdout_photos, seed, kind=breed_of)
    kinds = {role: [breed_of(p, folder) for p in paths] for role, paths in parts.items()}
    labels = {role: np.array([class_folder_index(p.relative_to(folder).parts[0], classes) for p in paths], np.int64)
              for role, paths in parts.items()}
    listing = "\n".join(str(p.relative_to(folder)) for p in good).encode()
    summary = {"folder": folder.name, "photos_sha256": hashlib.sha256(listing).hexdigest(),
               "photos": {role: len(paths) for role, paths in parts.items()}, "skipped_files": len(files) - len(good),
               "unseen_breeds": sorted(set(kinds["unseen"])), "seed": seed}
    return PetPhotos(images, kinds, summary, labels)


def pets_for(config, classes: list[str], training_paths: list[Path], image_size: int,
             resample: str) -> PetPhotos | None:
    """The run's photos of the classes from other collections (`config.pet_photos`), or None without them."""
    if not config.pet_photos:
        return None
    return load_pets(Path(config.pet_photos), classes, training_paths, image_size, resample,
                     config.pet_holdout_breeds, config.pet_holdout_photos, config.seed)


def with_pet_photos(train: D.ImageSet, pets: PetPhotos, repeats: int) -> D.ImageSet:
    """The training photos with `pets`' training photos added, each `repeats` times (a copy in memory)."""
    extra = np.tile(np.arange(len(pets.images["train"])), repeats)
    folder = Path(pets.summary["folder"])
    return replace(train, paths=[*train.paths, *(folder / f"pet-photo-{i}" for i in extra)],
                   labels=np.concatenate([train.labels, pets.labels["train"][extra]]),
                   images=np.concatenate([train.images, pets.images["train"][extra]]), key=None)
