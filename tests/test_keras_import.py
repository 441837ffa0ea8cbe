"""Keras files written here with h5py (no TensorFlow), checked against a numpy reference of Keras's maths; and
files Keras itself saved (tests/fixtures), checked against Keras's own predictions."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from catdogcnn.keras_import import KerasImportError, import_keras
from catdogcnn.predict import Classifier


def keras_layers(rng: np.random.Generator, padding: str = "same", final: str = "softmax", units: int = 3):
    """A small seed-like Sequential model: (config layers, name -> weights)."""
    layers = [
        {"class_name": "InputLayer", "config": {"name": "input", "batch_shape": [None, 16, 16, 3]}},
        {"class_name": "Conv2D", "config": {"name": "conv", "filters": 4, "kernel_size": [3, 3], "strides": [1, 1],
                                            "padding": padding, "activation": "relu", "use_bias": True,
                                            "data_format": "channels_last"}},
        {"class_name": "MaxPooling2D", "config": {"name": "pool", "pool_size": [2, 2], "strides": [2, 2],
                                                  "padding": "valid", "data_format": "channels_last"}},
        {"class_name": "Dropout", "config": {"name": "drop", "rate": 0.25}},
        {"class_name": "Flatten", "config": {"name": "flat", "data_format": "channels_last"}},
        {"class_name": "Dense", "config": {"name": "hidden", "units": 5, "activation": "relu", "use_bias": True}},
        {"class_name": "Dense", "config": {"name": "out", "units": units, "activation": final, "use_bias": True}},
    ]
    side = 8 if padding == "same" else 7
    weights = {"conv": [rng.normal(0, 0.3, (3, 3, 3, 4)), rng.normal(0, 0.1, 4)],
               "hidden": [rng.normal(0, 0.3, (side * side * 4, 5)), rng.normal(0, 0.1, 5)],
               "out": [rng.normal(0, 0.5, (5, units)), rng.normal(0, 0.1, units)]}
    return layers, {k: [w.astype(np.float32) for w in v] for k, v in weights.items()}


def write_h5(path: Path, layers: list, weights: dict, class_name: str = "Sequential") -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": class_name, "config": {"name": "m", "layers": layers}})
        f.attrs["keras_version"] = "3.15.1"
        group = f.create_group("model_weights")
        names = [layer["config"]["name"] for layer in layers if layer["class_name"] != "InputLayer"]
        group.attrs["layer_names"] = np.array(names, dtype="S")
        for name in names:
            g = group.create_group(name)
            ws = weights.get(name, [])
            g.attrs["weight_names"] = np.array([f"{name}/{i}" for i in range(len(ws))], dtype="S")
            for i, w in enumerate(ws):
                g.create_dataset(f"{name}/{i}", data=w)
    return path


def write_keras_zip(path: Path, layers: list, weights: dict) -> Path:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name, ws in weights.items():
            g = f.create_group(f"layers/{name}/vars")
            for i, w in enumerate(ws):
                g.create_dataset(str(i), data=w)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": layers}}))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("model.weights.h5", buffer.getvalue())
    return path


def keras_reference(x: np.ndarray, layers: list, weights: dict) -> np.ndarray:
    """Keras's forward pass in numpy, channels-last, one photo (H, W, C) in [0, 1]."""
    for layer in layers:
        kind, c = layer["class_name"], layer["config"]
        if kind == "Conv2D":
            kernel, bias = weights[c["name"]]
            if c["padding"] == "same":  # stride 1, odd kernel: symmetric
                p = kernel.shape[0] // 2
                x = np.pad(x, ((p, p), (p, p), (0, 0)))
            h, w = x.shape[0] - kernel.shape[0] + 1, x.shape[1] - kernel.shape[1] + 1
            out = np.zeros((h, w, kernel.shape[3]))
            for i in range(h):
                for j in range(w):
                    out[i, j] = np.tensordot(x[i:i + 3, j:j + 3], kernel, axes=3) + bias
            x = np.maximum(out, 0)
        elif kind == "MaxPooling2D":
            h, w = x.shape[0] // 2, x.shape[1] // 2
            x = x[: h * 2, : w * 2].reshape(h, 2, w, 2, -1).max(axis=(1, 3))
        elif kind == "Flatten":
            x = x.reshape(-1)
        elif kind == "Dense":
            kernel, bias = weights[c["name"]]
            x = x @ kernel + bias
            if c["activation"] == "relu":
                x = np.maximum(x, 0)
            elif c["activation"] == "softmax":
                x = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
            elif c["activation"] == "sigmoid":
                x = 1 / (1 + np.exp(-x))
    return x


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_round_trip_matches_keras_maths(tmp_path, padding, fmt):
    layers, weights = keras_layers(np.random.default_rng(0), padding)
    writer = write_h5 if fmt == "h5" else write_keras_zip
    bundle = import_keras(writer(tmp_path / f"m.{fmt}", layers, weights), tmp_path / "bundle",
                          ["a", "b", "c"])
    clf = Classifier(bundle)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    got = clf.predict_arrays(images)
    expected = np.stack([keras_reference(img / 255.0, layers, weights) for img in images])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert clf.resize == "nearest" and clf.classes == ["a", "b", "c"]


def test_binary_sigmoid_model(tmp_path):
    layers, weights = keras_layers(np.random.default_rng(2), "valid", final="sigmoid", units=1)
    clf = Classifier(import_keras(write_h5(tmp_path / "m.h5", layers, weights), tmp_path / "bundle"))
    image = np.random.default_rng(3).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    p_dog = keras_reference(image[0] / 255.0, layers, weights)[0]
    assert clf.classes == ["cats", "dogs"]
    assert clf.predict_arrays(image)[0] == pytest.approx([1 - p_dog, p_dog], abs=1e-5)


def test_unsupported_layer_is_named(tmp_path):
    layers, weights = keras_layers(np.random.default_rng(4))
    layers.insert(2, {"class_name": "BatchNormalization", "config": {"name": "bn_1"}})
    with pytest.raises(KerasImportError, match="'bn_1' is a BatchNormalization"):
        import_keras(write_h5(tmp_path / "m.h5", layers, weights), tmp_path / "bundle")


def test_functional_model_is_refused(tmp_path):
    layers, weights = keras_layers(np.random.default_rng(5))
    with pytest.raises(KerasImportError, match="only Sequential"):
        import_keras(write_h5(tmp_path / "m.h5", layers, weights, class_name="Functional"), tmp_path / "b")


def test_truncated_file_is_a_one_line_error(tmp_path):
    layers, weights = keras_layers(np.random.default_rng(6))
    path = write_h5(tmp_path / "m.h5", layers, weights)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(KerasImportError) as info:
        import_keras(path, tmp_path / "bundle")
    assert "\n" not in str(info.value) and "m.h5" in str(info.value)


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("file_name", ["keras_seed_like.h5", "keras_seed_like.keras"])
def test_a_file_keras_saved_gives_keras_answers(tmp_path, file_name):
    """Saved by Keras 3.15 (tests/fixtures/make_keras_fixture.py), not by this test: Keras's own layout, names
    and attributes, and its predictions on the same photos."""
    expected = json.loads((FIXTURES / "keras_seed_like_predictions.json").read_text())
    photos = np.random.default_rng(expected["photos_seed"]).integers(0, 256, (expected["photos"], 16, 16, 3),
                                                                     dtype=np.uint8)
    clf = Classifier(import_keras(FIXTURES / file_name, tmp_path / "bundle"))
    assert clf.classes == ["cats", "dogs"] and clf.image_size == 16
    p_dog = [clf.predict(photo).probabilities["dogs"] for photo in photos]
    assert p_dog == pytest.approx(expected["p_dog"], abs=1e-5)


def test_reference_keras_model_reproduces_its_predictions(real_data, tmp_path):
    from catdogcnn.evaluate import evaluate

    anchors = real_data.parents[1] / "anchors"
    if not (anchors / "seed_keras_model.h5").exists():
        pytest.skip(f"no reference Keras model in {anchors}")
    bundle = import_keras(anchors / "seed_keras_model.h5", tmp_path / "bundle")
    clf = Classifier(bundle)
    reference = json.loads((anchors / "seed_keras_model_predictions.json").read_text())
    for row in reference["predictions"]:
        assert clf.predict(real_data / row["file"]).probabilities["dogs"] == pytest.approx(row["p_dog"], abs=1e-4)
    assert evaluate(real_data, clf)["accuracy"] == pytest.approx(0.8195, abs=1e-9)
