"""Calibration helpers: log loss, expected calibration error, temperature."""

from __future__ import annotations

import math

import numpy as np

from catdogcnn.calibration import expected_calibration_error, fit_temperature, log_loss, probabilities_from_logits


def test_log_loss_of_certain_and_even_answers():
    y = np.array([0, 1])
    certain = log_loss(y, np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert certain == 0 and math.copysign(1, certain) == 1  # not -0.0, which prints as "-0.0000"
    assert math.isclose(log_loss(y, np.full((2, 2), 0.5)), math.log(2))
    assert math.isclose(log_loss(y, np.array([[0.0, 1.0], [0.0, 1.0]])), -math.log(1e-12) / 2)  # clipped


def test_temperature_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    honest = rng.normal(0, 1.5, 2000) + np.where(y == 1, 1.0, -1.0)  # a calibrated-ish logit
    overconfident = 4 * honest[:, None]
    t = fit_temperature(overconfident, y)
    assert 2.5 < t < 6
    before = expected_calibration_error(y, probabilities_from_logits(overconfident))
    after = expected_calibration_error(y, probabilities_from_logits(overconfident / t))
    assert after < before / 2
