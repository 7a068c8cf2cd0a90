import torch

from t2i.cli.main import main
from t2i.io import load_weights, save_weights
from t2i.io.lora import load_lora, save_lora
from t2i.models import build_model
from t2i.nn.lora import LoRALinear, inject_lora, lora_state_dict

PARAMS = {"channels": 3, "width": 8, "depth": 1, "time_dim": 16, "num_classes": 4, "groups": 4}


def _model_with_lora(tmp_path):
    torch.manual_seed(0)
    model = build_model("toy_unet", PARAMS).eval()
    save_weights(tmp_path / "base.safetensors", model.state_dict())
    inject_lora(model, ["emb", "time_mlp.0"], rank=2, alpha=4.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_up["default"].weight.normal_(0, 0.3)
    save_lora(tmp_path / "lora.safetensors", lora_state_dict(model))
    return model


def _out(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10.0, 500.0]), labels=torch.tensor([1, 2]))


def test_merge_gives_the_adapted_model(tmp_path, capsys):
    model = _model_with_lora(tmp_path)
    out = tmp_path / "merged.safetensors"
    assert (
        main(
            [
                "lora",
                "merge",
                str(tmp_path / "base.safetensors"),
                f"{tmp_path / 'lora.safetensors'}:1.0",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    merged = build_model("toy_unet", PARAMS).eval()
    merged.load_state_dict(load_weights(out))
    torch.testing.assert_close(_out(merged), _out(model), atol=1e-5, rtol=1e-5)
    # half weight lands half-way in weight space
    assert (
        main(
            [
                "lora",
                "merge",
                str(tmp_path / "base.safetensors"),
                f"{tmp_path / 'lora.safetensors'}:0.5",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    half, base = load_weights(out), load_weights(tmp_path / "base.safetensors")
    full = merged.state_dict()
    k = "enc.0.emb.weight"
    torch.testing.assert_close(half[k], (base[k] + full[k]) / 2, atol=1e-6, rtol=1e-6)


def test_convert_to_kohya_and_back(tmp_path):
    _model_with_lora(tmp_path)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "b.safetensors"
    assert main(["lora", "convert", str(tmp_path / "lora.safetensors"), "--to", "kohya", "-o", str(kohya)]) == 0
    assert "lora_unet_enc_0_emb.lora_down.weight" in load_lora(kohya)[0]
    assert main(["lora", "convert", str(kohya), "--to", "t2i", "-o", str(back)]) == 2  # needs --base
    base = str(tmp_path / "base.safetensors")
    assert main(["lora", "convert", str(kohya), "--to", "t2i", "-o", str(back), "--base", base]) == 0
    a, b = load_lora(tmp_path / "lora.safetensors")[0], load_lora(back)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_reports_a_lora_that_does_not_fit(tmp_path, capsys):
    _model_with_lora(tmp_path)
    other = build_model("toy_unet", {**PARAMS, "time_dim": 32})
    save_weights(tmp_path / "other.safetensors", other.state_dict())
    code = main(
        [
            "lora",
            "merge",
            str(tmp_path / "other.safetensors"),
            str(tmp_path / "lora.safetensors"),
            "-o",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert code == 2
    assert "does not fit the base weights" in capsys.readouterr().err
