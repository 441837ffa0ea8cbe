"""`catdogcnn serve` (the page and the HTTP API) and `catdogcnn export-web` (the page alone, as a static folder
that labels photos in the browser)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from catdogcnn.cli_common import ModelOption, fail, user_errors


@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the service to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    model: ModelOption = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest photo accepted, in MB.")] = 10.0,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Most photos in one model call (micro-batching; "
                                                  "default 8).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each with its own model, sharing the "
                                         "port.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="Model threads per worker, and ordinary photos decoded "
                                                "at once (default: the cores divided among the workers).")] = None,
    max_megapixels: Annotated[float, typer.Option(min=0.001, help="Largest photo accepted, in megapixels (read "
                                                  "from its header before decoding).")] = 40.0,
    api_key_file: Annotated[Path | None, typer.Option(help="Require the key in this file for everything but the "
                                                      "page, health and docs ('Authorization: Bearer KEY' or "
                                                      "'X-API-Key: KEY'); or set $CATDOGCNN_API_KEY. Never on the "
                                                      "command line, where `ps` shows it.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="A web origin allowed to call the API from a "
                                                          "browser, e.g. https://example.org (repeatable).")]
    = None,
    request_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds an upload may take to arrive (then "
                                                   "408).")] = 30.0,
    shutdown_timeout: Annotated[float, typer.Option(min=0, help="On SIGTERM, seconds to finish the requests in "
                                                    "flight before exiting.")] = 20.0,
) -> None:
    """Serve the web page and the HTTP API (docs at /docs, Prometheus metrics at /metrics)."""
    from catdogcnn.predict import load_classifier
    from catdogcnn.runner import serve as run_server
    from catdogcnn.serve import ServeConfig

    load_classifier(model)  # fail here, in one line, if the bundle is unusable
    api_key = os.environ.get("CATDOGCNN_API_KEY", "").strip() or None
    if api_key_file:
        try:
            api_key = api_key_file.read_text().strip()
        except OSError as e:
            raise fail(f"{api_key_file}: cannot read the API key file ({e.strerror or e})") from None
        if not api_key:
            raise fail(f"{api_key_file}: the API key file is empty")
    limits = {"max_upload_mb": max_upload_mb} | ({"max_batch": max_batch} if max_batch else {})
    config = ServeConfig(**limits, max_megapixels=max_megapixels, threads=threads, request_timeout_s=request_timeout,
                         api_key=api_key, cors_origins=[origin.rstrip("/") for origin in cors_origin or []])
    run_server(model, host, port, config, workers, shutdown_timeout)


@user_errors
def export_web(
    out: Annotated[Path, typer.Argument(help="Folder to write (any static host serves it).")],
    model: ModelOption = None,
) -> None:
    """Write the page as a static folder that labels photos in the browser (onnxruntime-web): the page, its
    runtime and the model, nothing uploaded. Threads need the host to send the cross-origin isolation headers
    (Cross-Origin-Opener-Policy: same-origin, Cross-Origin-Embedder-Policy: require-corp); one otherwise."""
    from catdogcnn.web import export_web as write_site

    typer.echo(f"page written to {write_site(out, model)}; serve the folder, e.g. python -m http.server -d {out}")
