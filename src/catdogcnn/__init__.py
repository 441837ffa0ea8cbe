"""catdogcnn: a cats-vs-dogs image classifier.

    from catdogcnn import load_classifier
    print(load_classifier().predict("photo.jpg"))

Importing the package loads numpy, Pillow and onnxruntime only; torch is needed to train and export.
"""

from catdogcnn.data import BadImageError
from catdogcnn.errors import UserError
from catdogcnn.predict import BundleError, Classifier, Prediction, load_classifier

__all__ = ["BadImageError", "BundleError", "Classifier", "Prediction", "UserError", "load_classifier"]
__version__ = "0.1.0"
