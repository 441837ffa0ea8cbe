"""Accuracy of model bundles on test_set, side by side, as a markdown table.

    python benchmarks/accuracy.py --data ../shared/data/cats_vs_dogs \\
        [--bundle NAME=PATH ...] [--tta NAME ...]

Default rows: the shipped models (models/seed_cnn, models/default, models/default-float), each as it predicts
(averaged with the mirror image where its training chose that on validation photos). Training time and
parameters come from each bundle's JSON (measured when it was trained); latency is measured here, one photo
file to label, median of 50 calls. `--tta NAME` adds a row with flip test-time augmentation for that bundle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from catdogcnn.bundle import bundled_models_dir
from catdogcnn.data import scan_folder
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier

ROOT = Path(__file__).resolve().parents[1]


def latency_ms(clf: Classifier, photos: list[Path], calls: int = 50) -> float:
    times = []
    for path in (photos * (calls // len(photos) + 1))[:calls]:
        started = time.perf_counter()
        clf.predict(path)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--tta", action="append", default=[], metavar="NAME")
    args = parser.parse_args()

    bundles = {"seed_cnn (shipped)": bundled_models_dir() / "seed_cnn",
               "default (shipped, int8)": bundled_models_dir() / "default",
               "default-float": bundled_models_dir() / "default-float"}
    bundles.update(dict(item.split("=", 1) for item in args.bundle))
    non_pets = None
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from non_pet_photos import write_non_pet_photos

        non_pets = Path(tempfile.mkdtemp(prefix="non_pets"))
        write_non_pet_photos(non_pets)
    except ImportError:
        print("scikit-image is not installed: no non-pet row", file=sys.stderr)
    _, samples = scan_folder(args.data / "test_set")
    photos = [s.path for s in samples[:: len(samples) // 10]]

    rows = []
    runs = [(name, Path(path), None) for name, path in bundles.items()]  # None: the bundle's own choice
    runs += [(name, Path(bundles[name]), True) for name in args.tta]
    for name, path, tta in runs:
        clf = Classifier(path, tta=tta)
        result = evaluate(args.data, clf, non_pets=non_pets)
        training = clf.metadata.get("training", {})
        config = training.get("config", {})
        neither = result["neither"] or {}
        rows.append([
            name + (" + flip TTA" if tta else " (mirror-averaged)" if clf.tta else ""),
            config.get("model", clf.metadata.get("architecture", "?")),
            f"{config.get('recipe', 'full')}, {clf.image_size} px", f"{result['accuracy']:.2%}",
            f"{result['log_loss']:.4f}", f"{result['roc_auc']:.4f}",
            f"{neither['pets_flagged']:.2%}" if neither else "n/a",
            f"{neither['non_pets_flagged']:.0%}" if neither.get("non_pets_flagged") is not None else "n/a",
            f"{training['seconds'] / 60:.1f}" if "seconds" in training else "?",
            f"{training.get('parameters', 0) / 1e6:.2f}M", f"{latency_ms(clf, photos):.1f}",
        ])
    print(f"\ntest_set: {args.data / 'test_set'}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")
    print("| model | architecture | recipe | accuracy | log loss | ROC AUC | pets called neither | "
          "non-pets called neither | training min | parameters | latency ms (p50) |")
    print("|" + "---|" * 11)
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
