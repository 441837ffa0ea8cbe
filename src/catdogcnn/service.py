"""What a service reachable beyond the machine needs around the HTTP API: Prometheus metrics, an optional API
key, a deadline for uploads and the one JSON error envelope. A leaf: it imports nothing of the app.

- `/metrics` (Prometheus text format): requests by route and status, request latency by route, photos per
  model call. With several workers the figures are summed over all of them (prometheus-client's
  multiprocess mode, in a temporary folder that `run` makes).
- API key (`ServeConfig.api_key`): denied by default. Every path answers 401 without it but the open ones
  (`OPEN_PATHS`, `/static/`): the page, `/v1/health` (for load balancers) and the API docs, which show nothing
  private (the page asks for the key when the API answers 401). Paths are taken relative to where the app is
  mounted, so a prefix changes nothing. Sent as `Authorization: Bearer KEY` (the scheme in any case) or
  `X-API-Key: KEY`, compared in constant time.
- Uploads must arrive within `request_timeout_s`, or the request gets 408 and its connection is closed: a
  stalled or very slow client cannot hold a request open. Idle keep-alive connections close after 5 s.
- A request refused for its size (413) or slowness (408) is answered after a pause of `REFUSAL_PAUSE_S`, which
  costs the server no work (the connection waits): a client sending such requests in a loop cannot claim the time
  of those that are not.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time

from catdogcnn.extras import needs_extra

with needs_extra("serve"):
    from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
    from python_multipart.multipart import parse_options_header
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse, Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
OPEN_PATHS = frozenset({"/", "/v1/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                        "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# The page is cross-origin isolated, so that onnxruntime-web may run the model on several threads in the browser
# (SharedArrayBuffer needs it); the page loads nothing from other origins.
ISOLATION_HEADERS = [(b"cross-origin-opener-policy", b"same-origin"),
                     (b"cross-origin-embedder-policy", b"require-corp")]
# A client sending requests it knows are refused, in a loop, gets a few answers a second, not the server's time.
REFUSAL_PAUSE_S = 0.25
LINGER_S, LINGER_BYTES = 2.0, 8_000_000  # how long, and how much, a request cut short is read on after its answer
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
    """Every error the service answers, in one shape: `{"error": {"status": ..., "message": ...}}`."""
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def multipart_boundary(scope: Scope) -> bytes | None:
    """The boundary of a multipart/form-data request, read from its (first) Content-Type as Starlette's form parser
    reads it; None for any other request."""
    kind, params = parse_options_header(Headers(scope=scope).get("content-type", ""))
    return (params.get(b"boundary") or None) if kind == b"multipart/form-data" else None


class PartSizes:
    """The size of each multipart part as the body streams in, found by looking for the boundary in each piece
    (bytes.find: C speed, whatever the parser behind does), so that a part over `limit` is refused at that size,
    not at the request's (32 photos' worth): a flood in one part costs a photo's bytes, not 320 MB.

    A delimiter is CRLF, "--", the boundary and then what python-multipart takes to end one: CRLF, "--" (the last)
    or padding; anything else is data. The preamble counts with the first part. The last few bytes of a piece,
    which may start a delimiter, are kept and counted with the next."""

    def __init__(self, boundary: bytes, limit: int):
        self.delimiter, self.limit = b"\r\n--" + boundary, limit
        self.current, self.tail = 0, b""  # bytes of the part so far; the end of the last piece, not yet counted

    def over_limit(self, piece: bytes) -> bool:
        data, counted, search = self.tail + piece, 0, 0
        while (found := data.find(self.delimiter, search)) >= 0:
            end = found + len(self.delimiter)
            if len(data) - end < 2:  # too near the end to tell: kept for the next piece
                break
            search = found + 1
            if data[end:end + 2] in (b"\r\n", b"--") or data[end:end + 1] in (b" ", b"\t"):
                if self.current + found - counted > self.limit:
                    return True
                self.current, counted, search = 0, end, end
        keep = max(counted, len(data) - len(self.delimiter) - 1)
        self.current += keep - counted
        self.tail = data[keep:]
        return self.current > self.limit


async def answer_then_linger(response: Response, receive: Receive, send: Send) -> None:
    """Send `response` whole, but end it (and so close the connection) only once the rest of the request body has
    been read and dropped, for at most LINGER_S or LINGER_BYTES: closing a socket with unread data resets the
    connection, and a client still sending would lose the answer (uvicorn has no lingering close of its own)."""
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    deadline, dropped = time.perf_counter() + LINGER_S, 0
    while dropped < LINGER_BYTES and (left := deadline - time.perf_counter()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            break
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class ServiceMiddleware:
    """Pure ASGI middleware (an upload's deadline wraps `receive`, which Starlette's BaseHTTPMiddleware hides):
    the API key, the request's size and deadline, and the request metrics.

    The body is counted as it streams in, chunked or not: past `max_body_bytes` (or declared past it in
    Content-Length), or with one multipart part past `max_part_bytes`, the request gets 413 and its connection is
    closed, as a request still arriving after `request_timeout_s` gets 408. Either way the app reads no further:
    it is told the client has gone."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None, request_timeout_s: float,
                 max_body_bytes: int, max_part_bytes: int):
        self.app, self.metrics, self.request_timeout_s = app, metrics, request_timeout_s
        self.max_body_bytes, self.max_part_bytes = max_body_bytes, max_part_bytes
        self.api_key = api_key.encode() if api_key else None

    def key_accepted(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"").strip()
        if not given:
            scheme, _, credentials = headers.get(b"authorization", b"").strip().partition(b" ")
            given = credentials.strip() if scheme.lower() == b"bearer" else b""
        return bool(given) and hmac.compare_digest(given, self.api_key)

    @staticmethod
    def is_open(scope: Scope) -> bool:
        """Whether a path needs no key: relative to where the app is mounted, in OPEN_PATHS or OPEN_PREFIXES."""
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def declared_too_large(self, scope: Scope) -> bool:
        length = dict(scope["headers"]).get(b"content-length", b"")
        return length.isdigit() and int(length) > self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # unless a response starts
        deadline, body_done, body_bytes = started + self.request_timeout_s, False, 0
        cut_short: tuple[int, str] | None = None  # the answer that replaces the app's when the body is cut short
        boundary = multipart_boundary(scope)
        part_sizes = PartSizes(boundary, self.max_part_bytes) if boundary else None

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if cut_short:  # the app's answer to a body cut short is replaced below
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                if status in (408, 413):  # refused for its size or slowness: answered after a pause (no work)
                    await asyncio.sleep(REFUSAL_PAUSE_S)
                message = {**message, "headers": [*message.get("headers", []), *ISOLATION_HEADERS]}
            await send(message)

        async def receive_within_limits() -> Message:
            nonlocal body_done, body_bytes, cut_short
            if body_done or cut_short:  # later reads wait for a disconnect: no deadline there
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                cut_short = (408, f"the request did not arrive within {self.request_timeout_s:g} s")
                return {"type": "http.disconnect"}  # the app stops reading, as if the client had gone
            piece = message.get("body", b"")
            body_bytes += len(piece)
            if body_bytes > self.max_body_bytes:
                cut_short = (413, f"request over the limit of {self.max_body_bytes} bytes")
            elif part_sizes and part_sizes.over_limit(piece):
                cut_short = (413, f"a part of the request over the limit of {self.max_part_bytes} bytes "
                                  "(twice a photo's size limit)")
            if cut_short:
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            if self.api_key and not self.is_open(scope) and not self.key_accepted(scope):
                await error_response(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY' or "
                                     "'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})(scope, receive,
                                                                                         send_recorded)
                return
            if self.declared_too_large(scope):
                cut_short = (413, f"request over the limit of {self.max_body_bytes} bytes")
            else:
                try:
                    await self.app(scope, receive_within_limits, send_recorded)
                except Exception:
                    if not cut_short:
                        raise
            if cut_short:
                answer, cut_short = cut_short, None
                await answer_then_linger(error_response(*answer, {"Connection": "close"}), receive, send_recorded)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the route's pattern: few label values
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
