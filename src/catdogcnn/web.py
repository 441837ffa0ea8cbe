"""The page as a static folder: it labels photos in the browser (onnxruntime-web), with nothing uploaded.

    catdogcnn export-web site/ [--model BUNDLE]
    python -m http.server -d site/          # or any static host

The folder holds the page and its runtime (static/), and the files the page would ask the server for: v1/model,
v1/limits (saying there is no server: the page starts in local mode and stays there), v1/bundle/bundle.json and
v1/bundle/graph. No Python runs behind it. Threads need the host to send the cross-origin isolation headers
(`Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Embedder-Policy: require-corp`); one thread otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from catdogcnn.bundle import graph_path
from catdogcnn.errors import UserError
from catdogcnn.predict import load_classifier

STATIC = Path(__file__).parent / "static"
RUNTIME = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


def export_web(out: str | os.PathLike, bundle: str | os.PathLike | None = None) -> Path:
    """Write the static page for `bundle` (default: the shipped model) into `out`; returns `out/index.html`."""
    missing = [name for name in RUNTIME if not (STATIC / "ort" / name).is_file()]
    if missing:
        raise UserError(f"{STATIC / 'ort'}: the page's runtime is not installed ({', '.join(missing)} missing); "
                        "`make web` fetches it from npm")
    clf = load_classifier(bundle)
    out = Path(out)
    (out / "v1" / "bundle").mkdir(parents=True, exist_ok=True)
    shutil.copytree(STATIC, out / "static", dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    shutil.copy2(STATIC / "index.html", out / "index.html")
    (out / "v1" / "model").write_text(json.dumps(clf.description()))
    (out / "v1" / "limits").write_text(json.dumps({"local_only": True, "max_files": 32, "max_upload_mb": None,
                                                   "max_megapixels": None}))
    (out / "v1" / "bundle" / "bundle.json").write_text(json.dumps(clf.metadata))
    shutil.copy2(graph_path(clf.bundle, clf.metadata), out / "v1" / "bundle" / "graph")
    return out / "index.html"
