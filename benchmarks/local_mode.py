"""The page's local mode against native inference, side by side in one run: photos a second, one photo at a time.

    python benchmarks/local_mode.py --data ../shared/data/cats_vs_dogs [--photos 100] [--write docs/results.md]

The server (`catdogcnn serve`, shipped model) only serves the page, its runtime and the model; Debian's headless
Chromium (Playwright) loads the page, switches local mode on and labels `--photos` test_set photos one after the
other (decode, Pillow's resize in JavaScript, onnxruntime-web on WebAssembly, the "neither" rules), timed in
the page. Native: the same photos through `Classifier.predict` (Pillow, onnxruntime), before and after the browser
so that a change in the machine's load shows. Rates are given with their 95% interval (t interval on the mean time
a photo); the labels of both are compared.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import numpy as np
from results_page import add_write_option, rate, recorded  # sibling scripts' helpers
from serve_load import start_server

from catdogcnn.data import scan_folder
from catdogcnn.predict import load_classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402  (the tests' way to start the browser)

LABEL_IN_PAGE = """async ({photos}) => {
  const { loadLocalModel } = await import("./static/local.js");
  const local = await loadLocalModel(fetch);
  const out = [];
  for (const [name, data] of photos) {
    const file = new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name);
    const started = performance.now();
    const answer = await local.label(file);
    out.push({ ms: performance.now() - started, label: answer.label });
  }
  return { out, threads: local.threads };
}"""


def native(clf, paths: list[Path]) -> tuple[list[float], list[str]]:
    times, labels = [], []
    for path in paths:
        started = time.perf_counter()
        labels.append(clf.predict(path).label)
        times.append((time.perf_counter() - started) * 1000)
    return times, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--photos", type=int, default=100)
    add_write_option(parser)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with recorded(args.write, "local_mode.py", "The page's local mode beside native inference "
                                               "(`benchmarks/local_mode.py`)"):
        _, samples = scan_folder(args.data / "test_set")
        paths = [s.path for s in samples[:: max(1, len(samples) // args.photos)][: args.photos]]
        clf = load_classifier()
        native(clf, paths[:5])  # warm-up
        load_before = os.getloadavg()[0]
        before, native_labels = native(clf, paths)
        server, url, _ = start_server([])
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
                page = browser.new_page()
                page.goto(url)
                photos = [[path.name, base64.b64encode(path.read_bytes()).decode()] for path in paths]
                page.evaluate(LABEL_IN_PAGE, {"photos": photos[:5]})  # warm-up: the runtime compiled once
                result = page.evaluate(LABEL_IN_PAGE, {"photos": photos})
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
        after, _ = native(clf, paths)
        browser_ms = [row["ms"] for row in result["out"]]
        agree = sum(row["label"] == label for row, label in zip(result["out"], native_labels, strict=True))
        native_ms = before + after
        print(f"\n{len(paths)} test_set photos, one at a time; {os.cpu_count()} cores; load average {load_before:.2f} "
              f"before, {os.getloadavg()[0]:.2f} after; model {clf.model_id}\n")
        print("| where | threads | ms a photo (p50) | photos/s [95% interval] | against native |")
        print("|---|---|---:|---:|---:|")
        rows = [("Chromium, local mode (onnxruntime-web, WebAssembly)", result["threads"], browser_ms),
                ("native: Classifier.predict (onnxruntime), before and after", clf.session.get_session_options()
                 .intra_op_num_threads, native_ms)]
        native_rate = rate(native_ms)[0]
        for where, threads, ms in rows:
            value, low, high = rate(ms)
            print(f"| {where} | {threads} | {np.median(ms):.1f} | {value:.1f} [{low:.1f}, {high:.1f}] | "
                  f"{value / native_rate:.2f}x |")
        print(f"\nNative before the browser {rate(before)[0]:.1f} photos/s, after {rate(after)[0]:.1f}. Labels equal "
              f"on {agree} of {len(paths)} photos (JPEGs over twice the input size are decoded at reduced scale by "
              "Pillow, in full by the browser).")


if __name__ == "__main__":
    main()
