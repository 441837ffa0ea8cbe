"""The finetune recipe's cached views (the photo, its mirror image, augmented copies) and the learned "neither":
the photo split by kind, the cut, and tiny models trained on images the test makes (pretrained and from scratch,
two classes and three), their bundles answering "neither" through the Classifier."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RECIPES, make_class_folder, make_neither_folder, neither_photo, open_set_run, synthetic_photo

from catdogcnn.augment import parse_augment
from catdogcnn.bundle import BLANK_RULE, NEITHER_OUTPUT_NAME, neither_rules, read_bundle_metadata
from catdogcnn.calibration import neither_cut
from catdogcnn.predict import NEITHER, Classifier
from catdogcnn.train import TrainConfig, train
from catdogcnn.train.finetune import augmented_copy, random_views
from catdogcnn.train.openset import decode_neither, kind_of, split_by_kind


def test_split_by_kind_holds_out_whole_kinds_and_a_share_of_the_rest(tmp_path):
    folder = make_neither_folder(tmp_path / "neither", 10)
    files = sorted(folder.iterdir())
    parts = split_by_kind(files, folder, holdout_kinds=0.4, holdout_photos=0.2, seed=3)
    kinds = {role: {kind_of(p, folder) for p in paths} for role, paths in parts.items()}
    assert len(kinds["unseen"]) == 2 and not kinds["unseen"] & (kinds["train"] | kinds["seen"])
    assert kinds["seen"] == kinds["train"] and len(parts["seen"]) == 3 * 2  # 20% of each trained kind's 10
    assert sorted(sum(parts.values(), [])) == files  # every photo in exactly one part
    assert split_by_kind(files, folder, 0.4, 0.2, seed=3) == parts  # the seed decides


def test_kind_is_the_sub_folder_else_the_name_before_the_last_underscore(tmp_path):
    assert kind_of(tmp_path / "red_fox_0012.jpg", tmp_path) == "red_fox"
    assert kind_of(tmp_path / "scenes" / "IMG_1.jpg", tmp_path) == "scenes"


def test_the_cut_keeps_the_share_of_class_photos_turned_away_within_the_target_with_95_percent_confidence():
    scores = np.random.default_rng(0).permutation(np.linspace(0, 1, 5000))
    cut = neither_cut(scores, 0.01)
    assert (scores > cut).sum() == 38  # 39 of 5,000 would leave the 95% upper bound above 1%
    assert neither_cut(scores, 0.01, confidence=0.5) == np.sort(scores)[-50]  # the median bound: about 1% itself
    assert neither_cut(scores[:100], 0.01) == scores[:100].max()  # too few photos to vouch for 1%: none flagged


def test_neither_photos_are_no_sharper_than_the_training_photos(tmp_path):
    rng = np.random.default_rng(0)
    sharp = tmp_path / "checks_0001.png"
    neither_photo("checks", rng, size=256).save(sharp)
    presized, _ = decode_neither([sharp], 128, "bilinear", presize=32)
    direct, _ = decode_neither([sharp], 128, "bilinear", presize=512)
    # Through 32 px the 8-px checks blur away: far less detail than when resized straight to 128.
    assert np.abs(np.diff(presized[0].astype(int), axis=1)).mean() < 0.5 * np.abs(np.diff(direct[0].astype(int),
                                                                                          axis=1)).mean()


@pytest.fixture(scope="module", params=list(RECIPES))
def two_classes(request, tmp_path_factory):
    return open_set_run(tmp_path_factory.mktemp("open_set"), ("cats", "dogs"), request.param)


@pytest.mark.slow
def test_the_bundle_carries_a_learned_rule_cut_on_validation_photos(two_classes):
    bundle, _ = two_classes
    metadata = read_bundle_metadata(bundle)
    blank, rule = neither_rules(metadata)
    assert blank == BLANK_RULE  # a blank photo first, whatever the model has learned
    assert rule["kind"] == "learned" and rule["output"] == NEITHER_OUTPUT_NAME
    assert NEITHER_OUTPUT_NAME in metadata["graph"]["outputs"]
    entry = metadata["neither"]
    assert entry["fitted_on"] == "validation photos" and entry["val_pets_flagged"] <= entry["target_pets_flagged"]
    photos = entry["photos"]
    assert photos["folder"] == "neither" and len(photos["unseen_kinds"]) == 1
    assert set(photos["unseen_kinds"]).isdisjoint(photos["trained_kinds"])
    assert metadata["training"]["config"]["neither_photos"] == "neither"  # the folder's name, not its path


@pytest.mark.slow
def test_the_classifier_answers_neither_for_what_it_learned_and_a_class_for_pets(two_classes, tmp_path):
    bundle, _ = two_classes
    fresh = make_neither_folder(tmp_path / "fresh", 6, seed=9)
    pets = make_class_folder(tmp_path / "pets", 10, seed=7)
    classifier = Classifier(bundle)
    answers = [p.label for p in classifier.predict_many([fresh])]
    assert answers.count(NEITHER) >= 0.8 * len(answers), answers
    pet_answers = list(classifier.predict_many([pets]))
    # The cut is a quantile of a few dozen validation photos' scores: on new photos it turns away more than 5%.
    assert sum(p.label == NEITHER for p in pet_answers) <= 0.3 * len(pet_answers)
    flagged = next(p for p in classifier.predict_many([fresh]) if p.label == NEITHER)
    assert flagged.reason and "neither" in flagged.reason.lower()
    assert NEITHER not in {p.label for p in Classifier(bundle, neither=False).predict_many([fresh])}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["efficientnet_lite0", "resnet_small"])
def test_three_classes_with_neither(tmp_path, model):
    bundle, _ = open_set_run(tmp_path, ("birds", "cats", "dogs"), model)
    classifier = Classifier(bundle)
    assert classifier.classes == ["birds", "cats", "dogs"]
    assert [rule["kind"] for rule in neither_rules(read_bundle_metadata(bundle))] == ["blank", "learned"]
    answers = [p.label for p in classifier.predict_many([make_neither_folder(tmp_path / "fresh", 4, seed=5)])]
    assert answers.count(NEITHER) >= 0.8 * len(answers), answers


def test_mirror_averaging_is_refused_beside_a_learned_neither():
    with pytest.raises(ValueError, match="tta on cannot go with neither_photos"):
        TrainConfig(recipe="finetune", model="efficientnet_lite0", neither_photos="photos", tta="on").validate()


def test_augment_views_are_for_the_finetune_recipe():
    with pytest.raises(ValueError, match="augment_views is for the finetune recipe"):
        TrainConfig(model="seed_cnn", augment_views=2).validate()


@pytest.mark.parametrize(("augment", "reason"), [("none", "copies of the photo or its mirror image"),
                                                  ("flip", "copies of the photo or its mirror image"),
                                                  ("crop,mixup=0.2", "blends two photos")])
def test_augment_views_need_an_augmentation_a_cached_copy_can_hold(augment, reason):
    with pytest.raises(ValueError, match=reason):
        TrainConfig(recipe="finetune", model="efficientnet_lite0", augment=augment, augment_views=2).validate()
    TrainConfig(recipe="finetune", model="efficientnet_lite0", augment=augment).validate()  # without views: fine


def test_each_epoch_sees_every_view_and_two_views_draw_as_the_mirror_rule_did():
    draws = random_views(np.random.default_rng(3), 6000, 6)
    assert draws.min() == 0 and draws.max() == 5
    assert np.all(np.abs(np.bincount(draws) / 6000 - 1 / 6) < 0.03)
    mirrored = np.random.default_rng(3).random(6000) < 0.5
    assert np.array_equal(random_views(np.random.default_rng(3), 6000, 2), mirrored.astype(int))


def _photos(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(synthetic_photo(i % 2, rng)) for i in range(n)])


def test_an_augmented_copy_is_drawn_by_its_seed_and_keeps_the_photos_shape():
    photos, crop = _photos(6), parse_augment("crop")
    first, again, other = (augmented_copy(photos, crop, seed) for seed in (0, 0, 1))
    assert first.shape == photos.shape and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other) and not np.array_equal(first, photos)
    assert np.array_equal(augmented_copy(photos, parse_augment("none"), 0), photos)  # no augmentation: exact


def test_the_cache_holds_the_photo_its_mirror_image_and_each_augmented_copy(tmp_path):
    from catdogcnn.models import build_model, get_spec
    from catdogcnn.train.finetune import FrozenPrefix, cached_activations, views_of

    spec, photos, crop = get_spec("efficientnet_lite0"), _photos(8), parse_augment("crop")
    model = build_model("efficientnet_lite0", 2, 64)
    prefix = FrozenPrefix(model, len(model.backbone._blocks) - 1, spec.mean, spec.std)
    views = views_of(prefix, 64, photos, "pets", tmp_path, crop, 2)
    assert views.shape[:2] == (4, 8) and len(list(tmp_path.glob("activations-*.npy"))) == 4
    mirrored = cached_activations(prefix, 64, np.ascontiguousarray(photos[:, :, ::-1]), "check", None)
    assert np.array_equal(views[1], mirrored)
    assert not np.allclose(views[2], views[0]) and not np.allclose(views[2], views[3])
    assert np.array_equal(views_of(prefix, 64, photos, "pets", tmp_path, crop, 2), views)  # read back
    assert len(list(tmp_path.glob("activations-*.npy"))) == 4


@pytest.mark.slow
def test_an_open_set_run_resumes_to_the_weights_of_a_straight_one(tmp_path):
    import torch

    from catdogcnn.train import load_checkpoint

    make_class_folder(tmp_path / "data", 30, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    config = TrainConfig(model="seed_cnn", epochs=2, batch_size=16, augment="seed", neither_photos=str(neither),
                         val_fraction=0.2, tta="off", threads=2, ema=0.9)
    train(tmp_path / "data", tmp_path / "straight", config, cache_dir=tmp_path / "cache", show_progress=False)
    train(tmp_path / "data", tmp_path / "split", TrainConfig(**{**config.__dict__, "epochs": 1}),
          cache_dir=tmp_path / "cache", show_progress=False)
    bundle = train(tmp_path / "data", tmp_path / "split", config, resume=True, cache_dir=tmp_path / "cache",
                   show_progress=False)
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "split"))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and any("neither" in k for k in a[part])
        for name in a[part]:
            assert torch.allclose(a[part][name].float(), b[part][name].float(), atol=1e-6), (part, name)
    assert [rule["kind"] for rule in neither_rules(read_bundle_metadata(bundle))] == ["blank", "learned"]


@pytest.mark.slow
def test_the_full_recipe_teaches_neither_to_a_pretrained_model_too(tmp_path):
    make_class_folder(tmp_path / "data", 30, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    config = TrainConfig(model="efficientnet_lite0", image_size=64, epochs=1, batch_size=16, lr=1e-3,
                         optimizer="adamw", augment="none", neither_photos=str(neither), val_fraction=0.2, tta="off",
                         threads=2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    metadata = read_bundle_metadata(bundle)
    assert [rule["kind"] for rule in neither_rules(metadata)] == ["blank", "learned"]  # not the ImageNet rule
    assert NEITHER_OUTPUT_NAME in metadata["graph"]["outputs"]


@pytest.mark.slow
def test_a_finetune_run_trains_on_augmented_views_of_pets_and_neither_photos(tmp_path):
    make_class_folder(tmp_path / "data", 30, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    config = TrainConfig(model="efficientnet_lite0", recipe="finetune", image_size=64, train_blocks=1, epochs=2,
                         batch_size=16, optimizer="adamw", augment="crop", augment_views=1,
                         neither_photos=str(neither), val_fraction=0.2, tta="off", threads=2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    cached = list((tmp_path / "cache").glob("activations-*.npy"))
    metadata = read_bundle_metadata(bundle)
    # the 7 activation files a run without augmented views caches, and one augmented copy of the training pets
    # and one of the training "neither" photos
    assert len(cached) == 9
    assert metadata["training"]["config"]["augment_views"] == 1
    assert [rule["kind"] for rule in neither_rules(metadata)] == ["blank", "learned"]
