"""The training loop shared by every model: tasks supply ``loss`` and ``sample``, the loop does everything else.

One optimiser step is:

1. k micro-batches (``optim.grad_accum``), each ``loss = sum(per-sample losses) * world / global_batch`` so the
   accumulated gradient equals that of one batch of ``data.batch_size`` on one process (DDP averages over ranks,
   hence the ``* world``); DDP's all-reduce runs only on the last micro-batch;
2. autocast to bf16 (any device) or fp16 (with a grad scaler) when ``run.precision`` asks for it, never otherwise;
3. unscale, clip the global grad norm, step the optimiser; when the step is skipped (fp16 overflow, or a
   non-finite gradient in any precision) neither the lr schedule nor the EMA advance;
4. EMA update, metrics, sample grids, checkpoints and shapes-benchmark scores (``run.eval_every``) at their
   intervals (rank 0 writes and scores; all ranks compute).

Training cost is counted in CPU-seconds of this process (all its threads), excluding the time spent scoring and
drawing sample grids, and carried across ``--resume``: that is the x axis of ``eval_curve.png``, so runs with other
thread counts, batch sizes or step counts can be compared at equal compute.

Randomness is explicit: model init from ``run.seed``; per-sample noise and augmentation from the sample's draw
index (see ``t2i.train.data``); global RNG states are saved in checkpoints anyway, for any model that draws from
them (dropout). Together with the pure-function data stream and lr schedule this makes ``--resume`` bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from t2i.io import atomic_write_text, load_into
from t2i.nn.precision import bf16_advice, bf16_is_native

from . import distributed as D
from .checkpoint import load_resumable, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import MicroBatches, build_dataset
from .ema import EMA
from .optim import LRSchedule, build_optimizer, clip_grad_norm
from .report import MetricsLog, plot_eval_curves, plot_loss_curve, read_metrics, save_grid
from .tasks import Task, build_task, resolve_params


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def freeze_all_but(model: nn.Module, names: list[str]) -> None:
    """Train only the named submodules or parameters of ``model`` (``model.train_only``); the rest is frozen."""
    params = dict(model.named_parameters())
    unknown = [n for n in names if not any(k == n or k.startswith(n + ".") for k in params)]
    if unknown:
        tops = sorted({k.split(".")[0] for k in params})
        raise ValueError(f"model.train_only names {unknown}, which this model does not have; its parts: {tops}")
    for k, p in params.items():
        p.requires_grad_(any(k == n or k.startswith(n + ".") for n in names))


def autocast_context(precision: str, device: torch.device):
    """The autocast context for ``run.precision``: a no-op for fp32, so fp32 runs never touch autocast."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor its parameter's memory layout. Checkpoints store them contiguous,
    while a channels-last model's conv weights are not, and the fused Adam kernel pairs elements by memory
    position: with mismatched layouts it silently updates each weight with another weight's moments."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class Trainer:
    """Builds task, model, optimiser, schedule, EMA and data from a ``TrainConfig`` and runs the loop.

    Args:
        cfg: the resolved config.
        resume: False for a fresh run; True to continue from the newest checkpoint in the run folder (a fresh
            start when there is none); or the path of one checkpoint folder.
        allow_pickle: allow loading pickle weight files (read with ``weights_only=True``).
        out: where progress lines go when the progress bar is off (stdout by default).
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False, allow_pickle: bool = False, out=None):
        cfg = resolve_params(cfg)  # model/task params with every default spelled out (stored in checkpoints)
        self.cfg, self.out = cfg, out or sys.stdout
        self.dist = D.env_dist_info()
        self.device = D.pick_device(cfg.run.device, self.dist)
        D.init_process_group(self.dist, self.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.run.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; set before the first CUDA matmul
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        if cfg.run.precision == "bf16" and self.dist.is_main and not bf16_is_native(self.device.type):
            # the config stays as written (a run's numerics are its config's), but the user hears why it crawls
            print(f"warning: run.precision=bf16, but {bf16_advice(self.device.type)}; this run will be slow. "
                  "Train here with run.precision=fp32.", file=sys.stderr)  # fmt: skip
        seed_everything(cfg.run.seed)  # the same on every rank: identical initial weights

        self.task: Task = build_task(cfg)
        self.model: nn.Module = self.task.build_model().to(self.device)
        if cfg.model.init_from:
            # fine-tuning start point; every name and shape is checked, and a resume below overrides it
            load_into(self.model, cfg.model.init_from, allow_pickle=allow_pickle, new=cfg.model.init_new)
        self.task.setup_model(self.model)
        if cfg.model.train_only:
            freeze_all_but(self.model, cfg.model.train_only)
        if cfg.run.channels_last and cfg.run.precision == "bf16":
            # oneDNN's bf16 convolutions in channels-last (1.4x a bare decoder step; see RunConfig.channels_last
            # for why it is opt-in); fp32 convolutions are 1.3x slower so. Saved weights are made contiguous.
            self.model.to(memory_format=torch.channels_last)
        self.ema: EMA | None = None
        if cfg.ema.enabled:
            self.ema = EMA(
                self.model,
                decay=cfg.ema.decay,
                half_life=cfg.ema.half_life,
                samples_per_update=cfg.data.batch_size * cfg.ema.update_every,
                warmup=cfg.ema.warmup,
            )
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.precision == "fp16" else None
        self.step, self.samples_seen, self.skipped_steps = 0, 0, 0
        self.cpu_seconds = 0.0  # this process's training CPU time so far, all sessions (see the module docstring)
        self._cpu_mark = time.process_time()
        self.last_scores: dict[str, float] = {}
        self.resumed_from: Path | None = None
        self._saved_step: int | None = None
        self._config_changes: list[str] = []
        self._resume_requested = bool(resume)
        state = None
        if resume:
            loaded = load_resumable(
                self.run_dir,
                resume,
                model=self.model,
                ema=self.ema.module if self.ema else None,
                allow_pickle=allow_pickle,
                load_fn=self.task.load_saved_state,
            )
            if loaded is not None:
                state, self.resumed_from = loaded.state, loaded.path
                self.step = self._saved_step = loaded.step
                self._config_changes = config_changes(loaded.metadata, cfg)
                if self.dist.is_main:
                    for note in loaded.notes:
                        self._say(note)

        self.train_model = D.wrap_model(self.model, cfg.run.distributed, self.dist, self.device)
        if cfg.run.compile:
            # only the training forward/backward: checkpoints, EMA and sampling use the plain module, so saved
            # weights carry no compiler prefixes and evaluation never waits for a recompile
            self.train_model = torch.compile(self.train_model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LRSchedule(self.optimizer, cfg.schedule, cfg.optim.lr, cfg.run.steps)
        if state is not None:
            self._load_training_state(state)

        self.dataset = build_dataset(cfg.data, seed=cfg.run.seed)
        if cfg.run.eval_every:
            self._check_can_score()
        self.batches = MicroBatches(
            self.dataset,
            global_batch=cfg.data.batch_size,
            grad_accum=cfg.optim.grad_accum,
            rank=self.dist.rank,
            world=self.dist.world,
            seed=cfg.run.seed,
            start_step=self.step,
            num_workers=cfg.data.num_workers,
        )
        self.log = MetricsLog(self.run_dir, tensorboard=cfg.run.tensorboard) if self.dist.is_main else None
        if state is not None:
            # last: dropout and the tasks' own global draws continue exactly where the saved run stopped only if
            # nothing else draws from the global generators between here and the first resumed step
            set_rng_state(state["rng"])

    # -- state ----------------------------------------------------------------------------------------------

    def _training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "cpu_seconds": self._cpu_total(),
            "schedule": self.schedule.state_dict(),
            "optimizer": self._optimizer_state(),
            "rng": rng_state(),
            "data": {"step": self.step, "draws": self.step * self.cfg.data.batch_size, "seed": self.cfg.run.seed},
        }
        if self.ema is not None:
            state["ema"] = self.ema.extra_state()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def _optimizer_state(self) -> dict[str, Any]:
        if self.cfg.run.distributed == "fsdp" and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _load_training_state(self, state: dict[str, Any]) -> None:
        if self.cfg.run.distributed == "fsdp" and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        _match_state_layouts(self.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        # the saved figure is the total over ranks; each rank carries its share (absent in older checkpoints)
        self.cpu_seconds = float(state.get("cpu_seconds", 0.0)) / self.dist.world
        self._cpu_mark = time.process_time()
        if self.ema is not None and "ema" in state:
            self.ema.load_extra_state(state["ema"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank takes part in gathering sharded state)."""
        fsdp = self.cfg.run.distributed == "fsdp" and self.dist.enabled
        model = _FullWeights(D.full_state_dict(self.model) if fsdp else self.task.saved_state(self.model))
        ema = _FullWeights(self.task.saved_state(self.ema.module)) if self.ema else None
        state = self._training_state()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                model=model,
                state=state,
                config=self.cfg.to_dict(),
                ema=ema,
                keep_last=self.cfg.run.keep_last,
            )
            self._say(f"checkpoint step {self.step} -> {path}")
        self._saved_step = self.step
        D.barrier(self.dist)
        return path

    # -- one optimiser step ---------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """k micro-batches, one (possibly skipped) update; returns the step's metrics (loss summed on all ranks)."""
        cfg = self.cfg
        k, world, B = cfg.optim.grad_accum, self.dist.world, cfg.data.batch_size
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for m in range(k):
            batch = next(self.batches)
            last = m == k - 1
            D.set_fsdp_sync(self.train_model, last)
            with D.no_sync(self.train_model, not last):
                with autocast_context(cfg.run.precision, self.device):
                    per_sample = self.task.loss(self.train_model, batch)  # (B/(kW),)
                loss = per_sample.float().sum() * (world / B)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += per_sample.detach().float().sum()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip)
        lr = self.schedule.get_lr()
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        else:
            stepped = bool(torch.isfinite(grad_norm))
            if stepped:
                self.optimizer.step()
        if stepped:
            self.schedule.step()
            if self.ema is not None and self.schedule.steps_taken % cfg.ema.update_every == 0:
                self.ema.update(self.model)
        else:
            self.skipped_steps += 1
        self.step += 1
        self.samples_seen += B
        total = D.all_reduce_sum(loss_sum, self.dist)
        return {"loss": float(total) / B, "lr": lr, "grad_norm": float(grad_norm), "skipped": float(not stepped),
                **self.task.extra_metrics}  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------------------

    def _note_continuation(self) -> None:
        """A run resumed from another run's checkpoint (``--resume-from``) is a later stage of that run: remember
        where it started (``continued_from.json``, written once), so an export can credit each stage with its own
        steps, images and time (the carried-over counters hold both)."""
        path = Path(self.resumed_from).resolve()
        note = self.run_dir / "continued_from.json"
        if path.parent.parent == self.run_dir.resolve() or note.exists():
            return
        atomic_write_text(note, json.dumps({"checkpoint": str(self.resumed_from), "step": self.step}, indent=1) + "\n")

    def fit(self) -> dict[str, Any]:
        """Train until ``run.steps``; returns a summary (final loss, steps, seconds, samples/s)."""
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            if self._resume_requested and self.resumed_from is None:
                self._say(f"no checkpoint in {self.run_dir / 'checkpoints'} yet: starting from step 0")
            if self.resumed_from is not None:
                self._say(f"resumed from {self.resumed_from} at step {self.step}")
                self._note_continuation()
                for change in self._config_changes:
                    self._say(f"  config changed since that checkpoint: {change}")
        bar = tqdm(total=cfg.run.steps, initial=self.step, disable=not (main and cfg.run.progress), desc=cfg.run.name)
        t_start = time.perf_counter()
        t_last, n_last = t_start, 0
        metrics: dict[str, float] = {}
        start_step = self.step
        while self.step < cfg.run.steps:
            metrics = self.train_step()
            n_last += cfg.data.batch_size
            now = time.perf_counter()
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                metrics["samples_per_s"] = n_last / max(now - t_last, 1e-9)
                t_last, n_last = now, 0
                cpu = self._cpu_total()  # a collective: every rank logs at the same steps
                if main:
                    record = {**metrics, "samples_seen": self.samples_seen, "cpu_seconds": cpu}
                    self.log.log(self.step, record)
                    score = {"score": f"{self.last_scores['overall']:.3f}"} if "overall" in self.last_scores else {}
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    sps=f"{metrics['samples_per_s']:.0f}", **score)  # fmt: skip
                    if not cfg.run.progress:
                        line = f"step {self.step} loss {metrics['loss']:.6f} lr {metrics['lr']:.3e}"
                        self._say(line + (f" score {score['score']}" if score else ""))
            bar.update(1)
            if cfg.run.sample_every and self.step % cfg.run.sample_every == 0 and self.step < cfg.run.steps:
                self.sample_grid()
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
                self.evaluate()
            if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0:
                self.save()
        bar.close()
        seconds = time.perf_counter() - t_start
        if cfg.run.eval_every and self.step % cfg.run.eval_every:  # the final weights are always scored
            self.evaluate()
        if self._saved_step != self.step:  # decided from in-memory state, identically on every rank
            self.save()
        grid = self.sample_grid()
        curve = None
        if main:
            self.log.close()
            curve = plot_loss_curve(read_metrics(self.log.path), self.run_dir / "loss.png")
        cpu_total = self._cpu_total()
        # the barrier is the last collective before the process group goes: a gloo rank that tears its group down
        # while its peer is still inside an all-reduce aborts the peer ("terminate called without an active exception")
        D.barrier(self.dist)
        done = self.step - start_step
        return {
            "rank": self.dist.rank,
            "steps": self.step,
            "loss": metrics.get("loss", math.nan),
            "seconds": seconds,
            "samples_per_s": done * cfg.data.batch_size / max(seconds, 1e-9),
            "skipped_steps": self.skipped_steps,
            "run_dir": str(self.run_dir),
            "grid": str(grid) if grid else None,
            "loss_curve": str(curve) if curve else None,
            "cpu_seconds": round(cpu_total, 1),
            "scores": self.last_scores or None,
        }

    # -- compute accounting and scoring ---------------------------------------------------------------------

    def _cpu_now(self) -> float:
        """Training CPU-seconds so far (this process, all threads, every session), scoring and grids excluded."""
        return self.cpu_seconds + time.process_time() - self._cpu_mark

    def _cpu_total(self) -> float:
        """``_cpu_now`` summed over ranks (a collective under torchrun: call it on every rank)."""
        return float(D.all_reduce_sum(torch.tensor(self._cpu_now(), device=self.device), self.dist))

    @contextmanager
    def _not_training(self) -> Iterator[None]:
        """CPU time spent inside is not training (scoring, sample grids)."""
        t = time.process_time()
        try:
            yield
        finally:
            self._cpu_mark += time.process_time() - t

    def _eval_net(self) -> nn.Module:
        """What grids and scores are drawn from: the EMA weights, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def _check_can_score(self) -> None:
        if self.task.caption_sampler(self._eval_net(), steps=1, device=self.device) is None:
            raise ValueError(
                f"run.eval_every is set, but the {self.cfg.task.name!r} task cannot draw images from captions here "
                "(it needs its frozen encoders, e.g. task.params.vae and task.params.text for sd3); set "
                "run.eval_every=0"
            )
        if self.cfg.run.distributed == "fsdp" and self.dist.enabled and self.ema is None:
            raise ValueError("run.eval_every scores on rank 0 alone, which cannot run a sharded FSDP model; enable "
                             "the EMA (its copy is whole on every rank) or set run.eval_every=0")  # fmt: skip
        if self.cfg.data.image_size < 32:
            raise ValueError(f"run.eval_every scores on the shapes benchmark, which needs images of at least 32 "
                             f"px; data.image_size is {self.cfg.data.image_size}")  # fmt: skip

    def evaluate(self) -> dict[str, float] | None:
        """Score the EMA weights (or the model) on a fixed subset of the shapes benchmark: per-category accuracy,
        the overall GenEval-style score and the text track, logged with the training CPU-seconds; rank 0 only."""
        cpu = self._cpu_total()  # the training compute these scores belong to (a collective: before the rank check)
        if not self.dist.is_main:
            return None
        from t2i.shapes.scoring import evaluate_generator

        cfg = self.cfg.run
        net = self._eval_net()
        with self._not_training():
            t0 = time.perf_counter()
            fn = self.task.caption_sampler(net, steps=cfg.eval_steps or cfg.sample_steps, device=self.device)
            was_training = net.training
            net.eval()
            try:
                with torch.no_grad():
                    report = evaluate_generator(fn, split=cfg.eval_split, size=self.cfg.data.image_size,
                                                per_category=cfg.eval_per_category)  # fmt: skip
            finally:
                net.train(was_training)
            scores = {"overall": report.overall, **report.accuracy()}
            if report.text_letters is not None:
                scores["text_letters"] = report.text_letters
            self.last_scores = {k: float(v) for k, v in scores.items() if v is not None}
            seconds = time.perf_counter() - t0
            self.log.log(self.step, {**{f"eval/{k}": v for k, v in self.last_scores.items()},
                                     "cpu_seconds": cpu, "eval_seconds": seconds})  # fmt: skip
            plot_eval_curves(read_metrics(self.log.path), self.run_dir / "eval_curve.png", title=self.cfg.run.name)
            parts = " ".join(f"{k} {v:.2f}" for k, v in self.last_scores.items() if k != "overall")
            self._say(f"eval step {self.step} ({cpu / 60:.1f} CPU-min): overall "
                      f"{self.last_scores.get('overall', float('nan')):.3f} | {parts} ({seconds:.0f} s)")  # fmt: skip
        return self.last_scores

    def sample_grid(self) -> Path | None:
        """A PNG grid from the EMA model (or the model) at the current step; rank 0 only."""
        if not self.dist.is_main or self.cfg.run.num_samples < 1:
            return None
        with self._not_training():
            return self._sample_grid()

    def _sample_grid(self) -> Path | None:
        net = self._eval_net()
        if self.cfg.run.distributed == "fsdp" and self.dist.enabled and self.ema is None:
            return None  # the sharded model needs every rank to run; the EMA copy is whole on each rank
        images = self.task.sample(net, self.cfg.run.num_samples, seed=self.cfg.run.seed, device=self.device)
        if images is None:
            return None
        scale = max(1, 128 // images.shape[-1])
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", scale=scale)

    def _say(self, text: str) -> None:
        tqdm.write(text, file=self.out)  # prints above an active progress bar instead of through it
        self.out.flush()

    def close(self) -> None:
        D.destroy_process_group()


def config_changes(metadata: dict[str, str], cfg: TrainConfig) -> list[str]:
    """``key: old -> new`` for every config value that differs from the one stored with a checkpoint."""
    import json

    if "config" not in metadata:
        return []
    old, new = _flat(json.loads(metadata["config"])), _flat(json.loads(json.dumps(cfg.to_dict())))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _FullWeights(nn.Module):
    """Presents an already-gathered state dict through ``state_dict()`` for ``save_checkpoint``."""

    def __init__(self, weights: dict[str, Tensor]):
        super().__init__()
        self._weights = weights

    def state_dict(self, *args, **kwargs):
        return self._weights


def train(cfg: TrainConfig, *, resume: bool | str = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Build a ``Trainer`` and run it to ``run.steps``."""
    trainer = Trainer(cfg, resume=resume, allow_pickle=allow_pickle)
    try:
        return trainer.fit()
    finally:
        trainer.close()
