"""Real photos with no cat or dog, from the sample images that scikit-image and scikit-learn ship.

    python benchmarks/non_pet_photos.py OUT_DIR     # writes them as JPEG files (19 photos)

Used to measure how often the "neither" answer fires on non-pets (the target is >= 90%).
Synthetic drawings (checkerboards, blobs, logos) and the two cat photos (chelsea, cat) are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE = ["astronaut", "brick", "camera", "cell", "clock", "coffee", "coins", "grass", "gravel",
           "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "stereo_motorcycle",
           "text"]
SKLEARN = ["china.jpg", "flower.jpg"]


def write_non_pet_photos(out_dir: Path) -> list[Path]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SKIMAGE:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
        path = out_dir / f"skimage_{name}.jpg"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").save(path, quality=92)
        written.append(path)
    for name in SKLEARN:
        path = out_dir / f"sklearn_{name}"
        Image.fromarray(load_sample_image(name)).save(path, quality=92)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_non_pet_photos(Path(sys.argv[1] if len(sys.argv) > 1 else "non_pets")):
        print(p)
