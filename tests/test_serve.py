"""The HTTP API through FastAPI's test client: every route and every error."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import select
import socket
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import jpeg_bytes as jpeg
from conftest import live_app, read_http_response
from fastapi.testclient import TestClient
from PIL import Image

from catdogcnn import serve
from catdogcnn.bundle import shipped_bundle_names
from catdogcnn.predict import Classifier
from catdogcnn.serve import STATIC, ServeConfig, create_app


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with TestClient(create_app(tiny_bundle, ServeConfig(max_upload_mb=0.5, max_files=4))) as c:
        yield c


def post(client, *files):
    return client.post("/v1/predict", files=[("files", f) for f in files])


def test_predict_one_photo(client):
    r = post(client, ("cat.jpg", jpeg(), "image/jpeg"))
    assert r.status_code == 200
    body = r.json()
    (result,) = body["results"]
    assert result["filename"] == "cat.jpg" and result["label"] in ("cats", "dogs")
    assert set(result["probabilities"]) == {"cats", "dogs"} and result["time_ms"] > 0
    assert body["model_id"].startswith("seed_cnn-")


def test_an_iphone_photo_is_labelled(client, heic_photo):
    r = post(client, ("IMG_0001.HEIC", heic_photo((96, 96)), "image/heic"))
    assert r.status_code == 200 and r.json()["results"][0]["label"] in ("cats", "dogs")


def test_a_bad_photo_does_not_spoil_the_others(client):
    r = post(client, ("a.jpg", jpeg(1), "image/jpeg"), ("notes.txt", b"hello", "text/plain"),
             ("b.jpg", jpeg(2), "image/jpeg"))
    assert r.status_code == 200
    a, notes, b = r.json()["results"]
    assert a["label"] and b["label"] and notes["error"]["status"] == 415 and "notes.txt" in notes["error"]["message"]


@pytest.mark.parametrize(("kind", "status", "words"), [
    ("text", 415, "not an image"),
    ("empty", 422, "empty"),
    ("truncated", 422, "truncated"),
    ("bomb", 413, "too large"),
    ("too large", 413, "upload limit"),
])
def test_errors_have_their_status_and_a_message(client, png_with_size, kind, status, words):
    content = {"text": lambda: b"just some text", "empty": lambda: b"", "truncated": lambda: jpeg(3)[:300],
               "bomb": lambda: png_with_size(40_000, 40_000), "too large": lambda: b"\xff\xd8" + bytes(600_000)}[kind]()
    r = post(client, ("x.jpg", content, "image/jpeg"))
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_too_many_files(client):
    r = post(client, *[(f"{i}.jpg", jpeg(i), "image/jpeg") for i in range(5)])
    assert r.status_code == 413 and "limit is 4" in r.json()["error"]["message"]


def test_request_without_files_is_a_json_error(client):
    r = client.post("/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "files" in r.json()["error"]["message"]


def test_a_declared_oversized_request_is_refused_before_reading(client):
    r = client.post("/v1/predict", content=b"x" * 10, headers={"content-length": str(10**9),
                                                               "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "over the limit of" in r.json()["error"]["message"]


def test_pixels_are_checked_from_the_header_against_the_servers_cap(tiny_bundle, png_with_size):
    """Over the cap: "too large" (413), though the file is 60 bytes; under it, the same fake header is what it is,
    a corrupt photo (422)."""
    with TestClient(create_app(tiny_bundle, ServeConfig(max_megapixels=40))) as c:
        over = post(c, ("big.png", png_with_size(7000, 6000), "image/png"))
        under = post(c, ("fake.png", png_with_size(6000, 6000), "image/png"))
    assert over.status_code == 413 and "too large: 7000 x 6000 pixels, more than the limit of 40,000,000" in \
        over.json()["error"]["message"]
    assert under.status_code == 422 and "too large" not in under.json()["error"]["message"]


def chunked_request(path: str, boundary: str = "b0undary", content_type: str | None = None) -> bytes:
    content_type = content_type or f"multipart/form-data; boundary={boundary}"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def answer_while_sending(url: str, head: bytes, chunks, seconds: float = 20) -> tuple[int, bytes, int]:
    """Send `head`, then chunks as long as the server reads them and has not answered: (status, body, bytes of
    chunks sent). An answer before the body ends is what a bounded server gives."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # what was sent is near what the server read
    conn.connect((host, int(port)))
    conn.sendall(head)
    sent, deadline = 0, time.time() + seconds
    try:
        for data in chunks:
            if select.select([conn], [], [], 0)[0] or time.time() > deadline:
                break
            conn.sendall(chunk(data))
            sent += len(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection after answering
    status, body = read_http_response(conn, 10)
    assert status, f"no answer after {sent:,} bytes"
    return status, body, sent


def test_a_chunked_body_is_counted_as_it_streams_and_refused_past_the_cap(tiny_bundle):
    """Files and other fields, each under a photo's limit and as many as allowed, past the request's cap of 3 MB."""
    config = ServeConfig(max_upload_mb=0.5, max_files=4)
    file = b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
    field = b"--b0undary\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n"
    parts = itertools.chain.from_iterable((head + b"a" * 480_000 + b"\r\n",) for head in [file, field] * 4)
    flood = (piece[i:i + 65536] for piece in parts for i in range(0, len(piece), 65536))  # no Content-Length
    with live_app(create_app(tiny_bundle, config)) as url:
        status, body, sent = answer_while_sending(url, chunked_request("/v1/predict"), flood)
    assert status == 413 and b"over the limit of 3000000 bytes" in body, body
    assert sent < 2 * config.max_request_bytes, f"{sent:,} bytes read before the answer"


def test_the_form_parsers_refusals_are_413_or_422_never_an_undocumented_400(client):
    fields = {f"note{i}": "x" for i in range(5)}
    many = client.post("/v1/predict", data=fields, files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))])
    broken = client.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    large = client.post("/v1/predict", data={"note": "x" * 1_050_000},
                        files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))])
    assert many.status_code == 413 and "fields besides the photos; the limit is 4" in many.json()["error"]["message"]
    assert large.status_code == 413 and "form field over the size limit" in large.json()["error"]["message"]
    assert broken.status_code == 422 and "form cannot be read" in broken.json()["error"]["message"], broken.text


@pytest.mark.parametrize("boundary", ["b0undary", '"a quoted:boundary"'])
def test_a_part_is_refused_at_a_photos_limit_not_the_requests(tiny_bundle, boundary):
    """A chunked flood in one part is cut once the part passes twice a photo's limit (0.5 MB here), long before the
    request's (17 MB), though a delimiter-like run of bytes straddles the pieces; a request of parts each under the
    limit passes. (What was sent counts what waits in the sockets' buffers too: a few MB.)"""
    config = ServeConfig(max_upload_mb=0.5, max_files=32)  # a request cap of 17 MB
    bare = boundary.strip('"').encode()
    part = b"--" + bare + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
    near_miss = b"\xff" * 65530 + b"\r\n--" + bare[:3]  # the start of a delimiter, never completed
    flood = itertools.chain([part], itertools.repeat(near_miss, 50 * 16))
    with live_app(create_app(tiny_bundle, config)) as url:
        status, body, sent = answer_while_sending(url, chunked_request("/v1/predict", boundary), flood)
        photos = [("files", (f"{i}.jpg", jpeg(i) + bytes(400_000), "image/jpeg")) for i in range(4)]
        photos.append(("files", ("big.jpg", jpeg(5) + bytes(700_000), "image/jpeg")))
        ok = httpx.post(f"{url}/v1/predict", files=photos, timeout=30)
    assert status == 413 and b"a part of the request over the limit of 1064000 bytes" in body, body
    assert sent < 6_000_000 < config.max_request_bytes, f"{sent:,} bytes sent before the answer"
    assert ok.status_code == 200, ok.text
    # a photo over a photo's limit but under the part's gets its own 413; the others are labelled
    assert [r["error"]["status"] if r["error"] else 200 for r in ok.json()["results"]] == [200, 200, 200, 200, 413]


def test_too_many_parts_are_refused_while_parsing(tiny_bundle):
    """The fifth part of four allowed is refused as it is parsed: the answer comes though the body never ends."""
    part = (b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg(1) + b"\r\n")
    endless = itertools.chain(itertools.repeat(part, 5), (time.sleep(0.05) or part for _ in range(400)))
    with live_app(create_app(tiny_bundle, ServeConfig(max_files=4, request_timeout_s=60))) as url:
        status, body, sent = answer_while_sending(url, chunked_request("/v1/predict"), endless)
    assert status == 413 and b"the limit is 4" in body, body
    assert sent < 20 * len(part)


def test_a_full_server_answers_503_with_retry_after(tiny_bundle):
    """One photo in hand at most: the photo sent while the first waits for company gets 503 and Retry-After."""
    with TestClient(create_app(tiny_bundle, ServeConfig(max_pending=1, batch_wait_ms=1500))) as c, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, c, ("first.jpg", jpeg(1), "image/jpeg"))
        time.sleep(0.5)
        second = post(c, ("second.jpg", jpeg(2), "image/jpeg"))
        assert first.result(timeout=30).status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "busy" in second.json()["error"]["message"]


def test_file_names_are_never_paths(client):
    r = post(client, ("../../../../etc/passwd", jpeg(4), "image/jpeg"))
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "../../../../etc/passwd"


def raw_get(app, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client in between to tidy away `..`), straight through the ASGI app."""
    sent: list[dict] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected until the answer is sent

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_static_files_never_leave_their_folder(tiny_bundle):
    app = create_app(tiny_bundle)
    assert raw_get(app, "/static/app.js")[0] == 200  # the raw request reaches the static files
    assert (STATIC / ".." / "predict.py").is_file()  # what the climbs below would name
    for path in ("/static/../predict.py", "/static/../../catdogcnn/predict.py", "/static/%2e%2e/predict.py",
                 "/static/..%2fpredict.py"):
        status, body = raw_get(app, path)
        assert status == 404 and b"Classifier" not in body, path


def test_health_and_model(client):
    assert client.get("/v1/health").json() == {"status": "ok", "model_loaded": True,
                                               "model_id": client.get("/v1/model").json()["model_id"]}
    model = client.get("/v1/model").json()
    assert model["classes"] == ["cats", "dogs"] and model["threshold"] == 0.5
    # What a client needs, not the bundle's training details or file paths.
    assert set(model) == {"model_id", "classes", "image_size", "threshold", "tta", "metrics", "neither"}
    assert model["image_size"] == 64 and model["neither"] is None


def test_neither_answers_and_rules(neither_bundle):
    bundle = neither_bundle("served", {"rules": [{"kind": "blank", "max_std": 4.0},
                                                 {"kind": "learned", "output": "neither_probability", "max": 0.7},
                                                 {"kind": "imagenet", "output": "imagenet_probabilities",
                                                  "pet_indices": [1], "min_pet_probability": 0.2,
                                                  "imagenet_names": ["lakeside", "tabby"]}],
                                       "fitted_on": "validation photos"})
    photos = {}
    for name, colour in (("bright", (230, 230, 230)), ("dim", (40, 120, 10)), ("flat", (40, 120, 10))):
        image = np.full((32, 32, 3), colour, np.uint8)
        if name != "flat":  # a pattern of 16 levels: not blank
            image[::2, ::2] += 16
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        photos[name] = buffer.getvalue()
    with TestClient(create_app(bundle)) as c:
        model = c.get("/v1/model").json()
        results = post(c, *((f"{name}.png", data, "image/png") for name, data in photos.items())).json()["results"]
    assert model["neither"] == {"rules": [{"kind": "blank", "cut": 4.0}, {"kind": "learned", "cut": 0.7},
                                          {"kind": "imagenet", "cut": 0.2}]}
    assert "lakeside" not in str(model) and "fitted_on" not in str(model)
    assert [r["label"] for r in results] == ["neither", "dogs", "neither"]
    assert "'neither' score 0.918 is above its cut 0.7; ImageNet sees 'lakeside'" in results[0]["reason"]
    assert results[2]["reason"] == "none of cats, dogs: the photo is blank (one flat colour)"


@pytest.mark.parametrize("name", shipped_bundle_names())
def test_every_shipped_model_describes_itself_as_its_bundle_says(name):
    """/v1/model, field by field against the bundle.json it serves."""
    import json

    from catdogcnn.bundle import bundled_models_dir
    from catdogcnn.predict import RULE_CUTS

    bundle = json.loads((bundled_models_dir() / name / "bundle.json").read_text())
    with TestClient(create_app(name)) as c:
        model = c.get("/v1/model")
    assert model.status_code == 200
    rules = bundle.get("neither", {}).get("rules", [])
    assert model.json() == {
        "model_id": bundle["model_id"], "classes": bundle["classes"], "image_size": bundle["input"]["image_size"],
        "threshold": bundle["threshold"], "tta": bundle["tta"], "metrics": bundle["metrics"],
        "neither": {"rules": [{"kind": rule["kind"], "cut": rule[RULE_CUTS[rule["kind"]]]} for rule in rules]}
        if rules else None}


def test_page_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "Cat or dog?" in page.text and "static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/predict"]["post"]["responses"]
    assert set(responses) == {"200", "401", "408", "413", "415", "422", "500", "503"}
    assert {"401", "500", "503"} <= set(schema["paths"]["/v1/model"]["get"]["responses"])
    assert {"500", "503"} <= set(schema["paths"]["/v1/health"]["get"]["responses"])
    assert client.get("/docs").status_code == 200
    assert client.get("/nowhere").json()["error"]["status"] == 404


def test_concurrent_requests_are_batched(tiny_bundle, monkeypatch):
    calls = []
    original = Classifier.predict_decoded

    def counting(self, images, *args):
        calls.append(len(images))
        return original(self, images, *args)

    monkeypatch.setattr(Classifier, "predict_decoded", counting)
    with TestClient(create_app(tiny_bundle, ServeConfig(batch_wait_ms=200))) as c, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post(c, (f"{i}.jpg", jpeg(i), "image/jpeg")), range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert sum(calls) == 8 and max(calls) > 1, calls  # at least some photos shared a model call


def serve_command(monkeypatch, *args: str, env: dict | None = None) -> tuple[object, list[dict], dict]:
    """`catdogcnn serve ARGS` with uvicorn stubbed: (CLI result, uvicorn.run's arguments, the workers' settings)."""
    import json

    import uvicorn
    from typer.testing import CliRunner

    from catdogcnn.cli import app
    from catdogcnn.runner import SERVE_ENV

    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: bound.append(kwargs))
    monkeypatch.delenv("CATDOGCNN_API_KEY", raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["serve", *args])
    settings = json.loads(os.environ.pop(SERVE_ENV, "{}"))
    return result, bound, settings.get("config", {})


@pytest.mark.parametrize(("options", "host"), [((), "127.0.0.1"), (("--host", "0.0.0.0"), "0.0.0.0")])
def test_serve_command_binds_loopback_unless_told(tiny_bundle, monkeypatch, options, host):
    result, bound, _ = serve_command(monkeypatch, "--model", str(tiny_bundle), "--port", "8123", *options)
    assert result.exit_code == 0, result.output
    assert [(b["host"], b["port"]) for b in bound] == [(host, 8123)]


def test_the_key_comes_from_a_file_or_the_environment_never_the_command_line(tiny_bundle, monkeypatch, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    model = ("--model", str(tiny_bundle))
    assert serve_command(monkeypatch, *model, "--api-key-file", str(key_file))[2]["api_key"] == "from-file"
    assert serve_command(monkeypatch, *model, env={"CATDOGCNN_API_KEY": "from-env"})[2]["api_key"] == "from-env"
    assert serve_command(monkeypatch, *model)[2]["api_key"] is None
    refused, bound, _ = serve_command(monkeypatch, *model, "--api-key", "visible-in-ps")
    assert refused.exit_code == 2 and not bound
    key_file.write_text("  \n")
    empty, bound, _ = serve_command(monkeypatch, *model, "--api-key-file", str(key_file))
    assert empty.exit_code == 2 and "empty" in empty.output and not bound


def test_the_cores_are_divided_among_the_workers(tiny_bundle, monkeypatch):
    from catdogcnn.runner import threads_per_worker

    assert [threads_per_worker(w, cores=16) for w in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert serve_command(monkeypatch, "--model", str(tiny_bundle), "--workers", "4")[2]["threads"] == 2
    assert serve_command(monkeypatch, "--model", str(tiny_bundle), "--workers", "4", "--threads", "3"
                         )[2]["threads"] == 3


def asyncio_before_3_11(wait_for_error: type[BaseException] | None = None) -> types.SimpleNamespace:
    """The asyncio module as Python 3.10 had it: `asyncio.TimeoutError` a class of its own, not the builtin
    TimeoutError, and the one `wait_for` raises on timeout (or `wait_for_error`, to stand for a bug)."""
    class AsyncioTimeoutError(Exception):
        pass

    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise (wait_for_error or AsyncioTimeoutError)() from None

    return types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio) if not name.startswith("_")}
                                 | {"TimeoutError": AsyncioTimeoutError, "wait_for": wait_for})


def post_within(client, seconds: float, *files):
    """`post`, failing the test instead of hanging when no answer comes."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(post, client, *files).result(timeout=seconds)


def test_the_batcher_survives_the_timeout_of_python_before_3_11(tiny_bundle, monkeypatch):
    """Where asyncio.wait_for's timeout is not the builtin TimeoutError, the batcher once died on its first batch
    and every request after hung."""
    monkeypatch.setattr(serve, "asyncio", asyncio_before_3_11())
    with TestClient(create_app(tiny_bundle, ServeConfig(batch_wait_ms=20))) as c:
        for i in range(3):
            r = post_within(c, 30, (f"{i}.jpg", jpeg(i), "image/jpeg"))
            assert r.status_code == 200 and r.json()["results"][0]["label"] in ("cats", "dogs")


def test_requests_get_503_not_silence_when_the_batcher_dies(tiny_bundle, monkeypatch):
    monkeypatch.setattr(serve, "asyncio", asyncio_before_3_11(wait_for_error=RuntimeError))
    with TestClient(create_app(tiny_bundle, ServeConfig(batch_wait_ms=20))) as c:
        for i in range(2):  # the request in the batch when it died, and one after
            r = post_within(c, 30, (f"{i}.jpg", jpeg(i), "image/jpeg"))
            assert r.status_code == 503 and "model worker has stopped" in r.json()["error"]["message"]
        health = c.get("/v1/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


def test_an_unexpected_fault_is_a_json_500_like_every_other_error(tiny_bundle, monkeypatch):
    def broken(**fields):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(serve, "ModelResponse", broken)
    with TestClient(create_app(tiny_bundle), raise_server_exceptions=False) as c:
        r = c.get("/v1/model")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"status": 500, "message": "internal server error (ZeroDivisionError); it has "
                                                            "been logged"}}


def test_explain_returns_a_heat_map(real_data):
    from catdogcnn.bundle import bundled_models_dir

    photo = (real_data / "test_set" / "cats" / "cat.4001.jpg").read_bytes()
    with TestClient(create_app(bundled_models_dir() / "default")) as c:
        r = c.post("/v1/predict?explain=true", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
        plain = c.post("/v1/predict", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
    assert r.json()["results"][0]["heatmap"].startswith("data:image/png;base64,")
    assert plain.json()["results"][0]["heatmap"] is None


