"""Hyperparameter search with Optuna over `SEARCH_SPACE`, scored by validation accuracy.

Each trial trains one configuration (the base configuration with the sampled settings) and reports its
validation accuracy after every epoch, so the pruner stops trials that trail the others; its score is its
best validation accuracy. Validation photos come from the training data (`extra_set`, or a split of
`training_set`): `test_set` is never seen. The study lives in an Optuna storage (SQLite in the output
folder by default), so a stopped search resumes where it stopped and several machines can share one study
through a database URL. The best configuration is kept in `best_config.json`, which `catdogcnn train
--config` reads.
"""

from __future__ import annotations

import json
import os
import socket
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from catdogcnn.bundle import atomic_write
from catdogcnn.errors import UserError
from catdogcnn.extras import needs_extra
from catdogcnn.train.config import Schedule

with needs_extra("tune"):
    import optuna

    from catdogcnn.augment import PRESETS
    from catdogcnn.models import get_spec
    from catdogcnn.train import TrainConfig, TrainingInterrupted, train
    from catdogcnn.train.checkpoint import CHECKPOINTS

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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


# What `catdogcnn tune` searches (`--params` picks a subset). Here, beside its one reader, rather than in the
# torch-free train/config.py: the presets come from augment.py, which imports torch. The augmentation presets
# run from weak to strong; image size changes the seed CNN's dense layer, not its design.
SEARCH_SPACE: dict[str, Param] = {
    "lr": Param("float", 1e-4, 1e-2, log=True, grid=(3e-4, 1e-3, 3e-3)),
    "weight_decay": Param("choice", choices=(0.0, 1e-5, 1e-4, 1e-3)),
    "batch_size": Param("choice", choices=(32, 64, 128)),
    "dropout": Param("float", 0.0, 0.6, grid=(0.1, 0.25, 0.5)),
    "augment": Param("choice", choices=tuple(PRESETS)),
    "schedule": Param("choice", choices=typing.get_args(Schedule)),
    "image_size": Param("choice", choices=(64, 80, 96)),
    "epochs": Param("int", 10, 60, grid=(25, 40, 60)),
}


@dataclass
class TuneResult:
    study: optuna.Study
    best_config: TrainConfig | None
    best_config_path: Path | None


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def suggest(trial: optuna.Trial, names: list[str]) -> dict:
    """The trial's value for each named setting of the search space."""
    values = {}
    for name in names:
        param = SEARCH_SPACE[name]
        if param.kind == "choice":
            values[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.kind == "int":
            values[name] = trial.suggest_int(name, int(param.low), int(param.high), log=param.log)
        else:
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return values


def grid_of(names: list[str], values: dict[str, list] | None = None) -> dict[str, list]:
    """The values a grid search tries for each setting: `values` where given, else the search space's grid."""
    values = values or {}
    unknown = set(values) - set(names)
    if unknown:
        raise UserError(f"grid values for {sorted(unknown)}, which the search does not change ({', '.join(names)})")
    grid = {name: list(values.get(name) or SEARCH_SPACE[name].grid or SEARCH_SPACE[name].choices) for name in names}
    for name, param in ((n, SEARCH_SPACE[n]) for n in values):
        outside = [v for v in grid[name] if (v not in param.choices if param.kind == "choice"
                                             else not param.low <= v <= param.high)]
        if outside:
            raise UserError(f"grid values {outside} for {name} are outside its search space")
    return grid


def parse_grid(spec: str) -> dict[str, list]:
    """"augment=seed,crop;epochs=25,50" -> {"augment": ["seed", "crop"], "epochs": [25, 50]}, typed as the
    search space declares each setting."""
    grid: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, listed = part.partition("=")
        if name not in SEARCH_SPACE or not listed:
            raise UserError(f"grid {part!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SEARCH_SPACE)}")
        param = SEARCH_SPACE[name]
        typed = {"int": int, "float": float}.get(param.kind) or type(param.choices[0])
        try:
            grid[name] = [typed(v) for v in listed.split(",")]
        except ValueError:
            raise UserError(f"grid {part!r}: values of {name} must be {typed.__name__}s") from None
    return grid


def baseline_values(base: TrainConfig, names: list[str]) -> dict:
    """The base configuration's own value of each searched setting (model defaults filled in)."""
    spec = get_spec(base.model)
    values = asdict(base)
    values["image_size"] = base.image_size or spec.image_size
    if base.dropout is None:
        values["dropout"] = spec.options.get("dropout", 0.0)
    return {name: values[name] for name in names}


def heartbeat_storage(url: str, heartbeat_s: int = 30) -> optuna.storages.RDBStorage:
    """The study's storage at `url`. A worker that dies mid-trial stops its heartbeat; the trial is then failed
    and run again by someone."""
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna, stable in use since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s,
                                          heartbeat_stale_trial_callback=retry)


def tune(data_dir: Path, out_dir: Path, base: TrainConfig, trials: int, sampler: str = "tpe",
         storage: str | None = None, study_name: str | None = None, params: list[str] | None = None,
         pruner: optuna.pruners.BasePruner | None = None, enqueue: list[dict] | None = None,
         cache_dir: Path | None | bool = None, console: Console | None = None,
         grid: dict[str, list] | None = None, heartbeat_s: int = 30) -> TuneResult:
    """Run the study until it holds `trials` finished (complete or pruned) trials; returns it and the best
    configuration. Trial 0 of a new TPE study is the base configuration itself, so the search starts from
    it and the leaderboard shows how far it moved. `enqueue` adds trials to run first (settings dicts);
    `grid` replaces the search space's grid values of some settings (grid sampler only). A running trial
    beats every `heartbeat_s` seconds; one silent for four beats (its worker died) is failed and run again
    by the next worker to start a trial. A worker returns only when no trial of the study is left running."""
    console = console or Console(stderr=True, soft_wrap=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = params or list(SEARCH_SPACE)
    unknown = set(names) - set(SEARCH_SPACE)
    if unknown:
        raise UserError(f"unknown search parameter(s) {sorted(unknown)}; known: {', '.join(SEARCH_SPACE)}")
    if sampler not in ("tpe", "grid"):
        raise UserError(f"sampler must be tpe or grid, not {sampler!r}")
    if grid and sampler != "grid":
        raise UserError("grid values are for the grid sampler (--sampler grid)")
    base.validate()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials report through the console; a stop is one line
    # Workers sharing a storage seed their samplers apart: with one seed they would all propose the same settings.
    seed = base.seed if storage is None else None
    chosen_sampler = (optuna.samplers.GridSampler(grid_of(names, grid), seed=seed) if sampler == "grid"
                      else optuna.samplers.TPESampler(seed=seed))
    study = optuna.create_study(storage=heartbeat_storage(storage or default_storage(out_dir), heartbeat_s),
                                study_name=study_name or f"{base.model}-{sampler}", direction="maximize",
                                sampler=chosen_sampler, load_if_exists=True,
                                pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5))
    study.set_user_attr("base_config", asdict(base))
    study.set_user_attr("params", names)
    if not study.trials:
        for values in ([baseline_values(base, names)] if sampler == "tpe" else []) + list(enqueue or []):
            study.enqueue_trial(values, skip_if_exists=True)
    best_path = out_dir / "best_config.json"

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, names)
        config = TrainConfig.from_dict({**asdict(base), **values})
        trial.set_user_attr("config", asdict(config))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        console.print(f"[bold]trial {trial.number}[/] ({done + 1}/{trials}): "
                      + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        run_dir = out_dir / f"trial-{trial.number:04d}"
        best = 0.0

        def report(record: dict) -> None:
            nonlocal best
            best = max(best, record["val_accuracy"])
            trial.report(record["val_accuracy"], record["epoch"])
            if trial.should_prune():
                console.print(f"trial {trial.number}: pruned after epoch {record['epoch']} "
                              f"(val accuracy {record['val_accuracy']:.4f})")
                raise optuna.TrialPruned()

        started = time.perf_counter()
        try:
            train(data_dir, run_dir, config, cache_dir=cache_dir, show_progress=False, on_epoch=report, export=False)
        except TrainingInterrupted:
            study.enqueue_trial(values)  # a resumed search runs this configuration again first
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - started)
            for checkpoint in CHECKPOINTS:  # the study keeps the figures; weights would fill the disk
                (run_dir / checkpoint).unlink(missing_ok=True)
        return best

    def run_trials(count: int) -> None:
        # The total is shared: with several workers on one storage, all stop when the study holds `trials`.
        study.optimize(objective, n_trials=count, gc_after_trial=True,
                       callbacks=[_after_trial(best_path, console),
                                  optuna.study.MaxTrialsCallback(trials, states=FINISHED)])

    remaining = trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    if remaining > 0:
        run_trials(remaining)
    _settle(study, run_trials, heartbeat_s, console)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        return TuneResult(study, None, None)
    best_config = TrainConfig.from_dict(study.best_trial.user_attrs["config"])
    # Written again at the end: with several workers, the best trial may be another worker's.
    atomic_write(best_path, (json.dumps(asdict(best_config), indent=2) + "\n").encode())
    return TuneResult(study, best_config, best_path)


def _settle(study: optuna.Study, run_trials: Callable[[int], None], heartbeat_s: int, console: Console) -> None:
    """Before leaving, catch a trial whose worker died near the end: it falls silent within the grace period
    (four beats), is failed, and its retry runs here. A trial still running after six beats (two of margin) has a
    live worker, which finishes it; without this, a dead worker's trial would stay running for ever, unmeasured."""
    states = optuna.trial.TrialState
    deadline = time.monotonic() + 6 * heartbeat_s
    try:
        while True:
            with warnings.catch_warnings():  # experimental in Optuna since 2.9, like the heartbeats above
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            waiting = study.get_trials(deepcopy=False, states=(states.WAITING,))
            running = study.get_trials(deepcopy=False, states=(states.RUNNING,))
            if waiting and "failed_trial" in waiting[0].system_attrs:  # the retry is next in the queue
                run_trials(1)
            elif running and time.monotonic() < deadline:
                console.print(f"waiting for trial(s) {', '.join(str(t.number) for t in running)} of other workers "
                              "to finish or fall silent")
                time.sleep(heartbeat_s)
            else:
                return
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted while waiting for other workers' trials; the study is complete"
                                  ) from None


def _after_trial(best_path: Path, console: Console) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """What a finished trial says; a new best configuration is written to `best_path` at once."""

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE and study.best_trial.number == trial.number:
            atomic_write(best_path, (json.dumps(trial.user_attrs["config"], indent=2) + "\n").encode())
            console.print(f"trial {trial.number}: val accuracy {trial.value:.4f}, the best so far -> {best_path}")
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            console.print(f"trial {trial.number}: val accuracy {trial.value:.4f} "
                          f"(best {study.best_value:.4f}, trial {study.best_trial.number})")

    return after_trial


def leaderboard(study: optuna.Study, top: int = 10) -> Table:
    """The best finished trials, best first, with their settings; pruned trials show their last score."""
    names = study.user_attrs.get("params", [])
    table = Table(title=f"study {study.study_name}: {len(study.trials)} trials")
    for column in ("#", "trial", "state", "val acc", "epochs run", "minutes", *names):
        table.add_column(column, justify="right")

    def score(trial: optuna.trial.FrozenTrial) -> float:
        if trial.value is not None:
            return trial.value
        return max(trial.intermediate_values.values(), default=0.0)

    finished = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=score, reverse=True)
    for rank, trial in enumerate(finished[:top], 1):
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (trial.params.get(n, "") for n in names)]
        table.add_row(str(rank), str(trial.number), trial.state.name.lower(), f"{score(trial):.4f}",
                      str(max(trial.intermediate_values, default=0)), f"{trial.user_attrs.get('seconds', 0) / 60:.1f}",
                      *values)
    return table
