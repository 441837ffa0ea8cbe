from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from catdogcnn.augment import PRESETS, AugmentConfig, _affine_grid, _warp_cpu, augment_batch, mix_batch, parse_augment

# Each augmentation switched on alone, at a typical strength.
SINGLE = {
    "hflip": AugmentConfig(hflip=True),
    "shear_degrees": AugmentConfig(shear_degrees=15),
    "zoom": AugmentConfig(zoom=0.2),
    "crop_area": AugmentConfig(crop_area=0.3, crop_ratio=4 / 3),
    "brightness": AugmentConfig(brightness=0.4),
    "contrast": AugmentConfig(contrast=0.4),
    "saturation": AugmentConfig(saturation=0.4),
    "cutout": AugmentConfig(cutout=0.3),
    "mixup": AugmentConfig(mixup=0.4),
    "cutmix": AugmentConfig(cutmix=1.0),
}
CONFIGS = {**{f"preset {k}": v for k, v in PRESETS.items()}, **SINGLE,
           "everything": replace(PRESETS["strong"], mixup=0.2, cutmix=1.0)}


def batch() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]).float()


def apply(config: AugmentConfig, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return mix_batch(augment_batch(batch().to(device), config, generator), labels().to(device), config, generator)


def test_every_field_is_tested():
    assert set(SINGLE) | {"crop_ratio"} == {f.name for f in fields(AugmentConfig)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_ranges_and_labels_are_kept(name):
    x, y = apply(CONFIGS[name], 1)
    assert x.shape == batch().shape and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y.shape == labels().shape and y.min() >= 0 and y.max() <= 1
    if not CONFIGS[name].mixes:
        assert torch.equal(y, labels())
    assert torch.isclose(y.sum(), labels().sum(), atol=1e-5)  # mixing with a permutation keeps the label mass


@pytest.mark.parametrize("name", [k for k in CONFIGS if k != "preset none"])
def test_deterministic_under_a_seed_and_changes_the_photos(name):
    a, b, c = apply(CONFIGS[name], 3), apply(CONFIGS[name], 3), apply(CONFIGS[name], 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], batch())


def test_off_is_a_no_op():
    x, y = batch(), labels()
    generator = torch.Generator().manual_seed(0)
    assert augment_batch(x, PRESETS["none"], generator) is x
    assert mix_batch(x, y, PRESETS["none"], generator) == (x, y)
    for config in SINGLE.values():  # a field at zero switches its augmentation off
        off = replace(config, **{f.name: f.default for f in fields(AugmentConfig)})
        assert off.is_identity


def test_flip_alone_is_exact():
    x = batch()
    y = augment_batch(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    assert any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for height, width in [(64, 64), (24, 40), (1, 7)]:
        expected = F.affine_grid(theta, [5, 3, height, width], align_corners=False)
        torch.testing.assert_close(_affine_grid(theta, height, width), expected)


@pytest.mark.usefixtures("cpu_kernels")
def test_cpu_warp_matches_grid_sample():
    """Identity, mirror, shear, zoom in and out (past the border), crops and random maps; any input layout."""
    g = torch.Generator().manual_seed(0)
    theta = torch.cat([torch.tensor([[1.0, 0, 0, 0, 1, 0], [-1, 0, 0, 0, 1, 0], [1, 0.3, 0, 0, 1, 0],
                                     [1.4, 0, 0, 0, 0.7, 0], [0.5, 0, 0.5, 0, 0.5, -0.4]]),
                       torch.randn(11, 6, generator=g)]).view(16, 2, 3)
    photos = torch.rand(16, 48, 40, 3, generator=g)  # stored (N, H, W, C), as the training batches are
    for images in (photos.permute(0, 3, 1, 2), photos.permute(0, 3, 1, 2).contiguous()):
        expected = F.grid_sample(images, F.affine_grid(theta, list(images.shape), align_corners=False),
                                 mode="bilinear", padding_mode="border", align_corners=False)
        ours = _warp_cpu(images, theta)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_warp_cpu(images, theta[:1].expand(16, 2, 3)), images, rtol=0, atol=2e-6)


def test_cutout_paints_a_grey_square():
    x = torch.zeros(4, 3, 20, 20)
    y = augment_batch(x, AugmentConfig(cutout=0.5), torch.Generator().manual_seed(0))
    grey = (y == 0.5).all(1).float().mean((1, 2))
    assert ((grey > 0) & (grey <= 0.25 + 1e-6)).all()


def test_mixup_blends_photos_and_labels_alike():
    x = torch.stack([torch.full((3, 4, 4), float(i % 2)) for i in range(8)])  # photo value == its label
    y = torch.tensor([float(i % 2) for i in range(8)])
    mixed, targets = mix_batch(x, y, AugmentConfig(mixup=1.0), torch.Generator().manual_seed(5))
    assert torch.allclose(mixed.mean((1, 2, 3)), targets, atol=1e-6)


def test_multiclass_targets_stay_distributions():
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()
    _, targets = mix_batch(torch.rand(4, 3, 8, 8), y, AugmentConfig(cutmix=1.0), torch.Generator().manual_seed(2))
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_parse_augment():
    assert parse_augment("seed") == PRESETS["seed"]
    assert parse_augment("crop, cutout=0.25,mixup=0.2") == replace(PRESETS["crop"], cutout=0.25, mixup=0.2)
    assert parse_augment("none,hflip=true").hflip
    for bad in ("fancy", "seed,colour=1", "seed,cutout", "seed,cutout=big", "seed,crop_area=0", "seed,zoom=-1"):
        with pytest.raises(ValueError):
            parse_augment(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_gpu_batch_is_augmented_as_on_the_cpu(name):
    """The random draws stay on the CPU generator, so a seed gives the same augmentation on either device."""
    cpu_images, cpu_labels = apply(CONFIGS[name], 0)
    gpu_images, gpu_labels = apply(CONFIGS[name], 0, "cuda")
    assert gpu_images.device.type == "cuda"
    torch.testing.assert_close(gpu_images.cpu(), cpu_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu_labels.cpu(), cpu_labels)
