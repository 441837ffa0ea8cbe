"""The service around the API: API key, CORS, /metrics, upload deadlines, several workers, a graceful SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import time

import httpx
import pytest
from conftest import jpeg_bytes as jpeg
from conftest import read_http_response, start_server
from fastapi.testclient import TestClient

from catdogcnn import service
from catdogcnn.serve import ServeConfig, create_app

pytest.importorskip("prometheus_client", reason="/metrics needs the serve extra: pip install -e '.[serve]'")


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from the Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}(?:{{{re.escape(wanted)}}})? (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(tiny_bundle):
    config = ServeConfig(api_key=KEY, cors_origins=["https://pets.example"])
    with TestClient(create_app(tiny_bundle, config)) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_under_prefix(tiny_bundle):
    """The keyed app mounted under /pets in a larger app, as a site embeds it."""
    from fastapi import FastAPI

    site = FastAPI()
    site.mount("/pets", create_app(tiny_bundle, ServeConfig(api_key=KEY)))
    with TestClient(site) as client:
        yield client


@pytest.mark.parametrize("prefix", ["", "/pets"])
def test_every_path_needs_the_key_but_the_open_ones_wherever_the_app_is_mounted(keyed, keyed_under_prefix, prefix):
    client = keyed_under_prefix if prefix else keyed
    photo = {"files": ("a.jpg", jpeg(), "image/jpeg")}
    for path, method in (("/v1/predict", "post"), ("/v1/model", "get"), ("/metrics", "get"), ("/nowhere", "get"),
                         ("/v1/model/", "get"), ("/V1/model", "get")):
        refused = getattr(client, method)(prefix + path, **({"files": photo} if method == "post" else {}))
        assert refused.status_code == 401, path
        assert "API key" in refused.json()["error"]["message"] and refused.headers["www-authenticate"] == "Bearer"
    for open_path in ("/v1/health", "/", "/static/app.js", "/docs", "/openapi.json"):
        assert client.get(prefix + open_path).status_code == 200, open_path
    assert client.get(prefix + "/v1/model", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize(("headers", "status"), [
    ({"X-API-Key": KEY}, 200),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"Authorization": f"bearer {KEY}"}, 200),  # the scheme is case-insensitive (RFC 9110)
    ({"Authorization": f"BEARER  {KEY} "}, 200),
    ({"Authorization": KEY}, 401),  # no scheme
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"X-API-Key": KEY[:-1]}, 401),
])
def test_the_key_is_taken_only_as_a_bearer_token_or_x_api_key(keyed, headers, status):
    assert keyed.get("/v1/model", headers=headers).status_code == status
    assert keyed.post("/v1/predict", files={"files": ("a.jpg", jpeg(), "image/jpeg")},
                      headers=headers).status_code == status


def test_allowed_origins_get_cors_headers_and_others_do_not(keyed):
    allowed = keyed.get("/v1/health", headers={"Origin": "https://pets.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://pets.example"
    assert "access-control-allow-origin" not in keyed.get("/v1/health", headers={"Origin": "https://evil.example"}
                                                          ).headers
    preflight = keyed.options("/v1/predict", headers={"Origin": "https://pets.example",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "x-api-key"})
    assert preflight.status_code == 200  # no key needed: browsers send none with a preflight
    assert "POST" in preflight.headers["access-control-allow-methods"]
    refused = keyed.post("/v1/predict", files={"files": ("a.jpg", jpeg(), "image/jpeg")},
                         headers={"Origin": "https://pets.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://pets.example"


def test_metrics_count_requests_by_status_latency_and_batch_sizes(tiny_bundle):
    with TestClient(create_app(tiny_bundle)) as client:
        before = client.get("/metrics").text
        assert metric(before, "catdogcnn_requests_total", route="/v1/predict", status="200") == 0
        for seed in range(3):
            assert client.post("/v1/predict", files={"files": ("a.jpg", jpeg(seed), "image/jpeg")}).status_code == 200
        assert client.post("/v1/predict", files={"files": ("n.txt", b"not a photo", "text/plain")}).status_code == 415
        after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "catdogcnn_requests_total", route="/v1/predict", status="200") == 3
    assert metric(text, "catdogcnn_requests_total", route="/v1/predict", status="415") == 1
    assert metric(text, "catdogcnn_request_seconds_count", route="/v1/predict") == 4
    assert metric(text, "catdogcnn_batch_photos_count") == 3 and metric(text, "catdogcnn_batch_photos_sum") == 3


def test_requests_refused_for_their_size_are_answered_after_a_pause_and_others_at_once(tiny_bundle, monkeypatch):
    pauses = []
    real_sleep = service.asyncio.sleep

    async def sleep(seconds: float, *args) -> None:
        if seconds == service.REFUSAL_PAUSE_S:
            pauses.append(seconds)
        await real_sleep(seconds, *args)

    monkeypatch.setattr(service.asyncio, "sleep", sleep)
    with TestClient(create_app(tiny_bundle, ServeConfig(max_files=2))) as client:
        def timed(*photos: tuple) -> tuple[int, float, int]:
            started, before = time.perf_counter(), len(pauses)
            status = client.post("/v1/predict", files=[("files", photo) for photo in photos]).status_code
            return status, time.perf_counter() - started, len(pauses) - before

        good = timed(("a.jpg", jpeg(1), "image/jpeg"))
        bad = timed(("n.txt", b"not a photo", "text/plain"))
        many = timed(*[(f"{i}.jpg", jpeg(i), "image/jpeg") for i in range(3)])
    assert (good[0], bad[0], many[0]) == (200, 415, 413)
    assert (good[2], bad[2], many[2]) == (0, 0, 1) and many[1] >= service.REFUSAL_PAUSE_S, (good, bad, many)


def body_pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@pytest.mark.parametrize(("sizes", "over"), [([100, 120, 5], False), ([100, 300, 5], True), ([300], True),
                                             ([5, 5, 250], True)])
def test_part_sizes_find_every_part_wherever_the_body_is_cut(sizes, over):
    """Parts of `sizes` bytes of data (limit 200, each with ~60 bytes of headers), with runs that look like the
    delimiter but are not one inside them; the body cut into two pieces at every offset, and one byte at a time."""
    boundary = b"xyz123"
    lookalike = b"\r\n--" + boundary + b"x"  # python-multipart takes it as data
    parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\n'
             + (lookalike + b"d" * size)[:size] for size in sizes]
    body = b"\r\n".join(parts) + b"\r\n--" + boundary + b"--\r\n"
    for cuts in [[k] for k in range(1, len(body))] + [list(range(1, len(body)))]:
        counter = service.PartSizes(boundary, 200)
        assert any([counter.over_limit(piece) for piece in body_pieces(body, cuts)]) is over, cuts


def upload_in_halves(url: str, photo: bytes) -> tuple[socket.socket, bytes]:
    """A POST /v1/predict whose headers and first half of the body are sent; returns the socket and the rest."""
    request = httpx.Request("POST", f"{url}/v1/predict", files={"files": ("slow.jpg", photo, "image/jpeg")})
    body = request.read()
    head = f"POST /v1/predict HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host") + "\r\n"
    conn = socket.create_connection((request.url.host, request.url.port))
    conn.sendall(head.encode() + body[: len(body) // 2])
    return conn, body[len(body) // 2:]


@pytest.mark.slow
def test_two_workers_time_out_stalled_uploads_sum_metrics_and_finish_in_flight_requests_on_sigterm(tiny_bundle):
    server, url = start_server("--model", str(tiny_bundle), "--workers", "2", "--request-timeout", "8",
                               "--shutdown-timeout", "15")
    try:
        stalled, _ = upload_in_halves(url, jpeg(1))
        started = time.time()
        for seed in range(6):  # the stalled client holds no worker
            r = httpx.post(f"{url}/v1/predict", files={"files": ("a.jpg", jpeg(seed), "image/jpeg")}, timeout=10)
            assert r.status_code == 200
        status, body = read_http_response(stalled)
        assert status == 408 and b"did not arrive within 8 s" in body and 7.5 < time.time() - started < 20
        for _ in range(4):  # whichever worker answers, the figures are every worker's
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert metric(text, "catdogcnn_requests_total", route="/v1/predict", status="200") == 6
            assert metric(text, "catdogcnn_requests_total", route="/v1/predict", status="408") == 1

        in_flight, rest = upload_in_halves(url, jpeg(2))
        time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        told = time.time()
        # No new requests served once told to stop: each worker hears of it within moments. With several workers
        # the parent keeps the socket open until it exits, so a new connection is accepted by the kernel and
        # never answered (a timeout), not refused. The in-flight upload must still arrive within its 8 s.
        while True:
            try:
                httpx.get(f"{url}/v1/health", timeout=1)
            except httpx.HTTPError:
                break
            assert time.time() - told < 4, "new requests still answered 4 s after SIGTERM"
            time.sleep(0.2)
        in_flight.sendall(rest)
        status, body = read_http_response(in_flight)
        assert status == 200 and b'"label"' in body
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.slow
def test_sigterm_ends_within_the_shutdown_timeout_despite_a_stalled_client(tiny_bundle):
    server, url = start_server("--model", str(tiny_bundle), "--request-timeout", "60", "--shutdown-timeout", "2")
    try:
        stalled, _ = upload_in_halves(url, jpeg(3))
        time.sleep(0.5)
        started = time.time()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert time.time() - started < 8, output
        assert "timeout graceful shutdown exceeded" in output
        stalled.close()
    finally:
        if server.poll() is None:
            server.kill()
