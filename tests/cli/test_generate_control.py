"""``t2i generate --control / --controlnet``: the spec parser, a controlled run on a tiny model folder whose
ControlNet sits in the folder, an extra ControlNet by flag, and the error for every bad spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_folders import tiny_sd3_folder
from PIL import Image

from t2i.cli.generate import parse_control_spec
from t2i.cli.main import CLIError, main
from t2i.models.controlnet import ControlNet, controlnet_config_for
from t2i.models.files import load_model_file, save_model_file


def _controlnet(folder, seed: int, kind: str = "canny") -> ControlNet:
    """A random (non-zero) ControlNet that fits the folder's transformer."""
    base, _ = load_model_file(folder / "transformer.safetensors")
    torch.manual_seed(seed)
    net = ControlNet(controlnet_config_for(base.cfg, depth=2, control_type=kind))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    folder = tiny_sd3_folder(tmp_path_factory.mktemp("sd3ctl"))
    save_model_file(folder / "controlnet.safetensors", "sd3_controlnet", _controlnet(folder, 1))
    extra = folder.parent / "depth_controlnet.safetensors"
    save_model_file(extra, "sd3_controlnet", _controlnet(folder, 2, "depth"))
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[8:24, 10:20] = 255  # white outlines of a box, drawn as a filled box's edge map would be
    arr[10:22, 12:18] = 0
    Image.fromarray(arr).save(folder.parent / "edges.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))).save(folder.parent / "depth.png")
    return folder


def test_parse_control_spec(tmp_path):
    png = tmp_path / "a:b.png"  # a colon in the file name: numbers are read from the right
    png.write_bytes(b"")
    assert parse_control_spec(f"canny:{png}") == ("canny", str(png), 1.0, 0.0, 1.0)
    assert parse_control_spec(f"blur:{png}:0.5") == ("blur", str(png), 0.5, 0.0, 1.0)
    assert parse_control_spec(f"depth:{png}:1.2:0.1:0.6") == ("depth", str(png), 1.2, 0.1, 0.6)
    for spec, message in [
        ("edges.png", "write KIND:PNG"),
        (f"cany:{png}", "did you mean 'canny'"),
        (f"canny:{png}:1:0.7:0.2", "0 <= START < END <= 1"),
        ("canny:missing.png:0.5", "no image file 'missing.png'"),
        (f"canny:{png}:nan", "no image file"),  # not a number: taken as part of the path, which does not exist
    ]:
        with pytest.raises(CLIError, match=message):
            parse_control_spec(spec)


def test_controlled_generation_from_the_command_line(controlled, tmp_path):
    root = controlled.parent
    common = ["generate", "a red circle", "--model", str(controlled), "--quiet", "--no-sheet", "--seed", "3"]

    def image(*extra):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        assert main([*common, "-o", str(out), *extra]) == 0
        return np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)

    plain = image()
    edges = image("--control", f"canny:{root / 'edges.png'}:1.5")
    assert np.abs(edges - plain).max() > 0  # the folder's own ControlNet acted
    assert np.array_equal(image("--control", f"canny:{root / 'edges.png'}:0"), plain)  # scale 0: nothing
    both = image("--control", f"canny:{root / 'edges.png'}:1.5:0:0.5", "--control", f"depth:{root / 'depth.png'}",
                 "--controlnet", str(root / "depth_controlnet.safetensors"))  # fmt: skip
    assert np.abs(both - edges).max() > 0
    diff = image("--control", f"canny:{root / 'edges.png'}:1.5", "--controlnet-layout", "diffusers")
    assert np.abs(diff - edges).max() > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control", "depth:{root}/../depth.png"], "--controlnet: no loaded ControlNet takes 'depth'"),
        (["--control", "canny:{root}/nothing.png"], "no image file"),
        (["--controlnet", "{root}/nothing.safetensors"], "--controlnet {root}/nothing.safetensors: no such file"),
        (["--control", "canny:{root}/model.json"], "--control {root}/model.json: not a readable image"),
    ],
)
def test_bad_controls_get_one_clear_error(controlled, tmp_path, capsys, extra, message):
    root = str(controlled)
    argv = ["generate", "a red circle", "--model", root, "-o", str(tmp_path / "o"), "--quiet"]
    assert main(argv + [e.format(root=root) for e in extra]) == 2
    err = capsys.readouterr().err
    assert message.format(root=root) in err and "Traceback" not in err
