"""The finetune recipe's cached views (the photo, its mirror image, augmented copies) and the learned "neither":
the photo split by kind, the cut, and tiny models trained on images the test makes (pretrained and from scratch,
two classes and three), their bundles answering "neither" through the Classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import (
    RECIPES,
    make_breeds_folder,
    make_class_folder,
    make_neither_folder,
    neither_photo,
    open_set_run,
    synthetic_photo,
)

from catdogcnn.augment import parse_augment
from catdogcnn.bundle import BLANK_RULE, NEITHER_OUTPUT_NAME, neither_rules, read_bundle_metadata
from catdogcnn.calibration import neither_cut
from catdogcnn.predict import NEITHER, Classifier
from catdogcnn.train import TrainConfig, train
from catdogcnn.train.calibrate import neither_rule
from catdogcnn.train.finetune import augmented_copy, random_views
from catdogcnn.train.openset import decode_presized, kind_of, load_pets, split_by_kind


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
    presized, _ = decode_presized([sharp], 128, "bilinear", presize=32)
    direct, _ = decode_presized([sharp], 128, "bilinear", presize=512)
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
    assert rule["kind"] == "calibrated" and rule["output"] == NEITHER_OUTPUT_NAME and rule["max"] == 0.5
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
    assert [rule["kind"] for rule in neither_rules(read_bundle_metadata(bundle))] == ["blank", "calibrated"]
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
    assert [rule["kind"] for rule in neither_rules(read_bundle_metadata(bundle))] == ["blank", "calibrated"]


@pytest.mark.slow
def test_the_full_recipe_teaches_neither_to_a_pretrained_model_too(tmp_path):
    make_class_folder(tmp_path / "data", 30, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    config = TrainConfig(model="efficientnet_lite0", image_size=64, epochs=1, batch_size=16, lr=1e-3,
                         optimizer="adamw", augment="none", neither_photos=str(neither), val_fraction=0.2, tta="off",
                         threads=2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    metadata = read_bundle_metadata(bundle)
    assert [rule["kind"] for rule in neither_rules(metadata)] == ["blank", "calibrated"]  # not the ImageNet rule
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
    assert [rule["kind"] for rule in neither_rules(metadata)] == ["blank", "calibrated"]


def test_pets_of_another_collection_are_split_by_breed_with_their_class(tmp_path):
    folder = make_breeds_folder(tmp_path / "breeds", 5, breeds=4)
    pets = load_pets(folder, ["cats", "dogs"], [], 32, "bilinear", holdout_breeds=0.25, holdout_photos=0.4, seed=0)
    assert pets.summary["photos"] == {"train": 18, "seen": 12, "unseen": 10}  # 2 of 8 breeds; 2 of 5 photos
    assert len(pets.summary["unseen_breeds"]) == 2 and pets.summary["skipped_files"] == 0  # README: not a photo
    for role in ("train", "seen", "unseen"):
        assert [k.split("/")[0] for k in pets.kinds[role]] == [("cats", "dogs")[i] for i in pets.labels[role]]
    assert set(pets.kinds["unseen"]).isdisjoint(pets.kinds["train"])
    assert set(pets.kinds["seen"]) <= set(pets.kinds["train"])
    (folder / "birds").mkdir()
    synthetic_photo(0, np.random.default_rng(0)).save(folder / "birds" / "robin_0001.jpg")
    with pytest.raises(ValueError, match="folder.s. birds name no class of the data set"):
        load_pets(folder, ["cats", "dogs"], [], 32, "bilinear", 0.25, 0.4, 0)


def _logits(rng: np.random.Generator, mean: float, n: int) -> tuple[np.ndarray, None]:
    return rng.normal(mean, 1.0, n), None


def test_the_cut_keeps_pets_of_every_collection_within_the_target():
    import torch

    rng = np.random.default_rng(0)
    val = torch.from_numpy(rng.normal(-6, 1.0, (3000, 1)))  # the data set's pets: far from "neither"
    held_out = {"neither-seen": _logits(rng, 3, 400), "neither-unseen": _logits(rng, 1, 400),
                "pets-seen": _logits(rng, -2, 300), "pets-unseen": _logits(rng, -2, 300)}
    alone = neither_rule(val, None, {k: v for k, v in held_out.items() if k != "pets-seen"}, 0.02, None, {})
    both = neither_rule(val, None, held_out, 0.02, None, {})
    assert both["rules"][0]["kind"] == "calibrated" and set(both["candidates"]) == {"learned"}
    # Set on the data set's pets alone, the cut turns away far more of the other collection's pets than 2%
    assert alone["held_out_pets_flagged"]["unseen"] > 0.05
    assert both["held_out_pets_flagged"]["seen"] <= 0.02 and both["held_out_pets_flagged"]["unseen"] < 0.05
    assert both["val_pets_flagged"] == 0.0  # the other collection sets the cut: the stricter one
    assert both["held_out_neither_caught"]["seen"] > 0.9


def test_the_combined_rule_uses_what_imagenet_sees_of_pets():
    import torch

    rng = np.random.default_rng(1)
    n = 600

    def imagenet(pet: bool, count: int) -> np.ndarray:  # logits: the pet classes (151-268, 281-285) or others
        logits = rng.normal(0, 1, (count, 1000))
        logits[:, 151:269] += 6 if pet else 0
        return logits

    # The learned score alone barely tells these pets from "neither"; ImageNet's pet classes do.
    val = torch.from_numpy(rng.normal(-2, 1.0, (n, 1)))
    held_out = {"neither-seen": (rng.normal(0, 1.0, n), imagenet(False, n)),
                "pets-seen": (rng.normal(-1, 1.0, n), imagenet(True, n))}
    entry = neither_rule(val, torch.from_numpy(imagenet(True, n)), held_out, 0.02, list(range(151, 269)) +
                         list(range(281, 286)), {})
    rule = entry["rules"][0]
    assert entry["chosen"] == "combined" and rule["weights"]["imagenet"] < 0 and len(rule["imagenet_names"]) == 1000
    assert entry["candidates"]["combined"]["neither-seen"] > 0.9 > entry["candidates"]["learned"]["neither-seen"]
    assert entry["candidates"]["combined"]["pets-seen"] <= 0.02


@pytest.mark.slow
def test_a_tiny_model_sets_its_cut_on_pets_of_two_collections(tmp_path):
    make_class_folder(tmp_path / "data", 40, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 10, seed=2)
    breeds = make_breeds_folder(tmp_path / "breeds", 8, seed=3)
    config = TrainConfig(model="efficientnet_lite0", **RECIPES["efficientnet_lite0"], batch_size=16,
                         neither_photos=str(neither), pet_photos=str(breeds), neither_pets_flagged=0.05,
                         val_fraction=0.5, tta="off", threads=2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    metadata = read_bundle_metadata(bundle)
    entry = metadata["neither"]
    assert entry["pet_photos"]["folder"] == "breeds" and entry["pet_photos"]["photos"]["unseen"] == 16
    assert set(entry["candidates"]) == {"learned", "combined"} and entry["chosen"] == "combined"
    for figures in entry["candidates"].values():  # the cut holds for the pets of each collection
        assert figures["val"] <= 0.05 and figures["pets-seen"] <= 0.05
    assert metadata["training"]["config"]["pet_photos"] == "breeds"  # the folder's name, not its path
    clf = Classifier(bundle)
    answers = list(clf.predict_many([make_neither_folder(tmp_path / "fresh", 4, seed=9)]))
    assert sum(p.label == NEITHER for p in answers) >= 0.8 * len(answers)
    assert all(p.confidence == p.neither_probability > 0.5 for p in answers if p.label == NEITHER)


@pytest.mark.slow
def test_distillation_keeps_the_imagenet_head_near_the_frozen_network(tmp_path):
    import torch

    from catdogcnn.models.efficientnet_lite import load_imagenet

    make_class_folder(tmp_path / "data", 40, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    photos = np.stack([np.asarray(synthetic_photo(i % 2, np.random.default_rng(i))) for i in range(16)])
    frozen = load_imagenet("lite0")
    with torch.no_grad():
        x = (torch.from_numpy(photos).permute(0, 3, 1, 2).float() - 127.5) / 128
        expected = torch.softmax(frozen(x), 1).numpy()
    drift = {}
    for weight in (0.0, 1.0):
        config = TrainConfig(model="efficientnet_lite0", **RECIPES["efficientnet_lite0"], batch_size=16,
                             neither_photos=str(neither), distill=weight, val_fraction=0.5, tta="off", threads=2)
        bundle = train(tmp_path / "data", tmp_path / f"run{weight}", config, cache_dir=tmp_path / "cache",
                       show_progress=False)
        clf = Classifier(bundle)
        got = clf.session.run(["imagenet_probabilities"], {"image": photos})[0]
        drift[weight] = float((expected * (np.log(expected + 1e-12) - np.log(got + 1e-12))).sum(1).mean())
    # Kullback-Leibler divergence from the frozen network's answers: 2.4 nats without, 0.3 with (seed 0)
    assert drift[1.0] < 0.3 * drift[0.0], drift


@pytest.mark.slow
def test_the_full_recipe_learns_from_pets_of_another_collection_too(tmp_path):
    make_class_folder(tmp_path / "data", 30, seed=1)
    neither = make_neither_folder(tmp_path / "neither", 8, seed=2)
    breeds = make_breeds_folder(tmp_path / "breeds", 6, seed=3)
    config = TrainConfig(model="seed_cnn", **RECIPES["seed_cnn"], batch_size=16, neither_photos=str(neither),
                         pet_photos=str(breeds), pet_repeats=2, neither_pets_flagged=0.05, val_fraction=0.3,
                         tta="off", threads=2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    metadata = read_bundle_metadata(bundle)
    entry = metadata["neither"]
    assert [rule["kind"] for rule in entry["rules"]] == ["blank", "calibrated"]
    assert "imagenet" not in entry["rules"][1]["weights"] and set(entry["candidates"]) == {"learned"}  # no ImageNet
    assert entry["pet_photos"]["photos"] == {"train": 24, "seen": 12, "unseen": 12}
    assert set(entry["held_out_pets_flagged"]) == {"seen", "unseen"}
    # the data set's 42 training photos, and the 24 of the other collection twice each
    assert metadata["data"]["train"]["n"] == 42 and metadata["training"]["config"]["pet_photos"] == "breeds"


def test_the_imagenet_classes_of_other_classes_come_from_their_training_photos():
    import torch

    from catdogcnn.models.efficientnet_lite import IMAGENET_PETS
    from catdogcnn.train.calibrate import imagenet_indices

    assert imagenet_indices(["cats", "dogs"], None) == IMAGENET_PETS
    logits = torch.full((4, 1000), -10.0)
    logits[:, 283] = 5.0  # Persian cat
    logits[:2, 284] = 5.0  # Siamese cat, on half the photos
    assert imagenet_indices(["persian", "siamese"], logits) == [283, 284]


def test_pets_of_another_collection_join_the_training_photos_repeated():
    from catdogcnn import data as D
    from catdogcnn.train.openset import PetPhotos, with_pet_photos

    train = D.ImageSet(["cats", "dogs"], [Path(f"p{i}.jpg") for i in range(3)], np.array([0, 1, 0]),
                       np.zeros((3, 8, 8, 3), np.uint8))
    extra = np.full((2, 8, 8, 3), 7, np.uint8)
    pets = PetPhotos({"train": extra}, {}, {"folder": "breeds"}, {"train": np.array([1, 0])})
    joined = with_pet_photos(train, pets, 3)
    assert len(joined) == 9 and joined.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert (joined.images[3:] == 7).all() and (joined.images[:3] == 0).all() and joined.key is None
