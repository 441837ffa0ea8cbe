"""The fine-tuning recipe a 2-core CPU can run: a pretrained backbone's early blocks stay frozen and run once per
photo, its mirror image and (with `augment_views`) augmented copies, in onnxruntime, their output cached on disk;
the last `train_blocks` blocks, the class head and, with `neither_photos`, a second head for "none of the
classes" train on that cache.

Training the whole network on a CPU costs about 15 photos a second; the frozen part here is 85% of the work,
done once, so an epoch of the rest runs at about 120 photos a second.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from catdogcnn import data as D
from catdogcnn.augment import AugmentConfig, augment_batch, parse_augment
from catdogcnn.bundle import atomic_write
from catdogcnn.errors import UserError
from catdogcnn.models import Normalize, build_model, get_spec
from catdogcnn.train.calibrate import is_cats_and_dogs
from catdogcnn.train.checkpoint import check_writable, clear_checkpoints, save_checkpoint
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import prepare_data
from catdogcnn.train.device import use_bf16
from catdogcnn.train.finish import finish
from catdogcnn.train.metrics import loss_and_correct, to_batch
from catdogcnn.train.openset import NeitherPhotos, PetPhotos, neither_for, pets_for
from catdogcnn.train.optim import lr_factor, make_optimizer


class FrozenPrefix(nn.Module):
    """uint8 photos (N, H, W, 3) -> the activations entering block `first_trained` of the backbone."""

    def __init__(self, model: nn.Module, first_trained: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize, self.backbone, self.first_trained = Normalize(mean, std), model.backbone, first_trained

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = self.normalize(image.permute(0, 3, 1, 2).float() / 255)
        return net._blocks[: self.first_trained](F.relu6(net._bn0(net._conv_stem(x))))

    def session(self, image_size: int):
        """This prefix exported once to an onnxruntime session (each photo set then reuses it)."""
        import onnxruntime as ort

        from catdogcnn.export import to_onnx

        if getattr(self, "_session", None) is None:
            self._session = ort.InferenceSession(to_onnx(self.eval(), image_size, ["activations"]),
                                                 providers=["CPUExecutionProvider"])
        return self._session


def trained_map(model: nn.Module, first_trained: int, x: torch.Tensor) -> torch.Tensor:
    """The last feature map from the cached activations: the trained blocks, then the head convolution."""
    net = model.backbone
    return F.relu6(net._bn1(net._conv_head(net._blocks[first_trained:](x))))


def cached_activations(prefix: FrozenPrefix, image_size: int, images: np.ndarray, name: str,
                       cache_dir: Path | None, batch_size: int = 32) -> np.ndarray:
    """The frozen prefix's output (fp16) for decoded photos, from the disk cache when computed before."""
    digest = hashlib.sha256(np.ascontiguousarray(images[:: max(1, len(images) // 64)]).tobytes())
    weights = next(iter(prefix.backbone._conv_stem.parameters())).detach().numpy().tobytes()  # which backbone
    digest.update(weights + f"{len(images)}|{image_size}|{prefix.first_trained}|{name}".encode())
    cache = Path(cache_dir) / f"activations-{digest.hexdigest()[:24]}.npy" if cache_dir else None
    if cache and cache.exists():
        return np.load(cache, mmap_mode="r")
    session = prefix.session(image_size)
    out = np.concatenate([session.run(None, {"image": np.ascontiguousarray(images[i:i + batch_size])})[0]
                          .astype(np.float16) for i in range(0, len(images), batch_size)])
    if cache:
        buffer = io.BytesIO()
        np.save(buffer, out)
        atomic_write(cache, buffer.getvalue())
    return out


def train_finetune(data_dir: Path, out_dir: Path, config: TrainConfig, checkpoint: dict | None = None,
                   cache_dir: Path | None | bool = None, bundle_dir: Path | None = None) -> Path:
    """Fine-tune the last blocks on cached activations; checkpoint every epoch; export the bundle."""
    console = Console(stderr=True, soft_wrap=True)
    check_writable(out_dir)
    if checkpoint is None:
        clear_checkpoints(out_dir)
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    resize = config.resize or spec.resize
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    dataset = prepare_data(Path(data_dir), config, image_size, resize, cache_dir)
    neither = neither_for(config, list(dataset.train.paths), image_size, resize)
    pets = pets_for(config, dataset.summary["classes"], list(dataset.train.paths), image_size, resize)
    options = {"dropout": config.dropout} if config.dropout is not None else {}
    model = build_model(config.model, len(dataset.summary["classes"]), image_size, open_set=neither is not None,
                        **options)
    if not hasattr(model, "backbone"):
        raise UserError(f"the finetune recipe needs a pretrained backbone; {config.model!r} has none")
    first = len(model.backbone._blocks) - config.train_blocks
    if first < 0:
        raise UserError(f"train_blocks must be at most {len(model.backbone._blocks)} for {config.model}")
    prefix = FrozenPrefix(model, first, spec.mean, spec.std)
    feature_cache = None if cache_dir is False else Path(cache_dir or D.default_cache_dir())
    augment = parse_augment(config.augment)
    train_x = views_of(prefix, image_size, dataset.train.images, "pets", feature_cache, augment, config.augment_views)
    labels = dataset.train.labels
    if pets:  # the other collections' pets join the data set's, seen `pet_repeats` times an epoch
        train_x = np.concatenate([train_x, views_of(prefix, image_size, pets.images["train"], "pet-photos",
                                                    feature_cache, augment, config.augment_views)], axis=1)
        labels = np.concatenate([labels, pets.labels["train"]])
    neither_x = views_of(prefix, image_size, neither.images["train"], "neither", feature_cache, augment,
                       config.augment_views) if neither else None
    val_x = cached_activations(prefix, image_size, dataset.val.images, "val", feature_cache)
    console.print(f"data: {len(dataset.train)} training, {len(dataset.val)} validation photos"
                  + (f", {len(pets.images['train'])} pet photos of other collections" if pets else "")
                  + (f", {len(neither.images['train'])} 'neither' photos" if neither else "")
                  + f"; frozen blocks cached ({time.perf_counter() - started:.0f} s)")
    repeated = len(pets.images["train"]) if pets else 0
    _train_epochs(model, first, config, train_x, labels, repeated, neither_x, out_dir, checkpoint, console)
    val_logits = _outputs(model, first, val_x)
    training = {"seconds": time.perf_counter() - started, "epoch": config.epochs, "trained_blocks": config.train_blocks}
    # Classes other than cats and dogs stand for the ImageNet classes their training photos fall in.
    train_imagenet = (_outputs(model, first, train_x[0, :len(dataset.train)])[1]
                      if neither and not is_cats_and_dogs(dataset.summary["classes"]) else None)
    return finish(model, bundle_dir or out_dir / "bundle", config, dataset, training, console,
                  val_logits=val_logits[:2], val_neither=val_logits[2], neither=neither, pets=pets,
                  held_out=_held_out_outputs(model, first, prefix, image_size, neither, pets, feature_cache),
                  train_imagenet=train_imagenet)


def views_of(prefix: FrozenPrefix, image_size: int, images: np.ndarray, name: str, cache: Path | None,
             augment: AugmentConfig | None = None, augmented_views: int = 0) -> np.ndarray:
    """(2 + augmented_views, N, ...) activations of the photos, of their mirror images and of copies augmented
    with `augment`. View k's draws come from seed k alone, so its cache serves every training seed."""
    if augmented_views and augment is None:
        raise ValueError("augmented views need an augmentation")
    views = [cached_activations(prefix, image_size, images, name, cache),
             cached_activations(prefix, image_size, images[:, :, ::-1], f"{name}-mirrored", cache)]
    for view in range(augmented_views):
        views.append(cached_activations(prefix, image_size, augmented_copy(images, augment, view),
                                        f"{name}-augmented-{view}", cache))
    return np.stack(views)


def augmented_copy(images: np.ndarray, augment: AugmentConfig, seed: int, batch_size: int = 256) -> np.ndarray:
    """uint8 photos (N, H, W, 3) augmented once each by `augment_batch`, its draws fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    out = np.empty(images.shape, np.uint8)
    for i in range(0, len(images), batch_size):
        batch = to_batch(images, np.arange(i, min(i + batch_size, len(images))), torch.device("cpu"))
        warped = augment_batch(batch, augment, generator).mul(255).round_().clamp_(0, 255)
        out[i:i + batch_size] = warped.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def random_views(rng: np.random.Generator, photos: int, views: int) -> np.ndarray:
    """Which cached view each of `photos` places of an epoch's order is seen as, uniformly at random; with two
    views a draw below 0.5 is the mirror image (view 1)."""
    return views - 1 - (rng.random(photos) * views).astype(int)


def _train_epochs(model: nn.Module, first: int, config: TrainConfig, train_x: np.ndarray, labels: np.ndarray,
                  repeated: int, neither_x: np.ndarray | None, out_dir: Path, checkpoint: dict | None,
                  console: Console) -> None:
    """Epochs over the class photos and the "neither" photos together, each seen as one of its cached views at
    random (itself, its mirror image, its augmented copies); the last `repeated` class photos (other
    collections') `config.pet_repeats` times. BatchNorm keeps its ImageNet statistics (batches of 64 would
    estimate them worse). With `config.distill`, the ImageNet head's outputs are pulled towards those of the
    frozen network the training started from, so that they keep their meaning."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.distill else None
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("backbone.") or name.startswith(
            ("backbone._conv_head", "backbone._bn1")) or (name.startswith("backbone._blocks.")
                                                         and int(name.split(".")[2]) >= first)
    model.backbone._fc.requires_grad_(False)
    n_pets, n_neither = len(labels), 0 if neither_x is None else neither_x.shape[1]
    # Rows of an epoch: every photo once, the other collections' pets again (pet_repeats - 1) times.
    rows_per_epoch = np.concatenate([np.arange(n_pets + n_neither),
                                     np.tile(np.arange(n_pets - repeated, n_pets), config.pet_repeats - 1)])
    steps = math.ceil(len(rows_per_epoch) / config.batch_size)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    start = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])  # dropout goes on with the draws a straight run makes
        start = checkpoint["epoch"]
    amp = use_bf16(config.precision, torch.device("cpu"))
    for epoch in range(start, config.epochs):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        rng = np.random.default_rng(config.seed * 100_003 + epoch)  # an epoch's draws depend on (seed, epoch) alone
        order = rng.permutation(rows_per_epoch)
        views = random_views(rng, len(order), len(train_x))  # the view each place of the order is seen as
        began, total = time.perf_counter(), 0.0
        for step in range(steps):
            rows = order[step * config.batch_size:(step + 1) * config.batch_size]
            view = views[step * config.batch_size:(step + 1) * config.batch_size]
            is_neither = rows >= n_pets
            x = np.empty((len(rows), *train_x.shape[2:]), train_x.dtype)
            x[~is_neither] = train_x[view[~is_neither], rows[~is_neither]]
            if n_neither:
                x[is_neither] = neither_x[view[is_neither], rows[is_neither] - n_pets]
            x = torch.from_numpy(x).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                pooled = trained_map(model, first, x).mean((2, 3))
                features = model.dropout(pooled)
                logits = model.head(features)
                neither_logit = model.neither(features)[:, 0] if n_neither else None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher.backbone._fc(trained_map(teacher, first, x).mean((2, 3))).float()
                    imagenet = model.backbone._fc(pooled).float()
            pets = torch.from_numpy(~is_neither)
            loss = loss_and_correct(logits.float()[pets], torch.from_numpy(labels[rows[~is_neither]]),
                                    config.label_smoothing)[0] / max(1, int(pets.sum()))
            if n_neither:
                loss = loss + config.neither_weight * F.binary_cross_entropy_with_logits(
                    neither_logit.float(), torch.from_numpy(is_neither).float())
            if teacher is not None:
                loss = loss + config.distill * distillation_loss(imagenet, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        console.print(f"epoch {epoch + 1:>3}/{config.epochs}  loss {total / steps:.4f}  "
                      f"{time.perf_counter() - began:.0f} s")
        save_checkpoint(out_dir / "last.pt", {"epoch": epoch + 1, "config": asdict(config),
                                              "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict(),
                                              "torch_rng": torch.get_rng_state()})


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Kullback-Leibler divergence of the student's softened outputs from the teacher's, times T^2 (so that its
    gradients keep their scale whatever T), as "learning without forgetting" distils the old task."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature**2


@torch.no_grad()
def _outputs(model: nn.Module, first: int, activations: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    """(class logits, ImageNet logits, "neither" logits or None) of cached activations, in eval mode."""
    model.eval()
    parts = []
    for i in range(0, len(activations), batch_size):  # np.array copies: a cache read back is memory-mapped, read-only
        logits, imagenet, _, neither = model.outputs_from_map(
            trained_map(model, first, torch.from_numpy(np.array(activations[i:i + batch_size])).float()))
        parts.append((logits, imagenet, neither))
    return tuple(torch.cat(p) if p[0] is not None else None for p in zip(*parts, strict=True))


def _held_out_outputs(model: nn.Module, first: int, prefix: FrozenPrefix, image_size: int,
                      neither: NeitherPhotos | None, pets: PetPhotos | None,
                      cache: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """("neither" logits, ImageNet logits) of the held-out photos of other collections: `neither-seen`,
    `neither-unseen` (kinds seen, never seen), `pets-seen`, `pets-unseen` (breeds seen, never seen)."""
    if neither is None or model.neither is None:
        return {}
    out = {}
    for name, photos in (("neither", neither), ("pets", pets)):
        for role in ("seen", "unseen"):
            if photos is not None and len(photos.images[role]):
                _, imagenet, logits = _outputs(model, first, cached_activations(
                    prefix, image_size, photos.images[role], f"{name}-{role}", cache))
                out[f"{name}-{role}"] = (logits.numpy()[:, 0], imagenet.numpy())
    return out
