"""Multi-process training under ``torchrun``: process-group setup, model wrapping, small collectives.

``torchrun --nproc_per_node N -m t2i.cli.main train cfg.yaml`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
training runs in one process and every helper here is a no-op. The backend is gloo on CPU and NCCL on CUDA. DDP is
the default wrapper; ``run.distributed=fsdp`` shards parameters, gradients and optimiser state with FSDP2's
``fully_shard`` (checkpoints then gather full tensors on every rank, and rank 0 writes them).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment variables (a single process when they are unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return DistInfo(rank, world, local)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device asks for cuda but no GPU is visible; use run.device=cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(info: DistInfo, device: torch.device) -> None:
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world, **kwargs)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, kind: str, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP- or FSDP-wrap ``model`` for multi-process training; the bare model in a single process."""
    if not info.enabled:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # shard units: what the model names (``fsdp_units()``, as sd3.5's JointBlock is "a fsdp unit"), else
        # every block held in a ModuleList (the usual transformer / U-Net layout); the root takes the rest
        units = (
            list(model.fsdp_units())
            if hasattr(model, "fsdp_units")
            else [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
        )
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model
    raise ValueError(f"run.distributed must be 'ddp' or 'fsdp', got {kind!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (FSDP2 shards in place, so it is its own network)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, skip_sync: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-batches that are not the last one."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)  # under run.compile: the wrapped DDP module
    if skip_sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def set_fsdp_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's counterpart of ``no_sync``: reduce-scatter gradients only on the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def all_reduce_sum(x: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict: FSDP2's DTensors are gathered, which every rank must call."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if isinstance(v, DTensor) else v
    return out
