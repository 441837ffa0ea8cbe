"""Heat maps: where in a photo the answer comes from, drawn without torch.

For bundles with class activation maps (the pretrained models), the graph itself outputs the head
applied at every position of the last feature map (CAM); the map of the predicted class is scaled to
[0, 1] and laid over the photo as the model saw it. `catdogcnn explain PHOTO... --out DIR` writes them.
"""

from __future__ import annotations

import base64
import io
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


def explain_to_folder(classifier: Classifier, photos: list[Path], out_dir: Path) -> list[tuple[Prediction, Path]]:
    """Write `<photo stem>.heatmap.png` for each photo into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for photo in photos:
        prediction, image = explain(classifier, photo)
        path = out_dir / f"{Path(photo).stem}.heatmap.png"
        image.save(path)
        written.append((prediction, path))
    return written
