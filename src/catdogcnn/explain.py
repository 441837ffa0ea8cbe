"""Heat maps: where in a photo the answer comes from, drawn without torch.

For bundles with class activation maps (the pretrained models), the graph itself outputs the head
applied at every position of the last feature map (CAM); the map of the predicted class is scaled to
[0, 1] and laid over the photo as the model saw it. `catdogcnn explain PHOTO... --out DIR` writes them, one
file per photo, named after the photo's path under the folder that holds them all.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from catdogcnn.data import ImageSource, source_name
from catdogcnn.predict import Classifier, Prediction

# A dark-blue -> red -> yellow ramp (like Matplotlib's "inferno"), 5 stops interpolated: enough for a heat map,
# and it keeps inference free of a plotting library.
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours."""
    position = np.clip(heat, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_STOPS) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * _STOPS[low] + weight * _STOPS[low + 1]).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heat map (any resolution) stretched over `image` (H, W, 3) and blended in."""
    h, w = image.shape[:2]
    smooth = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC))
    colours = colorize(smooth / 255.0)
    return Image.fromarray(((1 - alpha) * image + alpha * colours).round().astype(np.uint8))


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def explain(classifier: Classifier, photo: ImageSource) -> tuple[Prediction, Image.Image]:
    """The prediction for one photo and its heat map over the photo as the model saw it."""
    image = classifier.preprocess(photo)
    prediction = classifier.predict_decoded(image[None], [source_name(photo)], explain=True)[0]
    return prediction, overlay(image, prediction.heatmap)


def heatmap_paths(photos: list[Path], out_dir: Path) -> list[Path]:
    """Where each photo's heat map goes, one file per photo: its path under the folder that holds all the photos,
    with `.heatmap.png` for its suffix (two `photo.jpg` in different folders keep a map each). A name that would
    come twice (`photo.jpg` beside `photo.png`, a photo given twice) takes `-2`, `-3`, ... after its stem."""
    # abspath, not resolve: `a/../b` is `b`, and a link to a photo elsewhere stays under the folder it was given in
    folders = [Path(os.path.abspath(photo)).parent for photo in photos]
    common = Path(os.path.commonpath(folders)) if folders else Path()
    taken: set[Path] = set()
    paths = []
    for photo, folder in zip(photos, folders, strict=True):
        stem = folder.relative_to(common) / Path(photo).stem
        name, repeat = stem, 1
        while name in taken:
            repeat += 1
            name = stem.with_name(f"{stem.name}-{repeat}")
        taken.add(name)
        paths.append(out_dir / f"{name}.heatmap.png")
    return paths


def save_heatmap(classifier: Classifier, photo: ImageSource, path: Path) -> Prediction:
    """Explain one photo and write its heat map to `path` (its folder made if need be); the prediction."""
    prediction, image = explain(classifier, photo)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return prediction


def explain_to_folder(classifier: Classifier, photos: list[Path], out_dir: Path) -> list[tuple[Prediction, Path]]:
    """Write each photo's heat map into `out_dir`, named as `heatmap_paths` says; (prediction, path) per photo."""
    paths = heatmap_paths(photos, Path(out_dir))
    return [(save_heatmap(classifier, photo, path), path) for photo, path in zip(photos, paths, strict=True)]
