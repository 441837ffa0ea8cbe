"""Train-time augmentation on whole batches (one affine warp per batch, no per-image Python work).

The seed's Keras ImageDataGenerator: horizontal flip, shear_range=0.2 and zoom_range=0.2. Keras
reads shear_range in degrees, so the seed's shear is 0.2 degrees (almost nothing); we keep that
meaning so "seed" reproduces the seed. Zoom draws x and y scales independently from [0.8, 1.2].
Out-of-image pixels repeat the border, as Keras's fill_mode="nearest".
"crop" is the usual fine-tuning augmentation: a random resized crop (area and aspect ratio drawn
per photo) and a flip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    shear_degrees: float = 0.0
    zoom: float = 0.0  # x and y scales drawn from [1 - zoom, 1 + zoom]
    crop_area: float = 1.0  # random resized crop: area fraction drawn from [crop_area, 1]; 1 is off
    crop_ratio: float = 1.0  # and aspect ratio from [1 / crop_ratio, crop_ratio]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        return not self.hflip and self.shear_degrees == 0 and self.zoom == 0 and self.crop_area == 1

    @property
    def flips_only(self) -> bool:
        return self.shear_degrees == 0 and self.zoom == 0 and self.crop_area == 1


PRESETS = {
    "none": AugmentConfig(),
    "flip": AugmentConfig(hflip=True),
    "seed": AugmentConfig(hflip=True, shear_degrees=0.2, zoom=0.2),
    "crop": AugmentConfig(hflip=True, crop_area=0.35, crop_ratio=4 / 3),
}


def get_preset(name: str) -> AugmentConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown augmentation {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment float images (N, C, H, W); random draws come from `generator` so a seed fixes them."""
    if config.is_identity:
        return images
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
    if config.flips_only:  # exact, no resampling blur
        flipped = (flip < 0).to(images.device).view(n, 1, 1, 1)
        return torch.where(flipped, images.flip(3), images)
    zoom_x = uniform(1 - config.zoom, 1 + config.zoom)
    zoom_y = uniform(1 - config.zoom, 1 + config.zoom)
    shear = uniform(-config.shear_degrees, config.shear_degrees) * (math.pi / 180)
    # Random resized crop: the crop's width and height as fractions of the photo, and where it sits.
    area = uniform(config.crop_area, 1.0)
    log_ratio = uniform(-math.log(config.crop_ratio), math.log(config.crop_ratio))
    crop_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1)
    crop_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1)
    shift_x = uniform(-1, 1) * (1 - crop_w)
    shift_y = uniform(-1, 1) * (1 - crop_h)
    # Output -> input coordinates (as Keras composes them: shear @ zoom), inside the crop, x flipped.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = zoom_x * crop_w * flip
    theta[:, 0, 1] = -torch.sin(shear) * zoom_y * crop_h
    theta[:, 1, 1] = torch.cos(shear) * zoom_y * crop_h
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
