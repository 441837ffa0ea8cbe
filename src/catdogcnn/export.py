"""Model bundle: an ONNX graph (uint8 photos in, class probabilities out) plus a JSON file about it.

Bundle folder layout: `bundle.json` and `model-<sha12>.onnx`. The JSON names the graph file and its
sha256 and is written last, by an atomic rename: a bundle is either the old one or the new one,
never a half-written mix, whatever moment a crash or kill strikes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from catdogcnn.models import Normalize, logits_to_probabilities
from catdogcnn.predict import ACTIVATION_OUTPUT_NAME, IMAGENET_OUTPUT_NAME, OUTPUT_NAME

BUNDLE_FORMAT = 1
INPUT_NAME = "image"


class InferenceModel(nn.Module):
    """uint8 photos (N, H, W, 3) -> class probabilities (N, C): what the ONNX graph computes.

    A pretrained-backbone model (`forward_all`) also outputs the 1000 ImageNet probabilities and the class
    activation maps (N, logits, h, w) that heat maps are drawn from.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.all_outputs = hasattr(model, "forward_all")
        self.output_names = ([OUTPUT_NAME, IMAGENET_OUTPUT_NAME, ACTIVATION_OUTPUT_NAME] if self.all_outputs
                             else [OUTPUT_NAME])

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.normalize(image.permute(0, 3, 1, 2).float() / 255)
        if self.all_outputs:
            logits, imagenet, activation = self.model.forward_all(x)
            return logits_to_probabilities(logits), torch.softmax(imagenet, dim=1), activation
        return logits_to_probabilities(self.model(x))


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a bundle is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return buffer.getvalue()


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


def write_bundle(out_dir: Path, onnx_bytes: bytes, metadata: dict, outputs: list[str]) -> Path:
    """Write graph then JSON atomically into `out_dir`; remove graphs no longer referenced. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    graph_name = f"model-{sha[:12]}.onnx"
    atomic_write(out_dir / graph_name, onnx_bytes)
    metadata = {"format": BUNDLE_FORMAT, **metadata, "graph": {"file": graph_name, "sha256": sha,
                                                              "input": INPUT_NAME, "outputs": outputs}}
    metadata.setdefault("model_id", f"{metadata.get('architecture', 'model')}-{sha[:8]}")
    atomic_write(out_dir / "bundle.json", (json.dumps(metadata, indent=2) + "\n").encode())
    for stale in out_dir.glob("model-*.onnx"):
        if stale.name != graph_name:
            stale.unlink(missing_ok=True)
    return out_dir


def export_bundle(model: nn.Module, out_dir: Path, *, image_size: int, mean: tuple[float, ...],
                  std: tuple[float, ...], parity_images: np.ndarray, metadata: dict) -> Path:
    """Export `model` (logits) as a bundle after checking ONNX parity on real photos."""
    module = InferenceModel(model, mean, std)
    onnx_bytes = to_onnx(module, image_size, module.output_names)
    diff = check_parity(module, onnx_bytes, parity_images)
    export_info = {"parity_max_abs_diff": diff, "torch": torch.__version__}
    return write_bundle(out_dir, onnx_bytes, {**metadata, "export": export_info}, module.output_names)


def float_bundle_metadata(bundle_dir: Path) -> dict:
    """A bundle's metadata, or a ValueError when it is already int8 (callers check before decoding photos)."""
    from catdogcnn.predict import read_bundle_metadata

    metadata = read_bundle_metadata(bundle_dir)
    if "quantization" in metadata:
        raise ValueError(f"{bundle_dir}: already quantized")
    return metadata


def float_head_nodes(graph: onnx.ModelProto) -> list[str]:
    """The nodes `quantize_bundle` leaves in float: after the last matrix product on the way to each probability
    output, and the class head's product itself (one weight per feature and class).

    In int8 the probabilities would be steps of 1/255 (most photos exactly 0 or 1), and the class logits' 256
    levels steps of about 3% near the threshold; neither saves measurable time. The ImageNet head's product
    (1.3M weights) stays int8: only its softmax is float.
    """
    producer = {name: node for node in graph.graph.node for name in node.output}
    head: list[str] = []
    for output, with_product in ((OUTPUT_NAME, True), (IMAGENET_OUTPUT_NAME, False)):
        pending = [output]
        while pending:
            node = producer.get(pending.pop())
            if node is None or node.name in head:
                continue
            product = node.op_type in ("Gemm", "MatMul", "Conv")
            if with_product or not product:
                head.append(node.name)
            if not product:
                pending.extend(node.input)
    return head


def quantize_bundle(bundle_dir: Path, out_dir: Path, calibration_images: np.ndarray, check_images: np.ndarray,
                    check_labels: np.ndarray) -> Path:
    """Write an int8 copy of a bundle (onnxruntime static quantization, QDQ, per-channel weights).

    Activation ranges come from `calibration_images` (training photos); the float and int8 graphs are then
    compared on `check_images` (validation photos): agreement of labels, largest probability change and both
    accuracies go into the new bundle's metadata, whose validation metrics become the int8 graph's. The
    "neither" cut is set again from the int8 graph's ImageNet probabilities of those photos.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from catdogcnn.calibration import neither_threshold
    from catdogcnn.predict import decide, run_graph

    metadata = float_bundle_metadata(bundle_dir)
    graph_in, outputs = metadata["graph"]["input"], metadata["graph"]["outputs"]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(np.asarray(calibration_images), max(1, len(calibration_images) // 32)))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {graph_in: batch}

    float_graph = Path(bundle_dir) / metadata["graph"]["file"]
    heads = float_head_nodes(onnx.load(float_graph))
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(float_graph, Path(tmp) / "int8.onnx", Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=heads)
        onnx_bytes = (Path(tmp) / "int8.onnx").read_bytes()

    tta = bool(metadata.get("tta", False))  # check the graphs as the bundle predicts: with mirror averaging if on

    def run_all(graph: bytes) -> list[np.ndarray]:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        batches = np.array_split(np.asarray(check_images), max(1, len(check_images) // 16))
        return [np.concatenate(parts)
                for parts in zip(*(run_graph(session, graph_in, outputs, b, tta) for b in batches), strict=True)]

    (original, *_), (int8, *int8_rest) = run_all(float_graph.read_bytes()), run_all(onnx_bytes)
    labels_float, labels_int8 = decide(original, metadata["threshold"]), decide(int8, metadata["threshold"])
    check_labels = np.asarray(check_labels)
    checked_on = f"{len(check_images)} validation photos" + (", averaged with the mirror image" if tta else "")
    info = {"method": "onnxruntime static int8 (QDQ, per-channel weights, uint8 activations, min-max ranges)",
            "calibration_photos": len(calibration_images), "checked_on": checked_on,
            "label_agreement": float((labels_float == labels_int8).mean()),
            "max_probability_change": float(np.abs(original - int8).max()),
            "val_accuracy_float": float((labels_float == check_labels).mean()),
            "val_accuracy_int8": float((labels_int8 == check_labels).mean())}
    kept = {k: v for k, v in metadata.items() if k not in ("graph", "model_id")}
    kept["metrics"] = {**metadata.get("metrics", {}), "val_accuracy": info["val_accuracy_int8"]}
    kept["metrics"].pop("val_log_loss", None)  # a float-graph figure; the int8 graph's differs
    if "neither" in kept:  # the int8 ImageNet head gives slightly different pet probabilities: cut again
        mass = int8_rest[outputs.index(IMAGENET_OUTPUT_NAME) - 1][:, kept["neither"]["pet_indices"]].sum(1)
        threshold = neither_threshold(mass)
        kept["neither"] = {**kept["neither"], "min_pet_probability": threshold,
                           "val_pets_flagged": float((mass < threshold).mean())}
    return write_bundle(out_dir, onnx_bytes, {**kept, "quantization": info}, outputs)

