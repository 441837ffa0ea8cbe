"""The hyperparameter search on tiny synthetic runs: trials, pruning, resuming, the grid, the best config."""

from __future__ import annotations

import json
from dataclasses import asdict

import optuna
import pytest
from conftest import make_class_folder
from conftest import run_cli as run

from catdogcnn import tune as tune_module
from catdogcnn.train import TrainConfig, TrainingInterrupted, train
from catdogcnn.tune import leaderboard, parse_grid, tune

BASE = TrainConfig(epochs=3, batch_size=16, augment="none", threads=2, val_fraction=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("tune") / "photos", 40, seed=4)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=tune_module.FINISHED)


@pytest.mark.slow
def test_trials_start_from_the_base_and_write_a_best_config_that_trains(data, tmp_path):
    result = tune(data, tmp_path / "study", BASE, trials=2, params=["lr", "dropout"], cache_dir=tmp_path / "cache")
    trials = finished(result.study)
    assert len(trials) == 2
    assert trials[0].params == {"lr": BASE.lr, "dropout": 0.25}  # trial 0 is the base configuration
    assert result.best_config.lr == result.study.best_trial.params["lr"]
    saved = json.loads(result.best_config_path.read_text())
    assert saved == asdict(result.best_config) and saved["epochs"] == BASE.epochs
    assert (tmp_path / "study" / "study.db").exists()
    bundle = train(data, tmp_path / "best", TrainConfig.from_dict({**saved, "epochs": 1}), show_progress=False,
                   cache_dir=tmp_path / "cache")
    assert (bundle / "bundle.json").exists()
    table = leaderboard(result.study)
    assert table.row_count == 2


@pytest.mark.slow
def test_pruned_trials_stop_early(data, tmp_path):
    never_good_enough = optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=2)  # prunes after epoch 2
    result = tune(data, tmp_path, BASE, trials=2, params=["lr"], pruner=never_good_enough,
                  cache_dir=tmp_path / "cache")
    trials = finished(result.study)
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    for trial in trials:
        log = (tmp_path / f"trial-{trial.number:04d}" / "metrics.jsonl").read_text().splitlines()
        assert len(log) == 2  # training stopped; epoch 3 never ran
    assert result.best_config is None and not (tmp_path / "best_config.json").exists()


@pytest.mark.slow
def test_a_stopped_study_resumes_and_reruns_the_interrupted_trial(data, tmp_path, monkeypatch):
    calls = []

    def interrupted_on_second_call(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise TrainingInterrupted("interrupted")
        return train(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train", interrupted_on_second_call)
    with pytest.raises(TrainingInterrupted):
        tune(data, tmp_path, BASE, trials=3, params=["lr"], cache_dir=tmp_path / "cache")
    monkeypatch.setattr(tune_module, "train", train)
    result = tune(data, tmp_path, BASE, trials=3, params=["lr"], cache_dir=tmp_path / "cache")
    states = [t.state for t in result.study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and len(finished(result.study)) == 3
    rerun = finished(result.study)[1]
    assert rerun.params["lr"] == calls[1].lr  # the interrupted configuration ran first after the restart


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the dead worker's trial is made by hand, not optimize
def test_a_dead_workers_trial_is_retried_before_the_search_returns(data, tmp_path):
    # A trial whose worker died after one heartbeat, in a study that then reaches its total.
    url = tune_module.default_storage(tmp_path)
    storage = tune_module.heartbeat_storage(url, heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    orphan = study.ask()
    orphan_values = tune_module.suggest(orphan, ["lr"])
    storage.record_heartbeat(orphan._trial_id)
    result = tune(data, tmp_path, BASE, trials=1, params=["lr"], storage=url, study_name="shared",
                  heartbeat_s=1, cache_dir=tmp_path / "cache")
    states = optuna.trial.TrialState
    assert result.study.trials[orphan.number].state == states.FAIL
    assert not result.study.get_trials(states=(states.RUNNING, states.WAITING))
    retried = [t for t in finished(result.study) if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].params == orphan_values


@pytest.mark.slow
def test_grid_search_tries_each_grid_value_once(data, tmp_path):
    one_epoch = TrainConfig.from_dict({**asdict(BASE), "epochs": 1})
    result = tune(data, tmp_path, one_epoch, trials=10, sampler="grid", params=["schedule", "batch_size"],
                  cache_dir=tmp_path / "cache")
    tried = sorted((t.params["schedule"], t.params["batch_size"]) for t in finished(result.study))
    assert tried == sorted((s, b) for s in ("constant", "cosine") for b in (32, 64, 128))  # 6: the grid ran out


@pytest.mark.slow
def test_grid_values_given_replace_the_search_space_grid(data, tmp_path):
    one_epoch = TrainConfig.from_dict({**asdict(BASE), "epochs": 1})
    grid = parse_grid("augment=none,flip; schedule=cosine")
    assert grid == {"augment": ["none", "flip"], "schedule": ["cosine"]}
    result = tune(data, tmp_path, one_epoch, trials=5, sampler="grid", params=["augment", "schedule"], grid=grid,
                  cache_dir=tmp_path / "cache")
    assert sorted(t.params["augment"] for t in finished(result.study)) == ["flip", "none"]  # 2: the grid ran out


@pytest.mark.parametrize("spec, message", [("augment=sepia", "outside"), ("lr=0.5", "outside"),
                                           ("epochs=ten", "ints"), ("colour=red", "NAME"), ("lr=", "NAME")])
def test_bad_grid_values_are_refused(data, tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        tune(data, tmp_path, BASE, trials=1, sampler="grid", params=["augment", "lr", "epochs"],
             grid=parse_grid(spec))


def test_grid_values_need_the_grid_sampler_and_a_searched_setting(data, tmp_path):
    with pytest.raises(ValueError, match="grid sampler"):
        tune(data, tmp_path, BASE, trials=1, params=["lr"], grid={"lr": [1e-3]})
    with pytest.raises(ValueError, match="does not change"):
        tune(data, tmp_path, BASE, trials=1, sampler="grid", params=["lr"], grid={"epochs": [3]})


def test_unknown_parameter_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="colour"):
        tune(data, tmp_path, BASE, trials=1, params=["colour"])


@pytest.mark.slow
def test_command_line_prints_a_leaderboard_and_the_config_trains(data, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**asdict(BASE), "epochs": 1}))
    out = tmp_path / "study"
    result = run("tune", data, "--trials", "2", "--params", "lr,augment", "--config", base, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "val acc" in result.stdout and "best configuration" in result.stdout
    trained = run("train", data, "--config", out / "best_config.json", "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "bundle" / "bundle.json").exists()
