from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from catdogcnn import BadImageError, BundleError, Classifier, load_classifier
from catdogcnn.bundle import BLANK_RULE, IMAGENET_OUTPUT_NAME, NEITHER_OUTPUT_NAME, default_bundle_path


def test_predict_one_photo(tiny_bundle, tmp_path, synthetic_photo):
    path = tmp_path / "x.jpg"
    synthetic_photo(0, np.random.default_rng(0), 100).save(path)
    p = Classifier(tiny_bundle).predict(path)
    assert p.ok and p.label in ("cats", "dogs") and p.source == str(path)
    assert np.isclose(sum(p.probabilities.values()), 1, atol=1e-6)
    assert p.confidence == p.probabilities[p.label]


def test_bytes_and_file_objects_give_the_same_answer(tiny_bundle, tmp_path, synthetic_photo):
    path = tmp_path / "x.png"
    synthetic_photo(1, np.random.default_rng(1), 80).save(path)
    clf = Classifier(tiny_bundle)
    a, b, c = clf.predict(path), clf.predict(path.read_bytes()), clf.predict(io.BytesIO(path.read_bytes()))
    assert a.probabilities == b.probabilities == c.probabilities


def test_photos_in_memory_give_the_same_answer_as_their_file(tiny_bundle, tmp_path, synthetic_photo):
    path = tmp_path / "x.png"
    synthetic_photo(1, np.random.default_rng(1), 80).save(path)
    clf = Classifier(tiny_bundle)
    image = Image.open(path)
    from_file, from_image, from_array = clf.predict(path), clf.predict(image), clf.predict(np.asarray(image))
    assert from_file.probabilities == from_image.probabilities == from_array.probabilities
    assert (from_image.source, from_array.source) == ("<PIL image>", "<array>")
    rgba = np.dstack([np.asarray(image), np.full((80, 80), 255, np.uint8)])  # opaque alpha: the same photo
    assert clf.predict(rgba).probabilities == from_file.probabilities
    for bad in (np.asarray(image, np.float32), np.zeros((0, 8, 3), np.uint8), np.zeros((8, 8, 2), np.uint8)):
        with pytest.raises(BadImageError, match=r"^<array>: an array photo must be uint8 .* not \w+ \("):
            clf.predict(bad)


def test_threshold_decides_between_two_classes(tiny_bundle, tmp_path, synthetic_photo):
    path = tmp_path / "x.jpg"
    synthetic_photo(0, np.random.default_rng(2), 64).save(path)
    p_dog = Classifier(tiny_bundle).predict(path).probabilities["dogs"]
    assert Classifier(tiny_bundle, threshold=p_dog - 1e-3).predict(path).label == "dogs"
    assert Classifier(tiny_bundle, threshold=p_dog + 1e-3).predict(path).label == "cats"


def test_many_keeps_order_and_reports_bad_files(tiny_bundle, tmp_path, make_class_folder, write_bad_files):
    make_class_folder(tmp_path / "photos", 7)
    bad = write_bad_files(tmp_path / "photos" / "cats")
    clf = Classifier(tiny_bundle)
    results = list(clf.predict_many([tmp_path / "photos"], batch_size=4))
    assert len(results) == 14 + len(bad)
    assert sorted(r.source for r in results) == [r.source for r in results]  # folder order, sorted
    failed = [r for r in results if not r.ok]
    assert len(failed) == len(bad) and all(r.label is None and r.error for r in failed)
    one_by_one = {r.source: clf.predict(r.source).probabilities for r in results if r.ok}
    for r in results:
        if r.ok:
            assert r.probabilities == pytest.approx(one_by_one[r.source], abs=1e-6)


def test_bad_photo_raises_a_one_line_error(tiny_bundle, tmp_path, write_bad_files):
    write_bad_files(tmp_path)
    with pytest.raises(BadImageError, match="empty file"):
        Classifier(tiny_bundle).predict(tmp_path / "empty.jpg")


def test_default_bundle_is_shipped_and_loads():
    clf = load_classifier()
    assert default_bundle_path().is_dir() and clf.classes == ["cats", "dogs"]


def test_importing_the_package_does_not_import_torch():
    code = "import sys, catdogcnn; catdogcnn.load_classifier(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_threshold_outside_0_1_is_refused(tiny_bundle, tmp_path):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
            Classifier(tiny_bundle, threshold=bad)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "threshold": 2}))
    with pytest.raises(BundleError, match=r"bundle\.json's threshold must be between 0 and 1, not 2"):
        Classifier(copy)


# --------------------------------------------------------------------------- "neither": the bundle's rules

LEARNED = {"kind": "learned", "output": NEITHER_OUTPUT_NAME, "max": 0.7}
IMAGENET = {"kind": "imagenet", "output": IMAGENET_OUTPUT_NAME, "pet_indices": [1], "min_pet_probability": 0.2,
            "imagenet_names": ["lakeside", "tabby"]}


CALIBRATED = {"kind": "calibrated", "output": NEITHER_OUTPUT_NAME, "imagenet_output": IMAGENET_OUTPUT_NAME,
              "pet_indices": [1], "imagenet_names": ["lakeside", "tabby"],
              "weights": {"learned": 1.0, "imagenet": -1.0, "bias": -0.5}, "max": 0.5}


def odds_over_cut(score: float, cut: float) -> float:
    """The probability of "neither" an earlier bundle's rule gives: the score's odds over its cut's (0.5 at it)."""
    return 1 / (1 + np.exp(-(np.log(score / (1 - score)) - np.log(cut / (1 - cut)))))


def halves(left: tuple[int, int, int], right: tuple[int, int, int] | None = None) -> np.ndarray:
    """A 32 x 32 photo: its left half one colour, its right half another (by default the same)."""
    image = np.empty((32, 32, 3), np.uint8)
    image[:, :16], image[:, 16:] = left, left if right is None else right
    return image


class RecordingSession:
    """An onnxruntime session that notes the outputs each call asks for."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append(list(names))
        return self.session.run(names, feeds)


def test_a_learned_rule_answers_neither_above_its_cut(neither_bundle):
    bundle = neither_bundle("learned", {"rules": [LEARNED], "val_pets_flagged": 0.01, "fitted_on": "validation"})
    clf = Classifier(bundle)
    assert clf.neither_cuts == [{"kind": "learned", "cut": 0.7}]
    bright = clf.predict(halves((230, 240, 250)))  # left half's brightness: 240 / 255 = 0.941
    assert bright.label == "neither" and bright.confidence == pytest.approx(odds_over_cut(240 / 255, 0.7), abs=1e-4)
    assert bright.confidence == bright.neither_probability > 0.5
    assert bright.reason == ("none of cats, dogs (probability 87%): the model's 'neither' score 0.941 is above its "
                             "cut 0.7")
    assert set(bright.probabilities) == {"cats", "dogs"}
    dark = clf.predict(halves((40, 120, 10)))  # brightness 0.22; p(dogs) = 120 / 160
    assert (dark.label, dark.reason) == ("dogs", None)
    assert dark.neither_probability == pytest.approx(odds_over_cut(170 / 765, 0.7), abs=1e-4)
    assert dark.confidence == pytest.approx((1 - dark.neither_probability) * 0.75, abs=1e-3)
    assert Classifier(bundle, neither=False).predict(halves((230, 240, 250))).label == "dogs"


def test_only_the_outputs_the_rules_need_are_fetched_in_one_call(neither_bundle):
    bundle = neither_bundle("learned_only", {"rules": [LEARNED]})
    photos = np.stack([halves((230, 240, 250)), halves((40, 120, 10))])
    for options, fetched in (({}, ["probabilities", NEITHER_OUTPUT_NAME]), ({"neither": False}, ["probabilities"])):
        clf = Classifier(bundle, **options)
        clf.session = RecordingSession(clf.session)
        clf.predict_decoded(photos, ["a", "b"])
        assert clf.session.calls == [fetched]


def test_the_first_rule_that_fires_gives_the_reason(neither_bundle):
    clf = Classifier(neither_bundle("both", {"rules": [{**LEARNED, "max": 0.9}, IMAGENET]}))
    very_bright = clf.predict(halves((240, 240, 240)))  # 0.941: both rules fire; the learned one is first
    assert very_bright.confidence == pytest.approx(odds_over_cut(240 / 255, 0.9), abs=1e-4)
    assert very_bright.reason.endswith("score 0.941 is above its cut 0.9; ImageNet sees 'lakeside' (94%)")
    bright = clf.predict(halves((217, 217, 217)))  # 0.851: below the learned cut, the pet mass 0.149 below 0.2
    assert bright.label == "neither"
    assert bright.confidence == pytest.approx(1 - odds_over_cut(1 - 217 / 255, 0.2), abs=1e-3)  # of the pet mass
    assert bright.reason == "none of cats, dogs (probability 59%): ImageNet sees 'lakeside' (85%), cats or dogs 14.9%"
    assert clf.predict(halves((150, 200, 150))).label == "dogs"


def test_a_bundle_of_the_first_format_keeps_its_imagenet_rule(neither_bundle):
    old = {key: value for key, value in IMAGENET.items() if key != "kind"}
    clf = Classifier(neither_bundle("first_format", {**old, "val_pets_flagged": 0.005}))
    clf.session = RecordingSession(clf.session)
    assert clf.neither_cuts == [{"kind": "imagenet", "cut": 0.2}]
    bright = clf.predict(halves((230, 240, 250)))
    assert clf.session.calls == [["probabilities", IMAGENET_OUTPUT_NAME]]
    assert bright.label == "neither" and bright.confidence == pytest.approx(1 - odds_over_cut(15 / 255, 0.2), abs=1e-3)
    assert "ImageNet sees 'lakeside' (94%), cats or dogs 5.9%" in bright.reason
    assert clf.predict(halves((120, 40, 10))).label == "cats"


def test_a_bundle_without_neither_never_answers_it(neither_bundle):
    clf = Classifier(neither_bundle("no_rule", None))
    assert clf.neither_rules == [] and clf.neither_cuts == []
    assert [clf.predict(halves(c)).label for c in ((255, 255, 255), (250, 0, 0), (0, 250, 0))] == \
        ["cats", "cats", "dogs"]


def test_three_classes_with_a_learned_rule(neither_bundle):
    clf = Classifier(neither_bundle("three", {"rules": [LEARNED]}, classes=("red", "green", "blue")))
    answers = [clf.predict(halves(c)) for c in ((90, 20, 10), (10, 20, 90), (240, 200, 250))]
    assert [p.label for p in answers] == ["red", "blue", "neither"]
    assert answers[1].confidence == pytest.approx((1 - answers[1].neither_probability) * 90 / 120, abs=5e-3)
    assert answers[2].reason.startswith("none of red, green, blue (probability 80%): the model's 'neither' score 0.902")


def test_mirror_averaging_averages_the_neither_score(neither_bundle):
    bundle = neither_bundle("mirrored", {"rules": [LEARNED]})
    plain, mirrored = Classifier(bundle, tta=False), Classifier(bundle, tta=True)
    half_bright = halves((255, 255, 255), (153, 153, 153))  # left half 1.0, right half 0.6
    assert plain.predict(half_bright).confidence == pytest.approx(1.0, abs=1e-4)
    assert mirrored.predict(half_bright).confidence == pytest.approx(odds_over_cut(0.8, 0.7), abs=1e-4)
    half_dark = halves((255, 255, 255), (0, 0, 0))  # 1.0 alone, 0.5 averaged with its mirror image
    assert plain.predict(half_dark).label == "neither" and mirrored.predict(half_dark).label != "neither"


def test_a_blank_photo_is_answered_neither_before_any_model_rule(neither_bundle):
    clf = Classifier(neither_bundle("blank_first", {"rules": [BLANK_RULE, LEARNED]}))
    clf.session = RecordingSession(clf.session)
    assert clf.neither_cuts == [{"kind": "blank", "cut": 4.0}, {"kind": "learned", "cut": 0.7}]
    grey = clf.predict(halves((40, 120, 10)))  # one flat colour: the model alone would say "dogs"
    assert (grey.label, grey.confidence) == ("neither", 1.0)
    assert grey.reason == "none of cats, dogs: the photo is blank (one flat colour)"
    assert grey.probabilities["dogs"] == pytest.approx(0.75, abs=1e-3)
    assert clf.session.calls[-1] == ["probabilities", NEITHER_OUTPUT_NAME]  # the rule reads the photo, no output
    # 5 levels of spread in one channel is not blank: the model decides
    assert clf.predict(halves((40, 120, 10), (40, 120, 20))).label == "dogs"
    bright = clf.predict(halves((235, 235, 235), (250, 250, 250)))
    assert bright.label == "neither" and "score 0.922 is above its cut 0.7" in bright.reason
    assert bright.confidence == pytest.approx(odds_over_cut(235 / 255, 0.7), abs=1e-4)
    assert Classifier(neither_bundle("blank_first", {"rules": [BLANK_RULE, LEARNED]}),
                      neither=False).predict(halves((40, 120, 10))).label == "dogs"


@pytest.mark.parametrize("rule, words", [({"kind": "magic", "max": 0.5}, "of unknown kind 'magic'"),
                                         ({"kind": "learned"}, "'learned' lacks its cut"),
                                         ({"kind": "blank"}, "'blank' lacks its cut"),
                                         ({**LEARNED, "output": "nowhere"}, "reads 'nowhere', which the graph")])
def test_a_rule_that_cannot_be_applied_is_a_one_line_error(neither_bundle, rule, words):
    bundle = neither_bundle("bad_rule", {"rules": [rule]})
    with pytest.raises(BundleError, match=rf"^{bundle / 'bundle.json'}: 'neither' rule .*{words}[^\n]*$"):
        Classifier(bundle)


def test_a_calibrated_rule_weighs_the_learned_score_against_imagenets_pets(neither_bundle):
    clf = Classifier(neither_bundle("calibrated", {"rules": [CALIBRATED]}))
    assert clf.neither_cuts == [{"kind": "calibrated", "cut": 0.5}]
    # brightness b: the learned score is b, ImageNet's pet mass 1 - b, so the evidence is 2 logit(b) - 0.5
    for level, expected in ((230, "neither"), (150, "neither"), (130, "dogs")):
        photo = halves((level - 20, level + 20, level))
        b = photo[:, :16].mean() / 255
        p = clf.predict(photo)
        assert p.neither_probability == pytest.approx(1 / (1 + np.exp(-(2 * np.log(b / (1 - b)) - 0.5))), abs=1e-4)
        assert p.label == expected, (level, p)
    answer = clf.predict(halves((190, 240, 210)))
    assert answer.reason == ("none of cats, dogs (probability 94%): the model's 'neither' score 0.837; ImageNet sees "
                             "'lakeside' (84%)")


@pytest.mark.parametrize("rules", [[LEARNED], [IMAGENET], [CALIBRATED], [BLANK_RULE, CALIBRATED],
                                   [{**LEARNED, "max": 0.9}, IMAGENET]], ids=["learned", "imagenet", "calibrated",
                                                                             "blank", "two"])
def test_confidence_is_the_probability_of_the_answer_for_every_rule(neither_bundle, rules):
    clf = Classifier(neither_bundle("confidence", {"rules": rules}))
    photos = [halves((r, g, b), (255 - r, g, 255 - b)) for r in (0, 60, 200) for g in (30, 128, 250) for b in (5, 99)]
    photos.append(halves((90, 90, 90)))  # blank
    for p in map(clf.predict, photos):
        q = p.neither_probability
        assert 0 <= p.confidence <= 1 and 0 <= q <= 1
        if p.label == "neither":
            assert p.confidence == q and q > 0.5
        else:
            assert p.confidence == pytest.approx((1 - q) * p.probabilities[p.label]) and q <= 0.5
