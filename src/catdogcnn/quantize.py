"""int8 copies of a bundle: onnxruntime's static quantizer, checked against the float graph.

`quantize` is the whole `catdogcnn quantize` command: the bundle's own training and validation photos, found
again from the training configuration it records, then `quantize_bundle`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra

with needs_extra("train"):
    import onnx

from catdogcnn.bundle import (
    IMAGENET_OUTPUT_NAME,
    NEITHER_OUTPUT_NAME,
    OUTPUT_NAME,
    find_bundle,
    neither_rules,
    read_bundle_metadata,
    write_bundle,
)
from catdogcnn.calibration import calibrated_evidence, decide, neither_cut, neither_threshold
from catdogcnn.predict import run_graph


def quantize(bundle: str | Path, data_dir: str | Path, out: str | Path, calibration_photos: int = 512) -> Path:
    """Write an int8 copy of `bundle` to `out`: activation ranges from `calibration_photos` training photos of
    `data_dir`, the check on the bundle's own validation photos (as its recorded training configuration
    chose them). Returns the new bundle's folder."""
    from catdogcnn.train import TrainConfig, prepare_data

    bundle = find_bundle(bundle)
    meta = float_bundle_metadata(bundle)
    if "config" not in meta.get("training", {}):
        raise UserError(f"{bundle}: the bundle records no training configuration, so its validation photos "
                        "are unknown")
    config = TrainConfig.from_dict(meta["training"]["config"])
    dataset = prepare_data(data_dir, config, meta["input"]["image_size"], meta["input"]["resize"])
    pick = np.sort(np.random.default_rng(config.seed).permutation(len(dataset.train))[:calibration_photos])
    return quantize_bundle(bundle, out, dataset.train.images[pick], dataset.val.images, dataset.val.labels)


def float_bundle_metadata(bundle_dir: Path) -> dict:
    """A bundle's metadata, or a UserError when it is already int8 (callers check before decoding photos)."""
    metadata = read_bundle_metadata(bundle_dir)
    if "quantization" in metadata:
        raise UserError(f"{bundle_dir}: already quantized")
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
    for output, with_product in ((OUTPUT_NAME, True), (NEITHER_OUTPUT_NAME, True), (IMAGENET_OUTPUT_NAME, False)):
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
    "neither" rules that read the graph have their cuts set again from its outputs for those photos.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

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

    (original, *float_rest), (int8, *int8_rest) = run_all(float_graph.read_bytes()), run_all(onnx_bytes)
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
    if "neither" in kept:  # the int8 graph's "neither" scores differ slightly: each rule's cut is set again
        kept["neither"] = _recut_neither(kept["neither"], metadata, dict(zip(outputs[1:], float_rest, strict=True)),
                                         dict(zip(outputs[1:], int8_rest, strict=True)))
    return write_bundle(out_dir, onnx_bytes, {**kept, "quantization": info}, outputs)



def _recut_neither(entry: dict, metadata: dict, float_outputs: dict[str, np.ndarray],
                   int8_outputs: dict[str, np.ndarray]) -> dict:
    """The "neither" rules with their cuts set again on the int8 graph's outputs for the validation photos, to
    turn away the same share of them as before; a `calibrated` rule, whose cut was also set on photos of other
    collections, has its bias moved by the median change of its evidence on these photos."""
    rules, flagged = [], False
    for rule in neither_rules(metadata):
        if rule["kind"] == "blank":  # reads the photo, not the graph: nothing to set again
            rules.append(rule)
        elif rule["kind"] == "calibrated":  # moved by how far int8 moves the evidence of the same photos
            before, after = calibrated_evidence(rule, float_outputs), calibrated_evidence(rule, int8_outputs)
            shift = float(np.median(after - before))
            rules.append({**rule, "weights": {**rule["weights"], "bias": rule["weights"]["bias"] - shift}})
            flagged = flagged | (after - shift > 0)
        elif rule["kind"] == "imagenet":
            mass = int8_outputs[rule["output"]][:, rule["pet_indices"]].sum(1)
            rules.append({**rule, "min_pet_probability": neither_threshold(mass)})
            flagged = flagged | (mass < rules[-1]["min_pet_probability"])
        else:
            scores = int8_outputs[rule["output"]][:, 0]
            rules.append({**rule, "max": neither_cut(scores, entry.get("target_pets_flagged", 0.01))})
            flagged = flagged | (scores > rules[-1]["max"])
    # The float graph's figures on held-out "neither" photos are left out: they are not this graph's.
    return {**{k: v for k, v in entry.items() if k in ("fitted_on", "target_pets_flagged", "photos", "pet_photos",
                                                        "chosen")},
            "rules": rules, "val_pets_flagged": float(np.mean(flagged)), "requantized": True}

