"""Two `catdogcnn tune` workers sharing one study on a throwaway PostgreSQL server (Debian's package), one of
them killed mid-trial: its trial is retried by the other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, make_class_folder

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2", reason="the PostgreSQL driver is in the tune extra: pip install -e '.[tune]'")

pytestmark = pytest.mark.slow

TRIALS = 8
BASE = {"epochs": 3, "batch_size": 16, "augment": "none", "threads": 1, "val_fraction": 0.25}


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own (data, socket and log in a temporary folder, a random loopback port),
    stopped and deleted at the end. PostgreSQL refuses to run as root: then it runs as the `postgres` user."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; `make test` tries)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="catdogcnn-pg-"))
    if os.geteuid() == 0:
        try:
            shutil.chown(root, "postgres", "postgres")
        except (LookupError, OSError) as e:
            shutil.rmtree(root)
            pytest.skip(f"running as root and no usable postgres user to run the server as ({e})")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)

    init = pg(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
    started = init.returncode == 0 and pg(
        bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off").returncode == 0
    if not started:
        reason = (init.stderr or (log.read_text() if log.exists() else "")).strip().splitlines()[-1:]
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {reason}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def tune_worker(data: Path, out: Path, url: str, config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catdogcnn", "tune", str(data), "--storage", url,
                             "--study", "shared", "--trials", str(TRIALS), "--params", "lr",
                             "--config", str(config), "--out", str(out), "--no-prune", "--heartbeat", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trials_of(url: str) -> list:
    try:
        return optuna.load_study(study_name="shared", storage=url).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(postgres_url, tmp_path):
    data = make_class_folder(tmp_path / "photos", 40, seed=4)
    config = tmp_path / "base.json"
    config.write_text(json.dumps(BASE))
    optuna.storages.RDBStorage(postgres_url)  # the tables, made once before the workers meet
    killed = tune_worker(data, tmp_path / "a", postgres_url, config)
    survivor = None
    try:
        deadline = time.time() + 300
        # The second worker joins once the first has created the study (and queued the base configuration).
        while not trials_of(postgres_url):
            assert time.time() < deadline and killed.poll() is None, "worker A never created the study"
            time.sleep(0.2)
        survivor = tune_worker(data, tmp_path / "b", postgres_url, config)
        victim = None
        while victim is None:  # A has finished a trial and is one epoch into the next: kill it there
            assert time.time() < deadline, "worker A never got into a second trial"
            assert killed.poll() is None, killed.stdout.read()
            time.sleep(0.2)
            mine = [t for t in trials_of(postgres_url) if t.user_attrs.get("worker", "").endswith(f":{killed.pid}")]
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in mine):
                running = next((t.number for t in mine if t.state == optuna.trial.TrialState.RUNNING
                                and t.intermediate_values), None)
                if running is not None:
                    # Stop A, then look again: its trial cannot finish between that look and the kill. The
                    # pause (well inside the heartbeat's grace) lets a statement A sent before it stopped land.
                    killed.send_signal(signal.SIGSTOP)
                    os.waitpid(killed.pid, os.WUNTRACED)
                    time.sleep(0.3)
                    if trials_of(postgres_url)[running].state == optuna.trial.TrialState.RUNNING:
                        victim = running
                    else:
                        killed.send_signal(signal.SIGCONT)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        output, _ = survivor.communicate(timeout=600)
    finally:
        for worker in (killed, survivor):
            if worker and worker.poll() is None:
                worker.kill()
    assert survivor.returncode == 0, output

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    states = optuna.trial.TrialState
    finished = study.get_trials(states=(states.COMPLETE,))
    # The total is shared, not per worker; the retry is one more when the dead trial fell silent after it.
    assert TRIALS <= len(finished) <= TRIALS + 1
    assert [t.number for t in study.trials if t.state == states.FAIL] == [victim]
    assert not study.get_trials(states=(states.RUNNING, states.WAITING))
    retried = [t for t in finished if t.system_attrs.get("failed_trial") == victim]
    assert len(retried) == 1 and retried[0].params == study.trials[victim].params
    assert retried[0].user_attrs["worker"].endswith(f":{survivor.pid}")

    workers = {t.number: t.user_attrs["worker"] for t in finished}
    assert {w.rsplit(":", 1)[1] for w in workers.values()} == {str(killed.pid), str(survivor.pid)}
    # Different trials: every configuration but the retried one was proposed once.
    settings = [t.params["lr"] for t in finished if t.number != retried[0].number]
    assert len(set(settings)) == len(settings)
    for trial in finished:  # each trial was trained once, by its own worker, every epoch once
        worker_out = tmp_path / ("a" if workers[trial.number].endswith(f":{killed.pid}") else "b")
        log = (worker_out / f"trial-{trial.number:04d}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in log] == list(range(1, BASE["epochs"] + 1))
        other = tmp_path / ("b" if worker_out.name == "a" else "a")
        assert not (other / f"trial-{trial.number:04d}").exists()

    best = json.loads((tmp_path / "b" / "best_config.json").read_text())
    assert best == study.best_trial.user_attrs["config"]
    assert best["lr"] == study.best_trial.params["lr"] and best["epochs"] == BASE["epochs"]
