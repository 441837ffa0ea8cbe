"""Sort a folder of photos by what they show: one folder per class, and `neither/`.

    catdogcnn sort ~/Pictures --into ~/Pictures/sorted --move
    sort_photos(load_classifier(), ["photos/"], "sorted/", mode="copy")

Every photo gets a row in `INTO/sorted.csv` (source, destination, label, confidence, action, error; absolute
paths) before its file is touched, and `INTO/.sorted.done` counts the rows whose files are in place: a rerun
finishes the rows after it, then sorts the photos not in the record. A photo that cannot be read gets a row with
its error and stays where it is. A name already taken in its folder gets a suffix (`photo-2.jpg`): nothing is
overwritten.

`--move` loses nothing, whenever it is killed. Within one file system a photo is hard-linked into place and only
then unlinked from its source; across file systems it is copied under a hidden name, fsynced, renamed into place,
then unlinked. So at every moment the photo is whole in at least one of its two places, and a rerun finishes the
rows not counted done: a source still there whose destination holds the same bytes is unlinked, one whose
destination is missing is moved again. A row the kill cut short is dropped (its photo was not touched yet). After a run
that ends, each photo is in exactly one place. `--copy` (the default) and `--link` leave the sources alone.
"""

from __future__ import annotations

import csv
import errno
import filecmp
import io
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from catdogcnn.bundle import atomic_write
from catdogcnn.errors import UserError
from catdogcnn.predict import Classifier, expand_photos

MODES = ("copy", "link", "move")
RECORD = "sorted.csv"
COLUMNS = ["source", "destination", "label", "confidence", "action", "error"]
UNREADABLE = "unreadable"  # the label of a photo that could not be read: it is listed, never moved
BATCH = 64  # photos planned and recorded (one fsync) before their files are touched


@dataclass
class SortSummary:
    into: Path
    record: Path
    counts: Counter = field(default_factory=Counter)  # label (or "unreadable") -> photos, this run and earlier
    finished: int = 0  # photos of an earlier, interrupted run put in place by this one
    planned: list[dict] = field(default_factory=list)  # with dry_run: what would be done


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _same_bytes(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def _copy_into_place(source: Path, destination: Path) -> None:
    """Copy under a hidden name, fsync, then rename: the destination is whole or absent."""
    partial = destination.with_name(f".{destination.name}.part")
    shutil.copy2(source, partial)
    _fsync(partial)
    os.replace(partial, destination)


NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK}  # other file system, FAT, SMB, too many


def _fsync_folder(folder: Path) -> None:
    """Make a new name in `folder` durable (before its file's other name is unlinked)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_into_place(source: Path, destination: Path, symbolic_fallback: bool) -> bool:
    """A hard link; False where the file system cannot make one (and no symbolic link was asked for)."""
    try:
        os.link(source, destination)
        return True
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
    if symbolic_fallback:
        destination.symlink_to(source.resolve())
        return True
    return False


def put_in_place(row: dict) -> bool:
    """Do (or finish) what a row of the record says; True when it had something left to do."""
    source, destination, action = Path(row["source"]), Path(row["destination"]), row["action"]
    if not row["destination"]:
        return False  # unreadable: listed, never moved
    destination.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(destination):
        if action == "move" and source.exists() and not source.samefile(destination) \
                and not _same_bytes(source, destination):
            raise UserError(f"{destination}: holds another file than {source}, recorded to go there; "
                            f"move one of them and run again")
        if action == "move" and source.exists():
            source.unlink()  # killed between placing and unlinking: the photo is whole at its destination
            return True
        return False
    if not source.exists():
        return False  # gone before it could be placed (removed by hand): nothing to do
    if action == "copy":
        _copy_into_place(source, destination)
    elif action == "link":
        _link_into_place(source, destination, symbolic_fallback=True)
    else:
        if not _link_into_place(source, destination, symbolic_fallback=False):
            _copy_into_place(source, destination)
        _fsync_folder(destination.parent)
        source.unlink()
    return True


class Record:
    """`INTO/sorted.csv`: rows appended and fsynced in batches, before the files they name are touched; and
    `INTO/.sorted.done`, how many of its rows are in place (rewritten after each batch): a rerun replays the rest.
    A row a kill cut short (the last line, unfinished) is dropped: its photos were not touched yet."""

    def __init__(self, path: Path):
        self.path, self.done_path = path, path.with_name(f".{path.stem}.done")
        self.rows: list[dict] = []
        self.done = 0
        if not path.exists():
            return
        with open(path, "r+b") as f:
            data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) < len(data):
                f.truncate(len(whole))
        reader = csv.DictReader(io.StringIO(whole.decode()))
        if reader.fieldnames != COLUMNS:
            raise UserError(f"{path}: not a record of `catdogcnn sort` (columns {reader.fieldnames})")
        for number, row in enumerate(reader, 2):
            if None in row.values() or None in row or row["action"] not in (*MODES, "none"):
                raise UserError(f"{path}: line {number} is not a row of `catdogcnn sort`; move the file aside")
            self.rows.append(row)
        if self.done_path.exists():
            self.done = min(len(self.rows), int(self.done_path.read_text() or 0))

    def append(self, rows: list[dict]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows

    def mark_done(self) -> None:
        """Every row so far is in place."""
        self.done = len(self.rows)
        atomic_write(self.done_path, str(self.done).encode())


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    """`folder/name`, or `folder/stem-2.suffix`, `-3`, ... when that is on disk or already planned."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = folder / name, 1
    # Compared without case: on a case-insensitive file system IMG_1.JPG and img_1.jpg are one file.
    while str(candidate).casefold() in taken or os.path.lexists(candidate):
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    taken.add(str(candidate).casefold())
    return candidate


def _plan(classifier: Classifier, photos: list[Path], into: Path, mode: str,
          batch_size: int | None) -> Iterator[dict]:
    taken: set[str] = set()
    for p in classifier.predict_many(photos, batch_size):
        source = Path(p.source)  # absolute: a rerun from another folder replays the same files
        if not p.ok:
            yield {"source": str(source), "destination": "", "label": UNREADABLE, "confidence": "",
                   "action": "none", "error": p.error}
            continue
        destination = _free_name(into / p.label, source.name, taken)
        yield {"source": str(source), "destination": str(destination), "label": p.label,
               "confidence": f"{p.confidence:.6f}", "action": mode, "error": ""}


def sort_photos(classifier: Classifier, photos: Iterable[str | os.PathLike], into: str | os.PathLike,
                mode: str = "copy", dry_run: bool = False, batch_size: int | None = None,
                on_photo: Callable[[int], None] | None = None) -> SortSummary:
    """Sort photos (files and folders) into `into/<label>/` (see the module's notes); a rerun resumes."""
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    into = Path(into).resolve()
    record = Record(into / RECORD)
    summary = SortSummary(into, record.path)
    if not dry_run and record.done < len(record.rows):  # finish first what a kill cut short
        for row in record.rows[record.done:]:
            summary.finished += put_in_place(row)
        record.mark_done()
    # Photos already sorted are skipped; a moved photo's old path is free again (a new photo may take its name).
    seen = {row["source"] for row in record.rows if row["action"] != "move"}
    todo = [p for p in dict.fromkeys(path.resolve() for path in expand_photos(photos))
            if str(p) not in seen and into not in p.parents]
    plan = _plan(classifier, todo, into, mode, batch_size)
    while batch := list(islice(plan, BATCH)):
        if dry_run:
            summary.planned += batch
        else:
            record.append(batch)
            for row in batch:
                put_in_place(row)
            record.mark_done()
        if on_photo:
            on_photo(len(batch))
    summary.counts = Counter(row["label"] for row in [*record.rows, *summary.planned])
    return summary
