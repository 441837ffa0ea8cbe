"""Shared fixtures: synthetic photo folders (made here, never the real photos) and the real data when present."""

from __future__ import annotations

import os
import socket
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """`$CATDOGCNN_DATA`, else `../shared/data/cats_vs_dogs` next to the project, else None."""
    for candidate in (os.environ.get("CATDOGCNN_DATA"), ROOT.parent / "shared" / "data" / "cats_vs_dogs"):
        if candidate and (Path(candidate) / "test_set").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.skip("real photos not found: set CATDOGCNN_DATA or provide ../shared/data/cats_vs_dogs")
    return found


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache, never the user's."""
    monkeypatch.setenv("CATDOGCNN_CACHE", str(tmp_path_factory.mktemp("cache")))


def synthetic_photo(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Class 0: a warm background with a disc; class 1: a cool background with a square. Noisy, random places."""
    base = np.array([200, 90, 60] if label == 0 else [60, 110, 200], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 35, (size, size, 3)), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 8, size // 4))]
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if label == 0 else ((abs(yy - cy) < r) & (abs(xx - cx) < r))
    arr[mask] = rng.integers(0, 255, 3)
    return Image.fromarray(arr.astype(np.uint8))


def make_class_folder(root: Path, per_class: int, seed: int = 0, classes=("cats", "dogs"), size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_photo(label % 2, rng, size).save(folder / f"{name}.{i}.jpg", quality=90)
    return root


@pytest.fixture
def seed_layout(tmp_path) -> Path:
    """A tiny copy of the seed's layout with synthetic photos: training_set, test_set."""
    make_class_folder(tmp_path / "training_set", 80, seed=1)
    make_class_folder(tmp_path / "test_set", 30, seed=2)
    return tmp_path


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb without the memory."""
    raw = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return raw + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + chunk(b"IEND", b"")


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind in `folder`; returns file name -> word expected in its reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_source.jpg"
    synthetic_photo(0, np.random.default_rng(5), 128).save(good, quality=90)
    jpeg = good.read_bytes()
    good.unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "corrupt.jpg").write_bytes(jpeg[:200] + bytes(range(256)) * 8 + jpeg[-100:])
    (folder / "notes.jpg").write_text("this is not a photo\n")
    (folder / "bomb.png").write_bytes(png_with_size(40_000, 40_000))
    return {"empty.jpg": "empty", "truncated.jpg": "truncated", "corrupt.jpg": "corrupt",
            "notes.jpg": "not an image", "bomb.png": "decompression bomb"}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained seed CNN exported as a bundle: enough to test everything on the inference side."""
    import torch

    from catdogcnn.export import export_bundle
    from catdogcnn.models import build_model, get_spec

    torch.manual_seed(0)
    spec = get_spec("seed_cnn")
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    metadata = {"architecture": "seed_cnn", "classes": ["cats", "dogs"], "threshold": 0.5,
                "input": {"image_size": 64, "resize": "bilinear"}}
    return export_bundle(build_model("seed_cnn", 2).eval(), tmp_path_factory.mktemp("bundle") / "tiny",
                         image_size=64, mean=spec.mean, std=spec.std, parity_images=images, metadata=metadata)


@pytest.fixture(scope="session")
def non_pet_photos(tmp_path_factory) -> Path:
    """Real photos with no cat or dog (scikit-image's and scikit-learn's sample images)."""
    pytest.importorskip("skimage", reason="scikit-image provides the non-pet sample photos")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from non_pet_photos import write_non_pet_photos

    folder = tmp_path_factory.mktemp("non_pets")
    write_non_pet_photos(folder)
    return folder


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (the GPU tests run there and skip, saying so, on CPU-only machines)."""
    import torch

    return torch.cuda.is_available()


NO_CUDA = "no CUDA device: the GPU path is checked on a machine that has one"


def free_port() -> int:
    """A loopback port no one listens on now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
