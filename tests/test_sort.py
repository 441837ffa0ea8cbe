"""`catdogcnn sort`: photos into class folders, nothing overwritten, nothing lost when a move is killed."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catdogcnn.predict import load_classifier
from catdogcnn.sort import RECORD, put_in_place, sort_photos


def digests(folder: Path) -> dict[str, list[Path]]:
    """sha256 -> the photos under `folder` with those bytes (the record aside)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != RECORD and not path.name.startswith("."):
            found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(path)
    return found


def record(into: Path) -> list[dict]:
    with open(into / RECORD, newline="") as f:
        return list(csv.DictReader(f))


def test_copy_sorts_into_class_folders_and_overwrites_nothing(tiny_bundle, tmp_path, make_class_folder,
                                                             write_bad_files):
    photos = make_class_folder(tmp_path / "photos", 4)
    (photos / "more").mkdir()
    (photos / "more" / "cats.0.jpg").write_bytes((photos / "dogs" / "dogs.1.jpg").read_bytes())  # a name twice
    write_bad_files(photos / "bad")
    before = digests(photos)
    into = tmp_path / "sorted"
    (into / "cats").mkdir(parents=True)
    (into / "cats" / "cats.0.jpg").write_bytes(b"someone else's file")
    (into / "dogs").mkdir()
    (into / "dogs" / "cats.0.jpg").write_bytes(b"and another")
    clf = load_classifier(tiny_bundle)
    summary = sort_photos(clf, [photos], into)
    rows = record(into)
    placed = [r for r in rows if r["destination"]]
    assert len(placed) == 9 and sum(r["label"] == "unreadable" for r in rows) == len(rows) - 9
    assert digests(photos) == before  # copies: the sources are as they were
    for row in placed:
        destination = Path(row["destination"])
        assert destination.parent == into / row["label"] and destination.read_bytes() == Path(row["source"]
                                                                                              ).read_bytes()
    assert (into / "cats" / "cats.0.jpg").read_bytes() == b"someone else's file"
    assert (into / "dogs" / "cats.0.jpg").read_bytes() == b"and another"
    assert len({r["destination"] for r in placed}) == 9  # every name its own
    assert sum(summary.counts[label] for label in ("cats", "dogs", "neither")) == 9
    again = sort_photos(clf, [photos], into)  # a rerun: nothing new
    assert record(into) == rows and again.counts == summary.counts


def test_dry_run_touches_nothing(tiny_bundle, tmp_path, make_class_folder):
    photos = make_class_folder(tmp_path / "photos", 2)
    summary = sort_photos(load_classifier(tiny_bundle), [photos], tmp_path / "sorted", "move", dry_run=True)
    assert len(summary.planned) == 4 and not (tmp_path / "sorted").exists()
    assert len(list(photos.rglob("*.jpg"))) == 4


def test_a_move_killed_at_any_moment_loses_nothing_and_a_rerun_finishes_it(tiny_bundle, tmp_path,
                                                                          make_class_folder):
    photos = make_class_folder(tmp_path / "photos", 600, size=32)
    originals = {digest: len(paths) for digest, paths in digests(photos).items()}
    into = tmp_path / "sorted"
    command = [sys.executable, "-m", "catdogcnn", "sort", str(photos), "--into", str(into), "--move", "--model",
               str(tiny_bundle)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (into / "dogs").exists() and not (into / "cats").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert any(photos.rglob("*.jpg")), "the run ended before it could be killed: give it more photos"
    at_kill = {**digests(photos)}
    for digest, paths in digests(into).items():
        at_kill.setdefault(digest, []).extend(paths)
    # every photo whole somewhere, whenever it was killed
    assert all(len(at_kill.get(digest, [])) >= copies for digest, copies in originals.items())
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(photos.rglob("*.jpg"))
    after = digests(into)
    assert {d: len(paths) for d, paths in after.items()} == originals  # each photo in exactly one place
    assert not list(into.rglob(".*.part"))


def test_each_half_done_move_is_finished(tmp_path):
    """The states a kill can leave a move in, each finished by `put_in_place`."""
    source, destination = tmp_path / "a.jpg", tmp_path / "sorted" / "cats" / "a.jpg"
    row = {"source": str(source), "destination": str(destination), "action": "move"}

    def state(at_source: bool, at_destination: str | None) -> None:
        for path in (source, destination):
            path.unlink(missing_ok=True)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if at_source:
            source.write_bytes(b"photo")
        if at_destination == "linked":
            os.link(source, destination)
        elif at_destination == "copied":
            destination.write_bytes(b"photo")

    for at_source, at_destination in ((True, None), (True, "linked"), (True, "copied"), (False, "copied")):
        state(at_source, at_destination)
        put_in_place(row)
        assert not source.exists() and destination.read_bytes() == b"photo", (at_source, at_destination)
    state(True, None)
    destination.write_bytes(b"another photo")  # a destination that holds something else: refused, nothing lost
    with pytest.raises(Exception, match="holds another file"):
        put_in_place(row)
    assert source.read_bytes() == b"photo"


def test_across_file_systems_a_move_copies_then_unlinks(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    source, destination = tmp_path / "a.jpg", tmp_path / "sorted" / "a.jpg"
    source.write_bytes(b"photo")
    put_in_place({"source": str(source), "destination": str(destination), "action": "move"})
    assert not source.exists() and destination.read_bytes() == b"photo" and not destination.is_symlink()


def test_the_command_prints_counts_and_exits_1_for_unreadable_photos(tiny_bundle, tmp_path, make_class_folder,
                                                                    write_bad_files, run_cli):
    photos = make_class_folder(tmp_path / "photos", 2)
    bad = write_bad_files(photos / "bad")
    result = run_cli("sort", photos, "--into", tmp_path / "sorted", "--link", "--model", tiny_bundle)
    assert result.returncode == 1 and f"{len(bad)} photo(s) could not be read" in result.stderr
    assert "cats/" in result.stdout and "unreadable (left in place)" in result.stdout
    assert all(p.exists() for p in (photos / "bad").iterdir())  # unreadable photos stay where they are
    linked = list((tmp_path / "sorted").rglob("*.jpg"))
    assert len(linked) == 4 and all(p.stat().st_nlink == 2 for p in linked)
    refused = run_cli("sort", photos, "--into", tmp_path / "x", "--copy", "--move", "--model", tiny_bundle)
    assert refused.returncode == 2 and "one of --copy, --link, --move" in refused.stderr


def test_a_record_cut_short_by_a_kill_is_mended_and_finished(tiny_bundle, tmp_path, make_class_folder):
    """A kill can leave the last row half-written: it is dropped (its photo untouched), never read as a move."""
    photos = make_class_folder(tmp_path / "photos", 3)
    into = tmp_path / "sorted"
    clf = load_classifier(tiny_bundle)
    sort_photos(clf, [photos / "cats"], into)  # copies: the sources stay
    record_file = into / RECORD
    text = record_file.read_text()
    record_file.write_text(text + text.splitlines()[1][:40])  # a row cut after 40 characters
    (into / ".sorted.done").write_text("1")  # and rows 2-3 not yet counted done
    summary = sort_photos(clf, [photos], into)
    rows = record(into)
    assert len(rows) == 6 and all(r["action"] == "copy" for r in rows)
    assert len(list(photos.rglob("*.jpg"))) == 6  # a copy never took a source away
    assert sum(summary.counts[label] for label in ("cats", "dogs", "neither")) == 6
    record_file.write_text(record_file.read_text() + "garbage,row\n")
    with pytest.raises(Exception, match="line 8 is not a row"):
        sort_photos(clf, [photos], into)


def test_a_new_photo_at_a_moved_photos_old_path_is_sorted_too(tiny_bundle, tmp_path, make_class_folder,
                                                              jpeg_bytes):
    """Cameras reuse names: a new IMG_0001.JPG where a moved one was is a new photo, sorted beside the first."""
    photos = make_class_folder(tmp_path / "photos", 1)
    into = tmp_path / "sorted"
    clf = load_classifier(tiny_bundle)
    sort_photos(clf, [photos], into, "move")
    (photos / "cats" / "cats.0.jpg").write_bytes(jpeg_bytes(5))
    sort_photos(clf, [photos], into, "move")
    assert not list(photos.rglob("*.jpg")) and len(list(into.rglob("cats.0*.jpg"))) == 2
