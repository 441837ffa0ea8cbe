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
