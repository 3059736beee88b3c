"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
gloo on CPU, nccl on CUDA; one process per device."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_flag: str | None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_flag.startswith("cuda") if device_flag else torch.cuda.is_available()
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    if want_cuda:
        device = torch.device(f"cuda:{local_rank}" if world > 1 or device_flag in (None, "cuda")
                              else device_flag)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The average of a scalar over processes (for logging)."""
    value = value.detach().float().clone()
    if info.distributed:
        dist.all_reduce(value)
        value /= info.world_size
    return value


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
