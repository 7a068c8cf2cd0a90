"""The ``controlnet`` task: train an SD3 ControlNet beside a frozen MMDiT (Zhang et al. 2023 on the SD3 recipe).

- The base MMDiT is frozen; it comes from a model folder (``models/sd3-shapes``: its transformer, VAE, text
  encoder and their settings) or from a run / weights file with ``base_params`` naming the VAE and text encoder
  as for the ``sd3`` task.
- The ControlNet (``model.name: sd3_controlnet``, its ``model.params`` must fit the base) starts as a copy of the
  base's embedders and first ``depth`` image streams, with zero output Linears and a zero control patch
  embedding, so step 0 samples exactly as the base does.
- The loss is the ``sd3`` task's rectified-flow loss of the base model with the ControlNet's residuals injected
  (``ControlledMMDiT``, ``layout`` convention); only the ControlNet learns.
- Control images are made on the fly from each training image: Canny edges (OpenCV; the ``control`` extra) of the
  rendered scene, i.e. the object outlines, for ``control_type: canny``; a Gaussian blur for ``blur``. They are
  taken into the ControlNet's "signed" range and encoded by the frozen VAE, posterior sample per draw.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from t2i.data.control import prepare_control_image, to_model_range
from t2i.data.transforms import sample_generator
from t2i.models.controlnet import ActiveControl, ControlledMMDiT, ControlNet

from ..distributed import unwrap
from . import Task, build_task

NOISE_STREAM, CONTROL_STREAM = 1, 5


@dataclass
class ControlNetTaskConfig:
    base: str | None = None  # the frozen MMDiT: a model folder, a run folder, a checkpoint or a weights file
    base_params: dict[str, Any] = field(default_factory=dict)  # sd3 task params (filled from a model folder)
    layout: str = "reference"  # which base blocks take which residual (t2i.models.mmdit.controlnet_block_picker)
    canny_low: int = 100  # Canny hysteresis thresholds of the on-the-fly control images
    canny_high: int = 200
    blur_sigma: float | None = None  # blur control images: Gaussian sigma in pixels (None: 1/40 of the side)
    sample_steps: int = 16  # sample grids: sampler steps of the controlled base model


def _folder_params(folder: Path) -> dict[str, Any]:
    """``sd3`` task params that reproduce a model folder's text encoder, VAE latent format and sampling."""
    from t2i.io import read_metadata

    spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    components = spec.get("components", {})
    part = lambda name: str(folder / components.get(name, f"{name}.safetensors"))  # noqa: E731
    fmt = json.loads(read_metadata(part("vae")).get("t2i_extra", "{}")).get("latent_format", {})
    d = spec.get("defaults", {})
    params = {"vae": part("vae"), "text": part("clip"), "text_layer": spec.get("text_layer", -2),
              "text_chars": spec.get("text_chars", 0), "text_words": spec.get("text_words", False),
              "text_word_positions": spec.get("text_word_positions", 0.0),
              "text_word_prefix": spec.get("text_word_prefix", 0.0),
              "caption_encoder": part("caption") if spec.get("caption_encoder") else None,
              "shift": d.get("shift", 3.0), "guidance": d.get("guidance", d.get("cfg", 4.5)),
              "sampler": d.get("sampler", "euler")}  # fmt: skip
    if fmt:
        params.update(latent_scale=fmt["scale"], latent_shift=fmt["shift"])
    return params


class ControlNetTask(Task):
    """A ControlNet trained on control images made from the training images, beside a frozen SD3 MMDiT."""

    params_cls = ControlNetTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if cfg.model.name != "sd3_controlnet":
            raise ValueError(f"the controlnet task trains model.name: sd3_controlnet, got {cfg.model.name!r}")
        if p.base is None:
            raise ValueError("set task.params.base to the frozen model: a model folder (models/sd3-shapes) or a run")
        if not Path(p.base).exists():
            raise FileNotFoundError(f"task.params.base={p.base} does not exist: give a model folder or a run folder")
        self.folder = Path(p.base) if (Path(p.base) / "model.json").is_file() else None
        base_params = {**(_folder_params(self.folder) if self.folder else {}), **p.base_params}
        inner = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="sd3", params=base_params))
        self.sd3 = build_task(inner)  # the data, text and VAE pipeline, the flow objective
        self.seed = cfg.run.seed
        self.base_model: nn.Module | None = None
        self._last: dict[str, Any] = {}

    # -- model --------------------------------------------------------------------------------------------------

    def _load_base(self) -> nn.Module:
        from t2i.models.files import load_model_file

        from ..trained import load_trained

        if self.folder is not None:
            spec = json.loads((self.folder / "model.json").read_text(encoding="utf-8"))
            rel = spec.get("components", {}).get("transformer", "transformer.safetensors")
            net, _ = load_model_file(self.folder / rel, expect="mmdit")
        else:
            net = load_trained(self.params.base, "mmdit")
        return net.eval().requires_grad_(False)

    def build_model(self) -> nn.Module:
        self.base_model = self._load_base()
        net = super().build_model()
        if not isinstance(net, ControlNet):
            raise ValueError("the controlnet task trains model.name: sd3_controlnet")
        if net.cfg.input_range != "signed":
            raise ValueError("ControlNets trained here take their images as 2x-1: set model.params.input_range: "
                             "signed")  # fmt: skip
        try:
            net.init_from_base(self.base_model)
        except ValueError as err:
            b = self.base_model.cfg
            raise ValueError(f"{err}. The base has num_heads={b.heads}, head_dim={b.head_dim}, patch_size="
                             f"{b.patch_size}, in_channels={b.in_channels}, pooled_dim={b.pooled_dim}, qk_norm="
                             f"{b.qk_norm}, depth={b.depth}: set model.params to match") from None  # fmt: skip
        return net

    def _controlled(self, net: nn.Module) -> ControlledMMDiT:
        return ControlledMMDiT(self.base_model, [ActiveControl(net, 1.0)], self.params.layout)

    # -- control images -------------------------------------------------------------------------------------------

    def control_images(self, images: Tensor, control_type: str) -> Tensor:
        """Control images ``(B, 3, H, W)`` in [0, 1] made from training images in [-1, 1]."""
        p = self.params
        kind = "canny" if control_type == "canny" else "blur" if control_type == "blur" else None
        if kind is None:
            raise ValueError("the shapes world has no depth; train canny (outlines) or blur ControlNets")
        H, W = images.shape[-2:]
        u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out = [prepare_control_image(Image.fromarray(np.ascontiguousarray(a)), kind, H, W, blur_sigma=p.blur_sigma,
                                     canny_thresholds=(p.canny_low, p.canny_high)) for a in u8]  # fmt: skip
        return torch.cat(out)

    def control_latents(self, net: ControlNet, images: Tensor, ids: list[int]) -> Tensor:
        """``(B, 1, C, h, w)`` MMDiT-space latents of the control images of ``images`` (training images)."""
        ctrl = to_model_range(self.control_images(images, net.cfg.control_type), net.cfg.control_type, "signed")
        gens = [sample_generator(self.seed, d, CONTROL_STREAM) for d in ids]
        return self.sd3.encode_images(ctrl, gens)[:, None]

    # -- Task interface ---------------------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        net = unwrap(model)
        device = next(net.parameters()).device
        self.base_model.to(device)
        if "image" not in batch:
            raise ValueError(
                "the controlnet task makes its control images from the training images: use a data source that "
                "yields images (data.source: shapes or a folder), not cached latents"
            )
        x0, context, pooled, ids = self.sd3._inputs(batch, drop=True)
        control = self.control_latents(net, batch["image"], ids)
        gens = [sample_generator(self.seed, d, NOISE_STREAM) for d in ids]
        t = torch.cat([self.sd3.objective.sample_time(1, g) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        self._last = {"images": batch["image"][:8].cpu(), "captions": list(batch.get("caption", []))[:8]}
        return self.sd3.objective(self._controlled(model), x0.to(device), t=t.to(device), eps=eps.to(device),
                                  context=context.to(device), pooled=pooled.to(device),
                                  control_latents=control.to(device))  # fmt: skip

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None):
        """Each of the last batch's images next to what the controlled model draws from its caption and outlines."""
        if self.sd3.vae is None or self.sd3.text_encoder is None or not self._last:
            return None
        from t2i.pipelines.control import Control
        from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

        net = unwrap(model)
        sp = self.sd3.params
        k = min(n, len(self._last["captions"]))
        if k == 0:
            return None
        truth = self._last["images"][:k]
        pipe = SD3Pipeline(self.base_model, self.sd3.vae, self.sd3.text_encoder, device=device,
                           preset=SD3Preset(steps=steps or self.params.sample_steps, guidance=sp.guidance,
                                            sampler=sp.sampler, shift=sp.shift))  # fmt: skip
        ctrl = self.control_images(truth, net.cfg.control_type)
        was_training = net.training
        net.eval()
        try:
            out = pipe(self._last["captions"][:k], seeds=list(range(seed, seed + k)), height=truth.shape[-2],
                       width=truth.shape[-1], output="tensor", controlnet_layout=self.params.layout,
                       controls=[Control(ctrl, "none", net=net)])  # fmt: skip
        finally:
            net.train(was_training)
        return torch.cat([ctrl * 2 - 1, out * 2 - 1])  # the control images, then the controlled samples


__all__ = ["ControlNetTask", "ControlNetTaskConfig"]
