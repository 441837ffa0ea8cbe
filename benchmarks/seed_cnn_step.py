"""Where a seed-CNN training step's time goes on this CPU: each heavy operation timed alone, then the whole step.

    python benchmarks/seed_cnn_step.py [--threads 2] [--repeats 200]

Shapes are the seed recipe's (batch 32, 64x64 RGB), in bf16 channels-last as the training loop runs them under
autocast. On a CPU with AVX-512 BF16 the step runs the fused convolution (conv1 + pool 1 + ReLU) instead of
torch's conv1 and the fused pool after it; both are timed, the rows a step does not run marked. Without a C
compiler (no `kernels.c` library) the step runs torch's pools and grid_sample, and so do these rows. The big
matrix product gives the CPU's bf16 peak to compare the convolutions' throughput with.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from types import SimpleNamespace
from unittest.mock import patch

import torch
import torch.nn.functional as F

from catdogcnn.accel import kernels
from catdogcnn.augment import augment_batch, parse_augment
from catdogcnn.models import build_model
from catdogcnn.models.fused_pool import ConvMaxPoolReLUFunction, MaxPoolReLUFunction
from catdogcnn.train import TrainConfig, keep_freed_memory, loss_and_correct, make_optimizer

BATCH = 32


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(max(5, repeats // 10)):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, input_grad: bool) -> Callable[[], object]:
    return lambda: torch.ops.aten.convolution_backward(grad, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False,
                                                       [0, 0], 1, [input_grad, True, True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the train command does
    bf16, cl, n = torch.bfloat16, torch.channels_last, args.repeats
    rand = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        t = torch.rand(*shape, generator=rand).to(bf16)
        return t.contiguous(memory_format=cl) if t.dim() == 4 else t

    x, w1, w2 = tensor(BATCH, 3, 64, 64), tensor(32, 3, 3, 3), tensor(32, 32, 3, 3)
    conv1 = F.conv2d(x, w1)  # (32, 32, 62, 62)
    pooled1, index1 = F.max_pool2d_with_indices(conv1, 2)
    hidden1 = pooled1.relu()  # (32, 32, 31, 31)
    conv2 = F.conv2d(hidden1, w2)  # (32, 32, 29, 29)
    pooled2, index2 = F.max_pool2d_with_indices(conv2, 2)
    flat, dense = pooled2.flatten(1), tensor(128, pooled2[0].numel())

    grad1, grad2 = torch.rand_like(pooled1), torch.rand_like(pooled2)
    contexts = {}  # the fused kernel's forward and backward called directly; a namespace stands in for autograd's

    def context(key: object) -> SimpleNamespace:
        space = contexts.setdefault(key, SimpleNamespace())
        space.save_for_backward = lambda *saved: setattr(space, "saved_tensors", saved)
        return space

    def fused_forward(x: torch.Tensor) -> torch.Tensor:
        return MaxPoolReLUFunction.forward(context(x.shape), x)

    def fused_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return MaxPoolReLUFunction.backward(contexts[x.shape], grad)

    have_kernels = kernels.library() is not None
    if have_kernels:
        fused_forward(conv1), fused_forward(conv2)
    # The fused convolution takes the fp32 photos, as the training step hands them over.
    photos32, w1_32, b1_32 = x.float().contiguous(memory_format=cl), w1.float(), torch.zeros(32)
    fused_conv = kernels.conv_pool_supported()
    if fused_conv:
        ConvMaxPoolReLUFunction.forward(context("conv"), photos32, w1_32, b1_32)

    def pool_backward(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> Callable[[], object]:
        return lambda: torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                       False, index)

    def pool_rows(number: int, conv: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
                  in_step: bool) -> list[tuple]:
        size = f"{conv.shape[2]}x{conv.shape[3]} -> {grad.shape[2]}x{grad.shape[3]}"
        if have_kernels:
            return [(f"max-pool {number} + ReLU forward (fused kernel, {size})", lambda: fused_forward(conv), 0,
                     in_step),
                    (f"max-pool {number} + ReLU backward (fused kernel)", lambda: fused_backward(conv, grad), 0,
                     in_step)]
        return [(f"max-pool {number} + ReLU forward (torch's: no C compiler, {size})",
                 lambda: F.max_pool2d(conv, 2).relu(), 0, in_step),
                (f"max-pool {number} backward (torch's)", pool_backward(grad, conv, index), 0, in_step)]

    def gflops(macs: int, ms: float) -> str:
        return f"{2 * macs / ms / 1e6:.0f}"

    macs1 = BATCH * 62 * 62 * 32 * 27
    macs2 = BATCH * 29 * 29 * 32 * 288
    rows = []
    # (name, work, multiply-adds, whether a training step runs it here)
    layer1 = [
        ("conv1 forward", lambda: F.conv2d(x, w1), macs1, not fused_conv),
        ("conv1 backward (weights only: the photos need no gradient)",
         conv_backward(torch.rand_like(conv1), x, w1, input_grad=False), macs1, not fused_conv),
        *pool_rows(1, conv1, index1, grad1, not fused_conv),
    ]
    if have_kernels:
        layer1 += [
            ("torch's max-pool 1 forward, for comparison (int64 indices)",
             lambda: F.max_pool2d_with_indices(conv1, 2), 0, False),
            ("torch's max-pool 1 backward, for comparison (zero-fill, then scatter)",
             pool_backward(grad1, conv1, index1), 0, False),
        ]
    if fused_conv:
        layer1 += [
            ("conv1 + max-pool 1 + ReLU forward (fused convolution: fp32 photos -> bf16 31x31 map)",
             lambda: ConvMaxPoolReLUFunction.forward(context("conv"), photos32, w1_32, b1_32), macs1, True),
            ("conv1 + max-pool 1 + ReLU backward (fused convolution: weights and bias)",
             lambda: ConvMaxPoolReLUFunction.backward(contexts["conv"], grad1), 0, True),
        ]
    for name, fn, macs, in_step in layer1 + [
        ("conv2 forward", lambda: F.conv2d(hidden1, w2), macs2, True),
        ("conv2 backward (input and weights)", conv_backward(torch.rand_like(conv2), hidden1, w2, input_grad=True),
         2 * macs2, True),
        *pool_rows(2, conv2, index2, grad2, True),
        ("dense 6272 -> 128 forward", lambda: F.linear(flat, dense), BATCH * dense.numel(), True),
    ]:
        ms = milliseconds(fn, n)
        rows.append((name if in_step else f"{name}, not in this CPU's step", ms, gflops(macs, ms) if macs else "",
                     in_step))
    heavy = sum(ms for _, ms, _, in_step in rows if in_step)

    # The whole step as the training loop runs it: augmentation, forward, loss, backward, Adam.
    torch.manual_seed(0)
    model = build_model("seed_cnn", 2, 64).to(memory_format=cl)
    optimizer = make_optimizer(model, TrainConfig())
    augment, augment_rng = parse_augment("seed"), torch.Generator().manual_seed(0)
    photos = torch.randint(0, 256, (BATCH, 64, 64, 3), dtype=torch.uint8, generator=rand)
    labels = torch.randint(0, 2, (BATCH,), generator=rand)

    def batch() -> torch.Tensor:
        return augment_batch(photos.permute(0, 3, 1, 2).float().div_(255), augment, augment_rng)

    def batch_grid_sample() -> torch.Tensor:  # the same, with torch's grid_sample instead of the C warp
        with patch.object(kernels, "library", lambda: None):
            return batch()

    def step() -> None:
        with torch.autocast("cpu", dtype=bf16):
            logits = model(batch().contiguous(memory_format=cl))
        loss, _ = loss_and_correct(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss / BATCH).backward()
        optimizer.step()

    augmentation = milliseconds(batch, n)
    augmentation_torch = milliseconds(batch_grid_sample, n) if have_kernels else None
    whole = milliseconds(step, n)
    big = torch.rand(2048, 2048, generator=rand).to(bf16)
    peak = milliseconds(lambda: big @ big, 20)

    print(f"\nSeed CNN, batch {BATCH}, bf16 channels-last, {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| part | ms per batch | GFLOP/s |")
    print("|---|---|---|")
    for name, ms, rate, _ in rows:
        print(f"| {name} | {ms:.3f} | {rate} |")
    print(f"| **the layers a training step runs** (those not marked otherwise) | **{heavy:.3f}** | |")
    warp = "the C warp" if have_kernels else "F.grid_sample: no C compiler"
    print(f"| augmentation of a batch (seed preset: flip, shear, zoom; {warp}) | {augmentation:.3f} | |")
    if have_kernels:
        print(f"| the same with F.grid_sample, for comparison | {augmentation_torch:.3f} | |")
    print(f"| **whole training step** (augmentation, forward, loss, backward, Adam) | **{whole:.3f}** | |")
    print(f"| bf16 matrix product 2048x2048x2048 (this CPU's practical peak) | {peak:.3f} | "
          f"{gflops(2048 ** 3, peak)} |")
    print(f"\nAn epoch of 250 such steps: {whole * 250 / 1e3:.2f} s")


if __name__ == "__main__":
    main()
