"""What a service reachable beyond the machine needs around the HTTP API: Prometheus metrics, an optional API
key, a deadline for uploads, allowed CORS origins, several worker processes and a bounded graceful stop.

- `/metrics` (Prometheus text format): requests by route and status, request latency by route, photos per
  model call. With several workers the figures are summed over all of them (prometheus-client's
  multiprocess mode, in a temporary folder that `run` makes).
- API key (`ServeConfig.api_key`): `/v1/predict`, `/v1/model` and `/metrics` answer 401 without it, sent as
  `Authorization: Bearer KEY` or `X-API-Key: KEY` and compared in constant time. `/v1/health` (for load
  balancers), the page and its static files, and the API docs stay open: they show nothing private, and the
  page asks for the key when the API answers 401.
- Uploads must arrive within `request_timeout_s`, or the request gets 408 and its connection is closed: a
  stalled or very slow client cannot hold a request open. Idle keep-alive connections close after 5 s.
- SIGTERM (or Ctrl-C): the server stops accepting connections, finishes the requests in flight for up to
  `shutdown_timeout_s`, then cancels what is left and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import os
import shutil
import tempfile
import time

from catdogcnn.extras import needs_extra

with needs_extra("serve"):
    from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
    from starlette.responses import JSONResponse, Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SERVE_ENV = "CATDOGCNN_SERVE"  # how `run` hands the bundle and settings to worker processes
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
KEYED_PATHS = ("/v1/predict", "/v1/model", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("catdogcnn_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("catdogcnn_request_seconds", "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("catdogcnn_batch_photos", "Photos per model call (micro-batching)",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)

    def exposition(self) -> Response:
        registry = self.registry
        if os.environ.get(MULTIPROCESS_ENV):  # several workers: every worker's figures, read from their files
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=METRICS_CONTENT_TYPE)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


class ServiceMiddleware:
    """Pure ASGI middleware (an upload's deadline wraps `receive`, which Starlette's BaseHTTPMiddleware hides):
    the API key, the upload deadline, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None, request_timeout_s: float):
        self.app, self.metrics, self.request_timeout_s = app, metrics, request_timeout_s
        self.api_key = api_key.encode() if api_key else None

    def key_accepted(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
        return hmac.compare_digest(given, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # unless a response starts
        deadline, body_done, timed_out = started + self.request_timeout_s, False, False

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if timed_out:  # the app's answer to a body cut short is replaced by the 408 below
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def receive_before_deadline() -> Message:
            nonlocal body_done, timed_out
            if body_done:  # later reads wait for a disconnect: no deadline there
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                timed_out = True
                return {"type": "http.disconnect"}  # the app stops reading, as if the client had gone
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            if self.api_key and scope["path"] in KEYED_PATHS and not self.key_accepted(scope):
                await error_response(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY' or "
                                     "'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})(scope, receive,
                                                                                         send_recorded)
                return
            try:
                await self.app(scope, receive_before_deadline, send_recorded)
            except Exception:
                if not timed_out:
                    raise
            if timed_out:
                timed_out = False
                await error_response(408, f"the request did not arrive within {self.request_timeout_s:g} s",
                                     {"Connection": "close"})(scope, receive, send_recorded)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the route's pattern: few label values
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def app_from_environment():
    """The app a worker process serves: the bundle and settings that `run` put in the environment."""
    from catdogcnn.serve import ServeConfig, create_app

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


def run(bundle: str | None, host: str, port: int, config, workers: int = 1, shutdown_timeout_s: float = 20,
        log_level: str = "info") -> None:
    """Serve with uvicorn: `workers` processes, each with its own model, sharing the port; SIGTERM stops them
    gracefully within `shutdown_timeout_s`."""
    from dataclasses import asdict

    with needs_extra("serve"):
        import uvicorn

    os.environ[SERVE_ENV] = json.dumps({"bundle": bundle, "config": asdict(config)})
    few_malloc_arenas()
    metrics_dir = None
    if workers > 1 and not os.environ.get(MULTIPROCESS_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="catdogcnn-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir
    try:
        uvicorn.run("catdogcnn.service:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=shutdown_timeout_s, timeout_keep_alive=5, log_level=log_level)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
