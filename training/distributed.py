"""Process-group setup: one code path for a single process and for ``torchrun --nproc_per_node N``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dfm.errors import DfmError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), else run
    alone on ``device`` (default: CUDA if available, else CPU).

    Under torchrun every rank uses its local GPU when CUDA is available (nccl), else the CPU
    (gloo); a ``device`` of another kind is refused. Idempotent: an already initialised process
    group is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device or pick_device())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank_device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device is not None and device.type != rank_device.type:
        raise DfmError(
            f"--device {device} under torchrun: every rank computes on {rank_device.type} here "
            f"(its local GPU when there is one); drop --device"
        )
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    device = rank_device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)
