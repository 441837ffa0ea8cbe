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
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from catdogcnn.augment import augment_batch, mix_batch, parse_augment
from catdogcnn.errors import UserError
from catdogcnn.models import Normalize, build_model, get_spec, num_outputs
from catdogcnn.train.checkpoint import (
    INTERRUPTED_CHECKPOINT,
    TrainingInterrupted,
    append_metrics,
    check_writable,
    clear_checkpoints,
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
from catdogcnn.train.openset import neither_for, pets_for, with_pet_photos
from catdogcnn.train.optim import lr_factor, make_optimizer
from catdogcnn.train.probe import check_probe_request, train_probe
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
        raise UserError(f"the {config.recipe} recipe trains in one process; run it without torchrun or --nproc")
    if config.recipe == "probe":
        check_probe_request(config, ["--resume"] if resume else [])
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
        if checkpoint is None:
            clear_checkpoints(out_dir)
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

    neither = neither_for(config, list(dataset.train.paths), image_size, config.resize or spec.resize)
    pets = pets_for(config, classes, list(dataset.train.paths), image_size, config.resize or spec.resize)
    if pets:  # the other collections' pets join the training photos, `pet_repeats` times each
        dataset.train = with_pet_photos(dataset.train, pets, config.pet_repeats)
        console.print(f"pet photos of other collections: {len(pets.images['train'])} to learn from "
                      f"(each {config.pet_repeats} times an epoch), "
                      f"{len(pets.images['seen']) + len(pets.images['unseen'])} held out")
    if neither:
        console.print(f"'neither': {len(neither.images['train'])} photos to learn from, "
                      f"{len(neither.images['seen']) + len(neither.images['unseen'])} held out to measure")
    options = {"dropout": config.dropout} if config.dropout is not None else {}
    model = build_model(config.model, len(classes), image_size, open_set=neither is not None, **options).to(device)
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
              rank=rank, world=world, per_process=per_process, steps=steps, console=console, neither=neither,
              pets=pets)
    if checkpoint:
        run.restore(checkpoint, out_dir / "last.pt")
    if run.lead:
        restart_metrics_log(out_dir / "metrics.jsonl", run.start_epoch if checkpoint else None)
    return run


def _train_epochs(run: Run, show_progress: bool, on_epoch: Callable[[dict], None] | None) -> None:
    """Every epoch from where the run stands; Ctrl-C saves the weights reached in `interrupted.pt` (`last.pt`
    stays the last whole epoch) and raises TrainingInterrupted."""
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
        # last.pt stays the end of the last whole epoch, so a resumed run ends as a straight one would; the
        # weights reached mid-epoch are kept beside it for a look, never resumed from.
        if run.lead:
            save_checkpoint(run.out_dir / INTERRUPTED_CHECKPOINT, run.state(epoch))
        done = f"after epoch {epoch}" if epoch else "from the beginning"
        raise TrainingInterrupted(f"interrupted in epoch {epoch + 1}; --resume goes on {done} "
                                  f"(mid-epoch weights in {run.out_dir / INTERRUPTED_CHECKPOINT})") from None


def _train_epoch(run: Run, epoch: int, progress: Progress, show_progress: bool) -> dict:
    """One pass over this process's share of the training photos; the epoch's training figures."""
    config = run.config
    run.model.train()
    # The order of an epoch depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = torch.randperm(len(run.dataset.train.labels),
                           generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    order = order.numpy()[run.rank::run.world][:run.per_process]
    # The "neither" photos go round once an epoch too, an even share of them in every batch.
    n_neither = len(run.neither.images["train"]) if run.neither else 0
    neither_order = np.random.default_rng((config.seed, epoch)).permutation(n_neither)[run.rank::run.world]
    neither_batches = np.array_split(neither_order, run.steps)
    task = progress.add_task("", total=run.steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0, acc=0.0, speed=0.0)
    started, seen, loss_sum, correct_sum = time.perf_counter(), 0, 0.0, 0
    heartbeat = started
    for step in range(run.steps):
        # sorted rows: sequential reads from the memory-mapped cache
        index = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
        loss, correct = _train_step(run, index, neither_batches[step])
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


def _train_step(run: Run, index: np.ndarray, neither_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the training photos at `index` (sorted) and the "neither" photos at
    `neither_index`; the class photos' summed loss and correct count."""
    train = run.dataset.train
    x = to_batch(train.images, index, run.device)
    if run.neither:  # augmented as the class photos are, but never mixed with them
        x = torch.cat([x, to_batch(run.neither.images["train"], neither_index, run.device)])
    x = augment_batch(x, run.augment, run.augment_rng)
    x, x_neither = x[:len(index)], x[len(index):]
    y = torch.from_numpy(train.labels[index]).to(run.device)
    x, targets = mix_batch(x, soft_targets(y, num_outputs(len(train.classes))), run.augment, run.augment_rng)
    x = run.normalize(torch.cat([x, x_neither])).contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        logits, neither_logit = run.trained(x, with_neither=True) if run.neither else (run.trained(x), None)
    loss, correct = loss_and_correct(logits[:len(index)].float(), y, run.config.label_smoothing, targets)
    objective = loss / len(index)
    if run.neither:  # the answer "neither" for the neither photos, not for the class photos
        is_neither = (torch.arange(len(x), device=run.device) >= len(index)).float()
        objective = objective + run.config.neither_weight * F.binary_cross_entropy_with_logits(
            neither_logit[:, 0].float(), is_neither)
    run.optimizer.zero_grad(set_to_none=True)
    objective.backward()
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
    append_metrics(run.out_dir / "metrics.jsonl", record)
    run.console.print(f"epoch {epoch + 1:>3}/{run.config.epochs}  loss {record['train_loss']:.4f}  "
                      f"acc {record['train_accuracy']:.4f}  val_loss {val['loss']:.4f}  "
                      f"val_acc {val['accuracy']:.4f}  {record['seconds']:.1f} s  "
                      f"{record['images_per_second']:.0f} img/s")
    if val["accuracy"] >= run.best_accuracy:  # of equals the later: more trained (its "neither" head too)
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
        return finish(run.validated_model, bundle_dir, run.config, run.dataset, training, run.console,
                      neither=run.neither, pets=run.pets)
    finally:
        leave(run.world)
