"""Train-time augmentation on whole batches (one affine warp per batch, no per-image Python work).

Each augmentation is a field of `AugmentConfig` (0 or False switches it off); a preset names a set of
them, and "PRESET,field=value,..." adjusts one (`parse_augment`). The resolved fields are recorded in
the bundle. Order: geometry (flip, shear, zoom, random resized crop: one warp), colour jitter, cutout,
then mixup or cutmix, which also mix the labels (`mix_batch`).

The seed's Keras ImageDataGenerator: horizontal flip, shear_range=0.2 and zoom_range=0.2. Keras
reads shear_range in degrees, so the seed's shear is 0.2 degrees (almost nothing); we keep that
meaning so "seed" reproduces the seed. Zoom draws x and y scales independently from [0.8, 1.2].
Out-of-image pixels repeat the border, as Keras's fill_mode="nearest".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra

with needs_extra("train"):
    import torch
    import torch.nn.functional as F

from catdogcnn.accel import kernels


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    shear_degrees: float = 0.0
    zoom: float = 0.0  # x and y scales drawn from [1 - zoom, 1 + zoom]
    crop_area: float = 1.0  # random resized crop: area fraction drawn from [crop_area, 1]; 1 is off
    crop_ratio: float = 1.0  # and aspect ratio from [1 / crop_ratio, crop_ratio]
    brightness: float = 0.0  # colour jitter: each factor drawn from [1 - x, 1 + x] per photo
    contrast: float = 0.0
    saturation: float = 0.0
    cutout: float = 0.0  # side of a grey square (fraction of the photo's side) pasted at a random place
    mixup: float = 0.0  # Beta(a, a) parameter of mixup (photos and labels blended); 0 is off
    cutmix: float = 0.0  # Beta(a, a) parameter of cutmix (a box of another photo pasted, labels by area)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        return self == AugmentConfig()

    @property
    def geometric(self) -> bool:
        return self.shear_degrees != 0 or self.zoom != 0 or self.crop_area != 1

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


PRESETS = {
    "none": AugmentConfig(),
    "flip": AugmentConfig(hflip=True),
    "seed": AugmentConfig(hflip=True, shear_degrees=0.2, zoom=0.2),
    # The seed's shear_range=0.2 read as radians (11.5 degrees), as Keras 1 read it: probably what the seed meant.
    "keras": AugmentConfig(hflip=True, shear_degrees=math.degrees(0.2), zoom=0.2),
    # Between "seed" and "strong": milder crops, colour jitter, no cutout.
    "medium": AugmentConfig(hflip=True, shear_degrees=10, zoom=0.1, crop_area=0.6, crop_ratio=4 / 3, brightness=0.2,
                            contrast=0.2, saturation=0.2),
    "crop": AugmentConfig(hflip=True, crop_area=0.35, crop_ratio=4 / 3),
    "strong": AugmentConfig(hflip=True, shear_degrees=10, crop_area=0.35, crop_ratio=4 / 3, brightness=0.3,
                            contrast=0.3, saturation=0.3, cutout=0.3),
}


def parse_augment(spec: str) -> AugmentConfig:
    """"crop" or "crop,cutout=0.25,mixup=0.2": a preset, then fields set one by one."""
    name, *settings = [part.strip() for part in spec.split(",")]
    if name not in PRESETS:
        raise UserError(f"unknown augmentation {name!r}; known: {', '.join(PRESETS)}")
    types = {f.name: f.type for f in fields(AugmentConfig)}
    changes: dict = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in types or not value:
            raise UserError(f"augmentation setting {setting!r}: expected FIELD=VALUE, FIELD one of {', '.join(types)}")
        try:
            changes[key] = value.lower() in ("1", "true", "yes", "on") if types[key] == "bool" else float(value)
        except ValueError:
            raise UserError(f"augmentation setting {setting!r}: {value!r} is not a number") from None
    config = replace(PRESETS[name], **changes)
    numbers = [config.shear_degrees, config.zoom, config.brightness, config.contrast, config.saturation,
               config.cutout, config.mixup, config.cutmix]
    if min(numbers) < 0 or not 0 < config.crop_area <= 1 or config.crop_ratio < 1 or config.zoom >= 1:
        raise UserError(f"augmentation {spec!r}: values out of range (crop_area in (0, 1], crop_ratio >= 1, "
                        "zoom < 1, the rest >= 0)")
    return config


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment float images (N, C, H, W) in [0, 1]; random draws come from `generator` so a seed fixes them.

    Mixup and cutmix are not applied here: they change the labels too (`mix_batch`).
    """
    if config.is_identity:
        return images
    images = _geometry(images, config, generator)
    if config.brightness or config.contrast or config.saturation:
        images = _colour_jitter(images, config, generator)
    if config.cutout:
        images = _cutout(images, config.cutout, generator)
    return images


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _geometry(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    if not config.hflip and not config.geometric:
        return images
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
    if not config.geometric:  # exact, no resampling blur
        flipped = (flip < 0).to(images.device).view(n, 1, 1, 1)
        return torch.where(flipped, images.flip(3), images)
    zoom_x = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    zoom_y = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    shear = _uniform(n, -config.shear_degrees, config.shear_degrees, generator) * (math.pi / 180)
    # Random resized crop: the crop's width and height as fractions of the photo, and where it sits.
    area = _uniform(n, config.crop_area, 1.0, generator)
    log_ratio = _uniform(n, -math.log(config.crop_ratio), math.log(config.crop_ratio), generator)
    crop_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1)
    crop_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1)
    shift_x = _uniform(n, -1, 1, generator) * (1 - crop_w)
    shift_y = _uniform(n, -1, 1, generator) * (1 - crop_h)
    # Output -> input coordinates (as Keras composes them: shear @ zoom), inside the crop, x flipped.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = zoom_x * crop_w * flip
    theta[:, 0, 1] = -torch.sin(shear) * zoom_y * crop_h
    theta[:, 1, 1] = torch.cos(shear) * zoom_y * crop_h
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    if images.device.type == "cpu" and images.dtype == torch.float32 and kernels.library() is not None:
        return _warp_cpu(images, theta)
    grid = _affine_grid(theta.to(images.device, images.dtype), *images.shape[2:])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _warp_cpu(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`_geometry`'s warp as one C pass (`kernels.c`): 0.3 ms for a batch of 32 at 64x64, where F.grid_sample and the
    grid it reads take 0.5 ms; a seed-CNN training step 0.5-0.8 ms shorter, alternated in one process. The result
    is laid out channels-last, as the CPU convolutions prefer."""
    n, c, h, w = images.shape
    out = torch.empty((n, h, w, c))
    theta = theta.reshape(n, 6).float().contiguous()
    kernels.library().warp_affine_bilinear(images.data_ptr(), *images.stride(), theta.data_ptr(), out.data_ptr(),
                                           n, c, h, w)
    return out.permute(0, 3, 1, 2)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (N, C, height, width), align_corners=False) written as broadcasts: on a CPU,
    F.affine_grid's batched matrix product takes 0.77 ms per batch of 32 at 64x64 (5% of a seed-CNN step),
    this 0.14 ms."""
    def centres(size: int) -> torch.Tensor:  # pixel centres in [-1, 1]
        return (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1

    x, y = centres(width).view(1, 1, width), centres(height).view(1, height, 1)
    t = theta.reshape(-1, 6, 1, 1)
    return torch.stack([t[:, 0] * x + t[:, 1] * y + t[:, 2], t[:, 3] * x + t[:, 4] * y + t[:, 5]], dim=-1)


def _colour_jitter(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors per photo, as torchvision's ColorJitter defines them."""
    n = images.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return _uniform(n, 1 - strength, 1 + strength, generator).clamp(min=0).to(images).view(n, 1, 1, 1)

    weights = torch.tensor([0.299, 0.587, 0.114]).to(images).view(1, 3, 1, 1)
    images = images * factor(config.brightness)
    grey = (images * weights).sum(1, keepdim=True)
    images = (images - grey.mean((2, 3), keepdim=True)) * factor(config.contrast) + grey.mean((2, 3), keepdim=True)
    grey = (images * weights).sum(1, keepdim=True)
    images = grey + (images - grey) * factor(config.saturation)
    return images.clamp(0, 1)


def _box_masks(n: int, height: int, width: int, side_h: torch.Tensor, side_w: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """(N, 1, H, W) boolean masks of one box per photo, sides in pixels, centre uniform (box clipped at edges)."""
    centre_y = torch.rand(n, generator=generator) * height
    centre_x = torch.rand(n, generator=generator) * width
    rows = torch.arange(height).view(1, height, 1) + 0.5
    cols = torch.arange(width).view(1, 1, width) + 0.5
    inside_y = (rows - centre_y.view(n, 1, 1)).abs() < side_h.view(n, 1, 1) / 2
    inside_x = (cols - centre_x.view(n, 1, 1)).abs() < side_w.view(n, 1, 1) / 2
    return (inside_y & inside_x).unsqueeze(1)


def _cutout(images: torch.Tensor, side: float, generator: torch.Generator) -> torch.Tensor:
    n, _, height, width = images.shape
    sides = torch.full((n,), side)
    mask = _box_masks(n, height, width, sides * height, sides * width, generator).to(images.device)
    return images.masked_fill(mask, 0.5)


def mix_batch(images: torch.Tensor, targets: torch.Tensor, config: AugmentConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of them per batch when both are on): each photo with another of the batch.

    `targets` are float label distributions: (N,) probabilities of class 1 for two classes, (N, C) otherwise.
    """
    if not config.mixes:
        return images, targets
    n, _, height, width = images.shape
    use_cutmix = config.cutmix > 0 and (config.mixup == 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = config.cutmix if use_cutmix else config.mixup
    # torch's Beta sampler takes no generator; numpy's, seeded from this one, keeps the draws reproducible.
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(alpha, alpha))
    partner = torch.randperm(n, generator=generator).to(images.device)
    if use_cutmix:
        side = torch.full((1,), math.sqrt(1 - lam))
        mask = _box_masks(1, height, width, side * height, side * width, generator).to(images.device)
        images = torch.where(mask, images[partner], images)
        lam = 1 - float(mask.float().mean())  # the area actually kept, after clipping at the edges
    else:
        images = lam * images + (1 - lam) * images[partner]
    return images, lam * targets + (1 - lam) * targets[partner]
