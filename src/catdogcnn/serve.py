"""HTTP API (FastAPI) and the web page, over one `Classifier`.

    catdogcnn serve [--host 127.0.0.1] [--port 8000] [--model BUNDLE]

Routes, versioned under /v1: POST /v1/predict (multipart, field `files`, repeatable), GET /v1/health,
GET /v1/model; the page at /, OpenAPI docs at /docs. Photos are decoded in worker threads; concurrent
requests are gathered into one model call (micro-batching: the first photo waits at most
`batch_wait_ms` for others), so throughput grows with load instead of queueing. Uploads are read into
memory and never touch the file system; a client's file name is only echoed back, never used as a path.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from catdogcnn.data import BadImageError, decode_image
from catdogcnn.explain import overlay, png_data_url
from catdogcnn.extras import needs_extra
from catdogcnn.predict import Classifier, Prediction, load_classifier

with needs_extra("serve"):
    from fastapi import FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from catdogcnn.service import Metrics, ServiceMiddleware

STATIC = Path(__file__).parent / "static"
# BadImageError.kind -> HTTP status: 415 not an image at all, 422 an image that cannot be decoded.
STATUS_FOR_KIND = {"not_image": 415}


@dataclass
class ServeConfig:
    max_upload_mb: float = 10.0  # per photo
    max_files: int = 32  # per request
    batch_wait_ms: float = 5.0  # how long the first photo of a batch waits for company
    # Photos in one model call. 8 rather than 16: at 32 clients, the same throughput and a p99 of 384 ms
    # instead of 465 ms, as a new photo waits less behind the batch running.
    max_batch: int = 8
    request_timeout_s: float = 30.0  # an upload must arrive within this (408 otherwise)
    api_key: str | None = None  # when set, the API and /metrics answer 401 without it (see service.py)
    cors_origins: list[str] = field(default_factory=list)  # web origins allowed to call the API from a browser


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PhotoResult(BaseModel):
    filename: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None  # of each class, if the photo shows one of them
    neither_probability: float | None = None  # that it shows none (models that answer "neither")
    reason: str | None = None
    heatmap: str | None = None  # with ?explain=true: a PNG data URL of where the answer comes from
    time_ms: float
    error: ErrorBody | None = None


class PredictResponse(BaseModel):
    model_id: str
    results: list[PhotoResult]


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    model_id: str | None


class NeitherRule(BaseModel):
    kind: Literal["blank", "calibrated", "learned", "imagenet"]  # blank: every colour's standard deviation at most
    cut: float  # the cut (of 255); calibrated: the probability of "neither" above the cut; learned: the model's
    # "neither" score above it; imagenet: the classes' ImageNet probability below it


class NeitherRules(BaseModel):
    rules: list[NeitherRule]  # a photo is answered "neither" when any rule fires


class ModelResponse(BaseModel):
    model_id: str
    classes: list[str]
    image_size: int  # photos are resized to image_size x image_size pixels
    threshold: float
    tta: bool  # whether each photo is averaged with its mirror image
    metrics: dict[str, Any] | None  # validation metrics, as the bundle records them
    neither: NeitherRules | None  # null: the model never answers "neither"


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    413: "A photo is larger than the upload limit, or too many photos in one request",
    415: "Not an image (for a request of one photo; with several, each failure is listed in `results`)",
    422: "An image that cannot be decoded (corrupt, truncated, decompression bomb), or a malformed request",
    503: "The model worker has stopped (the server needs a restart)",
}.items()}


class WorkerStoppedError(RuntimeError):
    """The micro-batcher's task has ended (shutdown, or a bug): its requests are answered 503, never left waiting."""


class MicroBatcher:
    """Gathers decoded photos from concurrent requests into batches for one model call each."""

    def __init__(self, classifier: Classifier, config: ServeConfig, metrics: Metrics | None = None):
        self.classifier, self.config, self.metrics = classifier, config, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def predict(self, image: np.ndarray, name: str, explain: bool = False) -> Prediction:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, name, explain, future))
        # The answer, or the end of the task that would give it: a request never waits for what cannot come.
        await asyncio.wait({future, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            future.cancel()
            raise WorkerStoppedError("the model worker has stopped; restart the server")
        return future.result()

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await self._gather(batch)
            await self._answer(batch)

    async def _gather(self, batch: list) -> None:
        """Add queued photos to `batch` until it is full or the first has waited `batch_wait_ms`."""
        deadline = time.perf_counter() + self.config.batch_wait_ms / 1000
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:  # noqa: UP041  asyncio's own name: a class of its own before Python 3.11
                return

    async def _answer(self, batch: list) -> None:
        images = np.stack([item[0] for item in batch])
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
        explain = self.classifier.can_explain and any(item[2] for item in batch)  # maps only when asked
        try:
            results = await run_in_threadpool(self.classifier.predict_decoded, images, [item[1] for item in batch],
                                              explain)
        except Exception as e:  # a failed model call fails its own batch, never the server
            for *_, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def create_app(bundle: str | Path | None = None, config: ServeConfig | None = None,
               classifier: Classifier | None = None) -> FastAPI:
    config = config or ServeConfig()
    state: dict = {"classifier": classifier, "batcher": None}
    metrics = Metrics()

    async def classifier_ready() -> Classifier:
        if state["classifier"] is None:
            classifier = await run_in_threadpool(load_classifier, bundle)
            await run_in_threadpool(classifier.warm_up, config.max_batch, True)  # the largest batch, with heat maps
            state["classifier"] = classifier
        return state["classifier"]

    async def batcher() -> MicroBatcher:
        """Started on first use, inside the running event loop (also when no lifespan event is sent)."""
        if state["batcher"] is None:
            state["batcher"] = MicroBatcher(await classifier_ready(), config, metrics)
            state["batcher"].start()
        return state["batcher"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher()  # load the model before the first request
        yield
        await state["batcher"].stop()

    app = FastAPI(title="catdogcnn", version="1", lifespan=lifespan,
                  description="Cats-vs-dogs photo classifier. Every error is JSON: "
                              '`{"error": {"status": ..., "message": ...}}`.')

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"status": exc.status, "message": exc.message}}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": {"status": exc.status_code, "message": str(exc.detail)}},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", []))
        message = f"malformed request: {where}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": {"status": 422, "message": message}}, status_code=422)

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = config.max_upload_mb * 1e6 * config.max_files + 1e6
        if length and length.isdigit() and int(length) > limit:
            return JSONResponse({"error": {"status": 413, "message": f"request of {int(length)} bytes is over "
                                           f"the limit of {int(limit)} bytes"}}, status_code=413)
        return await call_next(request)

    async def one_photo(upload: UploadFile, explain: bool) -> PhotoResult:
        started = time.perf_counter()
        name = upload.filename or "upload"
        classifier = await classifier_ready()
        limit = int(config.max_upload_mb * 1e6)
        data = await upload.read(limit + 1)
        try:
            if len(data) > limit:
                raise ApiError(413, f"{name}: larger than the {config.max_upload_mb:g} MB upload limit")
            try:
                image = await run_in_threadpool(decode_image, data, classifier.image_size, classifier.resize)
            except BadImageError as e:
                raise ApiError(STATUS_FOR_KIND.get(e.kind, 422), f"{name}: {e.reason}") from None
            try:
                p = await (await batcher()).predict(image, name, explain)
            except WorkerStoppedError as e:
                raise ApiError(503, f"{name}: {e}") from None
        except ApiError as e:
            return PhotoResult(filename=name, time_ms=(time.perf_counter() - started) * 1000,
                               error=ErrorBody(status=e.status, message=e.message))
        heatmap = None
        if explain and p.heatmap is not None:
            heatmap = await run_in_threadpool(lambda: png_data_url(overlay(image, p.heatmap)))
        return PhotoResult(filename=name, label=p.label, confidence=p.confidence, probabilities=p.probabilities,
                           neither_probability=p.neither_probability, reason=p.reason, heatmap=heatmap,
                           time_ms=(time.perf_counter() - started) * 1000)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, tags=["predict"])
    async def predict(files: Annotated[list[UploadFile], File(description="One or more photos")],
                      explain: Annotated[bool, Query(description="Add a heat map per photo (PNG data URL), "
                                                                 "for models that have them")] = False,
                      ) -> PredictResponse:
        """Label photos. Each photo gets its own result; a bad photo gets an `error` entry and the others
        still succeed. When no photo in the request could be labelled, the response carries the first
        photo's error status (413, 415, 422 or 503)."""
        if len(files) > config.max_files:
            raise ApiError(413, f"{len(files)} photos in one request; the limit is {config.max_files}")
        results = await asyncio.gather(*(one_photo(f, explain) for f in files))
        model_id = (await classifier_ready()).model_id
        if all(r.error for r in results):
            first = results[0].error
            body = {"error": first.model_dump(), "model_id": model_id, "results": [r.model_dump() for r in results]}
            return JSONResponse(body, status_code=first.status)
        return PredictResponse(model_id=model_id, results=list(results))

    @app.get("/v1/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness, and whether the model is loaded."""
        clf = state["classifier"]
        return HealthResponse(status="ok", model_loaded=clf is not None, model_id=clf.model_id if clf else None)

    @app.get("/v1/model", response_model=ModelResponse, tags=["service"])
    async def model() -> ModelResponse:
        """What a client needs of the model: its id, classes, input size, threshold, mirror averaging, validation
        metrics and "neither" rules (kind and cut; null when the model never answers "neither")."""
        clf = await classifier_ready()
        return ModelResponse(model_id=clf.model_id, classes=clf.classes, image_size=clf.image_size,
                             threshold=clf.threshold, tta=clf.tta, metrics=clf.metadata.get("metrics"),
                             neither={"rules": clf.neither_cuts} if clf.neither_rules else None)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return metrics.exposition()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(ServiceMiddleware, metrics=metrics, api_key=config.api_key,
                       request_timeout_s=config.request_timeout_s)
    if config.cors_origins:  # outermost: a browser's preflight is answered without the API key
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key"])
    return app


def serve(bundle: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None, workers: int = 1, shutdown_timeout_s: float = 20) -> None:
    """Serve until SIGTERM or Ctrl-C, in `workers` processes (see service.py)."""
    from catdogcnn.service import run

    run(str(bundle) if bundle else None, host, port, config or ServeConfig(), workers, shutdown_timeout_s)
