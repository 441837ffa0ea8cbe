"""Results files: written in batches, resumed by a rerun (every photo once, no partial line), killed for real."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_class_folder, write_bad_files

from catdogcnn.predict import Classifier, expand_photos
from catdogcnn.results import label_to_file, open_results, result_columns

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow writes .parquet results")

FORMATS = ("csv", "jsonl", "parquet")


def read_rows(output: Path) -> list[dict]:
    """Every row of a results file; fails on a line that is not whole."""
    if output.suffix == ".parquet":
        return pq.read_table(output).to_pylist()
    text = output.read_text()
    assert text.endswith("\n"), "a partial last line"
    if output.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = make_class_folder(tmp_path / "photos", 12)
    write_bad_files(folder / "bad")
    return folder


class Crash(Exception):
    pass


@pytest.mark.parametrize("kind", FORMATS)
def test_a_run_stopped_after_a_batch_resumes_with_every_photo_once(tiny_bundle, photos, tmp_path, kind):
    classifier = Classifier(tiny_bundle)
    output = tmp_path / f"labels.{kind}"

    def crash_after_first_batch(rows: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        label_to_file(classifier, [photos], output, flush_every=7, on_rows=crash_after_first_batch)
    assert len(read_rows(output)) == 7
    summary = label_to_file(classifier, [photos], output, flush_every=7)
    everything = [str(p) for p in expand_photos([photos])]
    assert summary.already_done == 7 and summary.labelled == len(everything) - 7
    rows = read_rows(output)
    assert sum(bool(r["error"]) for r in rows) == 5
    assert sorted(r["path"] for r in rows) == sorted(everything)
    expected = {p.source: p for p in classifier.predict_many([photos])}
    for row in rows:
        p = expected[row["path"]]
        assert (row["label"] or None) == p.label and (row["error"] or None) == p.error
        if p.ok:
            assert float(row["p_dogs"]) == pytest.approx(p.probabilities["dogs"], abs=1e-6)
    again = label_to_file(classifier, [photos, photos], output)  # bad photos are not retried; duplicates once
    assert (again.already_done, again.labelled) == (len(everything), 0)
    assert len(read_rows(output)) == len(everything)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_partial_last_line_is_cut_off_before_appending(tiny_bundle, photos, tmp_path, kind):
    classifier = Classifier(tiny_bundle)
    output = tmp_path / f"labels.{kind}"
    label_to_file(classifier, [photos / "cats"], output)
    whole = output.read_bytes()
    output.write_bytes(whole + whole.splitlines(keepends=True)[-1][:20])  # a write cut short by a kill
    with open_results(output, classifier.classes) as results:
        assert len(results.done) == 12
    assert output.read_bytes() == whole
    label_to_file(classifier, [photos], output)
    assert len(read_rows(output)) == len(expand_photos([photos]))


def test_an_output_of_another_model_or_kind_is_refused(tiny_bundle, tmp_path):
    output = tmp_path / "labels.csv"
    output.write_text("path,label\nx.jpg,cats\n")
    with pytest.raises(ValueError, match="labels.csv: its columns"):
        open_results(output, ["cats", "dogs"])
    with pytest.raises(ValueError, match="must end in .csv, .jsonl, .parquet"):
        open_results(tmp_path / "labels.txt", ["cats", "dogs"])
    (tmp_path / "file.parquet").write_text("")
    with pytest.raises(ValueError, match="folder of part files"):
        open_results(tmp_path / "file.parquet", ["cats", "dogs"])
    with open_results(tmp_path / "new.jsonl", ["a", "b", "c"]) as results:
        results.append([dict.fromkeys(result_columns(["a", "b", "c"]), None) | {"path": "p.jpg"}])
    assert json.loads((tmp_path / "new.jsonl").read_text())["p_c"] is None


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_killed_half_way_then_rerun_labels_every_photo_once(photos, tmp_path, kind):
    """The shipped model on one thread labels a few dozen photos a second: killed with SIGKILL once a third of
    the photos are written, the rerun writes the rest."""
    make_class_folder(photos / "more", 60, seed=3)
    everything = [str(p) for p in expand_photos([photos])]
    output = tmp_path / f"labels.{kind}"
    command = [sys.executable, "-m", "catdogcnn", "predict", str(photos), "--output", str(output), "--model",
               "default", "--threads", "1", "--batch-size", "4", "--flush-every", "4"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (output.exists() and rows_written(output) >= len(everything) // 3):
        assert run.poll() is None, f"finished before it could be killed: {run.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = rows_written(output)
    assert written < len(everything)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr  # the bad photos (first in order) were recorded by the first run
    assert f"{written} already there" in rerun.stderr
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == sorted(everything)
    assert sum(bool(r["error"]) for r in rows) == 5
    assert not list(tmp_path.rglob("*.tmp"))  # a part cut short by the kill is cleared away


def rows_written(output: Path) -> int:
    """Rows written so far by a running process: whole lines, or finished parts."""
    if output.suffix == ".parquet":
        return sum(pq.read_metadata(part).num_rows for part in output.glob("part-*.parquet"))
    return output.read_bytes().count(b"\n") - 1  # the header is not a row


def test_the_cli_refuses_ray_without_an_output(tiny_bundle, photos):
    from conftest import run_cli as run

    result = run("predict", photos, "--model", tiny_bundle, "--ray", "local")
    assert result.returncode == 2 and "--ray needs --output FILE" in result.stderr


def test_cli_output_is_written_and_resumed(tiny_bundle, photos, tmp_path):
    from conftest import run_cli as run

    output = tmp_path / "out" / "labels.jsonl"
    first = run("predict", photos / "cats", "--model", tiny_bundle, "--output", output)
    assert first.returncode == 0 and first.stdout == "" and "12 photo(s) labelled" in first.stderr
    second = run("predict", photos, "--model", tiny_bundle, "--output", output)
    assert second.returncode == 1 and "17 photo(s) labelled (5 could not be read" in second.stderr
    assert "12 already there" in second.stderr
    assert len(read_rows(output)) == 29 and os.path.getsize(output) > 0
