"""The ``controls`` field of a generation request: control images steer a model folder's ControlNet, batch only
with themselves, and every bad control is a 4xx naming the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from model_folders import tiny_sd3_folder
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from t2i.models.controlnet import ControlNet, controlnet_config_for
from t2i.models.files import load_model_file, save_model_file
from t2i.serve.app import ServeConfig, create_app


def _png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tiny_sd3_folder(tmp_path_factory.mktemp("serve_ctl"))
    base, _ = load_model_file(folder / "transformer.safetensors")
    torch.manual_seed(4)
    net = ControlNet(controlnet_config_for(base.cfg, depth=2, control_type="blur"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_model_file(folder / "controlnet.safetensors", "sd3_controlnet", net)
    cfg = ServeConfig(models=[str(folder)], output_dir=str(tmp_path_factory.mktemp("out")))
    with TestClient(create_app(cfg)) as c:
        yield c


def test_controls_steer_the_image(client):
    g = np.random.default_rng(0)
    control = _png_b64(g.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    body = {"prompt": "a red circle", "seed": 1, "steps": 2}
    plain = client.post("/v1/images/generations", json=body)
    steered = client.post("/v1/images/generations", json={**body, "controls": [{"image": control, "kind": "blur",
                                                                                  "scale": 2.0}]})  # fmt: skip
    off = client.post("/v1/images/generations", json={**body, "controls": [{"image": control, "kind": "blur",
                                                                             "start": 0.9, "end": 1.0}]})  # fmt: skip
    assert plain.status_code == steered.status_code == off.status_code == 200, steered.text
    images = [r.json()["data"][0]["b64_json"] for r in (plain, steered, off)]
    assert images[1] != images[0]
    assert images[2] == images[0]  # a window shorter than one of the two steps holds no step: no effect


@pytest.mark.parametrize(
    ("control", "status", "param"),
    [
        ({"image": "not base64!"}, 400, "controls.0.image"),
        ({"image": base64.b64encode(b"text, not a PNG").decode()}, 400, "controls.0.image"),
        ({"image": "AAAA", "kind": "sketch"}, 422, "controls.0.kind"),
        ({"image": "AAAA", "scale": 100}, 422, "controls.0.scale"),
        ({"image": "AAAA", "stregth": 1}, 422, "controls.0.stregth"),
        ({"image": _png_b64(np.zeros((8, 8, 3), np.uint8)), "start": 0.5, "end": 0.5}, 400, "controls.0"),
        ({"image": _png_b64(np.zeros((8, 8, 3), np.uint8)), "kind": "depth"}, 400, "controls"),  # no depth net
    ],
)
def test_bad_controls_name_the_field(client, control, status, param):
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "controls": [control]})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_large_bodies_only_with_control_images(client):
    big = _png_b64(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    assert len(big) > 16 * 1024
    body = {"prompt": "x", "steps": 1, "controls": [{"image": big, "kind": "blur"}]}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    r = client.post("/v1/images/generations", json={"prompt": "x" * 20000})
    assert r.status_code == 413 and "control images" in r.json()["error"]["message"]
