"""The seed recipe, measured: train the seed CNN on training_set, evaluate on test_set, print a markdown table.

    python benchmarks/seed_cnn.py --data ../shared/data/cats_vs_dogs [--seeds 0 1 2] [--keras ../keras-venv/bin/python]

With --keras, the seed's original Keras script (../shared/anchors/seed_keras.py) runs a few epochs in the
same run, so the epoch-time ratio is measured side by side on the same machine and load. Then
--rounds alternating rounds (ours for --round-epochs epochs, then Keras for as many) give one ratio each:
a shared machine's speed drifts by up to 20% over minutes, which a single pair of runs cannot tell from a
difference between the two; the median of alternated rounds can.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from catdogcnn.data import Sample
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier
from catdogcnn.train import TrainConfig, unused_extra

ROOT = Path(__file__).resolve().parents[1]


def train_run(data: Path, out: Path, seed: int, *flags: str, quiet: bool = False) -> tuple[float, Path]:
    """Train the seed CNN (the seed recipe, changed by `flags`) in a subprocess; (seconds, bundle)."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "catdogcnn", "train", str(data), "--model", "seed_cnn", "--out", str(out),
           "--overwrite", "--seed", str(seed), *flags]  # a rerun of the benchmark trains again
    subprocess.run(cmd, check=True, capture_output=quiet)
    return time.perf_counter() - started, out / "bundle"


def accuracy_on(classifier: Classifier, samples: list[Sample]) -> float:
    """Share of `samples` (labelled in the bundle's class order) answered right; a photo that fails is reported
    and counts as wrong."""
    right = 0
    for sample, answer in zip(samples, classifier.predict_many([s.path for s in samples]), strict=True):
        if not answer.ok:
            print(f"error: {answer.error}", file=sys.stderr)  # the error names the file
        right += answer.ok and answer.label == classifier.classes[sample.label]
    return right / len(samples)


def keras_epoch_seconds(python: str, data: Path, epochs: int) -> float:
    script = ROOT.parent / "shared" / "anchors" / "seed_keras.py"
    result = subprocess.run([python, str(script), str(data), str(epochs)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, help="default: the recipe's (25 for the seed's)")
    parser.add_argument("--config", type=Path, help="a recipe file (e.g. a tuned best_config.json) instead of "
                                                    "the seed recipe; the model stays the seed CNN")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_seed_cnn")
    parser.add_argument("--keras", help="Python with tensorflow-cpu, to time the Keras original side by side")
    parser.add_argument("--keras-epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating speed rounds after the runs (with --keras)")
    parser.add_argument("--round-epochs", type=int, default=4)
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        flags = (["--epochs", str(args.epochs)] if args.epochs else []) + (
            ["--config", str(args.config)] if args.config else [])
        total, bundle = train_run(args.data, args.out / f"seed{seed}", seed, *flags)
        records = [json.loads(line) for line in (args.out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        # The bundle as shipped (mirror averaging when its validation photos chose it), then one view only.
        test = evaluate(args.data, Classifier(bundle))
        test_06 = evaluate(args.data, Classifier(bundle, threshold=0.6))
        test_one_view = evaluate(args.data, Classifier(bundle, tta=False))
        train = evaluate(args.data / "training_set", Classifier(bundle))
        meta = json.loads((bundle / "bundle.json").read_text())
        # The half of extra_set this run neither trained nor validated on: 5,000 more photos to judge a recipe by.
        unused = unused_extra(args.data, TrainConfig.from_dict(meta["training"]["config"]))
        extra = ({"extra": accuracy_on(Classifier(bundle), unused),
                  "extra_one_view": accuracy_on(Classifier(bundle, tta=False), unused)} if unused else {})
        rows.append({"seed": seed, "train": train["accuracy"], "test": test["accuracy"], "test_06": test_06["accuracy"],
                     "one_view": test_one_view["accuracy"], "tta": meta.get("tta", False),
                     "log_loss": test["log_loss"], "epoch_s": statistics.median(r["seconds"] for r in records),
                     "img_s": statistics.median(r["images_per_second"] for r in records), "total_s": total,
                     "epoch": meta["training"]["epoch"], "n_extra": len(unused), **extra})
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    recipe = (f"recipe {args.config}: " + json.dumps({k: v for k, v in json.loads(args.config.read_text()).items()
                                                     if k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay",
                                                              "schedule", "dropout", "augment")})
              if args.config else "Seed recipe (25 epochs, batch 32, Adam 1e-3, flip/shear/zoom)")
    print(f"\n{recipe}{f', {args.epochs} epochs' if args.epochs else ''} on {args.data}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| seed | train acc | test acc @0.5 | test acc @0.6 | test log loss | mirror averaging (validation's "
          "choice) | test acc @0.5, one view | unused extra_set acc (one view) | s/epoch (median) | images/s | "
          "total s | exported epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f"{r['extra']:.2%} ({r['extra_one_view']:.2%})" if r["n_extra"] else "n/a"
        print(f"| {r['seed']} | {r['train']:.2%} | {r['test']:.2%} | {r['test_06']:.2%} | {r['log_loss']:.4f} | "
              f"{'yes' if r['tta'] else 'no'} | {r['one_view']:.2%} | {extra} | {r['epoch_s']:.2f} | "
              f"{r['img_s']:.0f} | {r['total_s']:.0f} | {r['epoch']} |")
    if len(rows) > 1:
        summaries = {"test": "test accuracy, the bundles as they predict", "one_view": "test accuracy, one view only",
                     "extra": f"accuracy on the unused half of extra_set ({rows[0]['n_extra']} photos a run), the "
                              "bundles as they predict",
                     "extra_one_view": "the same, one view only"}
        for key, what in summaries.items():
            if key not in rows[0]:
                continue
            values = [r[key] for r in rows]
            print(f"\nOver {len(rows)} seeds, {what}: mean {statistics.mean(values):.2%}, "
                  f"min {min(values):.2%}, max {max(values):.2%}")
    print(f"\nPeak memory of a training process: {peak_mb:.0f} MB")
    if args.keras:
        keras = keras_epoch_seconds(args.keras, args.data, args.keras_epochs)
        ours = statistics.median(r["epoch_s"] for r in rows)
        print(f"Keras original, same machine, same run: {keras:.2f} s/epoch (median of {args.keras_epochs}); "
              f"ours {ours:.2f} s/epoch: {keras / ours:.1f}x faster")
    if args.keras and args.rounds:
        print(f"\nAlternating rounds, {args.round_epochs} epochs each (medians of their epochs):\n")
        print("| round | ours s/epoch | Keras s/epoch | ratio |")
        print("|---|---|---|---|")
        ratios = []
        for number in range(1, args.rounds + 1):
            out = args.out / f"speed_round{number}"
            train_run(args.data, out, 0, "--epochs", str(args.round_epochs), "--tta", "off", quiet=True)
            ours = statistics.median(json.loads(line)["seconds"] for line in (out / "metrics.jsonl").open())
            keras = keras_epoch_seconds(args.keras, args.data, args.round_epochs)
            ratios.append(keras / ours)
            print(f"| {number} | {ours:.2f} | {keras:.2f} | {keras / ours:.2f}x |", flush=True)
        print(f"\nMedian ratio over {args.rounds} rounds: {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
