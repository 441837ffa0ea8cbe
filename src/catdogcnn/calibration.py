"""Class probabilities as every part reads them, and how far their confidence is from accuracy.

The one place that says how two classes differ from more: probabilities from logits, the decision, and the
one-against-the-rest views of metrics and curves. Then calibration: reliability bins (one binning for the
expected calibration error and the plot of it), log loss, a temperature that brings confidence and accuracy
together, and the "neither" cut. numpy, SciPy and scikit-learn only: training, quantization, inference and
evaluation all share it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from catdogcnn.extras import needs_extra


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 1) binary logits -> (N, 2); (N, C) -> softmax. As the bundle's graph computes them."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits[:, 0]))
        return np.stack([1 - p, p], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def decide(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Class indices (N,) from probabilities (N, C): for two classes the second wins when its probability
    exceeds the threshold; for more, the most probable."""
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] > threshold).astype(int)
    return probabilities.argmax(1)


def one_vs_rest(y: np.ndarray, p: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class index, is that class (N,), its probability (N,)) for each class a curve or an AUC speaks of: for
    two classes the second alone (the first's curve is its mirror image), for more every class."""
    positives = [1] if p.shape[1] == 2 else range(p.shape[1])
    return [(k, np.asarray(y) == k, p[:, k]) for k in positives]


class Reliability(NamedTuple):
    """Per non-empty confidence bin: mean confidence, accuracy, and the share of photos in it."""

    confidence: np.ndarray
    accuracy: np.ndarray
    share: np.ndarray


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> Reliability:
    """Photos binned by their top probability into `bins` equal-width bins from 1/C (a blind guess) to 1."""
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    edges = np.linspace(1 / p.shape[1], 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    used = [b for b in range(bins) if (which == b).any()]
    return Reliability(np.array([confidence[which == b].mean() for b in used]),
                       np.array([correct[which == b].mean() for b in used]),
                       np.array([(which == b).mean() for b in used]))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over the reliability bins, weighted by how many photos each holds."""
    r = reliability(y, p, bins)
    return float((np.abs(r.accuracy - r.confidence) * r.share).sum())


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean -log p(true class): scikit-learn's (probabilities clipped to [eps, 1 - eps], so never inf or -0.0),
    with every column of `p` a class even when `y` lacks one."""
    with needs_extra("report"):
        from sklearn.metrics import log_loss as sklearn_log_loss

    return float(sklearn_log_loss(y, p, labels=list(range(p.shape[1]))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the log loss of softmax(logits / T) on held-out photos."""
    with needs_extra("train"):
        from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: log_loss(y, probabilities_from_logits(logits / np.exp(log_t))),
                             bounds=(-3, 3), method="bounded")
    return float(np.exp(result.x))


def neither_threshold(pet_mass: np.ndarray, pet_false_alarm: float = 0.005) -> float:
    """The "neither cat nor dog" cut on the ImageNet head's cat + dog probability: the `pet_false_alarm`
    quantile of that mass on validation pets (so about that share of real pets is flagged), capped at 0.5."""
    return float(min(0.5, np.quantile(pet_mass, pet_false_alarm)))


def neither_cut(val_scores: np.ndarray, pets_flagged: float, confidence: float | None = 0.95) -> float:
    """The score above which a photo is "neither", set so that with `confidence` at most `pets_flagged` of all
    class photos like the validation ones are turned away, not only of these: the cut lets through the k highest
    validation scores, k the largest count whose one-sided Clopper-Pearson upper bound on the rate stays within
    `pets_flagged` (for 5,000 photos and 1%, k = 38: 0.76% of them). `confidence=None` asks for the share of
    these photos alone (k = the whole part of `pets_flagged` x their number): for a sample too small to vouch for
    the rate."""
    n = len(val_scores)
    k = np.arange(n)
    if confidence is None:
        within = k[k <= pets_flagged * n]
    else:
        with needs_extra("train"):
            from scipy.stats import beta

        within = k[beta.ppf(confidence, k + 1, n - k) <= pets_flagged]
    return float(np.sort(val_scores)[n - 1 - (within.max() if len(within) else 0)])


def sigmoid(x: float | np.ndarray) -> float | np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def logit(p: float | np.ndarray) -> float | np.ndarray:
    """log(p / (1 - p)), with p kept within [1e-12, 1 - 1e-12] so that a cut of 0 or 1 stays finite."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def imagenet_log_odds(probabilities: np.ndarray, indices: list[int]) -> np.ndarray:
    """(N,) log-odds that an ImageNet head's answer is one of `indices`, from its probabilities (N, 1000): the
    evidence of the classes that holds across photo collections."""
    mass = np.asarray(probabilities, np.float64)[:, indices].sum(1)
    return logit(np.clip(mass, 1e-7, 1 - 1e-7))  # float32 probabilities resolve no finer near 1


def evidence_columns(rule: dict, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 1 or 2) what a `calibrated` "neither" rule weighs, from graph outputs (name -> (N, ...)): the logit of
    the learned "neither" probability, and with an `imagenet_output` the ImageNet log-odds of `pet_indices`."""
    columns = [logit(np.asarray(outputs[rule["output"]])[:, 0])]
    if rule.get("imagenet_output"):
        columns.append(imagenet_log_odds(outputs[rule["imagenet_output"]], rule["pet_indices"]))
    return np.stack(columns, 1)


def calibrated_evidence(rule: dict, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """A bundle's `calibrated` "neither" rule: its logit of "neither" for graph outputs (name -> (N, ...)), the
    one computation training (`train.calibrate`) and inference (`Classifier`) share."""
    w = rule["weights"]
    columns = evidence_columns(rule, outputs)
    return columns @ np.array([w["learned"], w.get("imagenet", 0.0)][:columns.shape[1]]) + w["bias"]
