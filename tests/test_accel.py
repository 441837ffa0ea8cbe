from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from catdogcnn import augment
from catdogcnn.accel import kernels
from catdogcnn.models import build_model

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build the kernels")


@pytest.fixture
def rebuilt_library():
    """`library()` is built once per process; these tests build it again under their own settings."""
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


@needs_cc
def test_the_kernel_is_built_once_into_the_cache_and_reused(rebuilt_library, tmp_path, monkeypatch):
    monkeypatch.setenv("CATDOGCNN_CACHE", str(tmp_path))
    assert kernels.library() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # and no partial file left beside it
    stamp = built[0].stat().st_mtime_ns
    kernels.library.cache_clear()
    assert kernels.library() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])  # absent; present but failing
def test_without_a_working_compiler_training_says_so_once_and_uses_torch_operators(rebuilt_library, tmp_path,
                                                                                    monkeypatch, caplog, compiler):
    monkeypatch.setenv("CATDOGCNN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    model = build_model("seed_cnn", 2).to(memory_format=torch.channels_last).train()
    photos = torch.rand(2, 3, 64, 64)
    config = augment.parse_augment("seed")
    with caplog.at_level(logging.WARNING, logger="catdogcnn"):
        warped = augment.augment_batch(photos, config, torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = model[1](model[0](warped.contiguous(memory_format=torch.channels_last)))
            logits = model(warped.contiguous(memory_format=torch.channels_last))
    assert warped.shape == photos.shape and logits.shape == (2, 1)
    assert type(pooled.grad_fn).__name__ != "MaxPoolReLUFunctionBackward"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "CPU kernels" in warnings[0] and "torch's operators" in warnings[0]
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_importing_the_users_of_the_kernels_builds_nothing(tmp_path):
    """The kernels are built when first called, never on import (test collection imports every module)."""
    code = "import catdogcnn.accel.kernels, catdogcnn.augment, catdogcnn.models.fused_pool"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CATDOGCNN_CACHE": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_this_session_builds_the_kernels_outside_the_users_cache(cpu_kernels):
    built = Path(cpu_kernels.library()._name)
    assert Path(tempfile.gettempdir()).resolve() in built.resolve().parents
