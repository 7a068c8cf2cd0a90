"""The SD3 / SD3.5 pipeline: text -> (context, pooled) -> rectified-flow sampling -> VAE decode.

Composition only (Esser et al. 2024 for the model; the sd3.5 reference and diffusers for the defaults): the MMDiT
becomes an x0-denoiser through ``FlowDenoiser`` on ``RectifiedFlow(shift)``, guidance (CFG and SD3.5's skip-layer
guidance) wraps that denoiser, and any registered sampler of ``t2i.diffusion`` integrates it. No sampler or
guidance code lives here.

Per-model presets (``PRESETS``) hold steps, guidance, sampler, shift and SLG; "turbo" is just a preset (4 Euler
steps, no CFG). Noise is drawn per sample from its own seed, on the CPU in fp32, so image k of a batch is the same
image at any batch size and on any device.

img2img start step: sampling starts at index ``t_start = int(max(N - N*strength, 0))`` of the N-step grid
(so about ``N*strength`` steps run), from ``(1 - t) z0 + t eps`` at that grid time, as diffusers' SD3 img2img does
(the reference uses ``int(N*(1-strength))``, which is one step earlier for some values, e.g. N=40, strength=0.8,
because ``1 - 0.8`` is not exact in floating point). ``strength=1`` starts from pure noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.diffusion import (
    FlowDenoiser,
    RectifiedFlow,
    Seeds,
    SkipLayerGuidance,
    check_guidance_interval,
    check_sampler,
    classifier_free_guidance,
    get_sampler,
    sample,
    sample_repaint,
    step_interval_to_time,
)
from t2i.errors import check_choice
from t2i.io.png import to_pil
from t2i.nn.offload import placed
from t2i.nn.quantize import quantize_weights

from .control import Control


@dataclass(frozen=True)
class SD3Preset:
    steps: int = 28
    guidance: float = 4.5  # classifier-free guidance scale w; 1.0 disables it (no unconditional pass)
    sampler: str = "euler"  # a key of t2i.diffusion.SAMPLERS
    shift: float = 3.0  # rectified-flow timestep shift
    slg_scale: float = 0.0  # skip-layer guidance strength; 0 disables it
    slg_layers: tuple[int, ...] = (7, 8, 9)
    slg_window: tuple[float, float] = (0.01, 0.2)  # fractions of the steps where SLG is on (strict bounds)
    # classifier-free guidance only while the noise level t (1 = pure noise) lies in [low, high] (Kynkaanniemi et
    # al. 2024); elsewhere the conditional prediction alone. None guides every step.
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self):
        check_sampler(self.sampler)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance_interval is not None:  # checked, and held as a tuple of floats however it was given
            object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))


PRESETS: dict[str, SD3Preset] = {
    # model card: 28 steps at guidance 3.5 (3.5-4.5 works)
    "sd3.5-large": SD3Preset(steps=28, guidance=3.5, sampler="euler"),
    # the sd3.5 reference CONFIGS entry: 40 steps, guidance 4.5, and its DPM++(2M), which works in VE form on the flow
    # sigmas (lambda = -log sigma): `dpmpp_2m_ve` reproduces it; t2i's own `dpmpp_2m` is the flow-correct solver
    "sd3.5-large-ref": SD3Preset(steps=40, guidance=4.5, sampler="dpmpp_2m_ve"),
    # ADD-distilled: 4 Euler steps, no CFG
    "sd3.5-large-turbo": SD3Preset(steps=4, guidance=1.0, sampler="euler"),
    # 40 steps, guidance 4.5, SLG on layers 7, 8, 9 at 2.5 between 1% and 20% of the steps
    "sd3.5-medium": SD3Preset(steps=40, guidance=4.5, sampler="euler", slg_scale=2.5),
    # diffusers' StableDiffusion3Pipeline defaults (tuned for SD3-Medium)
    "sd3-medium": SD3Preset(steps=28, guidance=7.0, sampler="euler"),
}


def _image_tensor(image, height: int, width: int) -> Tensor:
    """PIL image(s) or a ``(B, 3, H, W)`` tensor in [0, 1] -> a tensor in [-1, 1] of the requested size."""
    if isinstance(image, Tensor):
        x = image.float()
        if x.ndim == 3:
            x = x[None]
    else:
        from PIL import Image

        images = image if isinstance(image, list | tuple) else [image]
        arrs = [np.asarray(im.convert("RGB").resize((width, height), Image.LANCZOS), dtype=np.float32) / 255
                for im in images]  # fmt: skip
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    if x.shape[-2:] != (height, width):
        raise ValueError(f"init_image is {tuple(x.shape[-2:])} but height x width is {(height, width)}; resize it")
    return x * 2 - 1


def _batch(x: Tensor, batch: int, what: str) -> Tensor:
    """``x`` with one entry per image: a single one is shared by the batch."""
    if x.shape[0] == 1 and batch > 1:
        return x.expand(batch, *x.shape[1:])
    if x.shape[0] != batch:
        raise ValueError(f"{what} has {x.shape[0]} entries for {batch} images; pass one, or one per image")
    return x


def _mask_tensor(mask, height: int, width: int, blur: float) -> Tensor:
    """A PIL mask (white = repaint) or a ``(B, 1, H, W)`` / ``(1, H, W)`` / ``(H, W)`` tensor in [0, 1] -> ``(B, 1,
    H, W)`` in [0, 1]. Without ``blur`` it is binarised at 0.5 (diffusers' rule); with ``blur`` (a Gaussian sigma in
    pixels) it stays soft, so the generated region fades into the kept one."""
    if isinstance(mask, Tensor):
        m = mask.float()
        m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else m[None] if m.ndim == 3 else m
    else:
        from PIL import Image

        masks = mask if isinstance(mask, list | tuple) else [mask]
        arrs = [np.asarray(im.convert("L").resize((width, height), Image.NEAREST), dtype=np.float32) / 255
                for im in masks]  # fmt: skip
        m = torch.from_numpy(np.stack(arrs))[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask_image must be one channel (B, 1, H, W), got shape {tuple(m.shape)}")
    if m.shape[-2:] != (height, width):
        raise ValueError(f"mask_image is {tuple(m.shape[-2:])} but height x width is {(height, width)}; resize it")
    if blur > 0:
        from t2i.diffusion import gaussian_blur

        return gaussian_blur(m.clamp(0, 1), blur, kernel_size=2 * int(3 * blur) + 1).clamp(0, 1)
    return (m >= 0.5).float()


class SD3Pipeline:
    """Text-to-image (and img2img) with an SD3/SD3.5 MMDiT, its VAE and its text stack.

    Args:
        transformer: the ``MMDiT``.
        vae: the ``AutoencoderKL`` (optional when only latents are wanted).
        text_encoder: the ``SD3TextEncoder`` (optional when embeddings are passed in).
        preset: a key of ``PRESETS`` or an ``SD3Preset``.
        device: where to run (default: the transformer's device).
        offload: keep every component on the CPU and move each to ``device`` only while it runs (sequential CPU
            offload: peak accelerator memory is the largest component, not the sum).
        autocast: a dtype (e.g. ``torch.bfloat16``) to run the transformer under autocast, or None.
        quantize: ``"int8"`` stores the large linear weights of the transformer and of T5 as int8 (torchao,
            ``t2i.nn.quantize``): half the memory of bf16, composes with ``offload``.
        controlnets: ControlNets (``t2i.models.controlnet``) that ``controls`` of a call pick by kind.
    """

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        *,
        preset: str | SD3Preset = "sd3.5-medium",
        device: torch.device | str | None = None,
        offload: bool = False,
        autocast: torch.dtype | None = None,
        quantize: str | None = None,
        controlnets: Sequence[nn.Module] = (),
    ):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.controlnets: list[nn.Module] = []
        if quantize is not None:
            quantize_weights(transformer, quantize)
            t5 = getattr(text_encoder, "t5", None)
            if t5 is not None:
                quantize_weights(t5, quantize)
        if isinstance(preset, str):
            check_choice("preset", preset, PRESETS)
            preset = PRESETS[preset]
        self.preset = preset
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.offload, self.autocast = offload, autocast
        if offload:
            for m in (transformer, vae, text_encoder):
                if m is not None:
                    m.to("cpu")
        for net in controlnets:
            self.add_controlnet(net)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, preset: str | SD3Preset | None = None, device=None, offload=False,
                        autocast=None, quantize: str | None = None, **load_kwargs) -> SD3Pipeline:  # fmt: skip
        """Load a diffusers folder or an official file (see ``t2i.models.sd3_loading.load_sd3``); the preset
        defaults to the detected model (a file or folder named "*turbo*" gets the turbo preset)."""
        from t2i.models.sd3_loading import load_sd3

        parts = load_sd3(path, device="cpu" if offload else (device or "cpu"), **load_kwargs)
        if preset is None:
            name = parts.model_name
            if name == "sd3.5-large" and "turbo" in Path(path).name.lower():
                name = "sd3.5-large-turbo"
            preset = name if name in PRESETS else "sd3.5-medium"
        return cls(parts.transformer, parts.vae, parts.text_encoder, preset=preset, device=device,
                   offload=offload, autocast=autocast, quantize=quantize)  # fmt: skip

    def add_controlnet(self, net: nn.Module) -> None:
        """Hold ``net`` for the ``controls`` of later calls, after checking that it fits this transformer."""
        c, t = net.cfg, self.transformer.cfg
        if (c.hidden_size, c.patch_size, c.in_channels, c.pooled_dim) != (t.hidden_size, t.patch_size,
                                                                            t.in_channels, t.pooled_dim):  # fmt: skip
            raise ValueError(
                f"this ControlNet ({c.hidden_size} wide, patch {c.patch_size}, {c.in_channels} latent channels, "
                f"pooled {c.pooled_dim}) does not fit the model ({t.hidden_size}, {t.patch_size}, {t.in_channels}, "
                f"{t.pooled_dim}); use one made for this model"
            )
        net.to("cpu" if self.offload else self.device)
        self.controlnets.append(net)

    def _on_device(self, module: nn.Module | None):
        return placed(module, self.device if self.offload else None)

    # -- steps ----------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(context, pooled)`` for a list of prompts (the empty string is the unconditional embedding)."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass context= and pooled= embeddings instead")
        with self._on_device(self.text_encoder):
            ctx, pooled = self.text_encoder(list(prompts))
        return ctx.to(self.device), pooled.to(self.device)

    def schedule(self, steps: int, shift: float, strength: float = 1.0) -> tuple[RectifiedFlow, Tensor]:
        """The flow path and the (possibly img2img-truncated) descending time grid."""
        path = RectifiedFlow(shift=shift)
        ts = path.timesteps(steps)
        if strength < 1.0:
            if not strength > 0.0:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")
            t_start = int(max(steps - steps * strength, 0))
            if t_start >= steps:
                raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
            ts = ts[t_start:]
        return path, ts

    def decode(self, latents: Tensor, *, tile: int | None = None) -> Tensor:
        """MMDiT-space latents -> images in [0, 1]."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE; use output='latent'")
        with self._on_device(self.vae):
            z = self.vae.latent_format.process_out(latents.to(self.device))
            img = self.vae.decode(z, tile=tile).float()
        return ((img + 1) / 2).clamp(0, 1)

    def _sample(self, x: Tensor, ts: Tensor, path, p: SD3Preset, cond: dict, uncond: dict, noise, callback,
                progress: bool, inpaint: tuple[Tensor, Tensor, Tensor] | None = None,
                net: nn.Module | None = None) -> Tensor:  # fmt: skip
        """Sample from ``x`` along ``ts``; ``inpaint`` = (clean latents, latent keep-mask, starting noise) pastes the
        kept region back after every step, re-noised with the starting noise (``t2i.diffusion.sample_repaint``
        with one pass per step). ``net`` replaces the transformer (a ``ControlledMMDiT``)."""
        net = net if net is not None else self.transformer
        denoise = FlowDenoiser(net, path)
        slg = None
        if p.slg_scale != 0:
            window = step_interval_to_time(ts, *p.slg_window)
            slg = SkipLayerGuidance(scale=p.slg_scale, layers=tuple(p.slg_layers), interval=window)
        guided = classifier_free_guidance(denoise, p.guidance, uncond, interval=p.guidance_interval, skip_layers=slg)
        amp = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        with self._on_device(net), amp:
            if inpaint is not None:
                known, keep, eps = inpaint
                return sample_repaint(guided, x, ts, path, known=known, mask=keep, resample=1,
                                      step=get_sampler(p.sampler), extra_args=cond, callback=callback, noise=noise,
                                      paste_noise=eps, progress=progress)  # fmt: skip
            return sample(p.sampler, guided, x, ts, path, extra_args=cond, noise=noise, callback=callback,
                          progress=progress)  # fmt: skip

    def _start_latents(self, init_image, init_latents: Tensor | None, shape: tuple, noise: Seeds) -> Tensor:
        """The clean MMDiT-space latents of img2img and inpainting: ``init_latents``, or ``init_image`` encoded."""
        B, lat_h, lat_w = shape[0], shape[2], shape[3]
        if init_latents is not None:
            z0 = _batch(init_latents.float().to(self.device), B, "init_latents")
            if tuple(z0.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"init_latents must be (B, {', '.join(map(str, shape[1:]))}), got {tuple(z0.shape)}")
            return z0
        if self.vae is None:
            raise ValueError("img2img needs a VAE to encode init_image (or pass init_latents)")
        factor = self.vae.downscale
        img = _batch(_image_tensor(init_image, lat_h * factor, lat_w * factor).to(self.device), B, "init_image")
        with self._on_device(self.vae):
            return self.vae.latent_format.process_in(self.vae.encode(img, noise=noise))

    # -- the call -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        negative_context: Tensor | None = None,
        negative_pooled: Tensor | None = None,
        seeds: int | Sequence[int] = 0,
        height: int = 1024,
        width: int = 1024,
        init_image=None,
        strength: float = 0.8,
        mask_image=None,
        mask_blur: float = 0.0,
        init_latents: Tensor | None = None,
        latents: Tensor | None = None,
        controls: Sequence[Control] = (),
        controlnet_layout: str = "reference",
        output: str = "pil",
        vae_tile: int | None = None,
        callback: Callable | None = None,
        progress: bool = False,
        **overrides,
    ):
        """Generate images.

        Args:
            prompt: one prompt or one per image; or pass ``context``/``pooled`` embeddings instead.
            negative_prompt: the unconditional prompt(s); or ``negative_context``/``negative_pooled``.
            seeds: one seed per image (an int n gives one image with seed n); a single prompt is repeated.
            height, width: image size in pixels, multiples of 8 * patch size (16 for the released models).
            init_image: PIL image(s) or a ``(B, 3, H, W)`` tensor in [0, 1] for img2img, with ``strength``.
            mask_image: inpainting: a PIL mask or ``(B, 1, H, W)`` tensor in [0, 1], white / 1 where the image is
                repainted; the rest of ``init_image`` is kept, its latents pasted back (re-noised) after every step.
            mask_blur: a Gaussian sigma in pixels that softens the mask's edge (0: a hard, binarised mask).
            init_latents: MMDiT-space latents ``(B, C, H/8, W/8)`` to start from instead of encoding ``init_image``.
            latents: explicit starting noise ``(B, C, H/8, W/8)`` instead of drawing it from ``seeds``.
            controls: ControlNet controls (``t2i.pipelines.control.Control``: image, kind, scale, step window),
                their residuals summed; each uses its ``net`` or the pipeline's ControlNet for its kind.
            controlnet_layout: which MMDiT blocks take which residual: "reference" (the sd3.5 reference, every block)
                or "diffusers" (not the last block); see ``t2i.models.mmdit.controlnet_block_picker``.
            output: "pil", "tensor" (``(B, 3, H, W)`` in [0, 1]) or "latent" (MMDiT-space latents).
            vae_tile: decode in tiles of this many latent pixels (bounds VAE memory for large images).
            overrides: any ``SD3Preset`` field: ``steps``, ``guidance`` (also accepted as ``cfg``), ``sampler``,
                ``shift``, ``slg_scale``, ``slg_layers``, ``slg_window``, ``guidance_interval``.
        """
        if output not in ("pil", "tensor", "latent"):
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        if "cfg" in overrides:  # the guidance scale's older name
            overrides["guidance"] = overrides.pop("cfg")
        p = replace(self.preset, **overrides)  # unknown keys raise TypeError naming them
        # 1. conditioning
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if context is None:
            if prompt is None:
                raise ValueError("pass a prompt, or context= and pooled= embeddings")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if len(prompts) == 1 and len(seeds) > 1:
                prompts = prompts * len(seeds)
            context, pooled = self.encode_prompt(prompts)
        if pooled is None:
            raise ValueError("context= needs pooled= as well")
        B = context.shape[0]
        if len(seeds) == 1 and B > 1:
            seeds = [seeds[0] + i for i in range(B)]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts; pass one seed per image")
        cond = {"context": context.to(self.device), "pooled": pooled.to(self.device)}
        uncond = {}
        if p.guidance != 1.0:
            if negative_context is None:
                negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
                negative_context, negative_pooled = self.encode_prompt(negs)
            uncond = {"context": negative_context.to(self.device), "pooled": negative_pooled.to(self.device)}
        # 2. schedule and starting point
        arch = self.transformer.cfg
        factor = self.vae.downscale if self.vae is not None else 8
        if height % (factor * arch.patch_size) or width % (factor * arch.patch_size):
            raise ValueError(f"height and width must be multiples of {factor * arch.patch_size}, got {height}x{width}")
        shape = (B, arch.in_channels, height // factor, width // factor)
        noise = Seeds(seeds)
        start = init_image is not None or init_latents is not None
        if mask_image is not None and not start:
            raise ValueError("inpainting needs the image to keep: pass init_image (or init_latents) with mask_image")
        path, ts = self.schedule(p.steps, p.shift, strength if start else 1.0)
        eps = latents.float().to(self.device) if latents is not None else noise.randn(shape, device=self.device)
        x, inpaint = eps, None
        if start:
            z0 = self._start_latents(init_image, init_latents, shape, noise)
            x = path.add_noise(z0, eps, ts[0].expand(B))  # (1 - t0) z0 + t0 eps
            if mask_image is not None:
                m = _mask_tensor(mask_image, height, width, mask_blur).to(self.device)
                m = _batch(m, B, "mask_image")
                # nearest, as diffusers does, for a hard mask; a blurred one is averaged so it stays soft
                m = F.interpolate(m, size=shape[-2:], mode="area" if mask_blur > 0 else "nearest")
                inpaint = (z0, 1 - m, eps)
        net = None
        if controls:
            from t2i.models.controlnet import ControlledMMDiT

            from .control import active_controls, encode_controls

            with self._on_device(self.vae):
                lat, nets = encode_controls(controls, self.controlnets, self.vae, B, height, width, noise, self.device)
            cond["control_latents"] = lat  # cond-only: guidance gives both branches the control, as the reference
            net = ControlledMMDiT(self.transformer, active_controls(controls, nets, ts, path.time_scale),
                                  controlnet_layout)  # fmt: skip
        # 3. sample with the guided denoiser
        x = self._sample(x, ts, path, p, cond, uncond, noise, callback, progress, inpaint=inpaint, net=net)
        # 4. decode
        if output == "latent":
            return x
        images = self.decode(x, tile=vae_tile)
        return images if output == "tensor" else [to_pil(im) for im in images]
