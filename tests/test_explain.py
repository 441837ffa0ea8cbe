from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdogcnn.bundle import BundleError, bundled_models_dir
from catdogcnn.explain import colorize, explain, explain_to_folder, overlay, png_data_url
from catdogcnn.predict import Classifier


def test_colour_ramp_runs_dark_to_bright():
    colours = colorize(np.linspace(0, 1, 11)[None, :])[0].astype(int)
    assert colours.shape == (11, 3) and colours.dtype == np.int64
    assert colours[0].sum() < 20 and colours[-1].sum() > 600
    assert all(a <= b for a, b in zip(colours.sum(1), colours.sum(1)[1:], strict=False))


def test_overlay_keeps_the_photo_size():
    image = np.full((40, 60, 3), 128, np.uint8)
    out = overlay(image, np.eye(3))
    assert out.size == (60, 40) and png_data_url(out).startswith("data:image/png;base64,")


def test_the_heat_map_is_hottest_where_the_dog_is(real_data, tmp_path):
    """A dog photo in one quadrant of a grey canvas: the map of the "dog" answer is hottest in that quadrant."""
    dog = Image.open(real_data / "test_set" / "dogs" / "dog.4008.jpg").resize((180, 180))
    for corner, (x, y) in enumerate([(0, 0), (180, 0), (0, 180), (180, 180)]):
        canvas = Image.new("RGB", (360, 360), (128, 128, 128))
        canvas.paste(dog, (x, y))
        canvas.save(tmp_path / "canvas.png")
        prediction, _ = explain(Classifier(bundled_models_dir() / "default"), tmp_path / "canvas.png")
        heat, half = prediction.heatmap, prediction.heatmap.shape[0] // 2
        quadrants = [heat[:half, :half], heat[:half, half:], heat[half:, :half], heat[half:, half:]]
        assert prediction.label == "dogs"
        assert int(np.argmax([q.mean() for q in quadrants])) == corner


def test_explain_writes_files_and_refuses_models_without_maps(tmp_path, tiny_bundle):
    Image.new("RGB", (50, 50), (200, 100, 50)).save(tmp_path / "x.png")
    (prediction, path), = explain_to_folder(Classifier(bundled_models_dir() / "default"), [tmp_path / "x.png"],
                                            tmp_path / "out")
    assert path.exists() and Image.open(path).size == (260, 260) and prediction.heatmap.max() <= 1
    with pytest.raises(BundleError, match="no class activation"):
        explain(Classifier(tiny_bundle), tmp_path / "x.png")
