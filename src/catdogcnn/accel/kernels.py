"""catdogcnn's CPU kernels (`kernels.c`), compiled on first use for this CPU and loaded with ctypes.

Hand-written C where torch's CPU operators do needless work at the seed CNN's sizes: the fused max-pool + ReLU
and convolution + max-pool + ReLU of seed-CNN training (`models/fused_pool.py`), and the augmentation's affine
warp (`augment.py`). Each user keeps torch's own operators as the fallback.

The C file is compiled with `-march=native` (without it the loops are not vectorized and the pool is slower than
torch's) into the cache folder, keyed by the source, the compiler and the CPU. Where no C compiler works,
training says so once and uses torch's operators.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch  # noqa: F401  (loaded first: the library's OpenMP calls must resolve to torch's runtime)

from catdogcnn.bundle import atomic_output

log = logging.getLogger("catdogcnn")
SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
FALLBACK = "training uses torch's operators, about 1.4x slower"


def _cpu_identity() -> str:
    try:  # the instruction sets -march=native compiles for
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(next((line for line in lines if line.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent or interrupted build never leaves half a library.
    with atomic_output(target) as partial:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True,
                       text=True, timeout=120)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use into `$CATDOGCNN_CACHE/kernels` (default
    `~/.cache/catdogcnn/kernels`); None (said once, as a warning) where they cannot be built."""
    from catdogcnn.data import default_cache_dir

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (%s) for catdogcnn's CPU kernels: %s", os.environ.get("CC", "cc"), FALLBACK)
        return None
    key = hashlib.sha256("|".join([SOURCE.read_text(), *FLAGS, compiler, _cpu_identity()]).encode()).hexdigest()
    target = default_cache_dir() / "kernels" / f"kernels-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))  # after torch is imported, so that its OpenMP runtime is the one shared
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        reason = detail.strip().splitlines()[-1] if detail.strip() else type(error).__name__
        log.warning("catdogcnn's CPU kernels could not be built (%s): %s", reason, FALLBACK)
        return None
    pointer, size, stride = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    signatures = {
        "max_pool_relu_forward": [pointer] * 3 + [size] * 4,
        "max_pool_relu_backward": [pointer] * 3 + [size] * 4,
        "warp_affine_bilinear": [pointer] + [stride] * 4 + [pointer] * 2 + [size] * 4,
        "conv_pool_supported": [],
    }
    lib.conv_pool_supported.restype = ctypes.c_int
    if lib.conv_pool_supported():  # built only for CPUs with AVX-512 BF16
        signatures["conv_pool_forward"] = [pointer] + [stride] * 4 + [pointer] * 5 + [size] * 4
        signatures["conv_pool_backward"] = [pointer] * 4 + [size] * 4
    for name, arguments in signatures.items():
        function = getattr(lib, name)
        function.argtypes = arguments
        if name != "conv_pool_supported":
            function.restype = None
    return lib


def conv_pool_supported() -> bool:
    """Whether the fused convolution exists here: the kernels built, on a CPU with AVX-512 BF16 dot products."""
    lib = library()
    return lib is not None and bool(lib.conv_pool_supported())
