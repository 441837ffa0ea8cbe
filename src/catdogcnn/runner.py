"""The process runner for the HTTP service: uvicorn, several worker processes, a bounded graceful stop.

- `workers` processes share the port, each with its own model; the cores are divided among them (each gets
  `cores // workers` model threads unless `ServeConfig.threads` says otherwise), so N workers never run N x cores
  threads.
- SIGTERM (or Ctrl-C): the server stops accepting connections, finishes the requests in flight for up to
  `shutdown_timeout_s`, then cancels what is left and exits.
- With several workers, /metrics sums every worker's figures (prometheus-client's multiprocess mode, in a
  temporary folder made here).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from catdogcnn.extras import needs_extra
from catdogcnn.serve import ServeConfig, create_app
from catdogcnn.service import MULTIPROCESS_ENV

SERVE_ENV = "CATDOGCNN_SERVE"  # how `run` hands the bundle and settings to worker processes


def app_from_environment():
    """The app a worker process serves: the bundle and settings that `run` put in the environment."""
    settings = json.loads(os.environ[SERVE_ENV])
    return create_app(settings["bundle"], ServeConfig(**settings["config"]))


def few_malloc_arenas(count: int = 2) -> None:
    """Let the server's threads share `count` glibc malloc arenas. By default each thread that meets another in
    malloc gets an arena of its own (up to 8 per core), keeping its freed memory: under load the thread pool that
    decodes uploads grew resident memory by 16% over minutes. Process-wide, for the server process, which is the
    command's own; worker processes read the variable at start. A no-op where the C library is not glibc."""
    os.environ.setdefault("MALLOC_ARENA_MAX", str(count))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, count)  # M_ARENA_MAX in glibc's malloc.h


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """The cores divided among the workers, at least one thread each."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def serve(bundle: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None, workers: int = 1, shutdown_timeout_s: float = 20,
          log_level: str = "info") -> None:
    """Serve with uvicorn until SIGTERM or Ctrl-C: `workers` processes, each with its own model, sharing the
    port; SIGTERM stops them gracefully within `shutdown_timeout_s`."""
    with needs_extra("serve"):
        import uvicorn

    config = config or ServeConfig()
    config = replace(config, threads=config.threads or threads_per_worker(workers))
    os.environ[SERVE_ENV] = json.dumps({"bundle": str(bundle) if bundle else None, "config": asdict(config)})
    few_malloc_arenas()
    metrics_dir = None
    if workers > 1 and not os.environ.get(MULTIPROCESS_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="catdogcnn-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir
    try:
        uvicorn.run("catdogcnn.runner:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=shutdown_timeout_s, timeout_keep_alive=5, log_level=log_level)
    finally:
        if metrics_dir:
            os.environ.pop(MULTIPROCESS_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
