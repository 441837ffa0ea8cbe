"""The run folder's files: checkpoints (written whole or not at all), the metrics log kept in step with them,
the checks before a run starts, and what `--resume` reads back. Ctrl-C keeps `last.pt`, the end of the last
whole epoch, to resume from, and saves the weights reached mid-epoch beside it in `interrupted.pt`."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import torch

from catdogcnn.bundle import atomic_write
from catdogcnn.errors import UserError
from catdogcnn.train.config import TrainConfig

log = logging.getLogger("catdogcnn")


class TrainingInterrupted(Exception):
    """Ctrl-C during training; `last.pt` holds the state to `--resume` from."""


INTERRUPTED_CHECKPOINT = "interrupted.pt"
CHECKPOINTS = ("last.pt", "best.pt", INTERRUPTED_CHECKPOINT)
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl", "bundle")  # any of them: the folder holds a run


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


def resume_from(out_dir: Path, config: TrainConfig, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The configuration a run goes on with, and the checkpoint it resumes from (None: it starts afresh).

    A resumed run keeps the configuration it was started with, except `epochs` (it may train longer). One
    killed before its first checkpoint has nothing to resume, so it starts from the beginning.
    """
    if not resume:
        return config, None
    if not (out_dir / "last.pt").exists():
        log.warning("%s: no checkpoint yet; starting from the beginning", out_dir / "last.pt")
        return config, None
    checkpoint = load_checkpoint(out_dir / "last.pt")
    saved = TrainConfig.from_dict(checkpoint["config"])
    saved.epochs = config.epochs
    return saved, checkpoint


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
        raise UserError(f"{out_dir}: only {free / 1e6:.0f} MB free; training needs about {need_bytes / 1e6:.0f} MB")


def restart_metrics_log(path: Path, resumed_after: int | None) -> None:
    """Keep the log in step with the checkpoint a run starts from (a kill can land between a record and the
    checkpoint): the records up to epoch `resumed_after`, none for a run that starts afresh."""
    lines = path.read_text().splitlines() if resumed_after is not None and path.exists() else []
    kept = [line for line in lines if json.loads(line)["epoch"] <= resumed_after]
    atomic_write(path, "".join(line + "\n" for line in kept).encode())


def append_metrics(path: Path, record: dict) -> None:
    """Add an epoch's record to the metrics log by rewriting it whole: a kill mid-write leaves the log as it was."""
    before = path.read_bytes() if path.exists() else b""
    atomic_write(path, before + (json.dumps(record) + "\n").encode())


def clear_checkpoints(out_dir: Path) -> None:
    """Remove an earlier run's checkpoints from a folder a new run starts afresh in (`--overwrite`): a kill
    before the new run's first checkpoint must not leave `--resume` to go on from the old run."""
    for name in CHECKPOINTS:
        (out_dir / name).unlink(missing_ok=True)
