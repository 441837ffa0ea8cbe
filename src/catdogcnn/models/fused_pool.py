"""2x2 max-pooling and ReLU in one pass, for training on bf16 channels-last CPU maps (C kernels, `fused_pool.c`),
and on CPUs with AVX-512 BF16 dot products the seed CNN's first convolution fused in front of them.

Hand-written because torch's CPU max-pool keeps int64 indices as large as its input, and its backward
zero-fills the whole input gradient and then scatters into it; this kernel keeps one byte per output and
writes the input gradient in one pass: a seed-CNN training step is 10-15% shorter. Outputs and gradients equal
those of `F.max_pool2d(x, 2).relu()` (ties: the first maximum in scan order gets the gradient; NaN: the last
NaN; none where the output is 0).

The convolution in front: the first convolution's output map (32 x 62 x 62 per photo, 8 MB a batch) was written,
read by the pool, and its gradient written and read again, four passes through memory that the machine's slow
phases made 2-4x slower than the arithmetic; the fused kernel computes each pooling window's four sums in
registers and keeps the byte index, and its backward builds the weight gradient from the pooled gradient alone.
It rounds the photos and weights to bf16 as the convolution under autocast does, but compares the four sums
before rounding them, so its outputs equal torch's to within bf16 rounding, not bit for bit.

The C file is compiled on first use for this CPU (`-march=native`: without it the loops are not vectorized and
the kernel is slower than torch's) into the cache folder, keyed by the source, the compiler and the CPU. Where
no C compiler works, training says so once and uses torch's layers.
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
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("catdogcnn")
SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
FALLBACK = "training uses torch's layers, 10-15% slower"


def _cpu_identity() -> str:
    try:  # the instruction sets -march=native compiles for
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(next((line for line in lines if line.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent or interrupted build never leaves half a library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (said once, as a warning) where they cannot be built."""
    from catdogcnn.data import default_cache_dir

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (%s) for the fused max-pool kernel: %s", os.environ.get("CC", "cc"), FALLBACK)
        return None
    key = hashlib.sha256("|".join([SOURCE.read_text(), *FLAGS, compiler, _cpu_identity()]).encode()).hexdigest()
    target = default_cache_dir() / "kernels" / f"fused_pool-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))  # after torch is imported, so that its OpenMP runtime is the one shared
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        reason = detail.strip().splitlines()[-1] if detail.strip() else type(error).__name__
        log.warning("the fused max-pool kernel could not be built (%s): %s", reason, FALLBACK)
        return None
    pointer, size, stride = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for function in (lib.max_pool_relu_forward, lib.max_pool_relu_backward):
        function.argtypes, function.restype = [pointer] * 3 + [size] * 4, None
    lib.conv_pool_supported.argtypes, lib.conv_pool_supported.restype = [], ctypes.c_int
    if lib.conv_pool_supported():
        lib.conv_pool_forward.argtypes = [pointer] + [stride] * 4 + [pointer] * 5 + [size] * 4
        lib.conv_pool_backward.argtypes = [pointer] * 4 + [size] * 4
        lib.conv_pool_forward.restype = lib.conv_pool_backward.restype = None
    return lib


def _nhwc_empty(n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An (N, C, H, W) tensor laid out channels-last: (N, H, W, C) in memory."""
    return torch.empty((n, h, w, c), dtype=dtype).permute(0, 3, 1, 2)


class MaxPoolReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out, index = _nhwc_empty(n, c, h // 2, w // 2), _nhwc_empty(n, c, h // 2, w // 2, torch.uint8)
        library().max_pool_relu_forward(x.data_ptr(), out.data_ptr(), index.data_ptr(), n, h, w, c)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (index,) = ctx.saved_tensors
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_in = _nhwc_empty(*ctx.input_shape)
        n, c, h, w = ctx.input_shape
        library().max_pool_relu_backward(grad_out.data_ptr(), index.data_ptr(), grad_in.data_ptr(), n, h, w, c)
        return grad_in


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel takes this map: bf16, channels-last, on the CPU, and the kernel could be built."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


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
        out, index = _nhwc_empty(n, c, (h - 2) // 2, (w - 2) // 2), _nhwc_empty(n, c, (h - 2) // 2, (w - 2) // 2,
                                                                                  torch.uint8)
        weight, bias = weight.detach().contiguous(), bias.detach().contiguous()
        library().conv_pool_forward(x.data_ptr(), *x.stride(), weight.data_ptr(), bias.data_ptr(), planes.data_ptr(),
                                    out.data_ptr(), index.data_ptr(), n, h, w, c)
        ctx.save_for_backward(planes, index)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        planes, index = ctx.saved_tensors
        n, _, h, padded = planes.shape
        c = index.shape[1]
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        partial = torch.empty((n, 28, c))  # per photo: [colour, kh, kw] x channel, then the bias's row
        library().conv_pool_backward(planes.data_ptr(), grad_out.data_ptr(), index.data_ptr(), partial.data_ptr(),
                                     n, h, padded - 2, c)
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
            and library() is not None and bool(library().conv_pool_supported()))


def conv_max_pool_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """ReLU(2x2 max-pool(conv(x))) for a layer and input that `conv_applies` takes, differentiable in the layer's
    weight and bias; a bf16 channels-last map, as the three layers give under autocast."""
    return ConvMaxPoolReLUFunction.apply(x, conv.weight, conv.bias)
