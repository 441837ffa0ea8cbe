"""The command line, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def test_predict_formats_agree_with_each_other_and_with_results_files(tiny_bundle, tmp_path, make_class_folder,
                                                                      run_cli):
    """table, csv and json name the same label for every photo; json and csv are the rows that --output writes
    to .jsonl and .csv, field for field."""
    photos = make_class_folder(tmp_path / "photos", 3)
    runs = {kind: run_cli("predict", photos, "--model", tiny_bundle, *(("--format", kind) if kind else ()))
            for kind in ("", "csv", "json")}
    assert all(r.returncode == 0 and r.stderr == "" for r in runs.values()), runs
    table = {line.split("\t")[0]: line.split("\t")[1:3] for line in runs[""].stdout.splitlines()}
    rows = list(csv.DictReader(io.StringIO(runs["csv"].stdout)))
    records = [json.loads(line) for line in runs["json"].stdout.splitlines()]
    assert len(table) == len(rows) == len(records) == 6
    assert list(rows[0]) == list(records[0]) == ["path", "label", "confidence", "p_cats", "p_dogs", "error", "reason"]
    for row, record in zip(rows, records, strict=True):
        assert row["path"] == record["path"] and row["label"] == record["label"] == table[row["path"]][0]
        assert float(row["confidence"]) == record["confidence"]
        assert abs(float(table[row["path"]][1]) - record["confidence"]) <= 5e-5
    for suffix, printed in ((".jsonl", runs["json"].stdout), (".csv", runs["csv"].stdout)):
        out = tmp_path / f"labels{suffix}"
        assert run_cli("predict", photos, "--model", tiny_bundle, "--output", out).returncode == 0
        assert sorted(out.read_text().splitlines()) == sorted(printed.splitlines())


@pytest.mark.parametrize(("args", "code"), [
    (("predict", "PHOTOS"), 0),
    (("predict", "PHOTOS", "--format", "xml"), 2),  # a usage mistake
    (("predict", "NOWHERE"), 1),  # a photo that is not there is a photo that could not be read
    (("predict", "PHOTOS", "EMPTY"), 1),  # an empty folder: the others still labelled
    (("predict", "PHOTOS", "--model", "NOWHERE"), 2),
    (("predict", "PHOTOS", "--ray", "local"), 2),  # --ray needs --output
    (("evaluate", "EMPTY"), 2),
    (("nonsense",), 2),
    (("--version",), 0),
])
def test_exit_codes(tiny_bundle, tmp_path, make_class_folder, run_cli, args, code):
    """0: done; 1: done, but some photos could not be read; 2: nothing done, the command was wrong."""
    places = {"PHOTOS": make_class_folder(tmp_path / "photos", 1), "NOWHERE": tmp_path / "nowhere",
              "EMPTY": tmp_path / "empty"}
    places["EMPTY"].mkdir()
    model = () if "--model" in args or args[0] not in ("predict", "evaluate") else ("--model", tiny_bundle)
    result = run_cli(*(places.get(a, a) for a in args), *model)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr


def test_predict_reports_each_bad_file_and_exits_1(tiny_bundle, tmp_path, make_class_folder, write_bad_files, run_cli):
    make_class_folder(tmp_path / "photos", 2)
    bad = write_bad_files(tmp_path / "photos" / "dogs")
    result = run_cli("predict", tmp_path / "photos", "--model", tiny_bundle)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad) and all(any(name in e for e in errors) for name in bad)


def test_seed_threshold_rule(brightness_bundle, tmp_path, run_cli):
    """This bundle's p(dogs) is the photo's brightness: 0.55 is a dog at its threshold 0.5, a cat at the seed's 0.6."""
    for name, level in (("dim", 100), ("between", 140), ("bright", 200)):
        Image.new("RGB", (40, 40), (level,) * 3).save(tmp_path / f"{name}.png")

    def labels(*options: str) -> dict[str, str]:
        result = run_cli("predict", tmp_path, "--model", brightness_bundle, "--format", "json", *options)
        assert result.returncode == 0, result.stderr
        return {Path(r["path"]).stem: r["label"] for r in map(json.loads, result.stdout.splitlines())}

    assert labels() == {"dim": "cats", "between": "dogs", "bright": "dogs"}
    assert labels("--threshold", "0.6") == {"dim": "cats", "between": "cats", "bright": "dogs"}


def test_user_errors_are_one_line(tmp_path, run_cli):
    result = run_cli("predict", tmp_path / "x.jpg", "--model", tmp_path / "nowhere")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no model bundle" in result.stderr
    result = run_cli("evaluate", tmp_path)
    assert result.returncode == 2 and "no class sub-folders" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_json(tiny_bundle, seed_layout, run_cli):
    result = run_cli("evaluate", seed_layout, "--model", tiny_bundle, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 60 and report["classes"] == ["cats", "dogs"]
    assert {"accuracy", "log_loss", "confusion_matrix", "roc_auc", "per_class", "bad_files"} <= set(report)
    assert sum(map(sum, report["confusion_matrix"])) == 60


def test_evaluate_prints_the_neither_rules_and_rates(neither_bundle, pets_and_others, run_cli):
    pets, others = pets_and_others
    bundle = neither_bundle("cli", {"rules": [{"kind": "learned", "output": "neither_probability", "max": 0.7}]})
    result = run_cli("evaluate", pets, "--model", bundle, "--non-pets", others)
    assert result.returncode == 0, result.stderr
    printed = " ".join(result.stdout.split())  # the table printer wraps long lines
    assert ("'neither' (the model's 'neither' score above 0.7): 11.11% of these photos, 75.00% of 4 photos of "
            "none of the classes") in printed


def test_data_check(seed_layout, write_bad_files, run_cli):
    write_bad_files(seed_layout / "training_set" / "cats")
    report = json.loads(run_cli("data", "check", seed_layout, "--json").stdout)
    assert report["counts"]["train"] == {"cats": 80, "dogs": 80}
    assert len(report["bad_files"]) == 5


@pytest.mark.slow
def test_train_command(seed_layout, tmp_path, run_cli):
    result = run_cli("train", seed_layout, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "32",
                 "--augment", "none")
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stderr and (tmp_path / "run" / "bundle" / "bundle.json").exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 1, "lr": 0.0005}))
    result = run_cli("train", seed_layout, "--out", tmp_path / "run2", "--config", config)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run2" / "bundle" / "bundle.json").read_text())
    assert meta["training"]["config"]["lr"] == 0.0005


def test_predict_reports_an_empty_folder(tiny_bundle, tmp_path, make_class_folder, run_cli):
    make_class_folder(tmp_path / "photos", 1)
    (tmp_path / "empty").mkdir()
    result = run_cli("predict", tmp_path / "photos", tmp_path / "empty", "--model", tiny_bundle)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 2  # the photos still print
    assert f"error: {tmp_path / 'empty'}: no files in this folder" in result.stderr
    assert "1 folder(s) had no files" in result.stderr and "could not be read" not in result.stderr


def test_predict_refuses_a_threshold_outside_0_1(tiny_bundle, tmp_path, make_class_folder, run_cli):
    make_class_folder(tmp_path / "photos", 1)
    result = run_cli("predict", tmp_path / "photos", "--model", tiny_bundle, "--threshold", "1.5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: threshold must be between 0 and 1, not 1.5\n"


@pytest.mark.parametrize("option", ["--batch-size", "--threads"])
def test_predict_refuses_counts_below_1(tiny_bundle, tmp_path, option, make_class_folder, run_cli):
    make_class_folder(tmp_path / "photos", 1)
    result = run_cli("predict", tmp_path / "photos", "--model", tiny_bundle, option, "0")
    assert result.returncode == 2 and result.stdout == "" and option in result.stderr


@pytest.mark.parametrize("args, option", [(("tune", "DATA", "--trials", "0"), "--trials"),
                                          (("train", "DATA", "--nproc", "0"), "--nproc"),
                                          (("data", "split", "DATA", "--dest", "OUT", "--train", "0"), "--train"),
                                          (("serve", "--max-batch", "0"), "--max-batch")])
def test_counts_below_their_minimum_are_refused(tmp_path, args, option, run_cli):
    args = [str(tmp_path / a) if a in ("DATA", "OUT") else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2 and option in result.stderr


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"catdogcnn {importlib.metadata.version('catdogcnn')}\n"


@pytest.mark.parametrize("left", ["last.pt", "metrics.jsonl", "bundle"])
def test_train_refuses_a_folder_that_holds_a_run_unless_told(tmp_path, left, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    if left == "bundle":
        (run / left).mkdir()
    else:
        (run / left).write_text("")
    result = run_cli("train", tmp_path / "nowhere", "--out", run)
    assert result.returncode == 2
    assert result.stderr == f"error: {run}: holds a run already; --resume to go on, --overwrite to start again\n"


@pytest.mark.parametrize("told", ["--resume", "--overwrite"])
def test_train_goes_into_a_folder_that_holds_a_run_when_told(tmp_path, told, run_cli):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    result = run_cli("train", tmp_path / "nowhere", "--out", tmp_path / "run", told)
    assert result.returncode == 2 and "holds a run" not in result.stderr and "nowhere" in result.stderr  # the data
    both = run_cli("train", tmp_path / "nowhere", "--out", tmp_path / "run", "--resume", "--overwrite")
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_train_runs_go_to_a_folder_per_model(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "resnet_small" / "bundle").mkdir(parents=True)
    result = run_cli("train", "nowhere", "--model", "resnet_small")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {Path('runs', 'resnet_small')}: holds a run")
    other = run_cli("train", "nowhere", "--model", "seed_cnn")
    assert other.returncode == 2 and "holds a run" not in other.stderr and "nowhere" in other.stderr


def test_the_probe_recipe_refuses_flags_it_cannot_honour(tmp_path, run_cli):
    result = run_cli("train", tmp_path / "nowhere", "--out", tmp_path / "run", "--recipe", "probe", "--model",
                     "efficientnet_lite0", "--probe-c", "0.1", "--lr", "0.01", "--ema", "0.9", "--resume")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: the probe recipe cannot honour --resume, --lr, --ema: ")
    assert not (tmp_path / "run").exists()


# `predict` with the API function it calls first replaced by one that raises ERROR.
PREDICT_RAISING = """
import catdogcnn.predict
from catdogcnn.cli import app
from catdogcnn.errors import UserError

def load_classifier(*args, **kwargs):
    raise ERROR

catdogcnn.predict.load_classifier = load_classifier
app(["predict", "photo.jpg"], prog_name="catdogcnn")
"""


def test_a_bug_keeps_its_traceback_and_a_deliberate_error_is_one_line():
    def predict_raising(error: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", PREDICT_RAISING.replace("ERROR", error)], capture_output=True,
                              text=True, timeout=300)

    bug = predict_raising("KeyError('x')")
    assert bug.returncode == 1 and bug.stderr.startswith("Traceback (most recent call last):")
    assert bug.stderr.endswith("KeyError: 'x'\n") and "error:" not in bug.stderr
    deliberate = predict_raising("UserError('photo.jpg: not what was asked for')")
    assert deliberate.returncode == 2 and deliberate.stderr == "error: photo.jpg: not what was asked for\n"


def test_the_command_reference_is_the_command_lines_own_help(repo_root, tmp_path):
    """docs/cli.md is generated (`make docs`): a command or option added, renamed or reworded shows here."""
    typer_cli = Path(sys.executable).with_name("typer")
    if not typer_cli.exists():
        pytest.skip(f"{typer_cli}: Typer's command line is not installed beside this Python")
    fresh = tmp_path / "cli.md"
    subprocess.run([typer_cli, "catdogcnn.cli", "utils", "docs", "--name", "catdogcnn", "--title", "Command reference",
                    "--output", fresh], check=True, capture_output=True)
    assert fresh.read_text() == (repo_root / "docs" / "cli.md").read_text(), "docs/cli.md is stale: run `make docs`"
