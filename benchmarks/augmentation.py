"""Augmentation study: the seed CNN and the seed recipe, changing only the augmentation.

    python benchmarks/augmentation.py --data ../shared/data/cats_vs_dogs [--augment none seed strong] [--seeds 0]

Prints, per augmentation: accuracy on training_set (photos as they are, no augmentation), on test_set,
and the gap between them (how much the model memorised), with the exported epoch (chosen on validation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from seed_cnn import ROOT, train_run

from catdogcnn.augment import parse_augment
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--augment", nargs="+", default=["none", "seed", "strong"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_augmentation")
    args = parser.parse_args()

    rows = []
    for augment in args.augment:
        parse_augment(augment)  # fail before training, not after
        for seed in args.seeds:
            out = args.out / f"{augment.replace(',', '_').replace('=', '')}-seed{seed}"
            seconds, bundle = train_run(args.data, out, seed, "--epochs", str(args.epochs), "--augment", augment)
            train = evaluate(args.data / "training_set", Classifier(bundle))["accuracy"]
            test = evaluate(args.data, Classifier(bundle))["accuracy"]
            epoch = json.loads((bundle / "bundle.json").read_text())["training"]["epoch"]
            rows.append({"augment": augment, "seed": seed, "train": train, "test": test, "epoch": epoch,
                         "seconds": seconds})

    print(f"\nSeed CNN, seed recipe ({args.epochs} epochs, Adam 1e-3, batch 32), augmentation varied; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| augmentation | seed | train acc (no aug.) | test acc | train - test gap | exported epoch | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['augment']}` | {r['seed']} | {r['train']:.2%} | {r['test']:.2%} | "
              f"{(r['train'] - r['test']) * 100:+.2f} pts | {r['epoch']} | {r['seconds']:.0f} |")
    if len(args.seeds) > 1:
        for augment in args.augment:
            tests = [r["test"] for r in rows if r["augment"] == augment]
            print(f"{augment}: mean test accuracy {statistics.mean(tests):.2%} over {len(tests)} seeds")


if __name__ == "__main__":
    main()
