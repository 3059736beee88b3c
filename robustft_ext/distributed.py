"""Gathering features across torch.distributed ranks with open_clip's semantics."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _require_distributed(world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has "
                         f"{dist.get_world_size()} ranks")


def all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, differentiable: gradients flow back to the rank that owns each shard."""
    return list(torch.distributed.nn.all_gather(x))


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *,
                    local_loss: bool, gather_with_grad: bool, rank: int,
                    world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip.loss.gather_features (torch.distributed path), batch rows concatenated by rank.

    gather_with_grad=True: a differentiable all-gather. Otherwise the gather carries no gradient
    and, unless local_loss, the local shard is put back so that it does.
    """
    _require_distributed(world_size)
    if gather_with_grad:
        return (torch.cat(all_gather_with_grad(image_features)),
                torch.cat(all_gather_with_grad(text_features)))
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features.contiguous())
    dist.all_gather(texts, text_features.contiguous())
    if not local_loss:
        images[rank] = image_features
        texts[rank] = text_features
    return torch.cat(images), torch.cat(texts)
