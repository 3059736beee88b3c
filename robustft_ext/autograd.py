"""One autograd Function per loss over the fused backends' forward and backward ops."""
from __future__ import annotations

import torch

from .backends import fused_ops


class ClipLossFunction(torch.autograd.Function):
    """CLIP loss on a fused backend; saves only the O(n) row/column log-sum-exp."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, diag_offset: int, symmetric: bool, backend: str):
        a, b = a.contiguous(), b.contiguous()
        loss, row_lse, col_lse = fused_ops(backend).clip_fwd(a, b, scale, bias, diag_offset, symmetric)
        ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
        ctx.diag_offset, ctx.symmetric, ctx.backend = diag_offset, symmetric, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
        ga, gb, gs, gbias = fused_ops(ctx.backend).clip_bwd(
            grad_loss.contiguous(), a, b, scale, bias, row_lse, col_lse, ctx.diag_offset,
            ctx.symmetric)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gbias if need[3] else None, None, None, None)


class SigLipLossFunction(torch.autograd.Function):
    """SigLIP loss on a fused backend; saves only the inputs."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, negative_only: bool, backend: str):
        a, b = a.contiguous(), b.contiguous()
        loss = fused_ops(backend).siglip_fwd(a, b, scale, bias, negative_only)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.negative_only, ctx.backend = negative_only, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, scale, bias = ctx.saved_tensors
        ga, gb, gs, gbias = fused_ops(ctx.backend).siglip_bwd(
            grad_loss.contiguous(), a, b, scale, bias, ctx.negative_only)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gbias if need[3] else None, None, None)
