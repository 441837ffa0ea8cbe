"""Inference on a model bundle with onnxruntime, numpy and Pillow (never torch).

    from catdogcnn import load_classifier
    clf = load_classifier()              # the shipped default model
    clf.predict("photo.jpg")             # Prediction(label='dog', confidence=0.97, ...)
    list(clf.predict_many(["a.jpg", "folder/"]))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from catdogcnn.bundle import (
    ACTIVATION_OUTPUT_NAME,
    IMAGENET_OUTPUT_NAME,
    METADATA_FILE,
    NEITHER_OUTPUT_NAME,
    OUTPUT_NAME,
    BundleError,
    default_bundle_path,
    find_bundle,
    graph_path,
    neither_rules,
    read_bundle_metadata,
    read_graph,
)
from catdogcnn.calibration import calibrated_evidence, decide, logit, sigmoid
from catdogcnn.data import (
    BadImageError,
    ImageSource,
    decode_image,
    decode_many,
    flat_photos,
    list_files,
    source_name,
)
from catdogcnn.errors import UserError

if TYPE_CHECKING:  # onnxruntime is imported when a Classifier is made: `import catdogcnn` stays quick
    import onnxruntime as ort

NEITHER = "neither"
# The graph outputs each kind of "neither" rule reads by default (`blank` reads the photo itself; `calibrated`
# also reads its `imagenet_output` when it has one), and the key of its cut in bundle.json.
RULE_OUTPUTS = {"blank": None, "learned": NEITHER_OUTPUT_NAME, "imagenet": IMAGENET_OUTPUT_NAME,
                "calibrated": NEITHER_OUTPUT_NAME}
RULE_CUTS = {"blank": "max_std", "learned": "max", "imagenet": "min_pet_probability", "calibrated": "max"}


@dataclass(frozen=True)
class Prediction:
    """One photo's answer. `confidence` is the probability of the answer `label`: `neither_probability` for
    "neither", else (1 - `neither_probability`) x the class's probability. `probabilities` are the classes'
    probabilities if the photo shows one of them; `neither_probability` (None for a model that never answers
    "neither") the probability that it shows none, as the bundle's rule gives it: "neither" is the answer when it
    is above one half."""

    source: str
    label: str | None
    confidence: float | None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    reason: str | None = None  # why the label is "neither": its probability and the rule's evidence
    neither_probability: float | None = None
    # Where in the photo the answer comes from: (h, w) in [0, 1] over the model's input; only when asked.
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def expand_photos(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders replaced by every non-hidden file inside them (recursively, sorted)."""
    return [found for p in map(Path, paths) for found in (list_files(p) if p.is_dir() else [p])]


def run_graph(session: ort.InferenceSession, input_name: str, names: list[str], images: np.ndarray,
              tta: bool) -> list[np.ndarray]:
    """A bundle graph's outputs `names` for uint8 photos (N, S, S, 3); with `tta`, each output is the average
    over the photo and its mirror image (one call on both views: twice the work)."""
    images = np.ascontiguousarray(images, np.uint8)
    if not tta:
        return session.run(names, {input_name: images})
    both = session.run(names, {input_name: np.concatenate([images, images[:, :, ::-1]])})
    n = len(images)
    # The mirrored view's activation maps are mirrored back before averaging.
    return [(out[:n] + (out[n:][..., ::-1] if name == ACTIVATION_OUTPUT_NAME else out[n:])) / 2
            for name, out in zip(names, both, strict=True)]


class Classifier:
    """A loaded bundle: one onnxruntime session, reused for every call."""

    def __init__(self, bundle: str | os.PathLike, threshold: float | None = None, threads: int | None = None,
                 neither: bool = True, tta: bool | None = None):
        import onnxruntime as ort

        self.bundle = find_bundle(bundle)
        self.metadata = read_bundle_metadata(self.bundle)
        graph = graph_path(self.bundle, self.metadata)
        graph_bytes = read_graph(self.bundle, self.metadata)
        self.classes: list[str] = list(self.metadata["classes"])
        self.image_size: int = int(self.metadata["input"]["image_size"])
        self.resize: str = self.metadata["input"].get("resize", "bilinear")
        self.threshold: float = float(self.metadata["threshold"] if threshold is None else threshold)
        if not 0 <= self.threshold <= 1:  # also rejects NaN
            if threshold is None:
                raise BundleError(f"{self.bundle}: bundle.json's threshold must be between 0 and 1, "
                                  f"not {self.threshold}")
            raise UserError(f"threshold must be between 0 and 1, not {self.threshold}")
        self.model_id: str = self.metadata.get("model_id", graph.stem)
        # Test-time augmentation: average over the photo and its mirror image (twice the work).
        self.tta: bool = bool(self.metadata.get("tta", False) if tta is None else tta)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(graph_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad graph
            raise BundleError(f"{graph}: onnxruntime cannot load the graph ({str(e).splitlines()[0]})") from None
        self._input = self.metadata["graph"]["input"]
        self._outputs = list(self.metadata["graph"]["outputs"])
        self._check_graph(graph)
        # "Neither" (none of the classes): the bundle's rules, each with the graph output it reads.
        self.neither_rules: list[dict] = neither_rules(self.metadata) if neither else []
        self._rule_outputs = [self._rule_output(rule) for rule in self.neither_rules]
        self._pet_indices = [np.asarray(rule.get("pet_indices", []), np.int64) for rule in self.neither_rules]
        self._outputs_used = list(dict.fromkeys([OUTPUT_NAME, *(o for outs in self._rule_outputs for o in outs)]))
        self.can_explain = ACTIVATION_OUTPUT_NAME in self._outputs
        self.warm_up(1)

    def _check_graph(self, graph: Path) -> None:
        """BundleError unless the graph takes bundle.json's input (uint8 photos of `image_size`) and gives its
        outputs, the class probabilities one per class: a bundle whose classes do not match its graph would
        load, then fail every photo."""
        where = f"{self.bundle / METADATA_FILE if self.bundle.is_dir() else self.bundle}"
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if self._input not in inputs:
            raise BundleError(f"{where}: 'graph.input' {self._input!r} is not an input of {graph.name} "
                              f"({', '.join(inputs)})")
        size = inputs[self._input][1:3]
        if all(isinstance(d, int) for d in size) and size != [self.image_size] * 2:
            raise BundleError(f"{where}: 'input.image_size' {self.image_size} is not the size {graph.name} takes "
                              f"({inputs[self._input][1]}x{inputs[self._input][2]})")
        missing = [name for name in self._outputs if name not in outputs]
        if missing or OUTPUT_NAME not in self._outputs:
            raise BundleError(f"{where}: 'graph.outputs' names {', '.join(missing or [OUTPUT_NAME])}, which "
                              f"{graph.name} does not output")
        width = outputs[OUTPUT_NAME][-1]
        if isinstance(width, int) and width != len(self.classes):
            raise BundleError(f"{where}: 'classes' names {len(self.classes)} classes, but {graph.name} gives "
                              f"{width} probabilities")

    def _rule_output(self, rule: dict) -> list[str]:
        """The graph outputs a "neither" rule reads (none: the photo); BundleError when bundle.json's rule cannot be
        applied."""
        where = f"{self.bundle / METADATA_FILE if self.bundle.is_dir() else self.bundle}: 'neither' rule"
        kind = rule.get("kind")
        if kind not in RULE_OUTPUTS:
            raise BundleError(f"{where} of unknown kind {kind!r} (known: {', '.join(RULE_OUTPUTS)})")
        reads_imagenet = kind == "imagenet" or "imagenet_output" in rule
        if RULE_CUTS[kind] not in rule or (reads_imagenet and not {"pet_indices", "imagenet_names"} <= set(rule)):
            raise BundleError(f"{where} {kind!r} lacks its cut or its ImageNet indices and names")
        if kind == "calibrated" and not {"learned", "bias"} <= set(rule.get("weights", {})):
            raise BundleError(f"{where} 'calibrated' lacks its weights")
        outputs = [o for o in (rule.get("output", RULE_OUTPUTS[kind]), rule.get("imagenet_output")) if o]
        for output in outputs:
            if output not in self._outputs:
                raise BundleError(f"{where} {kind!r} reads {output!r}, which the graph does not output")
        return outputs

    @property
    def neither_cuts(self) -> list[dict]:
        """What a client needs to know of the "neither" rules: each one's kind and cut (`blank`: the photo's
        standard deviation in every colour channel at most it, of 255; `calibrated`: the probability of "neither"
        above it; `learned`: the model's "neither" score above it; `imagenet`: the classes' ImageNet probability
        below it)."""
        return [{"kind": rule["kind"], "cut": float(rule[RULE_CUTS[rule["kind"]]])} for rule in self.neither_rules]

    def description(self) -> dict:
        """What a client needs of the model (the API's /v1/model): id, classes, input size, threshold, mirror
        averaging, validation metrics and "neither" rules (kind and cut; None when it never answers "neither")."""
        return {"model_id": self.model_id, "classes": self.classes, "image_size": self.image_size,
                "threshold": self.threshold, "tta": self.tta, "metrics": self.metadata.get("metrics"),
                "neither": {"rules": self.neither_cuts} if self.neither_rules else None}

    def __repr__(self) -> str:
        return f"Classifier({self.model_id!r}, classes={self.classes}, threshold={self.threshold})"

    def preprocess(self, photo: ImageSource) -> np.ndarray:
        return decode_image(photo, self.image_size, self.resize)

    def warm_up(self, batch_size: int, explain: bool = False) -> None:
        """Run one batch of `batch_size` blank photos: memory planning is paid now, and onnxruntime's memory
        arena reaches at once the size that batch needs, not during the first busy moments."""
        self._run(np.zeros((batch_size, self.image_size, self.image_size, 3), np.uint8), explain and self.can_explain)

    def _run(self, images: np.ndarray, explain: bool = False) -> list[np.ndarray]:
        """The graph's outputs in the order of `_outputs_used`, then the class activation maps if `explain`."""
        names = self._outputs_used + ([ACTIVATION_OUTPUT_NAME] if explain else [])
        return run_graph(self.session, self._input, names, images, self.tta)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for decoded uint8 photos (N, S, S, 3)."""
        return self._run(images)[0]

    def label(self, probabilities: np.ndarray) -> tuple[str, float]:
        index = int(decide(probabilities[None], self.threshold)[0])
        return self.classes[index], float(probabilities[index])

    def predict_decoded(self, images: np.ndarray, sources: list[str], explain: bool = False) -> list[Prediction]:
        """Predictions for decoded photos (N, S, S, 3) from `preprocess`, one model call for the batch.

        `explain` adds each prediction's heat map (bundles with class activation maps only).
        """
        if explain and not self.can_explain:
            raise BundleError(f"{self.bundle}: this model has no class activation output, so no heat maps")
        outputs = self._run(images, explain)
        by_name = dict(zip(self._outputs_used, outputs, strict=False))
        rule_scores = self._rule_scores(by_name)
        out = []
        for i, (source, probabilities) in enumerate(zip(sources, outputs[0], strict=True)):
            per_class = {c: float(p) for c, p in zip(self.classes, probabilities, strict=True)}
            label, confidence = self.label(probabilities)
            neither, fired, reason = self._neither(by_name, rule_scores, images[i], i)
            if fired:
                label, confidence = NEITHER, neither
            elif neither is not None:
                confidence *= 1 - neither
            heat = _heatmap(outputs[-1][i], self.classes, per_class) if explain else None
            out.append(Prediction(source, label, confidence, per_class, reason=reason, neither_probability=neither,
                                  heatmap=heat))
        return out

    def _rule_scores(self, outputs: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """For each "neither" rule, over the whole batch: (its probability of "neither", whether it fires, the
        score it reads); None for `blank`, which reads each photo.

        Each rule's probability is 0.5 at its cut: `calibrated` is a logistic regression fitted on held-out photos
        with its cut folded into the bias; `learned` and `imagenet` (earlier bundles) are their score's odds over
        their cut's."""
        scores: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        for rule, names, pet_indices in zip(self.neither_rules, self._rule_outputs, self._pet_indices, strict=True):
            if rule["kind"] == "blank":
                scores.append(None)
            elif rule["kind"] == "imagenet":
                cut = rule["min_pet_probability"]
                pet_mass = outputs[names[0]][:, pet_indices].sum(1)
                scores.append((sigmoid(logit(1 - pet_mass) - logit(1 - cut)), pet_mass < cut, pet_mass))
            else:
                score = outputs[names[0]].reshape(len(outputs[names[0]]), -1)[:, 0]
                p = (sigmoid(logit(score) - logit(rule["max"])) if rule["kind"] == "learned"
                     else sigmoid(calibrated_evidence(rule, outputs)))
                scores.append((p, (score if rule["kind"] == "learned" else p) > rule["max"], score))
        return scores

    def _neither(self, outputs: dict[str, np.ndarray], rule_scores: list, image: np.ndarray,
                 i: int) -> tuple[float | None, bool, str | None]:
        """(probability that photo `i` (`image`, as decoded) shows none of the classes, whether a rule answers
        "neither", why): the first rule that fires gives both (a blank photo is certain); when none fires, the
        highest probability of the rules that read the model. (None, False, None) for a model without rules."""
        none_of = f"none of {', '.join(self.classes)}"
        probability = None
        for rule, scores in zip(self.neither_rules, rule_scores, strict=True):
            if scores is None:
                if flat_photos(image[None], rule["max_std"])[0]:
                    return 1.0, True, f"{none_of}: the photo is blank (one flat colour)"
                continue
            p, fires, score = float(scores[0][i]), bool(scores[1][i]), float(scores[2][i])
            if fires:
                if rule["kind"] == "imagenet":
                    why = [f"{self._imagenet_guess(outputs, i)}, {' or '.join(self.classes)} {score:.1%}"]
                elif rule["kind"] == "learned":
                    why = [f"the model's 'neither' score {score:.3g} is above its cut {rule['max']:.3g}",
                           self._imagenet_guess(outputs, i)]
                else:
                    why = [f"the model's 'neither' score {score:.3g}", self._imagenet_guess(outputs, i)]
                return p, True, f"{none_of} (probability {p:.0%}): {'; '.join(filter(None, why))}"
            probability = p if probability is None else max(probability, p)
        return probability, False, None

    def _imagenet_guess(self, outputs: dict[str, np.ndarray], i: int) -> str | None:
        """ImageNet's top guess for photo `i`, when a rule reads the graph's ImageNet head (and has its names)."""
        for rule, names in zip(self.neither_rules, self._rule_outputs, strict=True):
            imagenet_output = IMAGENET_OUTPUT_NAME if rule["kind"] == "imagenet" else rule.get("imagenet_output")
            if imagenet_output and imagenet_output in names:
                imagenet = outputs[imagenet_output][i]
                top = int(np.argmax(imagenet))
                return f"ImageNet sees {rule['imagenet_names'][top]!r} ({imagenet[top]:.0%})"
        return None

    def predict(self, photo: ImageSource, explain: bool = False) -> Prediction:
        """One photo (path, bytes, file object, Pillow image or uint8 RGB array); raises BadImageError when it
        cannot be decoded."""
        return self.predict_decoded(self.preprocess(photo)[None], [source_name(photo)], explain)[0]

    @property
    def batch_size(self) -> int:
        """Photos per model call for folders: about 2 MB of input pixels (8 at 280 px, 162 at 64 px).

        Larger batches gain little on a CPU, while the runtime's activation memory grows with them.
        """
        return max(1, min(256, 2_000_000 // (3 * self.image_size**2)))

    def predict_many(self, photos: Iterable[str | os.PathLike], batch_size: int | None = None,
                     workers: int | None = None) -> Iterator[Prediction]:
        """Predictions in input order for files and folders; a bad photo yields a Prediction with `error`."""
        batch_size = batch_size or self.batch_size
        paths = expand_photos(photos)
        pending: list[tuple[Path, np.ndarray]] = []

        def flush() -> Iterator[Prediction]:
            yield from self.predict_decoded(np.stack([arr for _, arr in pending]), [str(path) for path, _ in pending])
            pending.clear()

        decoded = decode_many(paths, self.image_size, self.resize, workers, window=4 * batch_size + 8)
        for path, result in zip(paths, decoded, strict=True):
            if isinstance(result, BadImageError):
                if pending:  # keep input order: photos before the bad one come out first
                    yield from flush()
                yield Prediction(str(path), None, None, {}, str(result))
                continue
            pending.append((path, result))
            if len(pending) >= batch_size:
                yield from flush()
        if pending:
            yield from flush()


def _heatmap(activation: np.ndarray, classes: list[str], probabilities: dict[str, float]) -> np.ndarray:
    """The activation map of the more probable class, scaled to [0, 1] (0 = least, 1 = most evidence)."""
    best = max(range(len(classes)), key=lambda i: probabilities[classes[i]])
    # One binary logit: its map speaks for the second class, its negative for the first.
    heat = (activation[0] if best == 1 else -activation[0]) if activation.shape[0] == 1 else activation[best]
    span = float(heat.max() - heat.min())
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


def load_classifier(bundle: str | os.PathLike | None = None, **options) -> Classifier:
    """Load a bundle (default: `$CATDOGCNN_MODEL` or the shipped model)."""
    return Classifier(bundle or default_bundle_path(), **options)
