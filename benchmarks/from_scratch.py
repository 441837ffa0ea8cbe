"""A model trained from scratch (no pretrained weights) within a time budget: accuracy against minutes.

    python benchmarks/from_scratch.py --data ../shared/data/cats_vs_dogs [--config configs/resnet_small.json]
    python benchmarks/from_scratch.py --run runs/resnet_small   # report on a finished run, no training

Trains with the recipe file (training_set + extra_set, 2,000 extra_set photos held out for validation),
then prints the validation accuracy after each epoch against the training minutes so far, the wall-clock
time of the whole command (decoding included), and the final model's accuracy on test_set. The curve is
also drawn in RUN/curves.png (RUN/report.html).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier
from catdogcnn.report import training_report

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "resnet_small.json")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "resnet_small")
    parser.add_argument("--run", type=Path, help="a finished run folder to report on instead of training")
    args = parser.parse_args()

    run = args.run or args.out
    wall = None
    if not args.run:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "catdogcnn", "train", str(args.data), "--config", str(args.config),
                        "--out", str(run), "--overwrite"], check=True)  # a rerun of the benchmark trains again
        wall = time.perf_counter() - started
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bundle = Classifier(run / "bundle")
    test = evaluate(args.data, bundle)
    test_tta = evaluate(args.data, Classifier(run / "bundle", tta=True))
    meta = bundle.metadata
    training_report(run)

    print(f"\n{meta['architecture']} from scratch, {meta['training']['parameters']:,} parameters, "
          f"{meta['input']['image_size']} px; recipe {args.config}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| epoch | training minutes | train acc (augmented) | val acc |")
    print("|---|---|---|---|")
    minutes = 0.0
    for r in log:
        minutes += r["seconds"] / 60
        print(f"| {r['epoch']} | {minutes:.1f} | {r['train_accuracy']:.2%} | {r['val_accuracy']:.2%} |")
    print(f"\nTraining epochs: {minutes:.1f} min" + (f"; the whole command (decoding, validation, export): "
                                                     f"{wall / 60:.1f} min" if wall else ""))
    print(f"test_set: accuracy {test['accuracy']:.2%} (n={test['n']}), log loss {test['log_loss']:.4f}, "
          f"ROC AUC {test['roc_auc']:.4f}; with flip TTA {test_tta['accuracy']:.2%}")
    print(f"curve: {run / 'curves.png'}")


if __name__ == "__main__":
    main()
