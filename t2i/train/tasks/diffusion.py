"""The diffusion task: train any ``net(x, t, labels=...)`` with ``t2i.diffusion``'s objectives and sample it.

Two standard set-ups, chosen by ``task.params.path``:

- ``vp``: eps prediction on a variance-preserving path (Ho et al. 2020), uniform training times, DDIM samples;
- ``flow``: velocity prediction on rectified flow with logit-normal times (Esser et al. 2024), Euler samples.

Every default can be overridden (prediction, time density, weighting, sampler). Noise and training times are drawn
per sample from a generator seeded by the sample's draw index (``batch["id"]``), so a sample gets the same noise
whatever the batch split, the number of processes, or a resume in between. Labels, when the dataset has them and
the model is class-conditional, are dropped to the null label with probability ``cfg_dropout`` so that the model
also learns the unconditional score for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from t2i.data.transforms import sample_generator
from t2i.diffusion import (
    Denoiser,
    DenoisingObjective,
    RectifiedFlow,
    Seeds,
    VPPath,
    check_sampler,
    classifier_free_guidance,
    get_sampler,
    make_time_sampler,
)

from ..distributed import unwrap
from . import Task

NOISE_STREAM = 1  # sample_generator stream for diffusion noise (0 is data augmentation)


@dataclass
class DiffusionTaskConfig:
    path: str = "vp"  # vp | flow
    prediction: str | None = None  # eps | v | x0 | flow; default eps on vp, flow on flow
    vp_schedule: str = "cosine"  # linear | cosine | sigmoid
    num_train_timesteps: int | None = 1000  # discrete VP chain length; null for continuous time
    shift: float = 1.0  # rectified-flow timestep shift (SD3 uses 3.0 at 1024 px)
    time_sampler: str | None = (
        None  # uniform | logit_normal | mode | cosmap; default uniform on vp, logit_normal on flow
    )
    weighting: str | None = None  # None | p2 | min_snr | sigma_sqrt | cosmap
    loss_type: str = "l2"  # l2 | l1 | huber
    sampler: str | None = None  # a key of t2i.diffusion.SAMPLERS; default ddim on vp, euler on flow
    cfg_dropout: float = 0.1  # probability of training a sample with the null label
    guidance: float = 1.0  # classifier-free guidance scale of the sample grids
    input_key: str = "image"  # batch key holding x0 ("embedding" for embedding datasets)


class DiffusionTask(Task):
    """Denoising-diffusion or flow-matching training of a time-conditioned network."""

    params_cls = DiffusionTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if p.path == "vp":
            self.path = VPPath(p.vp_schedule, p.num_train_timesteps)
            prediction, times, sampler = p.prediction or "eps", p.time_sampler or "uniform", p.sampler or "ddim"
        elif p.path == "flow":
            self.path = RectifiedFlow(p.shift, p.num_train_timesteps)
            prediction = p.prediction or "flow"
            times, sampler = p.time_sampler or "logit_normal", p.sampler or "euler"
        else:
            raise ValueError(f"task.params.path must be 'vp' or 'flow', got {p.path!r}")
        check_sampler(sampler, "task.params.sampler")
        if not 0.0 <= p.cfg_dropout < 1.0:
            raise ValueError(f"task.params.cfg_dropout must lie in [0, 1), got {p.cfg_dropout}")
        self.objective = DenoisingObjective(
            self.path, prediction, make_time_sampler(times), weighting=p.weighting, loss_type=p.loss_type
        )
        self.prediction, self.sampler_name = prediction, sampler
        self.seed = cfg.run.seed
        self._shape: tuple[int, ...] | None = None

    def _num_classes(self, model: nn.Module) -> int:
        inner = unwrap(model)  # DDP / FSDP wrappers keep the network in .module
        return int(getattr(getattr(inner, "cfg", None), "num_classes", 0))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        device = next(model.parameters()).device
        x0 = batch[self.params.input_key].to(device=device, dtype=torch.float32)
        self._shape = tuple(x0.shape[1:])
        gens = [sample_generator(self.seed, int(d), NOISE_STREAM) for d in batch["id"]]
        t = torch.cat([self.objective.sample_time(1, g) for g in gens])  # (B,) float64
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        cond = {}
        num_classes = self._num_classes(model)
        if num_classes > 0 and "label" in batch:
            drop = torch.stack([torch.rand((), generator=g) for g in gens]) < self.params.cfg_dropout
            labels = torch.where(drop, torch.full_like(batch["label"], num_classes), batch["label"])
            cond["labels"] = labels.to(device)
        return self.objective(model, x0, t=t.to(device), eps=eps, **cond)

    def distill_inputs(self, model: nn.Module, batch: dict[str, Any], device) -> tuple[Tensor, dict, dict]:
        """(x0, cond, uncond) of a batch for the distillation tasks: labels and the null label, when class-
        conditional."""
        x0 = batch[self.params.input_key].to(device=device, dtype=torch.float32)
        self._shape = tuple(x0.shape[1:])
        num_classes = self._num_classes(model)
        if num_classes > 0 and "label" in batch:
            return x0, {"labels": batch["label"].to(device)}, {"labels": torch.full((1,), num_classes, device=device)}
        return x0, {}, {}

    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is not None:
            return self._shape
        if self.params.input_key != "image":
            dim = self.cfg.model.params.get("dim")
            if dim is None:
                raise ValueError("cannot tell the sample shape before training on a batch; set model.params.dim")
            return (int(dim),)
        d = self.cfg.data
        return (d.channels, d.image_size, d.image_size)

    @torch.no_grad()
    def sample(
        self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None
    ) -> Tensor | None:
        shape = self.sample_shape()
        if len(shape) != 3:
            return None  # vectors (e.g. embeddings): nothing to put in an image grid
        steps = steps or self.cfg.run.sample_steps
        denoise = Denoiser(model, self.path, self.prediction)
        extra: dict[str, Tensor] = {}
        num_classes = self._num_classes(model)
        if num_classes > 0:
            extra["labels"] = torch.arange(n, device=device) % num_classes  # cycles through the classes
            denoise = classifier_free_guidance(
                denoise, self.params.guidance, {"labels": torch.full((1,), num_classes, device=device)}
            )
        ts = self.path.timesteps(steps)
        # start at x_t for t = ts[0]: pure noise scaled by sigma (the alpha * x0 part is ~0 there)
        x = Seeds.from_base(seed, n).randn((n, *shape), device=device) * float(self.path.sigma(ts[0]))
        was_training = model.training
        model.eval()
        try:
            out = get_sampler(self.sampler_name)(
                denoise, x, ts, self.path, extra_args=extra, noise=Seeds.from_base(seed + n, n)
            )
        finally:
            model.train(was_training)
        return out.clamp(-1, 1)
