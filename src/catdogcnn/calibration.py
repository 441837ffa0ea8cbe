"""Calibration: how far confidence is from accuracy (ECE), and a temperature that brings them together.

numpy and SciPy only, so training (which fits the temperature) and evaluation (which reports ECE) share it.
"""

from __future__ import annotations

import numpy as np


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 1) binary logits -> (N, 2); (N, C) -> softmax. As the bundle's graph computes them."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits[:, 0]))
        return np.stack([1 - p, p], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by how many photos each holds."""
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    edges = np.linspace(1 / p.shape[1], 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    # + 0.0 turns the -0.0 of an all-certain set into 0.0, which prints as "0.0000", not "-0.0000"
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean()) + 0.0


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the log loss of softmax(logits / T) on held-out photos."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: log_loss(y, probabilities_from_logits(logits / np.exp(log_t))),
                             bounds=(-3, 3), method="bounded")
    return float(np.exp(result.x))


def neither_threshold(pet_mass: np.ndarray, pet_false_alarm: float = 0.005) -> float:
    """The "neither cat nor dog" cut on the ImageNet head's cat + dog probability: the `pet_false_alarm`
    quantile of that mass on validation pets (so about that share of real pets is flagged), capped at 0.5."""
    return float(min(0.5, np.quantile(pet_mass, pet_false_alarm)))
