"""A model on decoded photos: batches as tensors, the training loss, logits, loss and accuracy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def to_batch(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC rows -> float NCHW in [0, 1], channels-last in memory (which the CPU convolutions prefer)."""
    x = torch.from_numpy(images[np.sort(index)]).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255)


def soft_targets(labels: torch.Tensor, num_logits: int) -> torch.Tensor:
    """Labels as float distributions: (N,) probability of class 1 for one logit, (N, C) one-hot otherwise."""
    return labels.float() if num_logits == 1 else F.one_hot(labels, num_logits).float()


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                     targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss against `targets` (soft labels from mixup/cutmix; default: `labels`) and the count of
    photos whose most probable class is their label."""
    targets = soft_targets(labels, logits.shape[1]) if targets is None else targets
    if logits.shape[1] == 1:
        target = targets * (1 - label_smoothing) + label_smoothing / 2
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="sum")
        correct = ((logits[:, 0] > 0).long() == labels).sum()
    else:
        loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
        correct = (logits.argmax(1) == labels).sum()
    return loss, correct


@torch.no_grad()
def predict_logits(model: nn.Module, normalize: nn.Module, images: np.ndarray, device: torch.device,
                   batch_size: int = 64, with_imagenet: bool = False,
                   with_neither: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(class logits, ImageNet logits or None, "neither" logits or None) of `model` on decoded photos, in eval
    mode, on the CPU: the ImageNet logits of a pretrained model when asked, the "neither" logits of a model that
    learned them (`with_neither`), in the same pass.

    Batches of 64: at 256 the seed CNN's first activation map (126 MB) is above glibc's 32 MB limit for reused
    memory, so every batch gets fresh pages from the kernel (600,000 page faults per validation pass, 2x slower).
    """
    model.eval()
    logits, imagenet, neither = [], [], []
    for start in range(0, len(images), batch_size):
        x = normalize(to_batch(images, np.arange(start, min(start + batch_size, len(images))), device))
        x = x.contiguous(memory_format=torch.channels_last)
        if with_imagenet:
            out, extra, *_ = model.forward_all(x)
            imagenet.append(extra.float().cpu())
        elif with_neither:
            out, extra = model(x, with_neither=True)
            neither.append(extra.float().cpu())
        else:
            out = model(x)
        logits.append(out.float().cpu())
    return (torch.cat(logits), torch.cat(imagenet) if with_imagenet else None,
            torch.cat(neither) if with_neither else None)


def logits_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    loss, correct = loss_and_correct(logits, torch.from_numpy(np.asarray(labels)))
    # cross-entropy gives -0.0 (or a hair below zero) when every photo is certain: "-0.0000" in the log
    return {"loss": max(0.0, float(loss) / len(labels)), "accuracy": int(correct) / len(labels)}


def evaluate_arrays(model: nn.Module, normalize: nn.Module, images: np.ndarray, labels: np.ndarray,
                    device: torch.device) -> dict:
    """Loss and accuracy of `model` on decoded photos (no augmentation, eval mode)."""
    return logits_metrics(predict_logits(model, normalize, images, device)[0], labels)
