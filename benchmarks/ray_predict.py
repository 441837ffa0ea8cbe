"""Labelling throughput, one process against Ray, in one run on the same photos, as a markdown table.

    python benchmarks/ray_predict.py --data ../shared/data/cats_vs_dogs [--photos 2000] [--ray local]

Both write a fresh results file (`--output`, parquet) with the shipped model: the single process with
onnxruntime on every core; Ray (a local cluster by default, or `--ray ADDRESS`) with one actor per CPU, one
onnxruntime thread each. Ray's time includes starting the actors (each loads the model once) but not
starting the cluster. On one small machine Ray has nothing to spread the work over: what it shows there is
its overhead (scheduling, moving results back); it pays off with more machines. The labels of both are
compared photo by photo.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from results_page import add_write_option, recorded  # a sibling script's helper

from catdogcnn.data import scan_folder
from catdogcnn.predict import load_classifier
from catdogcnn.ray_predict import label_with_ray
from catdogcnn.results import label_to_file

ROOT = Path(__file__).resolve().parents[1]


def labels(output: Path) -> dict[str, str | None]:
    return {row["path"]: row["label"] for row in pq.read_table(output, columns=["path", "label"]).to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--photos", type=int, default=2000, help="photos from test_set (then training_set)")
    parser.add_argument("--model", help="bundle (default: the shipped model)")
    parser.add_argument("--ray", default="local", help="ray.init address: local (default), auto, ray://HOST:10001")
    add_write_option(parser)
    args = parser.parse_args()
    title = "Labelling a folder: one process against Ray (`benchmarks/ray_predict.py`)"
    with recorded(args.write, "ray_predict.py", title):

        samples = [s for split in ("test_set", "training_set") for s in scan_folder(args.data / split)[1]]
        photos = [s.path for s in samples[: args.photos]]
        classifier = load_classifier(args.model)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            single = label_to_file(classifier, photos, Path(tmp) / "single.parquet")
            rows.append(("single process", os.cpu_count(), single.labelled, time.perf_counter() - started))

            started = time.perf_counter()
            ray.init(address=args.ray, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            cluster_start = time.perf_counter() - started
            cpus = int(ray.cluster_resources().get("CPU", 1))
            started = time.perf_counter()
            spread = label_with_ray(classifier, photos, Path(tmp) / "ray.parquet")
            rows.append((f"Ray ({len(ray.nodes())} node(s), {cpus} actors)", cpus, spread.labelled,
                         time.perf_counter() - started))
            ray.shutdown()
            a, b = labels(Path(tmp) / "single.parquet"), labels(Path(tmp) / "ray.parquet")
        differ = sum(a[path] != b.get(path) for path in a)

        print(f"\n{len(photos)} photos, model {classifier.model_id}; {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f}; Ray cluster start {cluster_start:.1f} s (not counted); "
              f"labels that differ: {differ} of {len(a)}\n")
        print("| run | CPUs | photos | seconds | photos/s |")
        print("|---|---|---|---|---|")
        for name, cores, count, seconds in rows:
            print(f"| {name} | {cores} | {count} | {seconds:.1f} | {count / seconds:.1f} |")
        if differ:
            sys.exit(1)


if __name__ == "__main__":
    main()
