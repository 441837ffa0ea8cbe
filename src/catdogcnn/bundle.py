"""The model bundle, the contract between training and inference: its names, where bundles are, reading and
checking one, writing one, and the atomic write every file that matters goes through. No torch here.

A bundle is a folder: `bundle.json` and `model-<sha12>.onnx`. The JSON names the graph file and its sha256 and
is written last, by an atomic rename: a bundle is either the old one or the new one, never a half-written mix,
whatever moment a crash or kill strikes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUNDLE_FORMAT = 1
METADATA_FILE = "bundle.json"
# Input and output names of the bundle graph.
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
IMAGENET_OUTPUT_NAME = "imagenet_probabilities"
ACTIVATION_OUTPUT_NAME = "class_activation"
NEITHER_OUTPUT_NAME = "neither_probability"  # (N, 1): the learned open-set output, "none of the classes"

DEFAULT_BUNDLE = "default"  # a folder of the repository's models/ (inside the wheel: catdogcnn/_bundles/)


class BundleError(RuntimeError):
    """A model bundle that cannot be used; the message is one line naming the file."""


# --------------------------------------------------------------------------- writing files atomically

@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an error,
    removed when it raises. Whoever reads `path` sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; bundles and caches are meant to be read by others
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename it over `path`."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- the "neither" rule

# A photo of one flat colour (white, grey, ...) shows none of the classes, yet a model has learned nothing about
# it (the photos of cats and dogs hold one: a white "cat"). Every other photo of the data set has a standard
# deviation of 15 or more in some colour channel, so 4 of 255 leaves nothing but a blank picture and its
# compression noise.
BLANK_RULE = {"kind": "blank", "max_std": 4.0}


def neither_rules(metadata: dict) -> list[dict]:
    """The bundle's "neither" (none of its classes) rules: a photo is answered "neither" when any one fires.

    Four kinds: `blank` (the photo as the model sees it has a standard deviation of at most `max_std` of 255
    in every colour channel), `calibrated` (a logistic regression of "neither" on the graph's
    `neither_probability` and, with an `imagenet_output`, its ImageNet probability of `pet_indices`, above
    `max`), `learned` (the graph's `neither_probability` above `max`) and `imagenet` (an ImageNet head gives the
    classes' ImageNet indices together less than `min_pet_probability`). A bundle of
    the first format kept one ImageNet rule at the top level of its "neither" entry; it is read as that one rule.
    """
    entry = metadata.get("neither")
    if not entry:
        return []
    if "rules" in entry:
        return list(entry["rules"])
    return [{"kind": "imagenet", **entry}]


# --------------------------------------------------------------------------- finding bundles

def bundled_models_dir() -> Path:
    """Where the shipped bundles are: inside the installed wheel, or the repository's models/ folder."""
    packaged = Path(__file__).parent / "_bundles"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "models"


def default_bundle_path() -> Path:
    """`$CATDOGCNN_MODEL` when set, else the shipped default bundle."""
    return Path(os.environ.get("CATDOGCNN_MODEL") or bundled_models_dir() / DEFAULT_BUNDLE)


def shipped_bundle_names() -> list[str]:
    return sorted(p.parent.name for p in bundled_models_dir().glob(f"*/{METADATA_FILE}"))


def find_bundle(bundle: str | os.PathLike) -> Path:
    """A bundle folder (or its bundle.json) as given, else the shipped bundle of that name (`seed_cnn`, ...):
    shipped bundles are found by name wherever the package is installed."""
    path = Path(bundle)
    shipped = bundled_models_dir() / path
    if not path.exists() and len(path.parts) == 1 and (shipped / METADATA_FILE).is_file():
        return shipped
    return path


# --------------------------------------------------------------------------- reading and checking

def read_bundle_metadata(bundle: str | os.PathLike) -> dict:
    """A bundle's bundle.json, with the keys every reader needs; BundleError (one line) when it is unusable."""
    path = find_bundle(bundle)
    meta_path = path / METADATA_FILE if path.is_dir() else path
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{meta_path}: no model bundle here (expected a folder with {METADATA_FILE}, or a "
                          f"shipped bundle's name: {', '.join(shipped_bundle_names())})") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{meta_path}: unreadable bundle metadata ({e})") from None
    check_metadata(metadata, meta_path)
    return metadata


# Every field a reader of a bundle needs, with the type it must have: (path of keys, type, what it is).
REQUIRED_FIELDS = [
    (("classes",), list, "a list of class names"),
    (("threshold",), (int, float), "a number"),
    (("input",), dict, "an object"),
    (("input", "image_size"), int, "a whole number of pixels"),
    (("graph",), dict, "an object"),
    (("graph", "file"), str, "a file name"),
    (("graph", "sha256"), str, "a sha256 in hex"),
    (("graph", "input"), str, "the graph's input name"),
    (("graph", "outputs"), list, "a list of the graph's output names"),
]


def check_metadata(metadata: dict, where: os.PathLike | str) -> None:
    """BundleError (one line naming the field) unless `metadata` has every field a reader needs, of its type,
    with at least two classes, a positive image size and a graph file that is a bare name beside bundle.json."""
    if not isinstance(metadata, dict):
        raise BundleError(f"{where}: bundle metadata is not a JSON object")
    for keys, kind, what in REQUIRED_FIELDS:
        value, name = metadata, ".".join(keys)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise BundleError(f"{where}: bundle metadata lacks {name!r}")
            value = value[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{where}: bundle metadata's {name!r} must be {what}, not {value!r}")
    if len(metadata["classes"]) < 2 or not all(isinstance(c, str) and c for c in metadata["classes"]):
        raise BundleError(f"{where}: bundle metadata's 'classes' must name two classes or more")
    if metadata["input"]["image_size"] < 1:
        raise BundleError(f"{where}: bundle metadata's 'input.image_size' must be positive")
    file = metadata["graph"]["file"]
    if not file or Path(file).name != file or file in (".", ".."):
        raise BundleError(f"{where}: bundle metadata's 'graph.file' must be a file name beside it, not {file!r}")


def graph_path(bundle: str | os.PathLike, metadata: dict) -> Path:
    path = find_bundle(bundle)
    return (path if path.is_dir() else path.parent) / metadata["graph"]["file"]


def read_graph(bundle: str | os.PathLike, metadata: dict) -> bytes:
    """The ONNX graph's bytes, refused (BundleError) when unreadable or when its sha256 is not bundle.json's."""
    graph = graph_path(bundle, metadata)
    try:
        graph_bytes = graph.read_bytes()
    except OSError as e:
        raise BundleError(f"{graph}: cannot read the model graph ({e.strerror or e})") from None
    if hashlib.sha256(graph_bytes).hexdigest() != metadata["graph"]["sha256"]:
        raise BundleError(f"{graph}: sha256 does not match {METADATA_FILE} (corrupt or replaced file)")
    return graph_bytes


# --------------------------------------------------------------------------- writing

def write_bundle(out_dir: str | os.PathLike, onnx_bytes: bytes, metadata: dict, outputs: list[str]) -> Path:
    """Write graph then JSON atomically into `out_dir`; remove graphs no longer referenced. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    graph_name = f"model-{sha[:12]}.onnx"
    atomic_write(out_dir / graph_name, onnx_bytes)
    metadata = {"format": BUNDLE_FORMAT, **metadata, "graph": {"file": graph_name, "sha256": sha,
                                                              "input": INPUT_NAME, "outputs": outputs}}
    metadata.setdefault("model_id", f"{metadata.get('architecture', 'model')}-{sha[:8]}")
    atomic_write(out_dir / METADATA_FILE, (json.dumps(metadata, indent=2) + "\n").encode())
    for stale in out_dir.glob("model-*.onnx"):
        if stale.name != graph_name:
            stale.unlink(missing_ok=True)
    return out_dir
