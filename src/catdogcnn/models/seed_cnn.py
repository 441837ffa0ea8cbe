"""The seed's Keras CNN, layer for layer: 64x64 RGB in [0, 1], 813,217 parameters for two classes.

Keras: Conv2D(32, 3x3, relu) MaxPool(2) Conv2D(32, 3x3, relu) MaxPool(2) Dropout(0.25) Flatten
Dense(128, relu) Dropout(0.5) Dense(1, sigmoid). We pool before the ReLU: max-pooling and ReLU
commute (both monotone), so the function is the same, and ReLU on the pooled map is 4x less work,
which makes a CPU epoch about 1.5x faster; in bf16 CPU training the two run as one C kernel (`fused_pool`),
and on CPUs with AVX-512 BF16 the first convolution, its pool and ReLU run as one.
Like Keras, we flatten in (H, W, C) order, which is free on channels-last maps.
"""

from __future__ import annotations

import math
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from catdogcnn.errors import UserError
from catdogcnn.models import ModelSpec, fused_pool, num_outputs, register


class ByteDropout(nn.Module):
    """Dropout with the keep/drop draw made from random bytes, eight per 64-bit random number.

    Hand-written because torch's CPU dropout draws one 32-bit number per element, which was 13% of a seed-CNN
    training step; this is 5x faster. The drop probability is rounded to a multiple of 1/256 (exact for the
    seed's 0.25 and 0.5); in eval mode, and at p = 0, it is the identity, as nn.Dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.cut = round(p * 256) if 0 <= p < 1 else -1  # a byte below this drops its element
        if not 0 <= self.cut < 256:
            raise UserError(f"dropout must be in [0, 1) and round below 1 in steps of 1/256, not {p}")
        self.p = self.cut / 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        words = torch.empty(math.ceil(n / 8), dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        # A mask of x's dtype, laid out in memory as x is: a channels-last map times a contiguous boolean mask
        # is 12x slower. The scale comes after the mask, so that 1 / (1 - p) is not rounded to bf16 first.
        keep = words.view(torch.uint8).as_strided(x.shape, x.stride()) >= self.cut
        return (x * keep.to(x.dtype)).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MaxPoolReLU(nn.Module):
    """ReLU(2x2 max-pool(x)); in bf16 CPU training one C kernel does both (`fused_pool`: a 10-15% shorter step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and fused_pool.applies(x):
            return fused_pool.max_pool_relu(x)
        return F.max_pool2d(x, 2).relu()


class FlattenChannelsLast(nn.Module):
    """Flatten in (H, W, C) order, as Keras does: a free view of a channels-last map, and Keras's Dense weights fit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class SeedCNN(nn.Sequential):
    """The layers in Keras's order (a Sequential: the weights' names are the layers' indices)."""

    @property
    def head(self) -> nn.Linear:
        return self[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer but the last: what the head reads (128 values after the dense layer's dropout)."""
        first = 0
        if self.training and fused_pool.conv_applies(x, self[0]):  # layers 0 and 1: conv, max-pool + ReLU
            x, first = fused_pool.conv_max_pool_relu(x, self[0]), 2
        for layer in islice(self, first, len(self) - 1):
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(num_classes: int, image_size: int = 64, dropout: float = 0.25, dense_dropout: float = 0.5) -> nn.Module:
    side = ((image_size - 2) // 2 - 2) // 2
    model = SeedCNN(
        nn.Conv2d(3, 32, 3), MaxPoolReLU(),
        nn.Conv2d(32, 32, 3), MaxPoolReLU(),
        ByteDropout(dropout),
        FlattenChannelsLast(),
        nn.Linear(32 * side * side, 128), nn.ReLU(),
        ByteDropout(dense_dropout),
        nn.Linear(128, num_outputs(num_classes)),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):  # Keras's initialisation: Glorot-uniform weights, zero bias
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


SPEC = register(ModelSpec(
    name="seed_cnn", build=build, image_size=64, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0),
    description="the seed's Keras CNN (2 conv + 2 dense layers, 64x64)", resize="nearest",
    options={"dropout": 0.25, "dense_dropout": 0.5},
))
