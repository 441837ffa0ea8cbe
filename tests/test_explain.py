from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdogcnn.bundle import BundleError, bundled_models_dir
from catdogcnn.explain import colorize, explain, explain_to_folder, heatmap_paths, overlay, png_data_url
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
    shipped = Classifier(bundled_models_dir() / "default")
    (prediction, path), = explain_to_folder(shipped, [tmp_path / "x.png"], tmp_path / "out")
    size = shipped.image_size  # the map is drawn over the photo as the model saw it
    assert path.exists() and Image.open(path).size == (size, size) and prediction.heatmap.max() <= 1
    with pytest.raises(BundleError, match="no class activation"):
        explain(Classifier(tiny_bundle), tmp_path / "x.png")


def test_heat_maps_are_named_by_the_photo_s_path_and_never_share_a_file(tmp_path):
    out = tmp_path / "out"
    assert heatmap_paths([tmp_path / "x.jpg"], out) == [out / "x.heatmap.png"]
    photos = [tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg", tmp_path / "b" / "photo.png",
              tmp_path / "b" / "photo.jpg", tmp_path / "b" / "photo-2.jpg", tmp_path / "a" / ".." / "c" / "y.jpg"]
    names = [path.relative_to(out).as_posix() for path in heatmap_paths(photos, out)]
    assert names == ["a/photo.heatmap.png", "b/photo.heatmap.png", "b/photo-2.heatmap.png", "b/photo-3.heatmap.png",
                     "b/photo-2-2.heatmap.png", "c/y.heatmap.png"]


def test_two_photos_of_one_name_keep_a_heat_map_each(tmp_path):
    for folder, colour in (("a", (200, 100, 50)), ("b", (30, 60, 220))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (50, 50), colour).save(tmp_path / folder / "photo.png")
    written = explain_to_folder(Classifier(bundled_models_dir() / "default"),
                                [tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png"], tmp_path / "out")
    paths = [path for _, path in written]
    assert paths == [tmp_path / "out" / "a" / "photo.heatmap.png", tmp_path / "out" / "b" / "photo.heatmap.png"]
    assert np.asarray(Image.open(paths[0])).tolist() != np.asarray(Image.open(paths[1])).tolist()
