"""The KL-VAE training task and the latent format measured from data."""

from __future__ import annotations

import pytest
import torch

from t2i.models import build_model
from t2i.train.config import load_config
from t2i.train.tasks import build_task
from t2i.train.tasks.vae import latent_format_from_data

TINY = ["model.params.block_out_channels=[8, 8]", "model.params.norm_groups=4", "model.params.latent_channels=4",
        "data.batch_size=4", "run.precision=fp32"]  # fmt: skip


def _batch(n=4, size=64):
    from t2i.data.dataset import ShapesDataset

    ds = ShapesDataset("train", size)
    return {"image": torch.stack([ds[i]["image"] for i in range(n)]), "id": torch.arange(n)}


def test_vae_loss_is_per_sample_and_seeded_by_draw():
    cfg = load_config("configs/default/vae.yaml", TINY)
    task = build_task(cfg)
    model = task.build_model()
    batch = _batch()
    loss = task.loss(model, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    torch.testing.assert_close(task.loss(model, batch), loss)  # posterior noise comes from the draw index
    half = task.loss(model, {k: v[2:] for k, v in batch.items()})
    torch.testing.assert_close(half, loss[2:])


def test_a_few_steps_lower_the_reconstruction_loss():
    cfg = load_config("configs/default/vae.yaml", TINY)
    task = build_task(cfg)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = _batch(4, 32)
    first = task.loss(model, batch).mean().item()
    for _ in range(30):
        opt.zero_grad()
        task.loss(model, batch).mean().backward()
        opt.step()
    assert task.loss(model, batch).mean().item() < 0.6 * first
    grid = task.sample(model, 4, seed=0, device=torch.device("cpu"))
    assert grid.shape == (4, 3, 32, 32)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="recon_loss"):
        build_task(load_config("configs/default/vae.yaml", [*TINY, "task.params.recon_loss=l3"]))
    with pytest.raises(ValueError, match="kl_weight"):
        build_task(load_config("configs/default/vae.yaml", [*TINY, "task.params.kl_weight=-1"]))


def test_latent_format_maps_latents_to_unit_variance():
    vae = build_model("sd3_vae", dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_groups=4))
    images = _batch(16, 32)["image"]
    fmt = latent_format_from_data(vae, images)
    z = fmt.process_in(vae.moments(images)[0])
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-2
