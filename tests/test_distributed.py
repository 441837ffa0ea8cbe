"""Training across processes (DistributedDataParallel, gloo on the CPU), across two nodes on loopback (the
README's multi-machine torchrun recipe), and surviving SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_class_folder

from catdogcnn.errors import UserError
from catdogcnn.evaluate import evaluate
from catdogcnn.predict import Classifier
from catdogcnn.train import load_checkpoint

ARGS = ["--epochs", "3", "--batch-size", "16", "--augment", "seed", "--val-fraction", "0.2", "--seed", "3"]


def catdogcnn(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catdogcnn", *map(str, args)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_class_folder(root / "training_set", 60, seed=11)
    make_class_folder(root / "test_set", 30, seed=12)
    return root


@pytest.mark.slow
def test_two_processes_converge_with_identical_weights(data, tmp_path):
    run = catdogcnn("train", data, "--out", tmp_path / "run", "--nproc", "2", *ARGS)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    meta = json.loads((tmp_path / "run" / "bundle" / "bundle.json").read_text())
    distributed = meta["training"]["distributed"]
    assert distributed == {"processes": 2, "backend": "gloo", "effective_batch_size": 32,
                           "weights_identical": True}
    assert evaluate(data, Classifier(tmp_path / "run" / "bundle"))["accuracy"] > 0.9
    assert output.count("epoch   1/3") == 1  # only the first process logs


def wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    straight = catdogcnn("train", data, "--out", tmp_path / "straight", *ARGS)
    assert straight.wait(timeout=600) == 0
    killed = catdogcnn("train", data, "--out", tmp_path / "killed", *ARGS)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    wait_for(lambda: (tmp_path / "killed" / "last.pt").exists())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "bundle").exists()
    resumed = catdogcnn("train", data, "--out", tmp_path / "killed", "--resume", *ARGS)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "killed"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_kills_at_any_moment_never_leave_a_truncated_file(data, tmp_path):
    """Kill a run at several moments, checkpointing and export included: what is on disk always loads, under
    the names it is read by (a write in progress has a hidden temporary name), and the next run clears the
    temporary files a kill left behind."""
    out = tmp_path / "run"
    for delay in (0.5, 1.5, 2.5, 3.5, 4.5, 6.0):
        run = catdogcnn("train", data, "--out", out, *ARGS, "--resume")  # with no last.pt yet, it starts afresh
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        visible = {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.exists() else set()
        assert visible <= {"metrics.jsonl", "last.pt", "best.pt", "bundle"}, visible
        if (out / "last.pt").exists():
            load_checkpoint(out / "last.pt")
        if (out / "best.pt").exists():
            load_checkpoint(out / "best.pt")
        if (out / "bundle" / "bundle.json").exists():
            Classifier(out / "bundle")  # checks the graph's sha256 against the JSON
    finished = catdogcnn("train", data, "--out", out, "--resume", *ARGS)
    output, _ = finished.communicate(timeout=600)
    assert finished.returncode == 0, output
    assert not list(out.glob(".*.tmp"))
    Classifier(out / "bundle")


def test_full_disk_is_refused_before_training(data, tmp_path, monkeypatch):
    from catdogcnn.train import TrainConfig, train

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(UserError, match="MB free"):
        train(data, tmp_path / "run", TrainConfig(epochs=1), show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


NODE_ARGS = ["--epochs", "2", "--batch-size", "16", "--augment", "seed", "--val-fraction", "0.2", "--seed", "3",
             "--threads", "1"]


def node(data: Path, out: Path, port: int, *rdzv_options: str) -> subprocess.Popen:
    """One machine's launcher, as the README starts it (each node with its own cache and run folder, as on
    separate machines; `--local-addr` because both nodes are this machine)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cats", "--local-addr=127.0.0.1",
               *rdzv_options, "-m", "catdogcnn", "train", str(data), "--out", str(out), *NODE_ARGS]
    env = {**os.environ, "CATDOGCNN_CACHE": str(out.parent / f"cache-{out.name}")}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_nodes_train_with_identical_weights_and_write_one_bundle(data, tmp_path):
    port = free_port()
    nodes = [node(data, tmp_path / f"node{i}", port) for i in range(2)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    bundles = [tmp_path / f"node{i}" / "bundle" / "bundle.json" for i in range(2)]
    assert sum(b.exists() for b in bundles) == 1  # the first process alone exports
    meta = json.loads(next(b for b in bundles if b.exists()).read_text())
    assert meta["training"]["distributed"] == {"processes": 2, "backend": "gloo", "effective_batch_size": 32,
                                               "weights_identical": True}
    other = next(b.parent.parent for b in bundles if not b.exists())
    assert not other.exists() or not any(other.iterdir())  # nothing written by the second rank
    assert sum(output.count("epoch   1/2") for output in outputs) == 1  # only the first process logs


@pytest.mark.slow
def test_the_command_line_says_in_one_line_that_a_machine_never_joined(data, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "catdogcnn", "train", str(data), "--out", str(tmp_path / "alone"),
                             "--nnodes", "2", "--rdzv-endpoint", endpoint, "--join-timeout", "5", *NODE_ARGS],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: {endpoint}: not all 2 machines joined within 5 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "alone").exists()


@pytest.mark.slow
def test_a_node_that_never_joins_fails_the_launch_after_the_join_timeout(data, tmp_path):
    started = time.time()
    alone = node(data, tmp_path / "alone", free_port(), "--rdzv-conf=join_timeout=5")
    output, _ = alone.communicate(timeout=120)
    assert alone.returncode != 0
    assert "RendezvousTimeoutError" in output and time.time() - started < 60
    assert not (tmp_path / "alone").exists()  # training never started
