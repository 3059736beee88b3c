"""Gathering features across torch.distributed ranks with open_clip's semantics.

The differentiable gather is an autograd Function over two c10d collectives: the forward
all-gathers the rows (`all_gather_into_tensor`), the backward reduce-scatters their gradient
(`reduce_scatter_tensor`, summed), so each rank receives the sum over the ranks of its own
shard's gradient. It is not torch's functional autograd all-gather: in torch 2.11 a process
group that has served a functional collective stays alive after `destroy_process_group` (its
gloo worker threads run on), and its C++ teardown then happens during interpreter shutdown,
where it can abort the process. Nor is it `torch.distributed.nn.all_gather`: deprecated, and
`torch.distributed.nn` is a submodule that `import torch` does not load.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

def check_rank(rank: object, world_size: object) -> None:
    """A module's rank and world_size arguments: a positive int and an int in [0, world_size)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def current_world_size() -> int:
    """torch.distributed's world size when a process group is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the ranks of the default process group (x itself on one process)."""
    world = current_world_size()
    if world > 1:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return x


def require_distributed(world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has "
                         f"{dist.get_world_size()} ranks")


class _AllGatherRows(torch.autograd.Function):
    """Every rank's rows of x concatenated by rank; the backward sums the gradient of the
    gathered rows over the ranks and keeps this rank's shard (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # The collective needs a dense gradient; autograd may hand an expanded or strided one.
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
        return out


def all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, differentiable: the backward sums each shard's gradient over the
    ranks and hands it to the rank that owns the shard (a reduce-scatter)."""
    return list(_AllGatherRows.apply(x).chunk(dist.get_world_size()))


def gather_rows(x: torch.Tensor, *, gather_with_grad: bool, put_back: bool, rank: int,
                world_size: int) -> torch.Tensor:
    """The rows of every rank's `x`, concatenated by rank: [world_size * n, ...].

    gather_with_grad=True: a differentiable all-gather. Otherwise a plain all-gather that carries
    no gradient, except through this rank's own shard when `put_back` (the local tensor itself
    takes its place, as open_clip does for local_loss=False).
    """
    require_distributed(world_size)
    if gather_with_grad:
        return torch.cat(all_gather_with_grad(x))
    shards = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous())
    if put_back:
        shards[rank] = x
    return torch.cat(shards)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *,
                    local_loss: bool, gather_with_grad: bool, rank: int,
                    world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip.loss.gather_features (torch.distributed path), batch rows concatenated by rank.

    gather_with_grad=True: a differentiable all-gather. Otherwise the gather carries no gradient
    and, unless local_loss, the local shard is put back so that it does.
    """
    kw = dict(gather_with_grad=gather_with_grad, put_back=not local_loss, rank=rank,
              world_size=world_size)
    return gather_rows(image_features, **kw), gather_rows(text_features, **kw)


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `x` on every rank (a copy; `x` itself is left alone)."""
    out = x.detach().clone().contiguous()
    dist.broadcast(out, src=0)
    return out
