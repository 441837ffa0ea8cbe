"""Inference speed, measured side by side in one run on the same photos (test_set), as a markdown table.

    python benchmarks/inference.py --data ../shared/data/cats_vs_dogs [--calls 200] [--memory]

Rows: (a) the shipped default model through `Classifier` (onnxruntime), (b) its architecture in torch eager, in
float (built from the registry; for a float bundle with the bundle's own weights, checked to agree; an int8
bundle's weights are quantized and folded, so that row times the architecture only), (c) the seed CNN bundle.
Single-photo latency is file on disk to label; folder throughput runs the whole test_set.
Also the time from `import catdogcnn` to the first label in a fresh interpreter, and with --memory
the peak memory of `catdogcnn predict` over >= 25,000 photos (every split, training_set twice).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_page import add_write_option, recorded  # a sibling script's helper

from catdogcnn.bundle import bundled_models_dir
from catdogcnn.data import decode_image, decode_many, scan_folder
from catdogcnn.predict import Classifier

ROOT = Path(__file__).resolve().parents[1]


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 99)) * 1000


def time_single(predict_one, photos: list[Path], calls: int) -> tuple[float, float]:
    predict_one(photos[0])  # warm caches outside the measurement
    times = []
    for path in (photos * (calls // len(photos) + 1))[:calls]:
        started = time.perf_counter()
        predict_one(path)
        times.append(time.perf_counter() - started)
    return percentiles(times)


def time_folder(predict_all, photos: list[Path]) -> float:
    started = time.perf_counter()
    n = predict_all(photos)
    assert n == len(photos), (n, len(photos))
    return len(photos) / (time.perf_counter() - started)


def torch_equivalent(bundle: Path):
    """The bundle's model in torch eager: the registry's architecture with every weight the graph holds."""
    import onnx
    import torch
    from onnx import numpy_helper

    from catdogcnn.export import InferenceModel
    from catdogcnn.models import build_model, get_spec

    meta = json.loads((bundle / "bundle.json").read_text())
    spec = get_spec(meta["architecture"])
    graph = onnx.load(str(bundle / meta["graph"]["file"])).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = build_model(meta["architecture"], len(meta["classes"]), meta["input"]["image_size"],
                        open_set="model.neither.weight" in weights)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if f"model.{name}" in weights:
                tensor.copy_(torch.tensor(weights[f"model.{name}"]))  # onnx gives read-only arrays
    torch.set_num_threads(os.cpu_count() or 1)
    return InferenceModel(model, spec.mean, spec.std).eval().to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory over >= 25,000 photos")
    add_write_option(parser)
    args = parser.parse_args()
    title = "Inference speed (`benchmarks/inference.py`)"
    with recorded(args.write, "inference.py", title):
        import torch

        load_before = os.getloadavg()[0]
        _, samples = scan_folder(args.data / "test_set")
        photos = [s.path for s in samples]
        single_photos = photos[:: max(1, len(photos) // args.calls)][: args.calls]
        rows = []

        def classifier_row(name: str, clf: Classifier) -> None:
            p50, p99 = time_single(clf.predict, single_photos, args.calls)
            throughput = time_folder(lambda ps: sum(1 for _ in clf.predict_many(ps)), photos)
            rows.append([name, f"{clf.image_size}", f"{p50:.1f}", f"{p99:.1f}", f"{throughput:.0f}"])

        shipped = Classifier(bundled_models_dir() / "default")
        kind = "int8" if "quantization" in shipped.metadata else "float"
        classifier_row(f"(a) shipped `{shipped.model_id}` ({kind}), Classifier (onnxruntime)", shipped)

        eager = torch_equivalent(bundled_models_dir() / "default")
        size = shipped.image_size
        check = np.stack([decode_image(p, size) for p in photos[:8]])
        with torch.inference_mode():
            diff = np.abs(eager(torch.from_numpy(check))[0].numpy() - shipped.predict_arrays(check)).max()
        assert kind == "int8" or diff < 1e-4, f"torch and onnxruntime disagree by {diff}"

        def eager_one(path: Path) -> None:
            with torch.inference_mode():
                eager(torch.tensor(decode_image(path, size)[None]))  # a copy: decoded arrays may be read-only

        def eager_all(paths: list[Path], batch: int = 64) -> int:
            done, pending = 0, []
            with torch.inference_mode():
                for arr in decode_many(paths, size):
                    pending.append(arr)
                    if len(pending) == batch:
                        eager(torch.from_numpy(np.stack(pending)))
                        done, pending = done + len(pending), []
                if pending:
                    eager(torch.from_numpy(np.stack(pending)))
            return done + len(pending)

        p50, p99 = time_single(eager_one, single_photos, args.calls)
        torch_throughput = time_folder(eager_all, photos)
        weights = "the same weights" if kind == "float" else "float, timing only: int8 weights do not map"
        rows.append([f"(b) its architecture, torch eager ({weights}; channels-last, inference mode)", f"{size}",
                     f"{p50:.1f}", f"{p99:.1f}", f"{torch_throughput:.0f}"])
        classifier_row("(c) seed CNN bundle, Classifier (onnxruntime)", Classifier(bundled_models_dir() / "seed_cnn"))

        code = ("import sys, time; t = time.perf_counter(); import catdogcnn; clf = catdogcnn.load_classifier(); "
                f"clf.predict({str(photos[0])!r}); print(time.perf_counter() - t, 'torch' in sys.modules)")
        first = []
        for _ in range(3):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()
            first.append((float(out[0]), time.perf_counter() - started, out[1]))
        in_process, whole, torch_loaded = sorted(first)[1]

        print(f"\n{len(photos)} photos from {args.data / 'test_set'}; {os.cpu_count()} cores; load average "
              f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; single-photo latency over "
              f"{args.calls} calls\n")
        print("| model | input px | single photo p50 ms | p99 ms | folder photos/s |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nFolder throughput against torch eager: the shipped model in onnxruntime "
              f"{float(rows[0][4]) / torch_throughput:.1f}x")
        print(f"`import catdogcnn` + load + first label: {in_process * 1000:.0f} ms in process "
              f"({whole * 1000:.0f} ms with interpreter start-up; median of 3); torch imported: {torch_loaded}")

        if args.memory:
            folders = [args.data / "training_set", args.data / "extra_set", args.data / "test_set",
                       args.data / "training_set"]
            result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "catdogcnn", "predict",
                                     *map(str, folders), "--format", "csv"], capture_output=True, text=True)
            n = len(result.stdout.splitlines()) - 1
            peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024
            wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", result.stderr).group(1)
            print(f"`catdogcnn predict` over {n} photos: peak memory {peak:.0f} MB, wall time {wall}")


if __name__ == "__main__":
    main()
