"""The HTTP API on a tiny random SD3 folder: the OpenAI contract, auth, limits, files, progress and every bad input
getting a clear 4xx while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from model_folders import tiny_sd3_folder, tiny_unclip_folder
from PIL import Image

from t2i.io.png import parse_parameters
from t2i.serve import ServeConfig, create_app


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


@pytest.fixture(scope="module")
def client(sd3_folder, tmp_path_factory):
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path_factory.mktemp("serve_out"), batch_window_ms=0)
    with TestClient(create_app(cfg)) as c:
        yield c


def test_generation_contract(client, sd3_folder):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 11, "steps": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [11, 12]  # image k gets seed + k, as in `t2i generate`
    im = decode(body["data"][0])
    assert im.format == "PNG" and im.size == (32, 32)  # the model's trained size for size "auto"
    prompt, _, settings = parse_parameters(im.text["parameters"])
    assert prompt == "a red circle" and settings["Seed"] == "11" and settings["Steps"] == "2"
    assert body["t2i"] == {"model": sd3_folder, "steps": 2, "guidance": 3.0, "sampler": "euler", "size": "32x32",
                           "negative_prompt": "", "seeds": [11, 12], "shift": 1.0}  # fmt: skip


def test_same_seed_same_image_and_settings_change_it(client):
    req = {"prompt": "a blue square", "seed": 5, "steps": 2}
    a = np.asarray(decode(client.post("/v1/images/generations", json=req).json()["data"][0]))
    b = np.asarray(decode(client.post("/v1/images/generations", json=req).json()["data"][0]))
    c = np.asarray(decode(client.post("/v1/images/generations", json={**req, "guidance": 1.0}).json()["data"][0]))
    d = decode(client.post("/v1/images/generations", json={**req, "size": "48x48"}).json()["data"][0])
    assert np.array_equal(a, b) and not np.array_equal(a, c) and d.size == (48, 48)


def test_url_response_serves_the_file_from_the_output_folder_only(client, tmp_path):
    r = client.post("/v1/images/generations", json={"prompt": "x", "seed": 1, "steps": 1, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://testserver:80/files/") and url.endswith("-1.png")  # the socket's address
    got = client.get(url.removeprefix("http://testserver:80"))
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (32, 32)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    for path in ("/files/../secret.png", "/files/..%2Fsecret.png", f"/files/{secret}", "/files/%2e%2e%2fsecret.png",
                 "/files/.hidden.png", "/files/missing.png", "/files/x.txt"):  # fmt: skip
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path


def test_models_health_and_metrics(client, sd3_folder):
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (m,) = models["data"]
    assert m["id"] == sd3_folder and m["object"] == "model" and m["loaded"]
    assert m["defaults"]["steps"] == 3 and m["defaults"]["size"] == "32x32" and m["presets"] == ["fast"]
    assert "euler" in m["samplers"] and "consistency" in m["samplers"]
    client.post("/v1/images/generations", json={"prompt": "x", "seed": 1, "steps": 1, "n": 3})
    snap = client.get("/metrics").json()
    assert snap["images_served"] >= 3 and snap["requests"]["200"] >= 1
    assert snap["batches"]["images_histogram"].get("3", 0) >= 1
    assert snap["latency_s"]["p50"] > 0 and snap["queue"]["images"] == 0
    prom = client.get("/metrics", params={"format": "prometheus"}).text
    assert "t2i_images_served_total" in prom and 't2i_request_latency_seconds{quantile="0.99"}' in prom


BAD_REQUESTS = [
    (b"{", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"n": 1}', 422, "prompt: Field required"),
    (b'{"prompt": ""}', 422, "prompt: String should have at least 1 character"),
    (b'{"prompt": "   "}', 422, "prompt"),
    (b'{"prompt": "x", "n": -1}', 422, "n: Input should be greater than or equal to 1"),
    (b'{"prompt": "x", "n": 0}', 422, "n:"),
    (b'{"prompt": "x", "n": "two"}', 422, "n: Input should be a valid integer"),
    (b'{"prompt": 7}', 422, "prompt: Input should be a valid string"),
    (b'{"prompt": "x", "n": 9}', 400, "at most 8 images"),
    (b'{"prompt": "x"}', 415, "must be sent as application/json, got 'text/plain'"),
    (b'{"prompt": "x", "steps": 1000}', 400, "steps is 1000; the limit is 100"),
    (b'{"prompt": "x", "size": "big"}', 422, "size"),
    (b'{"prompt": "x", "size": "32x48"}', 400, "square"),
    (b'{"prompt": "x", "size": "1024x1024"}', 400, "square images of"),
    (b'{"prompt": "x", "response_format": "png"}', 422, "response_format"),
    (b'{"prompt": "x", "stpes": 3}', 422, "stpes: unknown field"),
    (b'{"prompt": "x", "sampler": "eulr"}', 400, "unknown sampler 'eulr'"),
    (b'{"prompt": "x", "seed": -3}', 422, "seed"),
    (b'{"prompt": "x", "model": "/etc/passwd"}', 404, "not served here"),
    (b'{"prompt": "x", "request_id": "../x"}', 422, "request_id"),
    # strict types: no coercion of booleans, strings or floats into integers (issue: all four were accepted)
    (b'{"prompt": "x", "n": true}', 422, "n: Input should be a valid integer"),
    (b'{"prompt": "x", "n": "2"}', 422, "n: Input should be a valid integer"),
    (b'{"prompt": "x", "steps": 1.0}', 422, "steps: Input should be a valid integer"),
    (b'{"prompt": "x", "seed": 1e3}', 422, "seed: Input should be a valid integer"),
    (b'{"prompt": "x", "guidance": "4"}', 422, "guidance: Input should be a valid number"),
    (b'{"prompt": "x", "guidance": NaN}', 400, "NaN is not a JSON number"),
    (b'{"prompt": "x", "guidance": 1e999}', 422, "guidance"),
    # malformed bodies that used to be 500s
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nests too deeply"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (json.dumps({"prompt": "x" * 1001}).encode(), 400, "the limit is 1000"),
    (json.dumps({"prompt": "x" * 20000}).encode(), 413, "limit"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(client, body, status, message):
    media = "text/plain" if status == 415 else "application/json"  # text/plain: a cross-origin "simple" POST
    r = client.post("/v1/images/generations", content=body, headers={"content-type": media})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    ok = client.post("/v1/images/generations", json={"prompt": "still here", "seed": 0, "steps": 1})
    assert ok.status_code == 200


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert client.get("/v1/images/generations").status_code == 405
    bad = client.get("/metrics", params={"format": "xml"})
    assert bad.status_code == 422 and "format" in bad.json()["error"]["message"]


def test_api_key_on_every_route_but_health(sd3_folder, tmp_path):
    cfg = ServeConfig(models=[sd3_folder], api_keys=["s3cret"], output_dir=tmp_path)
    with TestClient(create_app(cfg)) as c:
        assert c.get("/healthz").status_code == 200
        req = {"prompt": "x", "seed": 1, "steps": 1, "response_format": "url"}
        routes = [("get", "/v1/models", {}), ("get", "/metrics", {}), ("get", "/v1/progress/a", {}),
                  ("post", "/v1/images/generations", {"json": req}), ("get", "/files/a.png", {})]  # fmt: skip
        for method, path, kw in routes:
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert r.json()["error"]["code"] == "invalid_api_key"
            bad = getattr(c, method)(path, headers={"Authorization": "Bearer nope"}, **kw)
            assert bad.status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        r = c.post("/v1/images/generations", json=req, headers=good)
        assert r.status_code == 200
        url = r.json()["data"][0]["url"].removeprefix("http://testserver:80")
        assert c.get(url).status_code == 401 and c.get(url, headers=good).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200


def test_request_models_come_only_from_the_allow_list(sd3_folder, tmp_path):
    other = str(tiny_sd3_folder(tmp_path / "other", seed=1))
    unlisted = str(tiny_sd3_folder(tmp_path / "unlisted", seed=2))
    cfg = ServeConfig(models=[sd3_folder], allow_models=[other], output_dir=tmp_path / "out")
    with TestClient(create_app(cfg)) as c:
        registry = c.app.state.registry
        assert set(registry.loaded) == {sd3_folder}  # allow-listed models load on first use
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == [sd3_folder, other]
        r = c.post("/v1/images/generations", json={"prompt": "x", "model": unlisted, "steps": 1})
        assert r.status_code == 404 and unlisted not in registry.loaded
        r = c.post("/v1/images/generations", json={"prompt": "x", "model": other, "steps": 1, "seed": 0})
        assert r.status_code == 200 and other in registry.loaded


def test_unclip_model_and_its_negative_prompt_error(tmp_path):
    folder = str(tiny_unclip_folder(tmp_path / "unclip"))
    with TestClient(create_app(ServeConfig(models=[folder], output_dir=tmp_path / "out"))) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 3, "steps": 2,
                                                   "request_id": "u1"})  # fmt: skip
        assert r.status_code == 200 and decode(r.json()["data"][1]).size == (32, 32)
        p = c.get("/v1/progress/u1").json()  # prior steps + both stages' steps were all reported
        assert p["state"] == "done" and p["step"] == p["total"] > 4
        r = c.post("/v1/images/generations", json={"prompt": "x", "negative_prompt": "blue"})
        assert r.status_code == 400 and "negative_prompt" in r.json()["error"]["message"]


def test_progress_of_a_request_id(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "seed": 0, "request_id": "job-1"})
    assert r.status_code == 200
    assert client.get("/v1/progress/job-1").json() == {"state": "done", "step": 2, "total": 2}
    r = client.get("/v1/progress/never-sent")
    assert r.status_code == 404 and r.json()["error"]["param"] == "request_id"


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in r.text and "/v1/images/generations" in r.text


def test_openapi_documents_the_request_shape(client):
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "n", "size", "response_format", "seed", "steps", "guidance"} <= set(schema["properties"])


def test_an_unexpected_error_is_a_counted_500_that_leaks_nothing_and_keeps_the_connection(sd3_folder, tmp_path):
    import http.client

    from live_server import LiveServer

    from t2i.pipelines.folders import load_generator

    real = load_generator(sd3_folder)

    class Broken:  # a model whose settings cannot be read: an error no handler expects
        def __getattr__(self, name):
            return getattr(real, name)

        def settings(self, *args, **kwargs):
            raise RuntimeError("/srv/secret/weights.safetensors vanished")

    app = create_app(ServeConfig(output_dir=tmp_path, batch_window_ms=0), generators={"ok": real, "broken": Broken()})
    with LiveServer(app) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        headers = {"content-type": "application/json"}
        conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "x", "model": "broken"}), headers)
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 500 and body["error"]["type"] == "server_error"
        assert "error id" in body["error"]["message"] and "secret" not in json.dumps(body)
        # the same keep-alive connection still works
        conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "x", "model": "ok", "steps": 1}), headers)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"]
        conn.request("GET", "/metrics")
        counts = json.loads(conn.getresponse().read())["requests"]
        assert counts.get("500") == 1 and counts.get("200") == 1


def test_a_request_larger_than_the_queue_is_a_400_not_an_endless_429(sd3_folder, tmp_path):
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=0, max_queue=2)
    with TestClient(create_app(cfg)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "n": 3, "steps": 1})
        assert r.status_code == 400 and "at most 2 images" in r.json()["error"]["message"]
        assert "retry-after" not in r.headers


def test_url_responses_ignore_the_host_header_and_old_files_are_swept(sd3_folder, tmp_path):
    import os
    import time

    out = tmp_path / "out"
    cfg = ServeConfig(
        models=[sd3_folder], output_dir=out, batch_window_ms=0, public_url="https://img.example.org/t2i/"
    )
    req = {"prompt": "x", "seed": 1, "steps": 1, "response_format": "url"}
    with TestClient(create_app(cfg)) as c:
        first = c.post("/v1/images/generations", json=req, headers={"host": "evil.example"}).json()["data"][0]["url"]
        assert first.startswith("https://img.example.org/t2i/files/") and "evil" not in first
        old = out / first.rsplit("/", 1)[1]
        stale = time.time() - 2 * cfg.url_ttl_s
        os.utime(old, (stale, stale))
        keep = out / "notes.txt"  # not a file the server wrote: never touched
        keep.write_text("mine")
        os.utime(keep, (stale, stale))
        second = c.post("/v1/images/generations", json={**req, "seed": 2}).json()["data"][0]["url"]
        assert not old.exists() and (out / second.rsplit("/", 1)[1]).exists() and keep.exists()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_image_edits_inpaint_and_img2img(client):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:16] = 0  # OpenAI's rule: transparent = repaint (the top half)
    rgba = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    white = Image.fromarray(255 - alpha)  # t2i's rule for masks without alpha: white = repaint, the same region
    form = {"prompt": "a red circle", "n": "2", "seed": "5", "steps": "2", "strength": "1.0", "request_id": "e1"}
    r = client.post(
        "/v1/images/edits", data=form, files={"image": ("i.png", _png(init)), "mask": ("m.png", _png(rgba))}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [5, 6] and body["t2i"]["strength"] == 1.0
    assert client.get("/v1/progress/e1").json()["state"] == "done"
    r2 = client.post("/v1/images/edits", data={**form, "request_id": "e2"},
                     files={"image": ("i.png", _png(init)), "mask": ("m.png", _png(white))})  # fmt: skip
    assert [d["b64_json"] for d in r2.json()["data"]] == [
        d["b64_json"] for d in body["data"]
    ]  # same mask, same images
    r3 = client.post("/v1/images/edits", data={"prompt": "a red circle", "seed": "5", "steps": "2", "strength": "0.5"},
                     files={"image": ("i.png", _png(init))})  # img2img: no mask  # fmt: skip
    assert r3.status_code == 200 and decode(r3.json()["data"][0]).size == (32, 32)


@pytest.mark.parametrize(
    ("form", "files", "status", "param"),
    [
        ({"prompt": "x"}, {}, 422, "image"),
        ({"prompt": "x"}, {"image": ("i.png", b"not an image")}, 400, "image"),
        ({"prompt": "x", "n": "two"}, "ok", 422, "n"),
        ({"prompt": "x", "strength": "0"}, "ok", 400, "strength"),
        ({"prompt": "x", "colour": "red"}, "ok", 422, "colour"),
        ({"prompt": "x"}, "small-mask", 400, "mask"),
    ],
)
def test_image_edit_errors_name_the_field(client, form, files, status, param):
    from PIL import Image

    ok = {"image": ("i.png", _png(Image.new("RGB", (32, 32), "white")))}
    if files == "ok":
        files = ok
    elif files == "small-mask":
        files = {**ok, "mask": ("m.png", _png(Image.new("L", (8, 8), 255)))}
    r = client.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_image_edits_need_a_form_and_a_model_that_edits(client, tmp_path):
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 415
    folder = str(tiny_unclip_folder(tmp_path / "unclip"))
    from PIL import Image

    with TestClient(create_app(ServeConfig(models=[folder], output_dir=tmp_path / "out"))) as c:
        r = c.post(
            "/v1/images/edits", data={"prompt": "x"}, files={"image": ("i.png", _png(Image.new("RGB", (32, 32))))}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        assert "does not edit images" in r.json()["error"]["message"]
