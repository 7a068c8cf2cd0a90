"""Dynamic batching on a real server: batched images equal unbatched ones seed for seed, the bounded queue answers
429 with Retry-After, timeouts answer 504, a client that hangs up is cancelled, and the openai client works."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from live_server import LiveServer
from PIL import Image

from t2i.serve import ServeConfig, create_app


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=60, **kw)


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.int16)


def concurrently(fn, args: list) -> list:
    out = [None] * len(args)

    def run(k):
        out[k] = fn(*args[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


REQUESTS = [
    {"prompt": "a red circle", "seed": 3, "n": 2},
    {"prompt": "two blue squares", "seed": 40},
    {"prompt": "the word CAT", "seed": 7, "n": 3},
]


def test_batched_images_equal_unbatched_ones(sd3_folder, tmp_path):
    # a long window gathers the three concurrent requests into one sampling call
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=1500, max_batch=8)
    with LiveServer(create_app(cfg)) as srv:
        batched = concurrently(post, [(srv.url, r) for r in REQUESTS])
        snap = httpx.get(f"{srv.url}/metrics").json()
    assert snap["batches"]["images_histogram"] == {"6": 1}  # all 6 images in one call
    assert snap["batches"]["requests_histogram"] == {"3": 1}
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batching=False)
    with LiveServer(create_app(cfg)) as srv:
        alone = [post(srv.url, r) for r in REQUESTS]
    for a, b in zip(batched, alone, strict=True):
        assert a.status_code == b.status_code == 200
        for x, y in zip(a.json()["data"], b.json()["data"], strict=True):
            assert x["seed"] == y["seed"]
            diff = np.abs(pixels(x) - pixels(y))
            # the same image: float rounding of a batch-of-6 matmul may move a pixel by one level, no more
            assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_requests_with_different_settings_are_not_batched_together(sd3_folder, tmp_path):
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=800)
    with LiveServer(create_app(cfg)) as srv:
        rs = concurrently(post, [(srv.url, {"prompt": "x", "seed": 1, "steps": 2}),
                                 (srv.url, {"prompt": "x", "seed": 1, "steps": 3}),
                                 (srv.url, {"prompt": "y", "seed": 2, "steps": 2})])  # fmt: skip
        snap = httpx.get(f"{srv.url}/metrics").json()
    assert all(r.status_code == 200 for r in rs)
    assert snap["batches"]["requests_histogram"] == {"1": 1, "2": 1}  # steps 2 batched, steps 3 alone


def test_flooded_queue_answers_429_with_retry_after_and_recovers(sd3_folder, tmp_path):
    # one image fills the queue while the first request waits out its batching window
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=1500, max_queue=1)
    with LiveServer(create_app(cfg)) as srv:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=post(srv.url, {"prompt": "x", "seed": 0, "steps": 1})))
        t.start()
        deadline = time.time() + 10
        while httpx.get(f"{srv.url}/metrics").json()["queue"]["images"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        r = post(srv.url, {"prompt": "y", "seed": 1, "steps": 1})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        t.join()
        assert first["r"].status_code == 200
        assert post(srv.url, {"prompt": "y", "seed": 1, "steps": 1}).status_code == 200
        snap = httpx.get(f"{srv.url}/metrics").json()
        assert snap["rejected_queue_full"] == 1 and snap["requests"]["429"] == 1


def test_timeout_answers_504_and_drops_the_job(sd3_folder, tmp_path):
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=3000, request_timeout_s=0.3)
    with LiveServer(create_app(cfg)) as srv:
        r = post(srv.url, {"prompt": "x", "seed": 0, "steps": 1})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        snap = httpx.get(f"{srv.url}/metrics").json()
        assert snap["timeouts"] == 1 and snap["queue"]["images"] == 0 and snap["batches"]["calls"] == 0


def test_client_disconnect_cancels_the_queued_job(sd3_folder, tmp_path):
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, batch_window_ms=1500)
    with LiveServer(create_app(cfg)) as srv:
        body = json.dumps({"prompt": "x", "seed": 0, "steps": 1}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            deadline = time.time() + 10
            while httpx.get(f"{srv.url}/metrics").json()["queue"]["images"] == 0 and time.time() < deadline:
                time.sleep(0.02)
        # the socket is closed: the server notices within its poll interval and drops the job
        deadline = time.time() + 10
        while httpx.get(f"{srv.url}/metrics").json()["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        snap = httpx.get(f"{srv.url}/metrics").json()
        assert snap["cancelled"] == 1 and snap["queue"]["images"] == 0
        time.sleep(1.6)  # past the window: nothing was sampled for the departed client
        assert httpx.get(f"{srv.url}/metrics").json()["batches"]["calls"] == 0
        assert post(srv.url, {"prompt": "x", "seed": 0, "steps": 1}).status_code == 200


def test_openai_client(sd3_folder, tmp_path):
    openai = pytest.importorskip("openai")
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path, api_keys=["k1"], batch_window_ms=0)
    with LiveServer(create_app(cfg)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k1", max_retries=0)
        res = client.images.generate(model=sd3_folder, prompt="a red circle", n=2, size="32x32",
                                     response_format="b64_json", extra_body={"seed": 9, "steps": 2})  # fmt: skip
        assert len(res.data) == 2 and res.created > 0
        im = Image.open(io.BytesIO(base64.b64decode(res.data[1].b64_json)))
        assert im.size == (32, 32) and "Seed: 10" in im.text["parameters"]
        url = client.images.generate(model=sd3_folder, prompt="x", response_format="url", extra_body={"steps": 1})
        assert url.data[0].url.startswith(f"{srv.url}/files/")
        assert [m.id for m in client.models.list()] == [sd3_folder]
        with pytest.raises(openai.BadRequestError, match="square"):
            client.images.generate(model=sd3_folder, prompt="x", size="32x64")
        with pytest.raises(openai.NotFoundError):
            client.images.generate(model="dall-e-3", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        # image edits through the client's own multipart encoding
        scene, mask = io.BytesIO(), io.BytesIO()
        Image.new("RGB", (32, 32), "white").save(scene, format="PNG")
        Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(mask, format="PNG")  # all transparent: repaint everything
        edit = client.images.edit(model=sd3_folder, image=("scene.png", scene.getvalue()), prompt="a red circle",
                                  mask=("mask.png", mask.getvalue()), n=1, response_format="b64_json",
                                  extra_body={"seed": 3, "steps": 2, "strength": 1.0})  # fmt: skip
        im = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
        assert im.size == (32, 32) and "Strength: 1.0" in im.text["parameters"]
