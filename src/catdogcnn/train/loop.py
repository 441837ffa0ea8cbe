"""The training loop: set up, train epoch by epoch, finish. Photos are decoded once into the on-disk cache;
each batch is a slice of uint8 arrays, augmented on the whole batch. A run folder holds `metrics.jsonl`,
`last.pt`, `best.pt` and, at the end, the model bundle in `bundle/`.

Under torchrun each process trains on its share of every batch (DistributedDataParallel); the first process
logs, checkpoints and exports.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from catdogcnn.augment import augment_batch, mix_batch, parse_augment
from catdogcnn.models import Normalize, build_model, get_spec, num_outputs
from catdogcnn.train.checkpoint import (
    TrainingInterrupted,
    check_writable,
    load_checkpoint,
    restart_metrics_log,
    resume_from,
    save_checkpoint,
)
from catdogcnn.train.config import TrainConfig
from catdogcnn.train.dataset import prepare_data
from catdogcnn.train.device import training_device, use_bf16
from catdogcnn.train.distributed import end_training, init_distributed, leave, wrap
from catdogcnn.train.finetune import train_finetune
from catdogcnn.train.finish import finish
from catdogcnn.train.metrics import evaluate_arrays, loss_and_correct, soft_targets, to_batch
from catdogcnn.train.optim import lr_factor, make_optimizer
from catdogcnn.train.probe import train_probe
from catdogcnn.train.run import Run


def train(data_dir: Path, out_dir: Path, config: TrainConfig | None = None, resume: bool = False,
          cache_dir: Path | None | bool = None, show_progress: bool | None = None,
          bundle_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
          export: bool = True) -> Path | None:
    """Train, checkpoint every epoch, export the bundle (default `out_dir/bundle`); returns the bundle path.

    The bundle is replaced atomically, so `bundle_dir` may be a bundle in use (the shipped model, say).
    `on_epoch` gets each epoch's metrics record after its checkpoint is saved (a search prunes from it by
    raising); `export=False` stops after the last epoch, writing no bundle (and returns None). Under torchrun
    the processes other than the first return None.
    """
    out_dir = Path(out_dir)
    config, checkpoint = resume_from(out_dir, config or TrainConfig(), resume)
    config.validate()
    bundle_dir = Path(bundle_dir) if bundle_dir else out_dir / "bundle"
    if config.recipe != "full" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"the {config.recipe} recipe trains in one process; run it without torchrun or --nproc")
    if config.recipe == "probe":
        return train_probe(Path(data_dir), out_dir, config, cache_dir, show_progress, bundle_dir)
    if config.recipe == "finetune":
        return train_finetune(Path(data_dir), out_dir, config, checkpoint, cache_dir, bundle_dir)
    run = _set_up(Path(data_dir), out_dir, config, checkpoint, cache_dir)
    _train_epochs(run, run.lead and (run.console.is_terminal if show_progress is None else show_progress), on_epoch)
    return _finish_run(run, bundle_dir, export)


def _set_up(data_dir: Path, out_dir: Path, config: TrainConfig, checkpoint: dict | None,
            cache_dir: Path | None | bool) -> Run:
    """The photos, the model and its optimizer, on this process's device, restored from `checkpoint` if any."""
    rank, world = init_distributed()
    if rank == 0:
        check_writable(out_dir)
    console = Console(stderr=True, soft_wrap=True, quiet=rank != 0)
    spec = get_spec(config.model)
    image_size = config.image_size or spec.image_size
    torch.manual_seed(config.seed)
    device = training_device(config, world)

    started = time.perf_counter()
    dataset = prepare_data(data_dir, config, image_size, config.resize or spec.resize, cache_dir)
    classes = dataset.summary["classes"]
    console.print(f"data: {len(dataset.train)} training, {len(dataset.val)} validation photos, classes {classes}, "
                  f"{len(dataset.train.bad) + len(dataset.val.bad)} bad files skipped "
                  f"({time.perf_counter() - started:.1f} s)")

    options = {"dropout": config.dropout} if config.dropout is not None else {}
    model = build_model(config.model, len(classes), image_size, **options).to(device)
    model = model.to(memory_format=torch.channels_last)
    trained = wrap(model, world)
    optimizer = make_optimizer(model, config)
    # Each process takes every world-th photo of the epoch's order (the same count on each: DDP steps together).
    per_process = len(dataset.train) // world
    steps = math.ceil(per_process / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    augment = parse_augment(config.augment)
    augment_rng = torch.Generator().manual_seed(config.seed)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    run = Run(config=config, out_dir=out_dir, dataset=dataset, device=device, model=model, trained=trained,
              normalize=Normalize(spec.mean, spec.std).to(device), optimizer=optimizer, scheduler=scheduler,
              augment=augment, augment_rng=augment_rng, ema=ema, use_amp=use_bf16(config.precision, device),
              rank=rank, world=world, per_process=per_process, steps=steps, console=console)
    if checkpoint:
        run.restore(checkpoint, out_dir / "last.pt")
    if run.lead:
        restart_metrics_log(out_dir / "metrics.jsonl", run.start_epoch if checkpoint else None)
    return run


def _train_epochs(run: Run, show_progress: bool, on_epoch: Callable[[dict], None] | None) -> None:
    """Every epoch from where the run stands; Ctrl-C saves `last.pt` and raises TrainingInterrupted."""
    columns = [TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.4f} {task.fields[speed]:.0f} img/s"),
               TimeRemainingColumn()]
    epoch = run.start_epoch
    try:
        with Progress(*columns, console=run.console, disable=not show_progress, transient=True) as progress:
            for epoch in range(run.start_epoch, run.config.epochs):
                figures = _train_epoch(run, epoch, progress, show_progress)
                if run.lead:
                    _end_epoch(run, epoch, figures, on_epoch)
    except KeyboardInterrupt:
        # The unfinished epoch is redone on --resume, starting from the weights reached so far.
        if run.lead:
            save_checkpoint(run.out_dir / "last.pt", run.state(epoch))
        raise TrainingInterrupted("interrupted; resume with --resume "
                                  f"(state saved in {run.out_dir / 'last.pt'})") from None


def _train_epoch(run: Run, epoch: int, progress: Progress, show_progress: bool) -> dict:
    """One pass over this process's share of the training photos; the epoch's training figures."""
    config = run.config
    run.model.train()
    # The order of an epoch depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = torch.randperm(len(run.dataset.train.labels),
                           generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    order = order.numpy()[run.rank::run.world][:run.per_process]
    task = progress.add_task("", total=run.steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0, acc=0.0, speed=0.0)
    started, seen, loss_sum, correct_sum = time.perf_counter(), 0, 0.0, 0
    heartbeat = started
    for step in range(run.steps):
        # sorted rows: sequential reads from the memory-mapped cache
        index = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
        loss, correct = _train_step(run, index)
        seen += len(index)
        loss_sum += float(loss.detach())
        correct_sum += int(correct)
        progress.update(task, advance=1, loss=loss_sum / seen, acc=correct_sum / seen,
                        speed=seen / (time.perf_counter() - started))
        if not show_progress and time.perf_counter() - heartbeat > 60:  # a sign of life in log files
            heartbeat = time.perf_counter()
            run.console.print(f"  epoch {epoch + 1} step {step + 1}/{run.steps}  loss {loss_sum / seen:.4f}  "
                              f"acc {correct_sum / seen:.4f}  {seen / (heartbeat - started):.0f} img/s")
    seconds = time.perf_counter() - started
    progress.remove_task(task)
    return {"train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen, "seconds": seconds,
            "images_per_second": seen * run.world / seconds}


def _train_step(run: Run, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the training photos at `index` (sorted); their summed loss and correct count."""
    train = run.dataset.train
    x = augment_batch(to_batch(train.images, index, run.device), run.augment, run.augment_rng)
    y = torch.from_numpy(train.labels[index]).to(run.device)
    x, targets = mix_batch(x, soft_targets(y, num_outputs(len(train.classes))), run.augment, run.augment_rng)
    x = run.normalize(x).contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        logits = run.trained(x)
    loss, correct = loss_and_correct(logits.float(), y, run.config.label_smoothing, targets)
    run.optimizer.zero_grad(set_to_none=True)
    (loss / len(index)).backward()
    run.optimizer.step()
    run.scheduler.step()
    if run.ema:
        run.ema.update_parameters(run.model)
    return loss, correct


def _end_epoch(run: Run, epoch: int, figures: dict, on_epoch: Callable[[dict], None] | None) -> None:
    """On the first process: validate, log the epoch's record, save `last.pt` (and `best.pt` when it is the
    best so far), then pass the record on."""
    val = evaluate_arrays(run.validated_model, run.normalize, run.dataset.val.images, run.dataset.val.labels,
                          run.device)
    record = {"epoch": epoch + 1, "train_loss": figures["train_loss"], "train_accuracy": figures["train_accuracy"],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": figures["seconds"],
              "images_per_second": figures["images_per_second"], "lr": run.optimizer.param_groups[0]["lr"]}
    with open(run.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    run.console.print(f"epoch {epoch + 1:>3}/{run.config.epochs}  loss {record['train_loss']:.4f}  "
                      f"acc {record['train_accuracy']:.4f}  val_loss {val['loss']:.4f}  "
                      f"val_acc {val['accuracy']:.4f}  {record['seconds']:.1f} s  "
                      f"{record['images_per_second']:.0f} img/s")
    if val["accuracy"] > run.best_accuracy:
        run.best_accuracy = val["accuracy"]
        save_checkpoint(run.out_dir / "best.pt", run.state(epoch + 1))
    save_checkpoint(run.out_dir / "last.pt", run.state(epoch + 1))
    if on_epoch:
        on_epoch(record)


def _finish_run(run: Run, bundle_dir: Path, export: bool) -> Path | None:
    """The chosen weights ("best" or "last") exported as the bundle, by the first process."""
    distributed = end_training(run)
    try:
        if not (run.lead and export):
            return None
        chosen = load_checkpoint(run.out_dir / ("best.pt" if run.config.select == "best" else "last.pt"))
        if run.ema:  # the averaged weights are the ones validated, so they are the ones exported
            run.ema.load_state_dict(chosen["ema"])
        else:
            run.model.load_state_dict(chosen["model"])
        records = (run.out_dir / "metrics.jsonl").read_text().splitlines()
        training = {"seconds": sum(json.loads(line)["seconds"] for line in records), "epoch": chosen["epoch"],
                    "distributed": distributed}
        return finish(run.validated_model, bundle_dir, run.config, run.dataset, training, run.console)
    finally:
        leave(run.world)
