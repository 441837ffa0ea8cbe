from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from catdogcnn.models import build_model, fused_pool
from catdogcnn.models.fused_pool import max_pool_relu

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build the fused kernel")

CL = torch.channels_last


def _map(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random bf16 channels-last map with the cases a max-pool + ReLU must get right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(torch.bfloat16)
    x[0, 0, :2, :2] = 1.5  # a four-way tie: the first gets the gradient
    x[0, 1, :2, :2] = torch.tensor([[-0.0, -1.0], [-3.0, 0.0]])  # nothing positive: output 0, no gradient
    x[0, 2, :2, :2] = torch.tensor([[float("nan"), 9.0], [float("nan"), float("inf")]])  # NaN wins, the last one
    x[0, 3, :2, :2] = float("-inf")
    x[0, 4, :2, :2] = torch.tensor([[-2.0, 1e-30], [float("inf"), -float("nan")]])  # negative NaN still a NaN
    x[1, :, 2:4, 2:4] = 0.25  # ties across a whole block of channels
    return x.contiguous(memory_format=CL)


@pytest.mark.parametrize("shape", [(3, 8, 62, 62), (3, 8, 29, 29), (2, 5, 7, 10), (2, 5, 2, 3)])
def test_fused_max_pool_relu_equals_torch_forward_and_backward(shape):
    x = _map(*shape, seed=sum(shape))
    ours_in, torch_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, expected = max_pool_relu(ours_in), F.max_pool2d(torch_in, 2).relu()
    assert ours.shape == expected.shape and ours.is_contiguous(memory_format=CL)
    assert torch.equal(ours.isnan(), expected.isnan())
    assert torch.equal(ours.nan_to_num(), expected.nan_to_num())
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ours.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours_in.grad, torch_in.grad)
    assert ours_in.grad[0, 0, :2, :2].flatten().tolist() == [grad[0, 0, 0, 0].item(), 0, 0, 0]


def test_seed_cnn_trains_through_the_fused_kernel_as_through_torch_layers():
    """The same weights, photos and dropout draws give the same loss and gradients both ways."""
    torch.manual_seed(0)
    model = build_model("seed_cnn", 2).to(memory_format=CL).train()
    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=CL)

    def gradients(fused: bool) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model[0](x)
            h = model[1](h) if fused else F.max_pool2d(h, 2).relu()
            assert (type(h.grad_fn).__name__ == "MaxPoolReLUFunctionBackward") == fused
            h = model[2](h)
            h = model[3](h) if fused else F.max_pool2d(h, 2).relu()
            logits = model[4:](h)
        logits.float().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for ours, expected in zip(gradients(True), gradients(False), strict=True):
        assert torch.equal(ours, expected)


@pytest.fixture
def rebuilt_library():
    """`library()` is built once per process; these tests build it again under their own settings."""
    fused_pool.library.cache_clear()
    yield
    fused_pool.library.cache_clear()


def test_the_kernel_is_built_once_into_the_cache_and_reused(rebuilt_library, tmp_path, monkeypatch):
    monkeypatch.setenv("CATDOGCNN_CACHE", str(tmp_path))
    assert fused_pool.library() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # and no partial file left beside it
    stamp = built[0].stat().st_mtime_ns
    fused_pool.library.cache_clear()
    assert fused_pool.library() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])  # absent; present but failing
def test_without_a_working_compiler_training_says_so_once_and_uses_torch_layers(rebuilt_library, tmp_path,
                                                                                 monkeypatch, caplog, compiler):
    monkeypatch.setenv("CATDOGCNN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    layer = build_model("seed_cnn", 2)[1].train()
    x = _map(2, 5, 8, 8, seed=0).requires_grad_()
    with caplog.at_level(logging.WARNING, logger="catdogcnn"):
        first, second = layer(x), layer(x)
    assert torch.equal(first.nan_to_num(), F.max_pool2d(x, 2).relu().nan_to_num())
    assert type(second.grad_fn).__name__ != "MaxPoolReLUFunctionBackward"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "fused max-pool kernel" in warnings[0] and "torch's layers" in warnings[0]
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
