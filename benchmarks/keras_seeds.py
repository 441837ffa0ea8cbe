"""The seed's original Keras CNN over several seeds: its test accuracy is a distribution, not one number.

Runs under a Python with tensorflow-cpu (not this project's), reusing the anchor script's model and augmentation:

    ../keras-venv/bin/python benchmarks/keras_seeds.py --seeds 1 2 3 [--data ../shared/data/cats_vs_dogs]

Trains on training_set for 25 epochs (the seed recipe, as ../shared/anchors/seed_keras.py does), evaluates the last
epoch's model on test_set (Keras's own loading: nearest-neighbour resize to 64x64, x / 255), prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent / "shared" / "anchors"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.legacy.preprocessing.image import ImageDataGenerator  # noqa: E402
from seed_keras import EpochTimer, build_model  # noqa: E402


def run(data: Path, seed: int, epochs: int) -> dict:
    keras.utils.set_random_seed(seed)
    augment = ImageDataGenerator(rescale=1 / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    train = augment.flow_from_directory(data / "training_set", target_size=(64, 64), batch_size=32,
                                        class_mode="binary", seed=seed)
    timer = EpochTimer()
    model = build_model()
    model.fit(train, epochs=epochs, callbacks=[timer], verbose=0)
    test = ImageDataGenerator(rescale=1 / 255).flow_from_directory(
        data / "test_set", target_size=(64, 64), batch_size=64, class_mode="binary", shuffle=False)
    p_dog = model.predict(test, verbose=0)[:, 0]
    labels = test.classes
    log_loss = -np.mean(np.log(np.clip(np.where(labels == 1, p_dog, 1 - p_dog), 1e-7, 1)))
    return {"seed": seed, "test": np.mean((p_dog > 0.5) == labels), "test_06": np.mean((p_dog > 0.6) == labels),
            "log_loss": log_loss, "epoch_s": statistics.median(timer.times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [run(args.data, seed, args.epochs) for seed in args.seeds]
    print(f"\nKeras {keras.__version__} original, {args.epochs} epochs, last epoch evaluated on {args.data}/test_set; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| seed | test acc @0.5 | test acc @0.6 | test log loss | s/epoch (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['test']:.2%} | {r['test_06']:.2%} | {r['log_loss']:.4f} | {r['epoch_s']:.2f} |")
    if len(rows) > 1:
        tests = [r["test"] for r in rows]
        print(f"\nTest accuracy over {len(rows)} seeds: mean {statistics.mean(tests):.2%}, "
              f"min {min(tests):.2%}, max {max(tests):.2%}")


if __name__ == "__main__":
    main()
