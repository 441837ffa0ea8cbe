"""Training: a configuration in, a model bundle out. The modules, in the order a run meets them:

- `config`: `TrainConfig`, every setting said once (type, default, help, range); no torch, so the command
  line builds its flags from it.
- `dataset`: the training and validation photos (`test_set` is never used).
- `loop`: `train()`, set up, epochs, finish; `run`: what a run holds between epochs, as a checkpoint saves it.
- `device`, `optim`, `metrics`, `distributed`: where it computes, how it steps, what it measures, and
  training in several processes.
- `checkpoint`: the run folder's files, resuming, Ctrl-C.
- `finish` and `calibrate`: figures on the validation photos, temperature, mirror averaging, the "neither"
  rule, the bundle; `probe`: the linear-probe recipe.

The names below are importable from the package itself; each loads its module when first used, so importing
`catdogcnn.train.config` (the command line does, for every command) does not import torch.
"""

from __future__ import annotations

import importlib

from catdogcnn.extras import needs_extra

_HOMES = {
    "TrainConfig": "config",
    "TrainingData": "dataset", "prepare_data": "dataset", "unused_extra": "dataset",
    "train": "loop",
    "TrainingInterrupted": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "check_writable": "checkpoint",
    "keep_freed_memory": "device", "pick_device": "device", "use_bf16": "device",
    "make_optimizer": "optim", "lr_factor": "optim",
    "loss_and_correct": "metrics", "predict_logits": "metrics", "logits_metrics": "metrics",
    "evaluate_arrays": "metrics",
    "init_distributed": "distributed",
    "calibrate": "calibrate", "choose_tta": "calibrate", "calibrate_neither": "calibrate",
    "train_probe": "probe", "extract_features": "probe",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with needs_extra("train"):
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
