"""The HTTP API through FastAPI's test client: every route and every error."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import png_with_size, synthetic_photo
from fastapi.testclient import TestClient

from catdogcnn.predict import Classifier
from catdogcnn.serve import ServeConfig, create_app


def jpeg(seed: int = 0, size: int = 96) -> bytes:
    buf = io.BytesIO()
    synthetic_photo(seed % 2, np.random.default_rng(seed), size).save(buf, "JPEG")
    return buf.getvalue()


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


def test_a_bad_photo_does_not_spoil_the_others(client):
    r = post(client, ("a.jpg", jpeg(1), "image/jpeg"), ("notes.txt", b"hello", "text/plain"),
             ("b.jpg", jpeg(2), "image/jpeg"))
    assert r.status_code == 200
    a, notes, b = r.json()["results"]
    assert a["label"] and b["label"] and notes["error"]["status"] == 415 and "notes.txt" in notes["error"]["message"]


@pytest.mark.parametrize(("content", "status", "words"), [
    (b"just some text", 415, "not an image"),
    (b"", 422, "empty"),
    (jpeg(3)[:300], 422, "truncated"),
    (png_with_size(40_000, 40_000), 422, "decompression bomb"),
    (b"\xff\xd8" + bytes(600_000), 413, "upload limit"),
])
def test_errors_have_their_status_and_a_message(client, content, status, words):
    r = post(client, ("x.jpg", content, "image/jpeg"))
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_too_many_files(client):
    r = post(client, *[(f"{i}.jpg", jpeg(i), "image/jpeg") for i in range(5)])
    assert r.status_code == 413 and "limit is 4" in r.json()["error"]["message"]


def test_request_without_files_is_a_json_error(client):
    r = client.post("/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "files" in r.json()["error"]["message"]


def test_oversized_request_is_refused_before_reading(client):
    r = client.post("/v1/predict", content=b"x" * 10, headers={"content-length": str(10**9),
                                                               "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_file_names_are_never_paths(client, tmp_path):
    r = post(client, ("../../../../etc/passwd", jpeg(4), "image/jpeg"))
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "../../../../etc/passwd"
    assert client.get("/static/../../predict.py").status_code == 404


def test_health_and_model(client):
    assert client.get("/v1/health").json() == {"status": "ok", "model_loaded": True,
                                               "model_id": client.get("/v1/model").json()["model_id"]}
    model = client.get("/v1/model").json()
    assert model["classes"] == ["cats", "dogs"] and model["threshold"] == 0.5


def test_page_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "Cat or dog?" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422"} <= set(responses)
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


def test_serve_command_binds_loopback_by_default():
    from typer.testing import CliRunner

    from catdogcnn.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "127.0.0.1" in help_text


def test_explain_returns_a_heat_map(real_data):
    from catdogcnn.predict import bundled_models_dir

    photo = (real_data / "test_set" / "cats" / "cat.4001.jpg").read_bytes()
    with TestClient(create_app(bundled_models_dir() / "default")) as c:
        r = c.post("/v1/predict?explain=true", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
        plain = c.post("/v1/predict", files=[("files", ("cat.jpg", photo, "image/jpeg"))])
    assert r.json()["results"][0]["heatmap"].startswith("data:image/png;base64,")
    assert plain.json()["results"][0]["heatmap"] is None
