"""The HTTP API through FastAPI's test client: every route and every error."""

from __future__ import annotations

import asyncio
import io
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from catdogcnn import serve
from catdogcnn.bundle import shipped_bundle_names
from catdogcnn.predict import Classifier
from catdogcnn.serve import STATIC, ServeConfig, create_app


@pytest.fixture(scope="session")
def jpeg(jpeg_bytes):
    return jpeg_bytes


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with TestClient(create_app(tiny_bundle, ServeConfig(max_upload_mb=0.5, max_files=4))) as c:
        yield c


def post(client, *files):
    return client.post("/v1/predict", files=[("files", f) for f in files])


def test_predict_one_photo(client, jpeg):
    r = post(client, ("cat.jpg", jpeg(), "image/jpeg"))
    assert r.status_code == 200
    body = r.json()
    (result,) = body["results"]
    assert result["filename"] == "cat.jpg" and result["label"] in ("cats", "dogs")
    assert set(result["probabilities"]) == {"cats", "dogs"} and result["time_ms"] > 0
    assert body["model_id"].startswith("seed_cnn-")


def test_a_bad_photo_does_not_spoil_the_others(client, jpeg):
    r = post(client, ("a.jpg", jpeg(1), "image/jpeg"), ("notes.txt", b"hello", "text/plain"),
             ("b.jpg", jpeg(2), "image/jpeg"))
    assert r.status_code == 200
    a, notes, b = r.json()["results"]
    assert a["label"] and b["label"] and notes["error"]["status"] == 415 and "notes.txt" in notes["error"]["message"]


@pytest.mark.parametrize(("kind", "status", "words"), [
    ("text", 415, "not an image"),
    ("empty", 422, "empty"),
    ("truncated", 422, "truncated"),
    ("bomb", 422, "decompression bomb"),
    ("too large", 413, "upload limit"),
])
def test_errors_have_their_status_and_a_message(client, jpeg, png_with_size, kind, status, words):
    content = {"text": lambda: b"just some text", "empty": lambda: b"", "truncated": lambda: jpeg(3)[:300],
               "bomb": lambda: png_with_size(40_000, 40_000), "too large": lambda: b"\xff\xd8" + bytes(600_000)}[kind]()
    r = post(client, ("x.jpg", content, "image/jpeg"))
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_too_many_files(client, jpeg):
    r = post(client, *[(f"{i}.jpg", jpeg(i), "image/jpeg") for i in range(5)])
    assert r.status_code == 413 and "limit is 4" in r.json()["error"]["message"]


def test_request_without_files_is_a_json_error(client):
    r = client.post("/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "files" in r.json()["error"]["message"]


def test_oversized_request_is_refused_before_reading(client):
    r = client.post("/v1/predict", content=b"x" * 10, headers={"content-length": str(10**9),
                                                               "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_file_names_are_never_paths(client, jpeg):
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
def test_every_shipped_model_describes_itself(name):
    with TestClient(create_app(name)) as c:
        model = c.get("/v1/model")
    assert model.status_code == 200 and model.json()["model_id"]


def test_page_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "Cat or dog?" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422"} <= set(responses)
    assert client.get("/docs").status_code == 200
    assert client.get("/nowhere").json()["error"]["status"] == 404


def test_concurrent_requests_are_batched(tiny_bundle, monkeypatch, jpeg):
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


@pytest.mark.parametrize(("options", "host"), [((), "127.0.0.1"), (("--host", "0.0.0.0"), "0.0.0.0")])
def test_serve_command_binds_loopback_unless_told(tiny_bundle, monkeypatch, options, host):
    import uvicorn
    from typer.testing import CliRunner

    from catdogcnn.cli import app

    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: bound.append(kwargs))
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_bundle), "--port", "8123", *options])
    assert result.exit_code == 0, result.output
    assert [(b["host"], b["port"]) for b in bound] == [(host, 8123)]


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


def test_the_batcher_survives_the_timeout_of_python_before_3_11(tiny_bundle, jpeg, monkeypatch):
    """Where asyncio.wait_for's timeout is not the builtin TimeoutError, the batcher once died on its first batch
    and every request after hung."""
    monkeypatch.setattr(serve, "asyncio", asyncio_before_3_11())
    with TestClient(create_app(tiny_bundle, ServeConfig(batch_wait_ms=20))) as c:
        for i in range(3):
            r = post_within(c, 30, (f"{i}.jpg", jpeg(i), "image/jpeg"))
            assert r.status_code == 200 and r.json()["results"][0]["label"] in ("cats", "dogs")


def test_requests_get_503_not_silence_when_the_batcher_dies(tiny_bundle, jpeg, monkeypatch):
    monkeypatch.setattr(serve, "asyncio", asyncio_before_3_11(wait_for_error=RuntimeError))
    with TestClient(create_app(tiny_bundle, ServeConfig(batch_wait_ms=20))) as c:
        for i in range(2):  # the request in the batch when it died, and one after
            r = post_within(c, 30, (f"{i}.jpg", jpeg(i), "image/jpeg"))
            assert r.status_code == 503 and "model worker has stopped" in r.json()["error"]["message"]


def test_explain_returns_a_heat_map(real_data):
    from catdogcnn.bundle import bundled_models_dir

    photo = (real_data / "test_set" / "cats" / "cat.4001.jpg").read_bytes()
    with TestClient(create_app(bundled_models_dir() / "default")) as c:
        r = c.post("/v1/predict?explain=true", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
        plain = c.post("/v1/predict", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
    assert r.json()["results"][0]["heatmap"].startswith("data:image/png;base64,")
    assert plain.json()["results"][0]["heatmap"] is None
