"""catdogcnn: a cats-vs-dogs image classifier.

    from catdogcnn import load_classifier
    print(load_classifier().predict("photo.jpg"))

Importing the package loads numpy, Pillow and onnxruntime only; torch is needed to train and export.
"""

import importlib.metadata

from catdogcnn.data import BadImageError
from catdogcnn.errors import UserError
from catdogcnn.predict import BundleError, Classifier, Prediction, load_classifier

__all__ = ["BadImageError", "BundleError", "Classifier", "Prediction", "UserError", "load_classifier"]
try:  # the version is pyproject.toml's, as installed
    __version__ = importlib.metadata.version("catdogcnn")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
