"""The bundle's int8 variant: written by `catdogcnn quantize`, close to the float graph, smaller."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import make_neither_folder, open_set_run

from catdogcnn.bundle import BLANK_RULE
from catdogcnn.calibration import decide
from catdogcnn.data import load_images, scan_folder
from catdogcnn.predict import Classifier
from catdogcnn.quantize import float_head_nodes, quantize_bundle
from catdogcnn.train import TrainConfig, train


@pytest.mark.slow
def test_quantized_bundle_agrees_with_the_float_one(tmp_path, make_class_folder, run_cli):
    data = tmp_path / "data"
    make_class_folder(data / "training_set", 60, seed=7)
    make_class_folder(data / "test_set", 20, seed=8)
    config = TrainConfig(epochs=2, batch_size=16, augment="none", threads=2, val_fraction=0.25)
    bundle = train(data, tmp_path / "run", config, show_progress=False)
    result = run_cli("quantize", bundle, data, "--out", tmp_path / "int8", "--calibration-photos", "64")
    assert result.returncode == 0, result.stderr
    assert "labels agree" in result.stdout
    float_clf, int8_clf = Classifier(bundle), Classifier(tmp_path / "int8")
    info = int8_clf.metadata["quantization"]
    assert info["calibration_photos"] == 64 and info["label_agreement"] >= 0.9
    size = {c: (c.bundle / c.metadata["graph"]["file"]).stat().st_size for c in (float_clf, int8_clf)}
    assert size[int8_clf] < size[float_clf] / 2  # int8 weights
    photos = sorted((data / "test_set").rglob("*.jpg"))
    a = np.array([p.probabilities["dogs"] for p in float_clf.predict_many(photos)])
    b = np.array([p.probabilities["dogs"] for p in int8_clf.predict_many(photos)])
    assert ((a > 0.5) == (b > 0.5)).mean() >= 0.9 and np.abs(a - b).max() < 0.2

    again = run_cli("quantize", tmp_path / "int8", data, "--out", tmp_path / "int8-again")
    assert again.returncode == 2 and "already quantized" in again.stderr

    # The recorded accuracies are those of the bundle as it predicts: with or without mirror averaging.
    classes, samples = scan_folder(data / "test_set")
    photos = load_images(samples, classes, 64, cache_dir=False)
    for tta in (False, True):
        copy = shutil.copytree(bundle, tmp_path / f"tta-{tta}")
        meta = json.loads((copy / "bundle.json").read_text())
        (copy / "bundle.json").write_text(json.dumps({**meta, "tta": tta}))
        info = Classifier(quantize_bundle(copy, tmp_path / f"int8-{tta}", photos.images, photos.images,
                                          photos.labels)).metadata["quantization"]
        float_clf = Classifier(copy)
        expected = (decide(float_clf.predict_arrays(photos.images), float_clf.threshold) == photos.labels).mean()
        assert info["val_accuracy_float"] == expected
        assert ("mirror" in info["checked_on"]) == tta


def test_quantize_needs_the_training_record(tiny_bundle, tmp_path, make_class_folder, run_cli):
    make_class_folder(tmp_path / "data", 4)
    result = run_cli("quantize", tiny_bundle, tmp_path / "data", "--out", tmp_path / "int8")
    assert result.returncode == 2 and "no training configuration" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_quantized_bundle_keeps_its_heads_in_float(tiny_bundle, tmp_path):
    """int8 probabilities would be rounded to steps of 1/255 of their range (most photos exactly 0 or 1)."""
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    int8 = Classifier(quantize_bundle(tiny_bundle, tmp_path / "int8", photos, photos, rng.integers(0, 2, 40)))
    graph = onnx.load(int8.bundle / int8.metadata["graph"]["file"])
    kinds = {node.name: node.op_type for node in graph.graph.node}
    head = [kinds[name] for name in float_head_nodes(graph)]
    assert "Sigmoid" in head and "Gemm" in head and not any("Quantize" in kind for kind in head), head
    assert "DequantizeLinear" in kinds.values()  # the rest is int8
    float_p = Classifier(tiny_bundle).predict_arrays(photos)[:, 1]
    assert np.abs(int8.predict_arrays(photos)[:, 1] - float_p).max() < 0.05


@pytest.mark.slow
def test_an_int8_copy_sets_its_own_neither_cut_and_still_answers_neither(tmp_path):
    from catdogcnn.predict import NEITHER
    from catdogcnn.quantize import quantize

    bundle, _ = open_set_run(tmp_path, ("cats", "dogs"), "seed_cnn")
    int8 = quantize(bundle, tmp_path / "data", tmp_path / "int8", calibration_photos=64)
    entry, before = Classifier(int8).metadata["neither"], Classifier(bundle).metadata["neither"]
    rule, float_rule = entry["rules"][1], before["rules"][1]
    assert entry["requantized"] and rule["kind"] == float_rule["kind"] == "calibrated" and rule["max"] == 0.5
    assert rule["weights"]["learned"] == float_rule["weights"]["learned"]  # the same rule, its cut moved
    assert rule["weights"]["bias"] != float_rule["weights"]["bias"]
    assert abs(entry["val_pets_flagged"] - before["val_pets_flagged"]) <= 0.05  # about the same photos turned away
    assert entry["photos"] == before["photos"]  # which photos were held out, for the benchmarks
    assert entry["rules"][0] == before["rules"][0] == BLANK_RULE  # reads the photo: nothing to set again
    assert entry["val_pets_flagged"] <= entry["target_pets_flagged"] == before["target_pets_flagged"]
    assert "held_out_neither_caught" not in entry  # the float graph's figures, not the int8 one's
    answers = [p.label for p in Classifier(int8).predict_many([make_neither_folder(tmp_path / "fresh", 4, seed=9)])]
    assert answers.count(NEITHER) >= 0.8 * len(answers), answers
