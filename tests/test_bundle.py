"""The bundle format: finding, reading and checking, writing, and the atomic write underneath."""

from __future__ import annotations

import json
import shutil

import pytest

from catdogcnn.bundle import (
    BundleError,
    atomic_output,
    atomic_write,
    bundled_models_dir,
    find_bundle,
    read_bundle_metadata,
    read_graph,
    shipped_bundle_names,
    write_bundle,
)


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    path = tmp_path / "bundle.json"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError), atomic_output(path) as partial:
        partial.write_bytes(b"half of the new")
        raise RuntimeError("killed half-way")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["bundle.json"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_shipped_bundles_are_found_by_name(tmp_path, monkeypatch):
    assert {"default", "seed_cnn", "resnet_small"} <= set(shipped_bundle_names())
    monkeypatch.chdir(tmp_path)
    assert find_bundle("seed_cnn") == bundled_models_dir() / "seed_cnn"
    (tmp_path / "seed_cnn").mkdir()  # a folder of that name here wins over the shipped one
    assert find_bundle("seed_cnn").resolve() == tmp_path / "seed_cnn"


def test_bundle_errors_are_one_line_naming_the_file(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="no model bundle") as info:
        read_bundle_metadata(tmp_path)
    assert str(tmp_path / "bundle.json") in str(info.value) and "seed_cnn" in str(info.value)
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    meta = read_bundle_metadata(copy)
    graph = next(copy.glob("model-*.onnx"))
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(BundleError, match="sha256 does not match"):
        read_graph(copy, meta)
    (copy / "bundle.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "threshold"}))
    with pytest.raises(BundleError, match="lacks 'threshold'"):
        read_bundle_metadata(copy)
    (copy / "bundle.json").write_text("{")
    with pytest.raises(BundleError, match="unreadable bundle metadata"):
        read_bundle_metadata(copy)


def test_rewriting_a_bundle_keeps_it_consistent(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    graph_bytes = next(copy.glob("model-*.onnx")).read_bytes()
    meta = read_bundle_metadata(copy)
    meta.pop("graph")
    write_bundle(copy, graph_bytes, {**meta, "threshold": 0.7}, ["probabilities"])
    assert len(list(copy.glob("model-*.onnx"))) == 1
    rewritten = read_bundle_metadata(copy)
    assert rewritten["threshold"] == 0.7 and read_graph(copy, rewritten) == graph_bytes


def _broken(meta: dict, keys: tuple, value) -> dict:
    """A deep copy of `meta` with the field at `keys` set to `value` (or removed, for `...`)."""
    meta = json.loads(json.dumps(meta))
    parent = meta
    for key in keys[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    return meta


@pytest.mark.parametrize(("keys", "value", "words"), [
    (("graph", "sha256"), ..., "lacks 'graph.sha256'"),
    (("input", "image_size"), ..., "lacks 'input.image_size'"),
    (("input", "image_size"), "64", "'input.image_size' must be a whole number of pixels, not '64'"),
    (("classes",), ["cats"], "'classes' must name two classes or more"),
    (("graph", "file"), "../model.onnx", "'graph.file' must be a file name beside it, not '../model.onnx'"),
    (("graph", "outputs"), "probabilities", "'graph.outputs' must be a list"),
    (("threshold",), True, "'threshold' must be a number, not True"),
])
def test_a_bundle_missing_a_field_is_one_line_naming_it(tiny_bundle, tmp_path, keys, value, words):
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps(_broken(meta, keys, value)))
    with pytest.raises(BundleError, match=rf"^{copy / 'bundle.json'}: bundle metadata.*{words}") as info:
        read_bundle_metadata(copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("keys", "value", "words"), [
    (("classes",), ["cats", "dogs", "birds"], "'classes' names 3 classes, but model-.* gives 2 probabilities"),
    (("graph", "outputs"), ["probabilities", "neither_probability"],
     "'graph.outputs' names neither_probability, which"),
    (("graph", "input"), "pixels", "'graph.input' 'pixels' is not an input of model-"),
])
def test_a_bundle_whose_graph_does_not_match_it_is_refused_on_load(tiny_bundle, tmp_path, keys, value, words):
    from catdogcnn.predict import Classifier

    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps(_broken(meta, keys, value)))
    with pytest.raises(BundleError, match=rf"^{copy / 'bundle.json'}: {words}"):
        Classifier(copy)
