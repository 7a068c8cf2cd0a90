"""LoRA fine-tuning through the generic loop: adapters only train, checkpoints hold adapters, resume is exact."""

from __future__ import annotations

import pytest
import torch

from t2i.io import load_weights, save_weights
from t2i.nn.lora import LoRALinear
from t2i.train.loop import Trainer

LORA = {
    "task.name": "lora",
    "task.params": "{base_task: diffusion, base_params: {path: flow}, targets: [emb], rank: 2}",
}


def _base_weights(tiny_cfg, tmp_path, quiet):
    base = Trainer(tiny_cfg(**{"run.name": "base"}), out=quiet)
    base.fit()
    base.close()
    path = tmp_path / "base.safetensors"
    save_weights(path, base.model.state_dict())
    return path, {k: v.clone() for k, v in base.model.state_dict().items()}


def test_lora_run_trains_only_adapters_and_saves_them_alone(tiny_cfg, tmp_path, quiet):
    path, base = _base_weights(tiny_cfg, tmp_path, quiet)
    trainer = Trainer(tiny_cfg(**LORA, **{"run.name": "lora", "model.init_from": str(path)}), out=quiet)
    layers = [m for m in trainer.model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 3  # enc, mid and dec ResBlock.emb at depth 1
    before = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_up" in n}
    trainer.fit()
    trainer.close()
    state = trainer.model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"base weight {k} changed"
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    saved = load_weights(trainer.run_dir / "checkpoints" / "step_00000004" / "model.safetensors")
    assert set(saved) == {
        f"{m}.{k}"
        for m in ("enc.0.emb", "mid.0.emb", "dec.0.emb")
        for k in ("lora_down.weight", "lora_up.weight", "alpha")
    }


def test_lora_resume_is_exact(tiny_cfg, tmp_path, quiet):
    path, _ = _base_weights(tiny_cfg, tmp_path, quiet)
    common = {**LORA, "model.init_from": str(path), "run.steps": 6, "run.ckpt_every": 3}
    full = Trainer(tiny_cfg(**common, **{"run.name": "full"}), out=quiet)
    full.fit()
    full.close()
    first = Trainer(tiny_cfg(**{**common, "run.steps": 3, "run.name": "part"}), out=quiet)
    first.fit()
    first.close()
    resumed = Trainer(tiny_cfg(**common, **{"run.name": "part"}), out=quiet, resume=True)
    assert resumed.step == 3
    resumed.fit()
    resumed.close()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_needs_base_weights(tiny_cfg):
    with pytest.raises(ValueError, match=r"model\.init_from"):
        Trainer(tiny_cfg(**LORA))
