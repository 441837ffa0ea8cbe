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
from catdogcnn.bundle import default_bundle_path


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
