"""What a training run holds from one epoch to the next, and its state as a checkpoint saves and restores it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.optim.swa_utils import AveragedModel

from catdogcnn.augment import AugmentConfig
from catdogcnn.errors import UserError
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import TrainingData
from catdogcnn.train.openset import NeitherPhotos, PetPhotos


@dataclass
class Run:
    config: TrainConfig
    out_dir: Path
    dataset: TrainingData
    device: torch.device
    model: nn.Module
    trained: nn.Module  # what the training steps call: the model, or its DistributedDataParallel wrapper
    normalize: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: AugmentConfig
    augment_rng: torch.Generator
    ema: AveragedModel | None  # an exponential moving average of the weights, validated and exported instead
    use_amp: bool  # bf16 autocast
    rank: int
    world: int
    per_process: int  # training photos each process takes per epoch (the same count on each: DDP steps together)
    steps: int  # steps per epoch
    console: Console
    neither: NeitherPhotos | None = None  # photos of none of the classes, learned as "neither"
    pets: PetPhotos | None = None  # photos of the classes from other collections (their held-out ones)
    start_epoch: int = 0
    best_accuracy: float = -1.0

    @property
    def lead(self) -> bool:
        """Only the first process logs, checkpoints and exports."""
        return self.rank == 0

    @property
    def validated_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def state(self, epoch: int) -> dict:
        """Everything a resumed run needs to go on as if never stopped, after `epoch` epochs."""
        cuda = self.device.type == "cuda"
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "best_accuracy": self.best_accuracy, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
                "augment_rng": self.augment_rng.get_state(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "config": asdict(self.config),
                "classes": self.dataset.summary["classes"]}

    def restore(self, checkpoint: dict, path: Path) -> None:
        """Go on from `checkpoint` (the `state` saved in `path`)."""
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError:  # torch lists every mismatched tensor; one line says what it means
            raise UserError(f"{path}: its weights do not fit this version's {self.config.model} model "
                            "(saved by an older catdogcnn?); start a new run in another folder") from None
        if self.ema:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if self.device.type == "cuda" and checkpoint.get("cuda_rng") is not None:  # dropout draws on the GPU
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
        self.augment_rng.set_state(checkpoint["augment_rng"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.start_epoch, self.best_accuracy = checkpoint["epoch"], checkpoint["best_accuracy"]
        self.console.print(f"resumed from {path} after epoch {self.start_epoch}")
