"""Reports: every plot the HTML names exists, its numbers match `evaluate --json`, and a browser renders it."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import pytest
from conftest import chromium

from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier
from catdogcnn.report import evaluation_report, training_report


def check_report(html_path, result):
    html = html_path.read_text()
    referenced = set(re.findall(r"src='([^']+)'", html))
    assert referenced and all((html_path.parent / name).exists() for name in referenced)
    assert {p.name for p in html_path.parent.glob("*.png")} <= referenced  # nothing written that is not shown
    for key in ("accuracy", "log_loss", "ece"):
        assert f"{result[key]:.4f}" in html, key
    assert str(result["n"]) in html


def test_report_on_a_synthetic_set(tiny_bundle, tmp_path, make_class_folder):
    make_class_folder(tmp_path / "data", 12)
    clf = Classifier(tiny_bundle)
    result = evaluate(tmp_path / "data", clf, details=True)
    path = evaluation_report(result, clf, tmp_path / "report")
    check_report(path, result)
    cli = subprocess.run([sys.executable, "-m", "catdogcnn", "evaluate", str(tmp_path / "data"), "--model",
                          str(tiny_bundle), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["accuracy"] == result["accuracy"]


def test_report_names_the_neither_rules(neither_bundle, pets_and_others, tmp_path):
    pets, others = pets_and_others
    clf = Classifier(neither_bundle("reported", {"rules": [{"kind": "learned", "output": "neither_probability",
                                                            "max": 0.7}]}))
    page = evaluation_report(evaluate(pets, clf, non_pets=others, details=True), clf, tmp_path / "report")
    text = html.unescape(page.read_text())
    for row in ("'neither' rules</th><td>the model's 'neither' score above 0.7",
                "'neither' among these photos</th><td>11.11%", "none of the classes</th><td>75.00% of 4"):
        assert row in text, row


@pytest.mark.slow
@pytest.mark.browser
def test_report_on_the_real_test_set_in_a_browser(real_data, tmp_path, artifacts):
    from catdogcnn.bundle import bundled_models_dir

    clf = Classifier(bundled_models_dir() / "default")
    result = evaluate(real_data, clf, details=True)
    path = evaluation_report(result, clf, tmp_path / "report")
    check_report(path, result)
    assert "wrong_0.png" in path.read_text()  # the confidently wrong photos, with heat maps
    with chromium() as browser:
        page = browser.new_page()
        page.goto(path.as_uri())
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)


def test_training_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.5 + e / 12, "seconds": 2.0} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = training_report(run)
    assert (run / "curves.png").exists() and "curves.png" in path.read_text() and "epoch 3" in path.read_text()
