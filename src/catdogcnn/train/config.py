"""Every training setting, said once: its type (a `Literal` for a choice), its default and, in the field's
metadata, its help line and the range it must fall in. `TrainConfig.validate` checks a configuration against
them, the `train` command makes one flag per field from them, and the bundle records `asdict(config)`.

The defaults reproduce the seed's recipe: seed CNN, Adam 1e-3, batch 32, 25 epochs, flip/shear/zoom.
No torch here: the command line reads this module to build its flags.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import Any, Literal

from catdogcnn.errors import UserError

Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["constant", "cosine"]
Resize = Literal["bilinear", "nearest", "bicubic", "lanczos"]  # data.RESAMPLE's names
Extra = Literal["val", "train", "none"]
Select = Literal["best", "last"]
Tta = Literal["auto", "on", "off"]
Recipe = Literal["full", "probe", "finetune"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts: a lower and/or upper bound, each inclusive unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def setting(default: Any, help: str, bounds: Range | None = None) -> Any:
    """A field of `TrainConfig`: its default, its help line (the `train` command's) and its range, if any."""
    return field(default=default, metadata={"help": help, "bounds": bounds})


_KINDS = {int: "a whole number", float: "a number", str: "a string"}
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
NOT_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


@dataclass
class TrainConfig:
    model: str = setting("seed_cnn", "Architecture from the registry: seed_cnn, resnet_small, efficientnet_lite0, ...")
    image_size: int | None = setting(None, "Input size in pixels (default: the model's own, 64 for the seed CNN).",
                                     Range(16))
    resize: Resize | None = setting(None, "Photo resampling (default: the model's; nearest is Keras's load_img).")
    epochs: int = setting(25, "Passes over the training photos.", AT_LEAST_1)
    batch_size: int = setting(32, "Photos per step (per process with --nproc).", AT_LEAST_1)
    lr: float = setting(1e-3, "Learning rate.", POSITIVE)
    optimizer: Optimizer = setting("adam", "adam (the seed's), adamw, or sgd (momentum 0.9, Nesterov).")
    adam_eps: float = setting(1e-7, "Adam's epsilon, added to sqrt(v) before the bias correction as Keras (the "
                              "seed's) adds it.", POSITIVE)
    weight_decay: float = setting(0.0, "Weight decay (decoupled from the gradient with adamw).", NOT_NEGATIVE)
    schedule: Schedule = setting("constant", "constant (the seed's), or cosine: linear warm-up, then cosine decay "
                                 "to 0.")
    warmup_epochs: float = setting(0.0, "Epochs of linear warm-up (cosine schedule).", NOT_NEGATIVE)
    backbone_lr_scale: float = setting(1.0, "Pretrained backbone's lr = lr x this.", NOT_NEGATIVE)
    label_smoothing: float = setting(0.0, "Label smoothing of the training loss.", FRACTION)
    ema: float = setting(0.0, "Decay (per step) of an exponential moving average of the weights, validated and "
                         "exported instead of the raw weights (0: off).", FRACTION)
    augment: str = setting("seed", "Augmentation: a preset (none, flip, seed, keras, medium, crop, strong), "
                           "optionally with fields set: 'crop,cutout=0.25,mixup=0.2'.")
    dropout: float | None = setting(None, "Dropout rate (default: the model's own).", FRACTION)
    extra: Extra = setting("val", "Seed layout: extra_set gives the validation photos (val) and also trains on the "
                           "rest (train), or is ignored (none: val_fraction of training_set validates).")
    val_fraction: float = setting(0.1, "Share of the training photos held out to validate on when there is no "
                                  "extra_set.", Range(0, 1, low_open=True, high_open=True))
    val_max: int = setting(5000, "Validation photos at most (a stratified sample); more make the choice of epoch "
                           "surer.", Range(2))
    select: Select = setting("best", "Weights to export: best (validation accuracy; of equals the later epoch) or "
                             "last.")
    tta: Tta = setting("auto", "Bundle predicts on the photo and its mirror image: auto (when that lowers the log "
                       "loss and keeps the accuracy on the validation photos), on or off.")
    recipe: Recipe = setting("full", "full (train all weights), probe (frozen pretrained features + logistic "
                             "regression) or finetune (a pretrained backbone's last blocks and the head, trained on "
                             "the cached output of the frozen ones).")
    train_blocks: int = setting(3, "finetune: backbone blocks trained, counted from the last; the earlier ones are "
                                "frozen and run once per photo.", AT_LEAST_1)
    augment_views: int = setting(0, "finetune: augmented copies of each photo cached beside the photo and its "
                                 "mirror image, drawn with --augment (e.g. crop); each epoch sees one view of a "
                                 "photo at random.", NOT_NEGATIVE)
    neither_photos: str | None = setting(None, "A folder of photos that show none of the classes, learned as the "
                                         "answer 'neither' (full and finetune recipes).")
    neither_weight: float = setting(1.0, "Weight of the 'neither' loss beside the class loss.", POSITIVE)
    neither_pets_flagged: float = setting(0.01, "Share of class photos the 'neither' cut may turn away, with 95% "
                                          "confidence (set on the validation photos, whose own share is kept "
                                          "lower by their number).", Range(0, 0.5))
    neither_holdout_kinds: float = setting(0.25, "Share of the neither photos' kinds (the file name before its last "
                                           "'_', or the sub-folder) kept out of training, to measure 'neither' on "
                                           "kinds never seen.", FRACTION)
    neither_holdout_photos: float = setting(0.2, "Share of each trained kind's neither photos kept out of training, "
                                            "to measure 'neither' on kinds seen.", FRACTION)
    pet_photos: str | None = setting(None, "A folder of class sub-folders (cats/, dogs/) of photos of the classes from "
                                     "other collections, named <breed>_<n>.jpg: trained on beside DATA's (split by "
                                     "breed); with --neither-photos, the 'neither' cut is set on their held-out "
                                     "photos too.")
    pet_repeats: int = setting(4, "Times each --pet-photos photo is seen per epoch (they are few beside DATA's).",
                               AT_LEAST_1)
    pet_holdout_breeds: float = setting(0.25, "Share of the pet photos' breeds kept out of training, to measure "
                                        "pets of breeds never seen.", FRACTION)
    pet_holdout_photos: float = setting(0.25, "Share of each trained breed's pet photos kept out of training: they "
                                        "validate, and set the 'neither' cut beside DATA's validation photos.",
                                        FRACTION)
    distill: float = setting(1.0, "finetune: weight of keeping the frozen network's ImageNet outputs (distilled at "
                             "temperature 2 while the last blocks train, 'learning without forgetting'), so that the "
                             "graph's ImageNet head stays right for the 'neither' rule (0: off).", NOT_NEGATIVE)
    probe_c: float | None = setting(None, "probe: regularisation C (default: chosen on validation).", POSITIVE)
    seed: int = setting(0, "Seed of every random draw: the same seed gives the same model.")
    device: Device = setting("auto", "auto: cuda, else mps, else cpu.")
    precision: Precision = setting("auto", "auto (bf16 autocast on GPUs and on CPUs with bf16 units), fp32 or "
                                   "bf16.")
    threads: int | None = setting(None, "CPU threads for torch (default: the cores, shared among processes).",
                                  AT_LEAST_1)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def validate(self) -> None:
        """Each setting against its choices and range, checked before any photo is decoded rather than deep
        inside torch or scikit-learn; then the model's name and the augmentation."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            allowed, kind = choices(f.name), value_type(f.name)
            if allowed is not None and value not in allowed:
                raise UserError(f"{f.name} must be {' or '.join([', '.join(allowed[:-1]), allowed[-1]])}, "
                                f"not {value!r}")
            # JSON has no int/float distinction for whole numbers, so an int is a float; a bool is no number
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise UserError(f"{f.name} must be {_KINDS[kind]}, not {value!r}")
            bounds = f.metadata["bounds"]
            if bounds is not None and value not in bounds:
                raise UserError(f"{f.name} must be {bounds}, not {value}")
        from catdogcnn.augment import parse_augment
        from catdogcnn.models import get_spec

        get_spec(self.model)
        augment = parse_augment(self.augment)
        if self.augment_views and self.recipe != "finetune":
            raise UserError(f"augment_views is for the finetune recipe (its cached photos), not {self.recipe}")
        if self.augment_views and replace(augment, hflip=False).is_identity:
            raise UserError(f"augment_views with augment {self.augment!r} would cache copies of the photo or its "
                            "mirror image, which are cached already: choose an augmentation that crops or warps "
                            "(e.g. crop)")
        if self.augment_views and augment.mixes:
            raise UserError(f"augment_views caches each photo augmented on its own: augment {self.augment!r} "
                            "blends two photos (mixup, cutmix), which a cached copy cannot hold")
        if self.pet_photos and self.recipe == "probe":
            raise UserError("pet_photos is for the full and finetune recipes, not probe")
        if self.neither_photos and self.tta == "on":
            raise UserError("tta on cannot go with neither_photos: the learned neither cut is fitted on single views")


@cache
def setting_types() -> dict[str, Any]:
    """Each setting's type, as written in `TrainConfig` (the annotations are strings until resolved)."""
    return typing.get_type_hints(TrainConfig)


def _parts(name: str) -> tuple:
    """A setting's type and, for `X | None`, X and None."""
    return setting_types()[name], *typing.get_args(setting_types()[name])


def choices(name: str) -> tuple[str, ...] | None:
    """The values a choice setting takes (its `Literal`), or None for a setting that is not a choice."""
    return next((typing.get_args(p) for p in _parts(name) if typing.get_origin(p) is Literal), None)


def value_type(name: str) -> type:
    """int, float or str: the type of a setting's values (of its choices, for a choice)."""
    literal = choices(name)
    if literal is not None:
        return type(literal[0])
    return next(p for p in _parts(name) if p in (int, float, str))
