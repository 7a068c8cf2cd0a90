"""Few-step distillation: turn a trained diffusion or flow model (the teacher) into a 1-4 step student that needs
no classifier-free guidance at sampling time (the recipe behind SD3.5 Large Turbo, whose code was never published).

The task wraps a *base task* (``sd3`` for flow MMDiTs, ``diffusion`` for VP or flow networks) that supplies the data,
the conditioning and the noise path through ``base.distill_inputs(model, batch, device) -> (x0, cond, uncond)``.
The student starts as a copy of the teacher (``teacher``: a run folder, checkpoint or weights file; a model folder's
component file also works), or from ``student_init`` (the same kinds of path: an earlier student, say), and is
trained with one of two methods:

``consistency`` (no discriminator): consistency distillation with guidance distilled in (Song et al. 2023, Luo et
al. 2023 "LCM"). Pick adjacent times t_hi > t_lo of an N-step teacher grid, noise real data to x_hi, take one
guided teacher DDIM/Euler step to x_lo, and train the student's x0-prediction at (x_hi, t_hi) to match its own
prediction at (x_lo, t_lo) under stop-gradient (``x_lo`` itself when t_lo = 0). The x0-parameterisation meets the
boundary condition f(x, 0) = x on every path. Sample with the ``consistency`` sampler.

``adversarial`` (LADD, Sauer et al. 2024): the student denoises real data noised to a time of its few-step grid in
one call; its x0 and the real x0 are re-noised to a random time and fed to the *frozen teacher*, whose hidden states
at ``feature_layers`` feed small trainable heads (the discriminator), trained with the hinge loss. The generator
term reaches the student through the frozen teacher. An optional distillation term (``distill_weight``: MSE to the
guided teacher's x0, as in ADD) steadies the first steps. Sample with ``euler`` / ``ddim`` or ``consistency``.

The trained model is ``DistillModel``: the student plus the discriminator heads (empty for ``consistency``), so the
generic loop's optimiser, EMA, accumulation and exact resume cover both. ``t2i.train.trained.load_trained``
reads the student out of such a checkpoint (its ``student.*`` weights), so export works as for any run.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from t2i.data.transforms import sample_generator, sample_seed
from t2i.diffusion import (
    Denoiser,
    SkipLayerGuidance,
    check_guidance_interval,
    check_sampler,
    classifier_free_guidance,
)
from t2i.diffusion.paths import append_dims
from t2i.diffusion.samplers import sample_consistency
from t2i.nn.noise import Seeds

from ..distributed import unwrap
from . import Task, build_task

NOISE_STREAM, STEP_STREAM, SIMULATION_STREAM = 1, 4, 6


@dataclass
class DistillTaskConfig:
    method: str = "consistency"  # consistency | adversarial
    teacher: str | None = None  # weights of the teacher (a run folder, checkpoint, weights file or component file)
    # where the student starts (the same kinds of path); None: a copy of the teacher. An adversarial run on top of a
    # consistency student starts from that student, its discriminator reading the teacher
    student_init: str | None = None
    base_task: str = "sd3"  # sd3 | diffusion: supplies data, conditioning, path and parameterisation
    base_params: dict[str, Any] = field(default_factory=dict)
    guidance: float = 4.0  # teacher CFG scale distilled into the student
    # the teacher guides only while the noise level lies in [low, high] (its folder's guidance_interval); None: always
    guidance_interval: list[float] | None = None
    # skip-layer guidance of the teacher (SD3.5's; an MMDiT teacher, base_task sd3): slg_scale times (cond - cond with
    # the slg_layers blocks skipped) while the noise level lies in slg_interval (None: always); 0 turns it off. Its
    # folder states the window in fractions of its steps: `step_interval_to_time` converts it to noise levels
    slg_scale: float = 0.0
    slg_layers: list[int] = field(default_factory=list)
    slg_interval: list[float] | None = None
    student_steps: int = 4  # the student's step count (its preset); the adversarial method trains on its grid
    # how the student samples for grids, scores (run.eval_every) and its export's defaults; None: `consistency` for a
    # consistency student, the base task's sampler for an adversarial one (an adversarial student that continues a
    # consistency student keeps its sampler: set `consistency`)
    student_sampler: str | None = None
    teacher_steps: int = 32  # consistency: the teacher grid's size N (adjacent pairs of it are distilled)
    loss: str = "huber"  # consistency distance: l2 | huber (pseudo-Huber, Song & Dhariwal 2023)
    huber_c: float = 0.03
    feature_layers: list[str] = field(default_factory=list)  # adversarial: teacher modules whose outputs the heads see
    disc_time_logit_mean: float = 0.0  # adversarial: re-noising times ~ logit-normal(mean, 1) (LADD favours > 0)
    distill_weight: float = 1.0  # adversarial: weight of the MSE to the guided teacher's x0
    # adversarial: the distillation target. "renoised" (ADD, Sauer et al. 2023): the guided teacher's x0 from the
    # student's own sample re-noised to t_d, a sharpened, prompt-faithful version of it; "direct": the guided
    # teacher's one-step x0 from the student's input (x_s, t_s), which at t_s = 1 is the blurry mean image
    distill_target: str = "renoised"
    # adversarial: the share of samples whose input at the grid's step k is the student's own sample after its first
    # k steps from pure noise (its consistency sampler; "backward simulation", Yin et al. 2024, DMD2), not real data
    # noised to that time: what it sees at its later steps when sampling is its own blurrier guess, not real data
    backward_simulation: float = 0.0
    require_teacher: bool = True  # refuse a random teacher (tests set false)


class DistillModel(nn.Module):
    """The student and (adversarial method) the discriminator heads, trained together."""

    def __init__(self, student: nn.Module, heads: nn.ModuleDict | None = None):
        super().__init__()
        self.student = student
        self.heads = heads if heads is not None else nn.ModuleDict()

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


class DiscHead(nn.Module):
    """Per-token logits from one teacher feature map, averaged over tokens: a LADD discriminator head."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens.float()).squeeze(-1).mean(-1)


def _tokens(out: Any) -> Tensor:
    """A module output as (B, N, C) tokens: the image stream of an MMDiT block, or a flattened feature map."""
    if isinstance(out, tuple):
        out = out[-1]  # MMDiT joint blocks return (context, x)
    if out.ndim == 4:
        out = out.flatten(2).transpose(1, 2)
    return out


class FeatureTap:
    """Collect the outputs of named submodules of a network during its forward pass."""

    def __init__(self, net: nn.Module, names: list[str]):
        modules = dict(net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feature_layers {missing} are not modules of the teacher (e.g. {list(modules)[1:6]})")
        self.names, self.outputs = names, {}
        for n in names:
            modules[n].register_forward_hook(lambda _m, _i, out, n=n: self.outputs.__setitem__(n, _tokens(out)))

    def pop(self) -> dict[str, Tensor]:
        out, self.outputs = self.outputs, {}
        return out


class DistillTask(Task):
    """Consistency or adversarial (LADD) distillation of a frozen teacher into a few-step student."""

    params_cls = DistillTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if p.method not in ("consistency", "adversarial"):
            raise ValueError(f"task.params.method must be consistency or adversarial, got {p.method!r}")
        if p.base_task not in ("sd3", "diffusion"):
            raise ValueError(f"task.params.base_task must be sd3 or diffusion, got {p.base_task!r}")
        if p.distill_target not in ("renoised", "direct"):
            raise ValueError(f"task.params.distill_target must be renoised or direct, got {p.distill_target!r}")
        if p.loss not in ("l2", "huber"):
            raise ValueError(f"task.params.loss must be l2 or huber, got {p.loss!r}")
        if p.student_steps < 1 or p.teacher_steps < 2:
            raise ValueError("task.params.student_steps must be >= 1 and teacher_steps >= 2")
        if p.method == "adversarial" and not p.feature_layers:
            raise ValueError("the adversarial method needs task.params.feature_layers (teacher modules, e.g. "
                             "joint_blocks.1 joint_blocks.3 for an MMDiT)")  # fmt: skip
        if not 0 <= p.backward_simulation <= 1 or (p.backward_simulation and p.method != "adversarial"):
            raise ValueError(f"task.params.backward_simulation is a share in [0, 1] for the adversarial method, got "
                             f"{p.backward_simulation} with method {p.method}")  # fmt: skip
        if p.student_sampler is not None:
            check_sampler(p.student_sampler, "task.params.student_sampler")
        self.guidance_interval = None  # the teacher guides at every time
        if p.guidance_interval is not None:
            self.guidance_interval = check_guidance_interval(p.guidance_interval, "task.params.guidance_interval")
        self.skip_layers = None  # no skip-layer guidance in the teacher
        if p.slg_scale != 0:
            if p.base_task != "sd3" or not p.slg_layers:
                raise ValueError("task.params.slg_scale needs an MMDiT teacher (base_task: sd3) and "
                                 "task.params.slg_layers, the blocks to skip (e.g. [2, 3])")  # fmt: skip
            window = (0.0, 1.0)
            if p.slg_interval is not None:
                window = check_guidance_interval(p.slg_interval, "task.params.slg_interval")
            layers = tuple(int(i) for i in p.slg_layers)
            self.skip_layers = SkipLayerGuidance(scale=float(p.slg_scale), layers=layers, interval=window)
        if p.teacher is None and p.require_teacher:
            raise ValueError("set task.params.teacher to the trained model to distil (a run folder or weights file)")
        inner_cfg = dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, name=p.base_task, params=p.base_params)
        )
        self.base = build_task(inner_cfg)
        self.path, self.prediction = self.base.path, self.base.prediction
        self.seed = cfg.run.seed
        self.teacher: nn.Module | None = None
        self.tap: FeatureTap | None = None

    # -- model -------------------------------------------------------------------------------------------------

    def _load_into(self, net: nn.Module, path: str, what: str) -> None:
        """``net`` takes the trained weights at ``path`` (a run, checkpoint, weights or component file)."""
        from t2i.io import check_state_dict

        from ..trained import load_trained

        sd = load_trained(path, self.cfg.model.name).state_dict()
        check_state_dict(net.state_dict(), sd, what=f"{what} (does model.params match its config?)")
        net.load_state_dict(sd, strict=True)

    def _load_teacher(self) -> nn.Module:
        net = self.base.build_model()
        if self.params.teacher is not None:
            self._load_into(net, self.params.teacher, "teacher")
        return net.eval().requires_grad_(False)

    def build_model(self) -> nn.Module:
        self.teacher = self._load_teacher()
        depth = len(getattr(self.teacher, "joint_blocks", ()))
        if self.skip_layers is not None and not all(0 <= i < depth for i in self.skip_layers.layers):
            raise ValueError(f"task.params.slg_layers {list(self.skip_layers.layers)}: the teacher has {depth} MMDiT "
                             f"blocks, use indices in 0..{depth - 1}")  # fmt: skip
        student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        if self.params.student_init is not None:
            self._load_into(student, self.params.student_init, "task.params.student_init")
        heads = None
        if self.params.method == "adversarial":
            self.tap = FeatureTap(self.teacher, list(self.params.feature_layers))
            heads = nn.ModuleDict({n.replace(".", "_"): DiscHead(w) for n, w in self._feature_widths().items()})
        return DistillModel(student, heads)

    def _feature_widths(self) -> dict[str, int]:
        """Channel width of each tapped feature, from one dry teacher call on a batch of the training data."""
        from t2i.train.data import build_dataset, collate

        ds = build_dataset(self.cfg.data, self.seed)
        batch = collate([{**ds[i], "id": i} for i in range(2)])
        x0, cond, _ = self.base.distill_inputs(self.teacher, batch, torch.device("cpu"))
        t = torch.full((2,), 0.5, dtype=torch.float64)
        with torch.no_grad():
            # a private generator: building the task must not move the global stream that training draws from
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
            self._denoiser(self.teacher)(self.path.add_noise(x0, noise, t), t, **cond)
        return {n: f.shape[-1] for n, f in self.tap.pop().items()}

    def _denoiser(self, net: nn.Module) -> Denoiser:
        return Denoiser(net, self.path, self.prediction)

    # -- losses ------------------------------------------------------------------------------------------------

    def _draws(self, batch, x0: Tensor, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample (u in [0, 1)^n, eps, eps2) from the sample's own generators."""
        gens = [sample_generator(self.seed, int(d), NOISE_STREAM) for d in batch["id"]]
        u = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        eps2 = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        return u, eps, eps2

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        d = (a.float() - b.float()).flatten(1)
        if self.params.loss == "l2":
            return d.pow(2).mean(1)
        c = self.params.huber_c
        return torch.sqrt(d.pow(2).mean(1) + c * c) - c

    def _guided_teacher(self, uncond: dict):
        teacher = self._denoiser(self.teacher)
        return classifier_free_guidance(
            teacher, self.params.guidance, uncond, interval=self.guidance_interval, skip_layers=self.skip_layers
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        net = unwrap(model)
        device = next(net.parameters()).device
        self.teacher.to(device)
        x0, cond, uncond = self.base.distill_inputs(net.student, batch, device)
        if self.params.method == "consistency":
            return self._consistency(net, batch, x0, cond, uncond, device)
        return self._adversarial(net, batch, x0, cond, uncond, device)

    def _consistency(self, net, batch, x0, cond, uncond, device) -> Tensor:
        p = self.params
        ts = self.path.timesteps(p.teacher_steps).to(device)
        u, eps, _ = self._draws(batch, x0, 1, device)
        n = (u[:, 0] * p.teacher_steps).long().clamp(max=p.teacher_steps - 1).to(device)
        t_hi, t_lo = ts[n], ts[n + 1]
        x_hi = self.path.add_noise(x0, eps, t_hi)
        with torch.no_grad():  # one guided teacher DDIM (= Euler on flows) step from t_hi to t_lo
            x0_t = self._guided_teacher(uncond)(x_hi, t_hi, **cond)
            a_hi, s_hi = (append_dims(f(t_hi), x0.ndim).float() for f in (self.path.alpha, self.path.sigma))
            a_lo = append_dims(torch.where(t_lo == 0, 1.0, self.path.alpha(t_lo)), x0.ndim).float()
            s_lo = append_dims(torch.where(t_lo == 0, 0.0, self.path.sigma(t_lo)), x0.ndim).float()
            x_lo = a_lo * x0_t + s_lo * (x_hi - a_hi * x0_t) / s_hi
            student = self._denoiser(net.student)
            safe_lo = torch.where(t_lo == 0, ts[-2].expand_as(t_lo), t_lo)  # never call the net at t = 0
            target = torch.where(append_dims(t_lo == 0, x0.ndim), x_lo, student(x_lo, safe_lo, **cond))
        return self._distance(self._denoiser(net.student)(x_hi, t_hi, **cond), target)

    def _features(self, x: Tensor, t: Tensor, cond: dict) -> dict[str, Tensor]:
        """The frozen teacher's tapped features of ``x`` at ``t``, keyed like the heads."""
        self._denoiser(self.teacher)(x, t, **cond)
        return {name.replace(".", "_"): f for name, f in self.tap.pop().items()}

    @staticmethod
    def _logits(net, feats: dict[str, Tensor], heads_params: dict | None = None) -> Tensor:
        """Sum of the heads' logits (B,); with ``heads_params`` (detached weights) no gradient reaches the heads."""
        if heads_params is None:
            return sum(net.heads[key](f) for key, f in feats.items())
        return sum(functional_call(net.heads[key], heads_params[key], (f,)) for key, f in feats.items())

    @torch.no_grad()
    def _simulated_inputs(self, net, batch, eps: Tensor, k: Tensor, grid: Tensor, cond: dict, rows: Tensor) -> Tensor:
        """For the batch's ``rows``: the student's own consistency sampler run from their pure noise ``eps`` for
        ``k`` calls, i.e. their input at ``grid[k]`` when it samples; each sample draws its fresh noise from its own
        stream. Rows are grouped by ``k``, one sampler run per group."""
        out = torch.empty_like(eps[rows])
        student = self._denoiser(net.student)
        idx = rows.nonzero().squeeze(1)
        for step in k[idx].unique().tolist():
            group = idx[k[idx] == step]
            sub = {name: v[group] if torch.is_tensor(v) and v.shape[0] == len(rows) else v for name, v in cond.items()}
            noise = Seeds([sample_seed(self.seed, int(batch["id"][i]), SIMULATION_STREAM) for i in group.tolist()])
            x = sample_consistency(student, eps[group], grid[: step + 1], self.path, extra_args=sub, noise=noise)
            out[k[idx] == step] = x.to(eps.dtype)
        return out

    def _adversarial(self, net, batch, x0, cond, uncond, device) -> Tensor:
        p = self.params
        grid = self.path.timesteps(p.student_steps).to(device)
        # a third uniform only with backward simulation: runs without it keep their draws (and exact resume)
        u, eps, eps2 = self._draws(batch, x0, 3 if p.backward_simulation > 0 else 2, device)
        k = (u[:, 0] * p.student_steps).long().clamp(max=p.student_steps - 1).to(device)
        t_s = grid[k]
        x_s = self.path.add_noise(x0, eps, t_s)
        if p.backward_simulation > 0:
            simulated = (u[:, 2] < p.backward_simulation).to(device) & (k > 0)
            if simulated.any():
                x_s = x_s.clone()
                x_s[simulated] = self._simulated_inputs(net, batch, eps, k, grid, cond, simulated)
        fake = self._denoiser(net.student)(x_s, t_s, **cond)
        # re-noising times: logit-normal, as the teacher was trained (LADD Sec. 3.2)
        t_d = torch.sigmoid(p.disc_time_logit_mean + torch.special.ndtri(u[:, 1].clamp(1e-4, 1 - 1e-4))).to(device)
        t_d = self.path.quantize(t_d)
        real_d = self.path.add_noise(x0, eps2, t_d)
        fake_d = self.path.add_noise(fake, eps2, t_d)
        frozen = {key: {k: v.detach() for k, v in head.named_parameters()} for key, head in net.heads.items()}
        # one teacher pass on the fake serves both sides: the generator term through it with frozen heads, the
        # discriminator term on its detached features (the teacher is frozen, so they equal a detached pass)
        fake_feats = self._features(fake_d, t_d, cond)
        gen = -self._logits(net, fake_feats, frozen)
        with torch.no_grad():
            real_feats = self._features(real_d, t_d, cond)
        d_real = self._logits(net, real_feats)
        d_fake = self._logits(net, {k: f.detach() for k, f in fake_feats.items()})
        disc = F.relu(1 - d_real) + F.relu(1 + d_fake)
        loss = gen + disc
        if p.distill_weight > 0:
            with torch.no_grad():
                if p.distill_target == "renoised":
                    target = self._guided_teacher(uncond)(fake_d.detach(), t_d, **cond)
                else:
                    target = self._guided_teacher(uncond)(x_s, t_s, **cond)
            self.tap.pop()  # that call's features are not the discriminator's
            loss = loss + p.distill_weight * (fake.float() - target).flatten(1).pow(2).mean(1)
        return loss

    # -- samples -----------------------------------------------------------------------------------------------

    @property
    def student_sampler(self) -> str:
        """The sampler the student draws with (``student_sampler``, else by method)."""
        if self.params.student_sampler is not None:
            return self.params.student_sampler
        if self.params.method == "consistency":
            return "consistency"
        # the base task's; the diffusion task resolves an unset params.sampler by its path (sampler_name)
        return getattr(self.base, "sampler_name", None) or self.base.params.sampler

    @contextmanager
    def _as_student(self) -> Iterator[Any]:
        """The base task set to sample as the student does: its sampler, no guidance; restored on exit."""
        base = self.base
        saved = (base.params.guidance, base.params.sampler, getattr(base, "sampler_name", None))
        base.params.guidance, base.params.sampler = 1.0, self.student_sampler
        if saved[2] is not None:
            base.sampler_name = self.student_sampler
        try:
            yield base
        finally:
            base.params.guidance, base.params.sampler = saved[0], saved[1]
            if saved[2] is not None:
                base.sampler_name = saved[2]

    def sample(self, model, n, *, seed, device, steps=None):
        """Student samples in its few steps, without guidance, with the base task's grid and the student's sampler
        (``student_sampler``)."""
        with self._as_student() as base:
            return base.sample(unwrap(model).student, n, seed=seed, device=device, steps=self.params.student_steps)

    def caption_sampler(self, model, *, steps, device):
        """The student drawing from captions as it samples (its ``student_steps``, whatever ``steps`` asks, no
        guidance, the student's sampler), for ``run.eval_every``; None where the base task cannot draw from captions
        (``base_task: diffusion``, or an sd3 base without its encoders)."""
        with self._as_student() as base:  # the pipeline keeps the settings it is built with
            return base.caption_sampler(unwrap(model).student, steps=self.params.student_steps, device=device)
