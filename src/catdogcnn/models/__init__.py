"""Model registry: name -> how to build it and what input it expects.

Every model returns logits: one per photo for two classes (sigmoid, as the seed's Keras model),
one per class otherwise (softmax). `Normalize` and the export wrapper turn photos into its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra

with needs_extra("train"):
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(num_classes, image_size, **options) -> module returning logits
    image_size: int
    mean: tuple[float, float, float]  # on the 0-255 pixel scale
    std: tuple[float, float, float]
    description: str
    resize: str = "bilinear"
    options: dict = field(default_factory=dict)  # extra keyword arguments the builder accepts, with defaults


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def num_outputs(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1) binary logits -> (N, 2) [p0, p1]; (N, C) logits -> softmax."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


class Normalize(nn.Module):
    """Float pixels in [0, 1], NCHW -> the model's normalised input."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / 255)
        self.register_buffer("scale", 255 / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale


class OpenSet(nn.Module):
    """A model and a second head for "none of the classes", on the features its class head reads.

    The model must offer `features(x)` (what its class head takes) and `head` (that nn.Linear). Called as the
    model is, it gives the class logits alone, so every closed-set path (validation, calibration) works on it
    unchanged; `with_neither=True` (a keyword DistributedDataParallel passes on) adds the "neither" logit.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.neither = nn.Linear(model.head.in_features, 1)

    @property
    def head(self) -> nn.Linear:
        return self.model.head

    def forward(self, x: torch.Tensor, with_neither: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        logits = self.model.head(features)
        return (logits, self.neither(features)) if with_neither else logits


def build_model(name: str, num_classes: int, image_size: int | None = None, open_set: bool = False,
                **options) -> nn.Module:
    """The named model for `num_classes` classes; `open_set` adds a learned "neither" output (the pretrained
    models have their own, from-scratch ones are wrapped in `OpenSet`)."""
    spec = get_spec(name)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise UserError(f"model {name!r} takes no option(s) {sorted(unknown)}; it takes {sorted(spec.options)}")
    if "open_set" in spec.options:
        options["open_set"] = open_set
    model = spec.build(num_classes, image_size or spec.image_size, **{**spec.options, **options})
    return OpenSet(model) if open_set and "open_set" not in spec.options else model


# The architectures register themselves on import.
from catdogcnn.models import efficientnet_lite, resnet, seed_cnn  # noqa: E402,F401
