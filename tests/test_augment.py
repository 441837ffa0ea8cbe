from __future__ import annotations

import pytest
import torch

from catdogcnn.augment import PRESETS, AugmentConfig, augment_batch


def batch() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_and_ranges_are_kept(name):
    x = batch()
    y = augment_batch(x, PRESETS[name], torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1


def test_deterministic_under_a_seed():
    a = augment_batch(batch(), PRESETS["seed"], torch.Generator().manual_seed(3))
    b = augment_batch(batch(), PRESETS["seed"], torch.Generator().manual_seed(3))
    c = augment_batch(batch(), PRESETS["seed"], torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_off_is_a_no_op():
    x = batch()
    assert augment_batch(x, PRESETS["none"], torch.Generator()) is x


def test_flip_alone_is_exact():
    x = batch()
    y = augment_batch(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    assert any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))
