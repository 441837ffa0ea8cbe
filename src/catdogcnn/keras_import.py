"""Import a Keras Sequential CNN (legacy `.h5` or Keras 3 `.keras`) as a model bundle, without TensorFlow.

Supported layers: InputLayer, Conv2D, MaxPooling2D, Dropout, Flatten, Dense, Activation, ReLU, with
relu/sigmoid/softmax/tanh/linear activations, channels-last. The model must end in a sigmoid (one
unit: two classes) or a softmax. The bundle records Keras's preprocessing (nearest-neighbour resize,
as `keras.utils.load_img`, and x / 255) so predictions match Keras's.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra

with needs_extra("keras"):
    import torch
    from torch import nn

    from catdogcnn.export import export_bundle
    from catdogcnn.models.efficientnet_lite import SameConv2d
    from catdogcnn.models.seed_cnn import FlattenChannelsLast

SUPPORTED = ("InputLayer", "Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Activation", "ReLU")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softmax": lambda: nn.Softmax(dim=1), "tanh": nn.Tanh,
               "linear": None}


class KerasImportError(UserError):
    """A Keras file that cannot be imported; the message is one line naming the file and the reason."""


def _read(path: Path) -> tuple[dict, dict[str, list[np.ndarray]], str]:
    """(model config, layer name -> weights in Keras order, Keras version) from an .h5 or .keras file."""
    with needs_extra("keras"):
        import h5py

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
                meta = json.loads(archive.read("metadata.json")) if "metadata.json" in archive.namelist() else {}
                with archive.open("model.weights.h5") as raw, h5py.File(raw, "r") as f:
                    layers = f["layers"] if "layers" in f else f["_layer_checkpoint_dependencies"]
                    weights = {name: [np.array(group["vars"][k]) for k in sorted(group["vars"], key=int)]
                               for name, group in layers.items() if "vars" in group}
            return config, weights, meta.get("keras_version", "3")
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise KerasImportError(f"{path}: no model_config in the file (weights only? save the whole model)")
            config = json.loads(f.attrs["model_config"])
            group = f.get("model_weights", f)
            weights = {}
            for name in group.attrs.get("layer_names", []):
                name = name.decode() if isinstance(name, bytes) else name
                layer = group[name]
                names = [n.decode() if isinstance(n, bytes) else n for n in layer.attrs.get("weight_names", [])]
                weights[name] = [np.array(layer[n]) for n in names]
            version = f.attrs.get("keras_version", "?")
            return config, weights, version.decode() if isinstance(version, bytes) else str(version)
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise KerasImportError(f"{path}: not a readable Keras model file ({type(e).__name__}: {e})") from None


def _activation(path: Path, layer: str, name: str | None) -> list[nn.Module]:
    name = name or "linear"
    if name not in ACTIVATIONS:
        raise KerasImportError(f"{path}: layer {layer!r} has activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    make = ACTIVATIONS[name]
    return [make()] if make else []


def build_torch_model(path: Path) -> tuple[nn.Sequential, int, int, str]:
    """(torch module returning logits, input size, number of outputs, Keras version)."""
    path = Path(path)
    config, weights, version = _read(path)
    if config.get("class_name") != "Sequential":
        raise KerasImportError(f"{path}: a {config.get('class_name')!r} model; only Sequential models import "
                               "(functional or branched models are not supported)")
    body = config["config"]
    layers = body["layers"] if isinstance(body, dict) else body  # Keras 2 stored a bare list
    modules: list[nn.Module] = []
    channels, input_shape, flat = None, None, None
    for layer in layers:
        kind, c = layer["class_name"], layer["config"]
        name = c.get("name", kind)
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape and input_shape is None:
            input_shape = shape[1:]
            channels = input_shape[-1]
        if kind not in SUPPORTED:
            raise KerasImportError(f"{path}: layer {name!r} is a {kind}; supported: {', '.join(SUPPORTED)}")
        if c.get("data_format", "channels_last") != "channels_last":
            raise KerasImportError(f"{path}: layer {name!r} is channels_first; only channels_last is supported")
        if kind == "InputLayer":
            continue
        if input_shape is None:
            raise KerasImportError(f"{path}: the model does not state its input shape")
        w = weights.get(name, [])
        if kind == "Conv2D":
            if tuple(c.get("dilation_rate", (1, 1))) != (1, 1) or c.get("groups", 1) != 1:
                raise KerasImportError(f"{path}: layer {name!r}: dilated or grouped convolutions are not supported")
            conv_type = SameConv2d if c["padding"] == "same" else nn.Conv2d
            conv = conv_type(channels, c["filters"], tuple(c["kernel_size"]), tuple(c["strides"]),
                             bias=c.get("use_bias", True))
            conv.weight.data = torch.from_numpy(w[0]).permute(3, 2, 0, 1).contiguous()  # (kh, kw, in, out)
            if conv.bias is not None:
                conv.bias.data = torch.from_numpy(w[1])
            modules += [conv, *_activation(path, name, c.get("activation"))]
            channels = c["filters"]
        elif kind == "MaxPooling2D":
            if c.get("padding", "valid") != "valid":
                raise KerasImportError(f"{path}: layer {name!r}: only 'valid' max-pooling is supported")
            modules.append(nn.MaxPool2d(tuple(c["pool_size"]), tuple(c.get("strides") or c["pool_size"])))
        elif kind == "Dropout":
            continue  # inference only
        elif kind == "Flatten":
            modules.append(FlattenChannelsLast())
            flat = True
        elif kind == "Dense":
            if not flat:
                raise KerasImportError(f"{path}: layer {name!r}: Dense before Flatten is not supported")
            dense = nn.Linear(w[0].shape[0], c["units"], bias=c.get("use_bias", True))
            dense.weight.data = torch.from_numpy(w[0]).T.contiguous()  # Keras stores (in, out)
            if dense.bias is not None:
                dense.bias.data = torch.from_numpy(w[1])
            modules += [dense, *_activation(path, name, c.get("activation"))]
        elif kind in ("Activation", "ReLU"):
            modules += _activation(path, name, c.get("activation", "relu"))
    if not modules or not isinstance(modules[-1], (nn.Sigmoid, nn.Softmax)):
        raise KerasImportError(f"{path}: the model must end in a sigmoid or softmax activation")
    units = next(m for m in reversed(modules) if isinstance(m, nn.Linear)).out_features
    if isinstance(modules[-1], nn.Sigmoid) and units != 1:
        raise KerasImportError(f"{path}: a sigmoid output needs one unit, not {units}")
    if input_shape[0] != input_shape[1] or channels is None:
        raise KerasImportError(f"{path}: input shape {input_shape}: only square RGB inputs are supported")
    if input_shape[2] != 3:
        raise KerasImportError(f"{path}: input shape {input_shape}: only 3-channel (RGB) inputs are supported")
    modules.pop()  # the bundle applies the sigmoid/softmax itself, on these logits
    return nn.Sequential(*modules).eval(), int(input_shape[0]), units, version


def import_keras(path: str | Path, out: str | Path, classes: list[str] | None = None) -> Path:
    """Convert a Keras model file to a bundle at `out`; returns the bundle folder."""
    path = Path(path)
    if not path.exists():
        raise KerasImportError(f"{path}: no such file")
    model, size, units, version = build_torch_model(path)
    n_classes = 2 if units == 1 else units
    classes = classes or (["cats", "dogs"] if n_classes == 2 else [f"class_{i}" for i in range(n_classes)])
    if len(classes) != n_classes:
        raise KerasImportError(f"{path}: the model has {n_classes} classes but {len(classes)} names were given")
    probe = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    metadata = {
        "architecture": "keras_sequential",
        "classes": classes,
        "input": {"image_size": size, "resize": "nearest", "layout": "NHWC uint8 RGB", "mean": [0.0] * 3,
                  "std": [255.0] * 3, "preprocessing": "keras.utils.load_img (nearest) then x / 255"},
        "threshold": 0.5,
        "metrics": {},
        "training": {"imported_from": path.name, "keras_version": version,
                     "parameters": sum(p.numel() for p in model.parameters())},
    }
    return export_bundle(model, Path(out), image_size=size, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0),
                         parity_images=probe, metadata=metadata)
