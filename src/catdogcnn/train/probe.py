"""The linear-probe recipe: a frozen pretrained backbone's pooled features, and a logistic regression on them
as the model's head (its C chosen by validation log loss)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from catdogcnn import data as D
from catdogcnn.bundle import atomic_write
from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra
from catdogcnn.models import ModelSpec, Normalize, build_model, get_spec
from catdogcnn.train.checkpoint import check_writable
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import prepare_data
from catdogcnn.train.finish import finish

PROBE_C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0]
# The settings this recipe reads. It trains nothing by gradient and predicts on the validation photos as they
# are, so the rest (epochs, optimizer, augmentation, ...) would go unheeded.
PROBE_SETTINGS = frozenset({"model", "image_size", "resize", "extra", "val_fraction", "val_max", "tta", "recipe",
                            "probe_c", "seed", "threads"})


class FeatureExtractor(nn.Module):
    """uint8 photos (N, H, W, 3) -> pooled backbone features (N, 1280)."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(self.normalize(image.permute(0, 3, 1, 2).float() / 255))


def extract_features(model: nn.Module, spec: ModelSpec, image_size: int, image_sets: list[D.ImageSet],
                     cache_dir: Path | None, batch_size: int = 64) -> list[np.ndarray]:
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


def check_probe_request(config: TrainConfig, flags: Sequence[str] = ()) -> None:
    """Refuse, in one line, what the probe recipe would leave unheeded: `flags` (the caller's own options it
    cannot honour, e.g. --resume) and every setting it does not read that is not at its default."""
    unheeded = [*flags, *(f"--{f.name.replace('_', '-')}" for f in fields(config)
                          if f.name not in PROBE_SETTINGS and getattr(config, f.name) != f.default)]
    if unheeded:
        raise UserError(f"the probe recipe cannot honour {', '.join(unheeded)}: it fits a logistic regression on "
                        "a frozen backbone's features, once, in one process")


def train_probe(data_dir: Path, out_dir: Path, config: TrainConfig, cache_dir: Path | None | bool = None,
                show_progress: bool | None = None, bundle_dir: Path | None = None) -> Path:
    """Frozen pretrained backbone + logistic regression on its features; C chosen by validation log loss."""
    console = Console(stderr=True, soft_wrap=True)
    check_writable(out_dir)
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    dataset = prepare_data(Path(data_dir), config, image_size, config.resize or spec.resize, cache_dir)
    console.print(f"data: {len(dataset.train)} training, {len(dataset.val)} validation photos at {image_size} px "
                  f"({time.perf_counter() - started:.0f} s)")
    model = build_model(config.model, len(dataset.summary["classes"]), image_size).eval()
    if not hasattr(model, "backbone"):
        raise UserError(f"the probe recipe needs a pretrained backbone; {config.model!r} has none")
    feature_cache = None if cache_dir is False else Path(cache_dir or D.default_cache_dir())
    train_x, val_x = extract_features(model, spec, image_size, [dataset.train, dataset.val], feature_cache)
    console.print(f"features of {len(train_x) + len(val_x)} photos ready at {time.perf_counter() - started:.0f} s")
    best_c, fit = _fit_head(train_x, dataset.train.labels, val_x, dataset.val.labels, config.probe_c, console)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(fit.coef_).float())
        model.head.bias.copy_(torch.from_numpy(fit.intercept_).float())
        features = torch.from_numpy(val_x)
        val_logits = (model.head(features), model.backbone._fc(features))
    training = {"seconds": time.perf_counter() - started, "probe_c": best_c}
    return finish(model, bundle_dir or out_dir / "bundle", config, dataset, training, console, val_logits)


def _fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c: float | None,
              console: Console) -> tuple:
    """(C, the logistic regression fitted with it): `c`, or the one of PROBE_C_GRID with the lowest validation
    log loss."""
    with needs_extra("train"):
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import log_loss

    scores = []
    for candidate in [c] if c else PROBE_C_GRID:
        fit = LogisticRegression(C=candidate, max_iter=5000).fit(train_x, train_y)
        scores.append((log_loss(val_y, fit.predict_proba(val_x), labels=fit.classes_), candidate, fit))
        console.print(f"C={candidate:g}: val log loss {scores[-1][0]:.4f}, "
                      f"val accuracy {fit.score(val_x, val_y):.4f}")
    _, best_c, fit = min(scores, key=lambda t: t[0])
    return best_c, fit
