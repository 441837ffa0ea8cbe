"""The shipped default model: what the README claims about it holds (loose guards; exact figures in benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from catdogcnn.bundle import BundleError, bundled_models_dir
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import NEITHER, load_classifier


@pytest.fixture(scope="module")
def shipped():
    return load_classifier(bundled_models_dir() / "default")


def test_shipped_bundle_has_the_neither_rule(shipped):
    assert shipped.classes == ["cats", "dogs"] and shipped.metadata["quantization"]["label_agreement"] > 0.99
    [rule] = shipped.neither_rules
    assert rule["kind"] == "imagenet" and 0 < rule["min_pet_probability"] < 0.5
    assert len(rule["imagenet_names"]) == 1000


def test_non_pets_are_answered_neither(shipped, non_pet_photos):
    answers = list(shipped.predict_many([non_pet_photos]))
    flagged = [p for p in answers if p.label == NEITHER]
    # 17 of 19 (the float bundle: 18); the rocket is a borderline case, an 8% pet by either graph.
    assert len(answers) == 19 and len(flagged) / len(answers) >= 0.85, [(p.source, p.label) for p in answers]
    assert all(p.reason and "ImageNet sees" in p.reason for p in flagged)


def test_no_neither_turns_it_off(non_pet_photos):
    clf = load_classifier(bundled_models_dir() / "default", neither=False)
    assert all(p.label in ("cats", "dogs") for p in clf.predict_many([non_pet_photos]))


def test_a_cat_photo_is_a_cat(shipped, tmp_path):
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage.chelsea()).save(tmp_path / "chelsea.jpg")
    p = shipped.predict(tmp_path / "chelsea.jpg")
    assert p.label == "cats" and p.confidence > 0.9


def test_flip_tta_averages_the_two_views(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    plain = load_classifier(bundled_models_dir() / "default", tta=False)
    tta = load_classifier(bundled_models_dir() / "default", tta=True)
    image = plain.preprocess(tmp_path / "noise.png")
    expected = (plain.predict_arrays(image[None]) + plain.predict_arrays(image[None, :, ::-1])) / 2
    np.testing.assert_allclose(tta.predict_arrays(image[None]), expected, atol=1e-6)


@pytest.mark.slow
def test_shipped_model_on_the_real_test_set(shipped, real_data):
    result = evaluate(real_data, shipped)
    assert result["n"] == 2000
    assert result["accuracy"] >= 0.985 and result["log_loss"] <= 0.05, result  # README: 99.10%, 0.0403 (int8)
    assert result["neither"]["pets_flagged"] <= 0.015


@pytest.mark.slow
def test_shipped_from_scratch_model_on_the_real_test_set(real_data):
    """models/resnet_small: no pretrained weights, trained in under 30 minutes on 2 cores (README)."""
    clf = load_classifier(bundled_models_dir() / "resnet_small")
    assert clf.metadata["architecture"] == "resnet_small" and not clf.neither_rules
    result = evaluate(real_data, clf)
    assert result["n"] == 2000 and result["accuracy"] >= 0.9, result


def test_shipped_bundles_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("seed_cnn", "default-float"):
        assert load_classifier(name).bundle == bundled_models_dir() / name
    (tmp_path / "seed_cnn").mkdir()  # a folder given by the user wins over the shipped name
    with pytest.raises(BundleError, match="seed_cnn/bundle.json: no model bundle here"):
        load_classifier("seed_cnn")
    with pytest.raises(BundleError, match=r"^nosuch: .*shipped bundle's name: default, default-float, .*seed_cnn\)$"):
        load_classifier("nosuch")
