"""HTTP API (FastAPI) and the web page, over one `Classifier`.

    catdogcnn serve [--host 127.0.0.1] [--port 8000] [--model BUNDLE]

Routes, versioned under /v1: POST /v1/predict (multipart, field `files`, repeatable), GET /v1/health,
GET /v1/model; the page at /, OpenAPI docs at /docs. Photos are decoded in worker threads; concurrent
requests are gathered into one model call (micro-batching: the first photo waits at most
`batch_wait_ms` for others), so throughput grows with load instead of queueing. A client's file name is only
echoed back, never used as a path.

Work per request and per process is bounded, whatever a client sends: the body (chunked too) is counted as it
streams in, against the request cap and each part against twice a photo's, more than `max_files` parts are refused
while parsing, a photo's pixels are checked from its header against `max_megapixels` before it is decoded, at most
`threads` ordinary photos are decoded at once and beside them one large photo (over 4 MP decoded) at a lower CPU
priority, four in hand at most, and at most `max_pending` photos are in the server (read, decoding or waiting for
the model): past that a photo gets 503 with Retry-After. A photo's bytes are dropped once decoded.

The routes are module-level; what they share (the model, the batcher, the limits) is one `ServiceState` on
`app.state.service`. Process running (workers, signals) lives in runner.py; metrics, the API key, the upload
deadline and the one JSON error envelope in service.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from catdogcnn.bundle import graph_path
from catdogcnn.data import BadImageError, decode_image, header_pixels
from catdogcnn.explain import overlay, png_data_url
from catdogcnn.extras import needs_extra
from catdogcnn.predict import Classifier, Prediction, load_classifier

with needs_extra("serve"):
    from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from catdogcnn.serve_lanes import DecodeLanes, LaneFullError
    from catdogcnn.service import Metrics, ServiceMiddleware, error_response

log = logging.getLogger("catdogcnn")
STATIC = Path(__file__).parent / "static"
# BadImageError.kind -> HTTP status: 415 not an image at all, 413 too many pixels, 422 an image that cannot be decoded.
STATUS_FOR_KIND = {"not_image": 415, "bomb": 413}
RETRY_AFTER_S = 1  # what a photo turned away because the server is full is told to wait


@dataclass
class ServeConfig:
    max_upload_mb: float = 10.0  # per photo
    max_files: int = 32  # per request
    max_megapixels: float = 40.0  # per photo, read from its header before it is decoded
    batch_wait_ms: float = 5.0  # how long the first photo of a batch waits for company
    # Photos in one model call. 8 rather than 16: at 32 clients, the same throughput and a p99 of 384 ms
    # instead of 465 ms, as a new photo waits less behind the batch running.
    max_batch: int = 8
    max_pending: int = 128  # photos in the server at once (read, decoding, waiting for the model); then 503
    threads: int | None = None  # the model's threads, and photos decoded at once (None: all cores)
    request_timeout_s: float = 30.0  # an upload must arrive within this (408 otherwise)
    api_key: str | None = None  # when set, everything but the page, health and docs needs it (see service.py)
    cors_origins: list[str] = field(default_factory=list)  # web origins allowed to call the API from a browser

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6 * self.max_files + 1e6)  # the photos, and room for the multipart

    @property
    def max_part_bytes(self) -> int:
        """Past this a part ends its request (413); a photo over the limit but under twice it gets its own 413."""
        return int(2 * self.max_upload_mb * 1e6 + 64_000)


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
    status: Literal["ok", "unavailable"]
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


class LimitsResponse(BaseModel):
    max_upload_mb: float  # per photo
    max_megapixels: float  # per photo, read from its header
    max_files: int  # photos in one request


ERROR_TEXT = {
    401: "Missing or wrong API key (servers started with one)",
    408: "The upload did not arrive within the server's request timeout",
    413: "A photo over the upload limit (bytes or pixels), a request over the request limit, or too many photos",
    415: "Not an image (for a request of one photo; with several, each failure is listed in `results`)",
    422: "An image that cannot be decoded (corrupt, truncated), or a malformed request",
    500: "A fault in the server (logged); the same JSON envelope as every other error",
    503: "The server is full (retry after the Retry-After header's seconds) or its model is not serving",
}


def error_docs(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": ERROR_TEXT[code]} for code in codes}


class WorkerStoppedError(RuntimeError):
    """The micro-batcher's task has ended (shutdown, or a bug): its requests are answered 503, never left waiting."""


class MicroBatcher:
    """Gathers decoded photos from concurrent requests into batches for one model call each."""

    def __init__(self, classifier: Classifier, config: ServeConfig, metrics: Metrics | None = None):
        self.classifier, self.config, self.metrics = classifier, config, metrics
        self.queue: asyncio.Queue = asyncio.Queue()  # bounded by ServiceState's admission of photos
        self.task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

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


class ServiceState:
    """What the routes share: the model (loaded once), the batcher, the limits and the count of photos in."""

    def __init__(self, bundle: str | Path | None, config: ServeConfig, classifier: Classifier | None = None):
        self.bundle, self.config, self.classifier = bundle, config, classifier
        self.metrics = Metrics()
        self.batcher: MicroBatcher | None = None
        self.pending = 0  # photos admitted and not yet answered
        self.threads = config.threads or os.cpu_count() or 1
        self._decode_lanes: DecodeLanes | None = None  # made in the running loop, at the first photo
        self._loading = asyncio.Lock()

    async def ready(self) -> Classifier:
        if self.classifier is None:
            async with self._loading:  # two first requests load the model once
                if self.classifier is None:
                    classifier = await run_in_threadpool(load_classifier, self.bundle, threads=self.threads)
                    await run_in_threadpool(classifier.warm_up, self.config.max_batch, True)  # largest batch, maps
                    self.classifier = classifier
        return self.classifier

    async def started_batcher(self) -> MicroBatcher:
        """Started on first use, inside the running event loop (also when no lifespan event is sent)."""
        classifier = await self.ready()
        if self.batcher is None:  # no await between the check and the start: one batcher
            self.batcher = MicroBatcher(classifier, self.config, self.metrics)
            self.batcher.start()
        return self.batcher

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        if self._decode_lanes:
            self._decode_lanes.close()
        self.batcher = self._decode_lanes = None  # a later start makes them again

    @property
    def serving(self) -> bool:
        return self.classifier is not None and self.batcher is not None and self.batcher.alive

    async def label(self, upload: UploadFile, explain: bool) -> PhotoResult:
        """One uploaded photo's result, or its error: admitted only while the server has room for it."""
        started = time.perf_counter()
        name = upload.filename or "upload"
        try:
            if self.pending >= self.config.max_pending:
                raise ApiError(503, f"{name}: the server is busy ({self.pending} photos in hand); "
                                    f"try again in {RETRY_AFTER_S} s")
            self.pending += 1
            try:
                heatmap, p = await self._label(upload, name, explain)
            finally:
                self.pending -= 1
        except ApiError as e:
            return PhotoResult(filename=name, time_ms=(time.perf_counter() - started) * 1000,
                               error=ErrorBody(status=e.status, message=e.message))
        return PhotoResult(filename=name, label=p.label, confidence=p.confidence, probabilities=p.probabilities,
                           neither_probability=p.neither_probability, reason=p.reason, heatmap=heatmap,
                           time_ms=(time.perf_counter() - started) * 1000)

    async def _label(self, upload: UploadFile, name: str, explain: bool) -> tuple[str | None, Prediction]:
        classifier = await self.ready()
        limit = int(self.config.max_upload_mb * 1e6)
        data = await upload.read(limit + 1)
        await upload.close()
        if len(data) > limit:
            raise ApiError(413, f"{name}: larger than the {self.config.max_upload_mb:g} MB upload limit")
        if self._decode_lanes is None:
            self._decode_lanes = DecodeLanes(self.threads)
        cap = int(self.config.max_megapixels * 1e6)
        declared, decoded = header_pixels(data, classifier.image_size, classifier.resize)
        try:
            if declared > cap:  # refused from its header at once (decode_image says why), never queued for a slot
                decode_image(data, classifier.image_size, classifier.resize, cap)
            image = await self._decode_lanes.decode(decoded, decode_image, data, classifier.image_size,
                                                    classifier.resize, cap)
        except BadImageError as e:
            raise ApiError(STATUS_FOR_KIND.get(e.kind, 422), f"{name}: {e.reason}") from None
        except LaneFullError as e:
            raise ApiError(503, f"{name}: the server is busy ({e}); try again in {RETRY_AFTER_S} s") from None
        del data  # the decoded photo is all that is kept while it waits for the model
        try:
            p = await (await self.started_batcher()).predict(image, name, explain)
        except WorkerStoppedError as e:
            raise ApiError(503, f"{name}: {e}") from None
        heatmap = None
        if explain and p.heatmap is not None:
            heatmap = await run_in_threadpool(lambda: png_data_url(overlay(image, p.heatmap)))
        return heatmap, p


def service(request: Request) -> ServiceState:
    return request.app.state.service


api = APIRouter()


@api.post("/v1/predict", response_model=PredictResponse, tags=["predict"],
          responses=error_docs(401, 408, 413, 415, 422, 500, 503))
async def predict(request: Request,
                  files: Annotated[list[UploadFile], File(description="One or more photos")],
                  explain: Annotated[bool, Query(description="Add a heat map per photo (PNG data URL), "
                                                             "for models that have them")] = False,
                  ) -> PredictResponse:
    """Label photos. Each photo gets its own result; a bad photo gets an `error` entry and the others
    still succeed. When no photo in the request could be labelled, the response carries the first
    photo's error status (413, 415, 422 or 503)."""
    state = service(request)
    results = await asyncio.gather(*(state.label(f, explain) for f in files))
    model_id = (await state.ready()).model_id
    if all(r.error for r in results):
        first = results[0].error
        body = {"error": first.model_dump(), "model_id": model_id, "results": [r.model_dump() for r in results]}
        headers = {"Retry-After": str(RETRY_AFTER_S)} if first.status == 503 else None
        return JSONResponse(body, status_code=first.status, headers=headers)
    return PredictResponse(model_id=model_id, results=list(results))


@api.get("/v1/health", response_model=HealthResponse, tags=["service"],
         responses=error_docs(500) | {503: {"model": HealthResponse, "description": "The model is not serving"}})
async def health(request: Request) -> HealthResponse | JSONResponse:
    """Whether the model is loaded and its worker is serving: 200 if so, 503 (same body) if not. An app mounted
    in another (no lifespan events) loads its model here, at the first health check."""
    state = service(request)
    with contextlib.suppress(Exception):  # a model that cannot load is reported as not serving
        await state.started_batcher()
    clf = state.classifier
    answer = HealthResponse(status="ok" if state.serving else "unavailable", model_loaded=clf is not None,
                            model_id=clf.model_id if clf else None)
    return answer if state.serving else JSONResponse(answer.model_dump(), status_code=503)


@api.get("/v1/model", response_model=ModelResponse, tags=["service"], responses=error_docs(401, 500, 503))
async def model(request: Request) -> ModelResponse:
    """What a client needs of the model: its id, classes, input size, threshold, mirror averaging, validation
    metrics and "neither" rules (kind and cut; null when the model never answers "neither")."""
    return ModelResponse(**(await service(request).ready()).description())


@api.get("/v1/limits", response_model=LimitsResponse, tags=["service"], responses=error_docs(401, 500))
async def limits(request: Request) -> LimitsResponse:
    """What this server accepts: a photo's size in MB and megapixels, photos in one request."""
    config = service(request).config
    return LimitsResponse(max_upload_mb=config.max_upload_mb, max_megapixels=config.max_megapixels,
                          max_files=config.max_files)


@api.get("/v1/bundle/bundle.json", tags=["service"], responses=error_docs(401, 500, 503))
async def model_bundle(request: Request) -> JSONResponse:
    """The served bundle's bundle.json as it is: everything the page needs to label photos on the device (input
    size, classes, threshold, "neither" rules with their weights and cuts)."""
    return JSONResponse((await service(request).ready()).metadata)


@api.get("/v1/bundle/graph", tags=["service"], responses=error_docs(401, 500, 503),
         response_class=FileResponse)
async def model_graph(request: Request) -> FileResponse:
    """The served bundle's ONNX graph (what onnxruntime-web runs in the page's local mode)."""
    clf = await service(request).ready()
    return FileResponse(graph_path(clf.bundle, clf.metadata), media_type="application/octet-stream",
                        filename=clf.metadata["graph"]["file"])


@api.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@api.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request):
    return service(request).metrics.exposition()


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # Starlette's multipart parser: a limit passed (413), or a body it cannot read
        detail, limit = str(exc.detail), service(request).config.max_files
        if detail.startswith("Too many files"):
            return error_response(413, f"more than {limit} photos in one request; the limit is {limit}")
        if detail.startswith("Too many fields"):
            return error_response(413, f"more than {limit} fields besides the photos; the limit is {limit}")
        if detail.startswith(("Part exceeded", "Field exceeded")):
            return error_response(413, f"a form field over the size limit ({detail.rstrip('.')})")
        return error_response(422, f"the request's form cannot be read ({detail.rstrip('.')})")
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", []))
    return error_response(422, f"malformed request: {where}: {first.get('msg', 'invalid')}")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__}); it has been logged")


def create_app(bundle: str | Path | None = None, config: ServeConfig | None = None,
               classifier: Classifier | None = None) -> FastAPI:
    """The app over `bundle` (default: the shipped default model), or over an already loaded `classifier`."""
    config = config or ServeConfig()
    state = ServiceState(bundle, config, classifier)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.started_batcher()  # load the model before the first request
        yield
        await state.stop()

    app = FastAPI(title="catdogcnn", version="1", lifespan=lifespan,
                  description="Cats-vs-dogs photo classifier. Every error is JSON: "
                              '`{"error": {"status": ..., "message": ...}}`.')
    app.state.service = state
    app.include_router(api, form_limits={"max_files": config.max_files, "max_fields": config.max_files})
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(ServiceMiddleware, metrics=state.metrics, api_key=config.api_key,
                       request_timeout_s=config.request_timeout_s, max_body_bytes=config.max_request_bytes,
                       max_part_bytes=config.max_part_bytes)
    if config.cors_origins:  # outermost: a browser's preflight is answered without the API key
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key"])
    return app
