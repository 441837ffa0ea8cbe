"""The end of every recipe: the trained model's figures on the validation photos, its calibration, and the
model bundle that carries them (with the "neither" rule when the model can tell)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from catdogcnn.augment import parse_augment
from catdogcnn.bundle import BLANK_RULE
from catdogcnn.export import export_bundle
from catdogcnn.models import Normalize, get_spec
from catdogcnn.train.calibrate import (
    calibrate,
    calibrate_neither,
    choose_tta,
    imagenet_indices,
    is_cats_and_dogs,
    neither_rule,
)
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import TrainingData
from catdogcnn.train.metrics import logits_metrics, predict_logits
from catdogcnn.train.openset import NeitherPhotos, PetPhotos


def finish(model: nn.Module, bundle_dir: Path, config: TrainConfig, dataset: TrainingData, training: dict,
           console: Console, val_logits: tuple[torch.Tensor, torch.Tensor | None] | None = None,
           val_neither: torch.Tensor | None = None, neither: NeitherPhotos | None = None,
           pets: PetPhotos | None = None, held_out: dict[str, tuple] | None = None,
           train_imagenet: torch.Tensor | None = None) -> Path:
    """Final validation metrics, the "neither" rule, and the bundle.

    `val_logits` (class logits, ImageNet logits) skips the pass over the validation photos when known. A model
    that learned "neither" (`val_neither`: its logits on the validation photos) carries that rule
    (`calibrate.neither_rule`), its cut chosen on the validation photos and on `pets`' held-out photos of
    trained breeds; one with an ImageNet head and cats and dogs for classes carries the ImageNet rule instead.
    `held_out` ("neither-seen", "neither-unseen", "pets-seen", "pets-unseen" -> ("neither" logits, ImageNet
    logits or None) of the held-out photos of other collections) fits and measures the rule;
    `train_imagenet` (ImageNet logits of the training photos) chooses the ImageNet classes that stand for
    classes other than cats and dogs.
    """
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    normalize = Normalize(spec.mean, spec.std)
    cpu = torch.device("cpu")
    learned = val_neither is None and getattr(model, "neither", None) is not None  # by the full recipe
    with_neither = (hasattr(model, "forward_all") and is_cats_and_dogs(dataset.summary["classes"])
                    and val_neither is None and not learned)
    if val_logits is None:  # one pass over the validation photos for every output the rules need
        logits, imagenet, learned_logits = predict_logits(model, normalize, dataset.val.images, cpu,
                                                          with_imagenet=with_neither, with_neither=learned)
        val_logits, val_neither = (logits, imagenet), learned_logits if learned else val_neither
    if learned:
        held_out = {f"{name}-{role}": (predict_logits(model, normalize, photos.images[role], cpu,
                                                      with_neither=True)[2].numpy()[:, 0], None)
                    for name, photos in (("neither", neither), ("pets", pets)) for role in ("seen", "unseen")
                    if photos and len(photos.images[role])}
    calibration = calibrate(model, val_logits[0].numpy(), dataset.val.labels)
    val_logits = (val_logits[0] / calibration["temperature"], *val_logits[1:])
    final = logits_metrics(val_logits[0], dataset.val.labels)
    # A learned "neither" cut is fitted on single views: a bundle that averaged views would turn away another share.
    tta = (choose_tta(model, normalize, dataset.val, val_logits[0], config.tta) if val_neither is None
           else {"setting": config.tta, "used": False, "why": "the learned 'neither' cut is fitted on single views"})
    if tta["used"]:
        final = {"accuracy": tta["accuracy"]["flip_averaged"], "loss": tta["log_loss"]["flip_averaged"]}
    metadata = {
        "architecture": config.model,
        "classes": dataset.summary["classes"],
        "input": {"image_size": image_size, "resize": config.resize or spec.resize, "layout": "NHWC uint8 RGB",
                  "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": 0.5,
        "tta": tta["used"],
        "metrics": {"val_accuracy": final["accuracy"], "val_log_loss": final["loss"], "val_n": len(dataset.val)},
        "calibration": calibration,
        "tta_choice": tta,
        "training": {"config": asdict(config), "augment": parse_augment(config.augment).to_dict(),
                     "parameters": sum(p.numel() for p in model.parameters()), **training},
        "data": dataset.summary,
    }
    if val_neither is not None:
        imagenet = val_logits[1] if len(val_logits) > 1 else None
        indices = imagenet_indices(dataset.summary["classes"], train_imagenet) if imagenet is not None else None
        photos = {"photos": neither.summary if neither else None, "pet_photos": pets.summary if pets else None}
        metadata["neither"] = neither_rule(val_neither, imagenet, held_out or {}, config.neither_pets_flagged,
                                           indices, photos)
        _report_neither(metadata["neither"], console)
    elif with_neither:
        metadata["neither"] = {"rules": [calibrate_neither(val_logits[1])], "fitted_on": "validation photos"}
    if "neither" in metadata:  # a model that can answer "neither" answers it for a blank photo first
        metadata["neither"]["rules"].insert(0, dict(BLANK_RULE))
    # The folder of "neither" photos by name only: no path of the machine that trained it.
    metadata["training"]["config"]["neither_photos"] = neither.summary["folder"] if neither else None
    metadata["training"]["config"]["pet_photos"] = pets.summary["folder"] if pets else None
    parity = np.asarray(dataset.val.images[: min(16, len(dataset.val))])
    bundle = export_bundle(model, bundle_dir, image_size=image_size, mean=spec.mean, std=spec.std,
                           parity_images=parity, metadata=metadata)
    console.print(f"bundle written to {bundle} (val accuracy {final['accuracy']:.4f}, "
                  f"val log loss {final['loss']:.4f}{', averaged with the mirror image' if tta['used'] else ''})")
    return bundle


def _report_neither(entry: dict, console: Console) -> None:
    """Each candidate rule's share of validation pets and held-out photos answered "neither"."""
    for name, figures in entry["candidates"].items():
        console.print(f"'neither' rule {name}{' (chosen)' if name == entry['chosen'] else ''}: "
                      + ", ".join(f"{role} {share:.2%}" for role, share in figures.items()))
