"""2x2 max-pooling and ReLU in one pass, for training on bf16 channels-last CPU maps (C kernels, `accel/kernels.c`),
and on CPUs with AVX-512 BF16 dot products the seed CNN's first convolution fused in front of them.

Hand-written because torch's CPU max-pool keeps int64 indices as large as its input, and its backward
zero-fills the whole input gradient and then scatters into it; this kernel keeps one byte per output and
writes the input gradient in one pass: a seed-CNN training step is 10-15% shorter. Outputs and gradients equal
those of `F.max_pool2d(x, 2).relu()` (ties: the first maximum in scan order gets the gradient; NaN: the last
NaN; none where the output is 0).

The convolution in front: the first convolution's output map (32 x 62 x 62 per photo, 8 MB a batch) was written,
read by the pool, and its gradient written and read again: four passes through memory, which made the first
layers about 3 ms of a 12 ms step (2.3 ms timed alone). The fused kernel computes each pooling window's four sums
in registers and keeps the byte index (0.9 ms), and its backward builds the weight gradient from the pooled
gradient alone (0.65 ms).
It rounds the photos and weights to bf16 as the convolution under autocast does, but compares the four sums
before rounding them, so its outputs equal torch's to within bf16 rounding, not bit for bit.

The C code is in `accel/kernels.c`, built on first use (`accel/kernels.py`); where it cannot be built, training
uses torch's layers.
"""

from __future__ import annotations

import torch

from catdogcnn.accel import kernels


def _nhwc_empty(n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An (N, C, H, W) tensor laid out channels-last: (N, H, W, C) in memory."""
    return torch.empty((n, h, w, c), dtype=dtype).permute(0, 3, 1, 2)


class MaxPoolReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out, index = _nhwc_empty(n, c, h // 2, w // 2), _nhwc_empty(n, c, h // 2, w // 2, torch.uint8)
        kernels.library().max_pool_relu_forward(x.data_ptr(), out.data_ptr(), index.data_ptr(), n, h, w, c)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (index,) = ctx.saved_tensors
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_in = _nhwc_empty(*ctx.input_shape)
        n, c, h, w = ctx.input_shape
        kernels.library().max_pool_relu_backward(grad_out.data_ptr(), index.data_ptr(), grad_in.data_ptr(), n, h, w,
                                                 c)
        return grad_in


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel takes this map: bf16, channels-last, on the CPU, and the kernel could be built."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and kernels.library() is not None)


def max_pool_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU(2x2 max-pool(x)) of a map that `applies` takes, differentiable."""
    return MaxPoolReLUFunction.apply(x)


class ConvMaxPoolReLUFunction(torch.autograd.Function):
    """ReLU(2x2 max-pool(conv3x3(x) + bias)) of fp32 RGB photos, in bf16 as under autocast; no gradient for x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = weight.shape[0]
        planes = torch.empty((n, 3, h, w + 2), dtype=torch.bfloat16)  # the photos in bf16, for the backward pass
        pooled = (n, c, (h - 2) // 2, (w - 2) // 2)
        out, index = _nhwc_empty(*pooled), _nhwc_empty(*pooled, torch.uint8)
        weight, bias = weight.detach().contiguous(), bias.detach().contiguous()
        kernels.library().conv_pool_forward(x.data_ptr(), *x.stride(), weight.data_ptr(), bias.data_ptr(),
                                            planes.data_ptr(), out.data_ptr(), index.data_ptr(), n, h, w, c)
        ctx.save_for_backward(planes, index)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        planes, index = ctx.saved_tensors
        n, _, h, padded = planes.shape
        c = index.shape[1]
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        partial = torch.empty((n, 28, c))  # per photo: [colour, kh, kw] x channel, then the bias's row
        kernels.library().conv_pool_backward(planes.data_ptr(), grad_out.data_ptr(), index.data_ptr(),
                                             partial.data_ptr(), n, h, padded - 2, c)
        sums = partial.sum(0)  # over photos in a fixed order: the same bits whatever the thread count
        return None, sums[:27].t().reshape(c, 3, 3, 3), sums[27]


def conv_applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether the fused convolution takes this layer and input: an RGB 3x3 convolution (stride 1, no padding,
    a bias, a multiple of 16 filters) of fp32 photos needing no gradient, under CPU bf16 autocast, on a CPU
    with AVX-512 BF16."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3
            and min(x.shape[2:]) >= 4 and not x.requires_grad
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and conv.in_channels == 3 and conv.out_channels % 16 == 0 and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is not None and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu"
            and kernels.conv_pool_supported())


def conv_max_pool_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """ReLU(2x2 max-pool(conv(x))) for a layer and input that `conv_applies` takes, differentiable in the layer's
    weight and bias; a bf16 channels-last map, as the three layers give under autocast."""
    return ConvMaxPoolReLUFunction.apply(x, conv.weight, conv.bias)
