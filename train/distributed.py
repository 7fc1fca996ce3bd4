"""Process-group set-up for ``torchrun`` (one process per device; gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> DistContext:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else a single process.

    ``device`` defaults to ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank, dist.get_world_size() if dist.is_initialized() else 1, target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_gradients(grads: Sequence[Tensor]) -> list[Tensor]:
    """All-reduce (sum) gradients over the processes, as automl's MirroredStrategy sums the
    replicas' gradients in ``apply_gradients``; identity in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(grads)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
