"""Training throughput with 1 and 2 processes (DistributedDataParallel, gloo) on the machine it runs on, as a table.

    python benchmarks/ddp.py --data ../shared/data/cats_vs_dogs [--epochs 3]

The same seed-CNN recipe runs as one process with all cores, then as 2 processes splitting the cores
(torchrun); images/s is the median over epochs of photos trained per second, all processes together.
On a 2-core machine the processes share the same cores, so this measures DDP's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data: Path, processes: int, epochs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"ddp{processes}-"))
    cmd = [sys.executable, "-m", "catdogcnn", "train", str(data), "--out", str(out), "--epochs", str(epochs),
           "--nproc", str(processes)]
    subprocess.run(cmd, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    return {"images_s": statistics.median(r["images_per_second"] for r in records),
            "epoch_s": statistics.median(r["seconds"] for r in records),
            "val": records[-1]["val_accuracy"], "distributed": meta["training"].get("distributed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = {k: run(args.data, k, args.epochs) for k in (1, 2)}
    print(f"\nseed CNN, batch 32 per process, {args.epochs} epochs; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| processes | images/s (all) | s/epoch | val acc (last epoch) | weights identical |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        identical = r["distributed"]["weights_identical"] if r["distributed"] else "n/a"
        print(f"| {k} | {r['images_s']:.0f} | {r['epoch_s']:.2f} | {r['val']:.4f} | {identical} |")
    print(f"\n2 processes vs 1: {rows[2]['images_s'] / rows[1]['images_s']:.2f}x the throughput "
          f"(effective batch 64 vs 32; the learning rate is not rescaled)")


if __name__ == "__main__":
    main()
