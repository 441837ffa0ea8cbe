"""`data check`: bad files, blank photos, exact duplicates by kind (leakage, label conflicts), near-duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdogcnn.check import check_dataset


def test_check_finds_duplicates_leakage_and_conflicts(tmp_path, seed_layout, synthetic_photo, write_bad_files):
    train, test = seed_layout / "training_set", seed_layout / "test_set"
    (test / "cats" / "leak.jpg").write_bytes((train / "cats" / "cats.0.jpg").read_bytes())
    (train / "dogs" / "conflict.jpg").write_bytes((train / "cats" / "cats.1.jpg").read_bytes())
    (train / "cats" / "twin.jpg").write_bytes((train / "cats" / "cats.2.jpg").read_bytes())
    synthetic_photo(0, np.random.default_rng(9), 64).save(train / "cats" / "near_a.png")
    Image.open(train / "cats" / "near_a.png").resize((80, 80)).save(train / "cats" / "near_b.png")
    write_bad_files(train / "dogs")
    Image.new("RGB", (50, 40), (250, 250, 250)).save(train / "dogs" / "blank.jpg")
    report = check_dataset(seed_layout, cache_dir=tmp_path / "cache")
    assert report.blank == [str(train / "dogs" / "blank.jpg")] and report.to_dict()["blank_photos"] == report.blank
    kinds = sorted(p.kind for p in report.exact_duplicates)
    assert kinds == ["across classes (label conflict)", "across splits (leakage)", "within split"]
    assert any({Path(p.a).name, Path(p.b).name} == {"near_a.png", "near_b.png"} for p in report.near_duplicates)
    assert len(report.bad) == 5
    assert report.counts["test"] == {"cats": 31, "dogs": 30}


@pytest.mark.slow
def test_check_finds_the_13_known_pairs(real_data):
    report = check_dataset(real_data)
    pairs = {frozenset(Path(x).stem for x in (p.a, p.b)) for p in report.exact_duplicates}
    assert len(report.exact_duplicates) == 13
    assert [Path(p).name for p in report.blank] == ["cat.835.jpg"]  # a white picture among the cats
    assert frozenset({"cat.4435", "cat.3411"}) in pairs and frozenset({"cat.8456", "dog.8736"}) in pairs
