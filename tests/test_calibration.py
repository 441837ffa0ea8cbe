"""Calibration helpers: log loss, expected calibration error, temperature."""

from __future__ import annotations

import math

import numpy as np

from catdogcnn.calibration import (
    decide,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    one_vs_rest,
    probabilities_from_logits,
    reliability,
)


def test_log_loss_of_certain_and_even_answers():
    y = np.array([0, 1])
    certain = log_loss(y, np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert 0 <= certain < 1e-15 and f"{certain:.4f}" == "0.0000"  # never -0.0, which prints as "-0.0000"
    assert math.isclose(log_loss(y, np.full((2, 2), 0.5)), math.log(2))
    # A certain wrong answer costs -log(machine epsilon), not infinity
    wrong = log_loss(y, np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert math.isclose(wrong, -math.log(np.finfo(np.float64).eps) / 2)
    assert math.isclose(log_loss(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]])),
                        -(math.log(0.7) + math.log(0.4)) / 2)  # a class absent from y is still a column of p


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


def test_two_classes_decide_by_threshold_more_by_the_largest():
    two = np.array([[0.45, 0.55], [0.3, 0.7], [0.9, 0.1]])
    assert decide(two, 0.5).tolist() == [1, 1, 0] and decide(two, 0.6).tolist() == [0, 1, 0]
    three = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert decide(three, 0.99).tolist() == [2, 0]


def test_one_vs_rest_speaks_of_the_second_of_two_classes_and_of_each_of_more():
    y = np.array([0, 1, 2])
    three = np.eye(3)
    assert [k for k, _, _ in one_vs_rest(y, three)] == [0, 1, 2]
    ((k, truth, score),) = one_vs_rest(np.array([0, 1]), np.array([[0.8, 0.2], [0.4, 0.6]]))
    assert k == 1 and truth.tolist() == [False, True] and score.tolist() == [0.2, 0.6]


def test_ece_is_the_gap_the_reliability_bins_show():
    """One binning for the number and the plot: bins from 1/C to 1, each weighted by its share of photos."""
    y = np.array([1, 1, 0, 1])
    p = np.array([[0.45, 0.55], [0.4, 0.6], [0.02, 0.98], [0.01, 0.99]])
    bins = reliability(y, p, bins=5)  # edges 0.5, 0.6, 0.7, 0.8, 0.9, 1.0
    assert bins.share.tolist() == [0.25, 0.25, 0.5]
    assert np.allclose(bins.confidence, [0.55, 0.6, 0.985]) and bins.accuracy.tolist() == [1.0, 1.0, 0.5]
    expected = 0.25 * 0.45 + 0.25 * 0.4 + 0.5 * 0.485
    assert math.isclose(expected_calibration_error(y, p, bins=5), expected)


def test_a_cut_on_a_few_photos_keeps_their_own_share_within_the_target():
    from catdogcnn.calibration import neither_cut

    scores = np.arange(116) / 116  # 116 photos: 1% of them is one photo
    assert neither_cut(scores, 0.01, None) == scores[-2]  # lets the highest one through, no more
    assert neither_cut(scores, 0.02, None) == scores[-3]
    assert neither_cut(scores, 0.01) == scores[-1]  # 95% confidence: too few photos to let any through


def test_a_calibrated_rule_reads_the_learned_score_and_imagenets_pets():
    from catdogcnn.calibration import calibrated_evidence

    imagenet = np.full((2, 4), 0.25)
    imagenet[1] = [0.7, 0.1, 0.1, 0.1]
    outputs = {"neither_probability": np.array([[0.5], [0.9]]), "imagenet_probabilities": imagenet}
    rule = {"output": "neither_probability", "imagenet_output": "imagenet_probabilities", "pet_indices": [0, 1],
            "weights": {"learned": 2.0, "imagenet": -1.0, "bias": 0.5}}
    # photo 0: logit(0.5) = 0, pets' mass 0.5 (log-odds 0); photo 1: logit(0.9) = 2.197, mass 0.8 (1.386)
    np.testing.assert_allclose(calibrated_evidence(rule, outputs), [0.5, 2 * np.log(9) - np.log(4) + 0.5])
    learned_only = {"output": "neither_probability", "weights": {"learned": 2.0, "bias": 0.5}}
    np.testing.assert_allclose(calibrated_evidence(learned_only, outputs), [0.5, 2 * np.log(9) + 0.5])
