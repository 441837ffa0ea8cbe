"""The photos a run trains and validates on. Nothing from `test_set` is used: it is kept for the final test.

Seed layout: a stratified sample of `extra_set` validates (up to half of it); with extra="train" the rest of
it trains too, by default it is left unseen (`unused_extra`). Without an `extra_set` (or with extra="none"),
a stratified share of the training photos validates.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from catdogcnn import data as D
from catdogcnn.errors import UserError
from catdogcnn.train.config import TrainConfig

log = logging.getLogger("catdogcnn")


@dataclass
class TrainingData:
    train: D.ImageSet
    val: D.ImageSet
    summary: dict


def prepare_data(root: Path, config: TrainConfig, image_size: int, resize: str,
                 cache_dir: Path | None | bool = None) -> TrainingData:
    """Training and validation photos for `config`, decoded (into the on-disk cache). Training or validation
    photos that are byte-identical copies of a `test_set` photo are left out (the data set has a few)."""
    splits = D.resolve_splits(root)
    classes = D.list_classes(splits["train"])
    _, train_samples = D.scan_folder(splits["train"], classes)
    if "extra" in splits and config.extra != "none":
        rest, val_samples = _split_extra(splits["extra"], classes, config)
        if config.extra == "train":
            train_samples += rest
    else:
        train_samples, val_samples = D.stratified_split(train_samples, config.val_fraction, config.seed,
                                                        splits["train"])
        if len(val_samples) > config.val_max:
            _, val_samples = D.stratified_split(val_samples, config.val_max, config.seed)
    dropped: list[str] = []
    if "test" in splits:
        train_samples, val_samples, dropped = _without_test_copies(splits["test"], classes,
                                                                   [train_samples, val_samples])
    train = D.load_images(train_samples, classes, image_size, resize, cache_dir=cache_dir)
    val = D.load_images(val_samples, classes, image_size, resize, cache_dir=cache_dir)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"{root}: no usable photos to train on ({len(train)} train, {len(val)} validation)")
    # The data set by name and file list, never by a path of the machine it was trained on. Paths are made
    # absolute, not resolved: a folder of links to photos elsewhere is still listed relative to itself.
    root = Path(root).absolute()
    listing = "\n".join(str(Path(p).absolute().relative_to(root)) for p in [*train.paths, *val.paths]).encode()
    summary = {"name": root.name, "files_sha256": hashlib.sha256(listing).hexdigest(), "classes": classes,
               "train": train.summary(), "val": val.summary(),
               "extra_set": config.extra if "extra" in splits else "absent",
               "left_out_test_duplicates": [str(Path(p).absolute().relative_to(root)) for p in dropped]}
    return TrainingData(train, val, summary)


def _without_test_copies(test_folder: Path, classes: list[str], parts: list[list[D.Sample]]) -> tuple:
    """Each part without the byte-identical copies of a test photo (which must not be trained or validated
    on), and the paths left out."""
    _, test_samples = D.scan_folder(test_folder, classes)
    test_digests = set(D.file_digests([s.path for s in test_samples])) - {None}
    kept, dropped = [], []
    for part in parts:
        digests = D.file_digests([s.path for s in part])
        dropped += [str(s.path) for s, d in zip(part, digests, strict=True) if d in test_digests]
        kept.append([s for s, d in zip(part, digests, strict=True) if d not in test_digests])
    for path in dropped:
        log.warning("left out %s: byte-identical to a photo in %s", path, test_folder)
    return (*kept, dropped)


def _split_extra(folder: Path, classes: list[str], config: TrainConfig) -> tuple[list[D.Sample], list[D.Sample]]:
    """extra_set as (the rest, the validation photos): a seeded, stratified sample of up to half of it validates."""
    _, samples = D.scan_folder(folder, classes)
    return D.stratified_split(samples, min(config.val_max, len(samples) // 2), config.seed, folder)


def unused_extra(root: Path, config: TrainConfig) -> list[D.Sample]:
    """The `extra_set` photos a run with `config` neither trains nor validates on (half of it by default): photos
    no such run has seen, to compare recipes on without touching `test_set`. Empty without an extra_set."""
    splits = D.resolve_splits(Path(root))
    if "extra" not in splits or config.extra != "val":
        return []
    return _split_extra(splits["extra"], D.list_classes(splits["train"]), config)[0]
