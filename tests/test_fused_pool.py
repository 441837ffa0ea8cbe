from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from catdogcnn.accel import kernels
from catdogcnn.models import build_model, fused_pool
from catdogcnn.models.fused_pool import max_pool_relu

pytestmark = pytest.mark.usefixtures("cpu_kernels")

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


def _conv_case(n: int, h: int, w: int, filters: int, seed: int) -> tuple[torch.Tensor, nn.Conv2d]:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, filters, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.copy_(torch.randn(filters, generator=g) * 0.1)
    return torch.rand(n, 3, h, w, generator=g), conv


def _fused(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_pool.conv_applies(x, conv)
        return fused_pool.conv_max_pool_relu(x, conv)


@pytest.mark.usefixtures("bf16_conv_kernel")
@pytest.mark.parametrize(("n", "h", "w", "filters"), [(2, 64, 64, 32), (3, 11, 9, 16), (1, 4, 5, 48)])
def test_fused_convolution_equals_the_exact_layers_on_bf16_inputs(n, h, w, filters):
    """Against float64 on the same bf16-rounded photos and weights (the bias stays fp32): outputs to within bf16
    rounding, gradients to within fp32 sums (torch's bf16 convolution backward is off by up to 3% on conv1's)."""
    x, conv = _conv_case(n, h, w, filters, seed=h * w + filters)
    ours = _fused(x, conv)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=CL)
    weight = conv.weight.detach().to(torch.bfloat16).double().requires_grad_()
    bias = conv.bias.detach().double().requires_grad_()
    exact = F.max_pool2d(F.conv2d(x.to(torch.bfloat16).double(), weight, bias), 2).relu()
    assert ours.shape == exact.shape == (n, filters, (h - 2) // 2, (w - 2) // 2)
    assert ((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    grad = torch.randn(exact.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours.backward(grad)
    exact.backward(grad.double())
    for mine, expected in [(conv.weight.grad, weight.grad), (conv.bias.grad, bias.grad)]:
        assert mine.dtype == torch.float32
        assert (mine.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.usefixtures("bf16_conv_kernel")
def test_fused_convolution_reads_any_layout_and_its_gradient_does_not_depend_on_threads():
    x, conv = _conv_case(6, 20, 20, 32, seed=3)
    grad = torch.randn(6, 32, 9, 9, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    results = []
    for layout, threads in [(torch.contiguous_format, 2), (CL, 2), (CL, 1)]:
        conv.zero_grad()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = _fused(x.contiguous(memory_format=layout), conv)
            out.backward(grad)
        finally:
            torch.set_num_threads(previous)
        results.append((out, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.usefixtures("bf16_conv_kernel")
def test_seed_cnn_trains_its_first_layers_through_the_fused_convolution():
    torch.manual_seed(0)
    model = build_model("seed_cnn", 2).to(memory_format=CL).train()
    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=CL)

    def loss_and_gradients(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout draws
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x) if fused else model[2:](model[1](model[0](x)))
        loss = logits.float().sum()
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    loss, gradients = loss_and_gradients(fused=True)
    torch_loss, torch_gradients = loss_and_gradients(fused=False)
    assert torch.allclose(loss, torch_loss, rtol=1e-2)
    for ours, theirs in zip(gradients, torch_gradients, strict=True):  # torch's bf16 conv1 gradient is the rough one
        assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(model(x).grad_fn).__name__ != "ConvMaxPoolReLUFunctionBackward"  # the model's last layer
        assert type(fused_pool.conv_max_pool_relu(x, model[0]).grad_fn).__name__ == "ConvMaxPoolReLUFunctionBackward"


def test_the_fused_convolution_is_left_out_where_it_does_not_apply(monkeypatch):
    x, conv = _conv_case(2, 16, 16, 32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_pool.conv_applies(x.requires_grad_(), conv)  # photos that need a gradient
        x = x.detach()
        assert not fused_pool.conv_applies(x.to(torch.bfloat16), conv)
        assert not fused_pool.conv_applies(x, nn.Conv2d(3, 32, 3, padding=1))
        assert not fused_pool.conv_applies(x, nn.Conv2d(3, 24, 3))  # not a multiple of 16 filters
        assert not fused_pool.conv_applies(x, nn.Conv2d(3, 32, 3, bias=False))
    assert not fused_pool.conv_applies(x, conv)  # no autocast: fp32 training
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fused_pool.conv_applies(x, conv)
    monkeypatch.setattr(kernels, "library", lambda: None)  # no compiler
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_pool.conv_applies(x, conv)
        model = build_model("seed_cnn", 2).train()
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1)
