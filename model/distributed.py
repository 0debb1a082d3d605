"""Data-parallel training with PyTorch's own DDP, started by torchrun.

    torchrun --nproc_per_node=8 train.py --config configs/gpt2_124m.toml

torchrun starts one process per device and tells each who it is through environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without them this is
a single process and nothing here does any communication. Every process holds a full
copy of the model, reads its own share of each batch, and DDP averages the gradients
across processes during backward, so all copies take the same optimiser step.
CUDA devices talk over NCCL, CPU processes over gloo.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.device import resolve_device
from model.errors import UserError


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the processes of one training run."""

    rank: int = 0  # 0 .. world_size - 1; rank 0 alone writes checkpoints, logs and the progress bar
    local_rank: int = 0  # rank among the processes of this machine: picks the GPU
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree_max(self, values: list[float], device: torch.device) -> list[float]:
        """Every process gets the element-wise maximum over all processes (itself when alone)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all processes (in place; the tensor itself when alone)."""
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def from_environment() -> Distributed:
    """Read torchrun's variables; a plain ``python train.py`` gives a single process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    return Distributed(rank, local_rank, world_size)


def device_for_process(requested: str, ddp: Distributed) -> torch.device:
    """The device this process trains on: ``requested`` alone, or under torchrun the
    GPU numbered LOCAL_RANK (NCCL) or the CPU (gloo)."""
    if not ddp.enabled:
        return resolve_device(requested)
    wants_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise UserError(
                f"torchrun started {ddp.world_size} processes for device {requested!r}, but this machine has no "
                "usable CUDA GPU; use device=cpu to train on the CPU with gloo"
            )
        if ddp.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun process with LOCAL_RANK {ddp.local_rank} has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}; use --nproc_per_node={torch.cuda.device_count()} or fewer"
            )
        return torch.device("cuda", ddp.local_rank)
    if requested not in ("auto", "cpu"):
        raise UserError(f"under torchrun the device must be cuda or cpu, got {requested!r}")
    return torch.device("cpu")


def start(ddp: Distributed, device: torch.device) -> None:
    """Join the process group (a no-op for a single process)."""
    if not ddp.enabled:
        return
    # DDP imports torch.distributed.nn on first use, and its functions take group=group.WORLD
    # as a default argument. Imported after the group exists, they would hold the group for
    # the life of the process: destroy_process_group could not free it, gloo's worker threads
    # would outlive the interpreter, and one still dropping a tensor at exit aborts the process.
    import torch.distributed.nn  # noqa: F401  (imported while there is no group: the defaults are None)

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def stop(ddp: Distributed) -> None:
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gradient_sync(model: torch.nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients during every backward pass unless told not to. With
    gradient accumulation only the last micro-step's backward needs it (the earlier ones
    just add into .grad), so the others run under ``no_sync`` and skip the communication."""
    if last_micro_step or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
