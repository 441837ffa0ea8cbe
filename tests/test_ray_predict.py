"""Labelling on a local Ray cluster of 2 CPUs gives the single process's labels, into a resumable file; the
command line joins that cluster by its address (one cluster for the module: a start costs about 8 s on 2 cores)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import make_class_folder, write_bad_files

ray = pytest.importorskip("ray", reason="Ray is in the ray extra: pip install -e '.[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the ray extra: pip install -e '.[ray]'")

from catdogcnn.predict import Classifier, expand_photos  # noqa: E402
from catdogcnn.ray_predict import label_with_ray  # noqa: E402
from catdogcnn.results import label_to_file  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_ray_labels_match_the_single_process_and_resume(local_ray, tiny_bundle, tmp_path):
    photos = make_class_folder(tmp_path / "photos", 40, seed=6)
    write_bad_files(photos / "bad")
    classifier = Classifier(tiny_bundle)
    single = label_to_file(classifier, [photos], tmp_path / "single.jsonl")
    assert single.labelled == 85 and single.errors == 5

    output = tmp_path / "ray.parquet"
    label_to_file(classifier, [photos / "cats"], output)  # started here, finished on Ray
    summary = label_with_ray(classifier, [photos], output, batch_size=8, flush_every=16)
    assert (summary.already_done, summary.labelled, summary.errors) == (40, 45, 5)
    rows = sorted(pq.read_table(output).to_pylist(), key=lambda r: r["path"])
    expected = sorted(map(json.loads, (tmp_path / "single.jsonl").read_text().splitlines()), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == sorted(map(str, expand_photos([photos])))
    for row, want in zip(rows, expected, strict=True):  # the same labels and errors, every photo once
        assert {k: row[k] for k in ("path", "label", "error", "reason")} == {
            k: want[k] for k in ("path", "label", "error", "reason")}
        for column in ("confidence", "p_cats", "p_dogs"):  # thread counts and batch sizes differ: last bits may
            assert row[column] == pytest.approx(want[column], abs=1e-6)
    assert len(list(output.glob("part-*.parquet"))) >= 3  # written in batches as results came back

    again = label_with_ray(classifier, [photos], output)
    assert (again.already_done, again.labelled) == (85, 0)


def test_the_cli_labels_on_a_ray_cluster_by_its_address(local_ray, tiny_bundle, tmp_path):
    from conftest import run_cli as run

    photos = make_class_folder(tmp_path / "photos", 10, seed=7)
    result = run("predict", photos, "--model", tiny_bundle, "--output", tmp_path / "labels.csv", "--ray", local_ray,
                 "--ray-actors", "2")
    assert result.returncode == 0, result.stderr
    assert "20 photo(s) labelled" in result.stderr
    assert (tmp_path / "labels.csv").read_text().count("\n") == 21
