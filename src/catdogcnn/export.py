"""Export to the bundle's ONNX graph (uint8 photos in, class probabilities out), checked against torch.

The bundle format itself (names, reading, writing) is `bundle.py`; int8 copies are `quantize.py`.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np

from catdogcnn.extras import needs_extra

with needs_extra("train"):
    import torch
    from torch import nn

from catdogcnn.bundle import (
    ACTIVATION_OUTPUT_NAME,
    IMAGENET_OUTPUT_NAME,
    INPUT_NAME,
    NEITHER_OUTPUT_NAME,
    OUTPUT_NAME,
    write_bundle,
)
from catdogcnn.models import Normalize, logits_to_probabilities


class InferenceModel(nn.Module):
    """uint8 photos (N, H, W, 3) -> class probabilities (N, C): what the ONNX graph computes.

    A pretrained-backbone model (`forward_all`) also outputs the 1000 ImageNet probabilities and the class
    activation maps (N, logits, h, w) that heat maps are drawn from; any model that learned "neither" (an
    `OpenSet` one included) also outputs the probability (N, 1) that the photo shows none of the classes.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.all_outputs = hasattr(model, "forward_all")
        self.open_set = getattr(model, "neither", None) is not None
        self.output_names = ([OUTPUT_NAME, IMAGENET_OUTPUT_NAME, ACTIVATION_OUTPUT_NAME] if self.all_outputs
                             else [OUTPUT_NAME]) + ([NEITHER_OUTPUT_NAME] if self.open_set else [])

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.normalize(image.permute(0, 3, 1, 2).float() / 255)
        if self.all_outputs:
            logits, imagenet, activation, neither = self.model.forward_all(x)
            outputs = (logits_to_probabilities(logits), torch.softmax(imagenet, dim=1), activation)
            return (*outputs, torch.sigmoid(neither)) if self.open_set else outputs
        if self.open_set:
            logits, neither = self.model(x, with_neither=True)
            return logits_to_probabilities(logits), torch.sigmoid(neither)
        return logits_to_probabilities(self.model(x))


def to_onnx(module: nn.Module, image_size: int, output_names: list[str]) -> bytes:
    """Export a module taking uint8 photos (N, S, S, 3), with a dynamic batch dimension."""
    module = module.eval().cpu()
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # it warns that torchvision ops are absent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=output_names,
                                    dynamic_shapes={"image": {0: batch}}, dynamo=True, optimize=True, verbose=False)
    program.save(buffer)
    return _without_source_locations(buffer.getvalue())


def _without_source_locations(onnx_bytes: bytes) -> bytes:
    """The graph without the exporter's notes on each node (Python stack traces naming the exporting machine's files):
    they change nothing that runs, and a bundle names no path of the machine that made it."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes)
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.metadata_props[:]
    return graph.SerializeToString()


def check_parity(module: InferenceModel, onnx_bytes: bytes, images: np.ndarray, tolerance: float = 1e-4) -> float:
    """Max |torch - onnxruntime| over `images` (uint8 NHWC); raises when above `tolerance`.

    Probabilities are compared as they are; unbounded outputs (activation maps) relative to their scale.
    """
    import onnxruntime as ort

    images = np.array(images, dtype=np.uint8)  # a private, writable copy (the input may be a read-only memmap)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module.eval().cpu()(torch.from_numpy(images))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(module.output_names, {INPUT_NAME: images})
    diff = max(float(np.abs(e.numpy() - g).max()) / max(1.0, float(np.abs(e.numpy()).max()))
               for e, g in zip(expected, got, strict=True))
    if not diff < tolerance:
        raise RuntimeError(f"ONNX export differs from the torch model by {diff:.2e} (> {tolerance:.0e})")
    return diff


def export_bundle(model: nn.Module, out_dir: Path, *, image_size: int, mean: tuple[float, ...],
                  std: tuple[float, ...], parity_images: np.ndarray, metadata: dict) -> Path:
    """Export `model` (logits) as a bundle after checking ONNX parity on real photos."""
    module = InferenceModel(model, mean, std)
    onnx_bytes = to_onnx(module, image_size, module.output_names)
    diff = check_parity(module, onnx_bytes, parity_images)
    export_info = {"parity_max_abs_diff": diff, "torch": torch.__version__}
    return write_bundle(out_dir, onnx_bytes, {**metadata, "export": export_info}, module.output_names)
