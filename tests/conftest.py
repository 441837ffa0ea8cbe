"""Shared fixtures: synthetic photo folders (made here, never the real photos), the real data when present, the
session's private cache, and the markers' skips. Test files take these as fixtures and never import each other.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: the GPU path is checked on a machine that has one"


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is collected: what the session builds or decodes (the C kernels, decoded photos, in
    this process and in the CLI's subprocesses) goes into a temporary folder, never the user's cache."""
    cache = tempfile.mkdtemp(prefix="catdogcnn-test-cache-")
    config.stash[_SESSION_CACHE] = cache
    os.environ["CATDOGCNN_CACHE"] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE in config.stash:
        shutil.rmtree(config.stash[_SESSION_CACHE], ignore_errors=True)


_SESSION_CACHE = pytest.StashKey[str]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the real photos or the browser carry those markers without having to say so."""
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not cuda_available():
        pytest.skip(NO_CUDA)


def real_data_dir() -> Path | None:
    """`$CATDOGCNN_DATA`, else `../shared/data/cats_vs_dogs` next to the project, else None."""
    for candidate in (os.environ.get("CATDOGCNN_DATA"), ROOT.parent / "shared" / "data" / "cats_vs_dogs"):
        if candidate and (Path(candidate) / "test_set").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_data_if_present() -> Path | None:
    return real_data_dir()


@pytest.fixture(scope="session")
def real_data() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.skip("real photos not found: set CATDOGCNN_DATA or provide ../shared/data/cats_vs_dogs")
    return found


@pytest.fixture(scope="session")
def pet_breeds() -> Path:
    """Pets of many breeds from other collections: `$CATDOGCNN_PETS`, else `../shared/data/pet_breeds`."""
    for candidate in (os.environ.get("CATDOGCNN_PETS"), ROOT.parent / "shared" / "data" / "pet_breeds"):
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    pytest.skip("pets of many breeds not found: set CATDOGCNN_PETS or provide ../shared/data/pet_breeds")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


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


KINDS = ("stripes", "checks", "grass", "sky", "bricks")


def neither_photo(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Photos of none of the classes: patterns that share nothing with the discs and squares of the classes."""
    a = np.zeros((size, size, 3), np.uint8)
    shade = int(rng.integers(0, 60))
    if kind == "stripes":
        a[:: int(rng.integers(3, 6))] = 255 - shade
    elif kind == "checks":
        a[(np.indices((size, size)).sum(0) // 8) % 2 == 0] = [shade, 200, shade]
    elif kind == "grass":
        a[:] = [30 + shade, 160, 40]
    elif kind == "sky":
        a[:] = [140, 190, 255 - shade]
    else:
        a[:] = [150, 60 + shade, 40]
        a[::8] = 220
    return Image.fromarray(np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8))


def make_neither_folder(root: Path, per_kind: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        for i in range(per_kind):
            neither_photo(kind, rng).save(root / f"{kind}_{i:04d}.jpg", quality=90)
    return root


def make_breeds_folder(root: Path, per_breed: int, seed: int = 0, breeds: int = 4) -> Path:
    """Pets of another collection: `cats/<breed>_<n>.jpg` and `dogs/<breed>_<n>.jpg`, class photos as
    `synthetic_photo` draws them, each breed tinted its own way; a README beside them, as collections have."""
    rng = np.random.default_rng(seed)
    for label, animal in enumerate(("cats", "dogs")):
        (root / animal).mkdir(parents=True, exist_ok=True)
        for breed in range(breeds):
            tint = rng.integers(-40, 40, 3)
            for i in range(per_breed):
                photo = np.asarray(synthetic_photo(label, rng)).astype(int) + tint
                Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(
                    root / animal / f"breed{breed}_{i:04d}.jpg", quality=90)
    (root / "README.md").write_text("pets of many breeds\n")
    return root


# Each model learns "neither" its own way: the pretrained one by the finetune recipe, from-scratch ones by the
# full recipe (the neither photos in every batch, a second head on the features the class head reads).
RECIPES = {
    "efficientnet_lite0": {"image_size": 64, "recipe": "finetune", "train_blocks": 1, "epochs": 3, "lr": 3e-3,
                           "backbone_lr_scale": 0.1, "optimizer": "adamw"},
    "seed_cnn": {"recipe": "full", "epochs": 10, "lr": 2e-3, "augment": "none"},
    "resnet_small": {"recipe": "full", "epochs": 6, "lr": 3e-3, "optimizer": "adamw", "augment": "flip"},
}


def open_set_run(root: Path, classes: tuple[str, ...], model: str = "efficientnet_lite0") -> tuple[Path, Path]:
    from catdogcnn.train import TrainConfig, train  # torch loads only for the tests that train

    make_class_folder(root / "data", 60, seed=1, classes=classes)
    neither = make_neither_folder(root / "neither", 12, seed=2)
    config = TrainConfig(model=model, **RECIPES[model], batch_size=16, neither_photos=str(neither),
                         neither_holdout_kinds=0.2, neither_pets_flagged=0.05, val_fraction=0.5, tta="off", threads=2)
    return train(root / "data", root / "run", config, cache_dir=root / "cache", show_progress=False), neither


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
def brightness_bundle(tmp_path_factory) -> Path:
    """A two-class bundle whose p(second class) is the photo's mean brightness (0-255 -> 0-1): answers known in
    advance, for tests of what is decided from the probabilities."""
    from onnx import TensorProto, helper

    from catdogcnn.bundle import INPUT_NAME, OUTPUT_NAME, write_bundle

    nodes = [helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Div", ["mean", "full_scale"], ["p1"]),
             helper.make_node("Sub", ["one", "p1"], ["p0"]),
             helper.make_node("Unsqueeze", ["p0", "axis"], ["p0_column"]),
             helper.make_node("Unsqueeze", ["p1", "axis"], ["p1_column"]),
             helper.make_node("Concat", ["p0_column", "p1_column"], [OUTPUT_NAME], axis=1)]
    constants = [helper.make_tensor("full_scale", TensorProto.FLOAT, [], [255.0]),
                 helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                 helper.make_tensor("axis", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "brightness",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["n", 32, 32, 3])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", 2])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    metadata = {"architecture": "brightness", "classes": ["cats", "dogs"], "threshold": 0.5,
                "input": {"image_size": 32, "resize": "bilinear"}}
    return write_bundle(tmp_path_factory.mktemp("bundle") / "brightness", model.SerializeToString(), metadata,
                        [OUTPUT_NAME])


@pytest.fixture(scope="session")
def neither_bundle(tmp_path_factory):
    """Write a 32 px bundle with answers known in advance: class probabilities are the photo's mean red, green
    (and blue, for three classes) in proportion; `neither_probability` is the mean brightness (0-1) of the
    photo's left half, so that its mirror image scores the right half; `imagenet_probabilities` is
    (that brightness, 1 - it), named ('lakeside', 'tabby'), the second the pet. `neither` is bundle.json's
    entry (None: no entry)."""
    from onnx import TensorProto, helper

    from catdogcnn.bundle import IMAGENET_OUTPUT_NAME, INPUT_NAME, NEITHER_OUTPUT_NAME, OUTPUT_NAME, write_bundle

    def write(name: str, neither: dict | None, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
        n = len(classes)
        nodes = [helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
                 helper.make_node("Div", ["pixels", "full_scale"], ["scaled"]),
                 helper.make_node("ReduceMean", ["scaled"], ["channels"], axes=[1, 2], keepdims=0),
                 helper.make_node("Slice", ["channels", "zero", "n_classes", "one_axis"], ["class_means"]),
                 helper.make_node("Add", ["class_means", "small"], ["weights"]),  # never 0 / 0 on black
                 helper.make_node("ReduceSum", ["weights", "one_axis"], ["total"], keepdims=1),
                 helper.make_node("Div", ["weights", "total"], [OUTPUT_NAME]),
                 helper.make_node("Slice", ["scaled", "zero", "half_width", "width_axis"], ["left_half"]),
                 helper.make_node("ReduceMean", ["left_half"], ["left_mean"], axes=[1, 2, 3], keepdims=0),
                 helper.make_node("Unsqueeze", ["left_mean", "one_axis"], [NEITHER_OUTPUT_NAME]),
                 helper.make_node("Sub", ["unit", NEITHER_OUTPUT_NAME], ["pet"]),
                 helper.make_node("Concat", [NEITHER_OUTPUT_NAME, "pet"], [IMAGENET_OUTPUT_NAME], axis=1)]
        constants = [helper.make_tensor("full_scale", TensorProto.FLOAT, [], [255.0]),
                     helper.make_tensor("unit", TensorProto.FLOAT, [], [1.0]),
                     helper.make_tensor("small", TensorProto.FLOAT, [], [1e-3]),
                     helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                     helper.make_tensor("n_classes", TensorProto.INT64, [1], [n]),
                     helper.make_tensor("half_width", TensorProto.INT64, [1], [16]),
                     helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("width_axis", TensorProto.INT64, [1], [2])]
        outputs = [OUTPUT_NAME, NEITHER_OUTPUT_NAME, IMAGENET_OUTPUT_NAME]
        graph = helper.make_graph(
            nodes, "neither", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["n", 32, 32, 3])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", size])
             for name, size in zip(outputs, (n, 1, 2), strict=True)], constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        metadata = {"architecture": "brightness", "classes": list(classes), "threshold": 0.5,
                    "input": {"image_size": 32, "resize": "bilinear"}, "metrics": {"val_accuracy": 0.5},
                    **({"neither": neither} if neither is not None else {})}
        return write_bundle(tmp_path_factory.mktemp("bundle") / name, model.SerializeToString(), metadata, outputs)

    return write


@pytest.fixture
def pets_and_others(tmp_path) -> tuple[Path, Path]:
    """For `neither_bundle`: a labelled folder of 9 dim photos, one cat photo bright (left-half brightness 0.94),
    and a folder of 4 photos of neither class, 3 of them bright. PNG: the brightness is exact."""
    dim_red, dim_green, bright = (120, 40, 10), (40, 120, 10), (230, 240, 250)
    folders = {tmp_path / "pets" / "cats": [dim_red] * 4 + [bright], tmp_path / "pets" / "dogs": [dim_green] * 4,
               tmp_path / "others": [bright] * 3 + [dim_red]}
    for folder, colours in folders.items():
        folder.mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return tmp_path / "pets", tmp_path / "others"


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


@pytest.fixture(scope="session")
def cpu_kernels():
    """The C kernels, built (into the session's cache) when the first test asks, never while collecting."""
    from catdogcnn.accel import kernels

    if kernels.library() is None:
        pytest.skip("no working C compiler to build the CPU kernels (torch's operators are used)")
    return kernels


@pytest.fixture(scope="session")
def bf16_conv_kernel(cpu_kernels):
    if not cpu_kernels.conv_pool_supported():
        pytest.skip("this CPU has no AVX-512 BF16 dot products for the fused convolution (training uses torch's "
                    "convolution there)")


def jpeg_bytes(seed: int = 0, size: int = 96, mode: str = "RGB") -> bytes:
    """JPEG bytes of a synthetic photo: class `seed % 2`, drawn from `seed`."""
    buffer = io.BytesIO()
    synthetic_photo(seed % 2, np.random.default_rng(seed), size).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def heic_photo(size: tuple[int, int] = (80, 40), orientation: int | None = None) -> bytes:
    """A HEIC photo as an iPhone writes one: left half blue, right half red; EXIF orientation when given."""
    image = Image.new("RGB", size, (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="HEIF", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line as a user runs it: a subprocess of the installed console script."""
    exe = shutil.which("catdogcnn") or sys.executable
    prefix = [exe] if exe.endswith("catdogcnn") else [exe, "-m", "catdogcnn"]
    return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: `$CATDOGCNN_ARTIFACTS` when set, else a temporary folder (never the working tree)."""
    chosen = os.environ.get("CATDOGCNN_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _as_fixture(helper):
    @pytest.fixture(name=helper.__name__, scope="session")
    def fixture():
        return helper

    return fixture


# The helpers as fixtures of the same names (the module-level functions stay for code that still imports them).
for _helper in (synthetic_photo, make_class_folder, write_bad_files, png_with_size, run_cli, jpeg_bytes, heic_photo):
    globals()[f"_{_helper.__name__}_fixture"] = _as_fixture(_helper)


def free_port() -> int:
    """A loopback port no one listens on now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*options: str, env: dict | None = None, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`catdogcnn serve OPTIONS` in a process of its own on a free loopback port, once its health answers 200:
    (process, URL). The caller stops it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "catdogcnn", "serve", "--port", str(port), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        assert server.poll() is None, server.stdout.read()
        assert time.time() < deadline, "the server did not start"
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=1) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.2)


def read_http_response(conn: socket.socket, timeout: float = 30) -> tuple[int | None, bytes]:
    """(status, body) of the HTTP response on a raw socket, read until its Content-Length is in or the server
    hangs up; (None, b"") when nothing came. The socket is closed."""
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            if length and len(body) >= int(length.group(1)):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    conn.close()
    return (int(data.split(b" ", 2)[1]) if data else None), data.partition(b"\r\n\r\n")[2]


@contextmanager
def live_app(app) -> Iterator[str]:
    """An ASGI app served by uvicorn in a thread on a free loopback port, for tests that speak raw HTTP: its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


@contextmanager
def chromium() -> Iterator:
    """Debian's headless Chromium driven by Playwright; the test skips, saying why, where either is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python drives the browser")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian packages chromium, chromium-driver; `make browser`)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
