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


class SlerpFunction(torch.autograd.Function):
    """Row-wise slerp(a, b; lam) on a fused backend (the O(n D) mix, with its explicit backward)."""

    @staticmethod
    def forward(ctx, a, b, lam, backend: str):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b, lam)
        ctx.backend = backend
        return fused_ops(backend).slerp(a, b, lam)

    @staticmethod
    def backward(ctx, grad):
        a, b, lam = ctx.saved_tensors
        ga, gb = fused_ops(ctx.backend).slerp_bwd(grad.contiguous(), a, b, lam)
        need = ctx.needs_input_grad
        return ga if need[0] else None, gb if need[1] else None, None, None


class M2MixFunction(torch.autograd.Function):
    """m^2-mix loss, and with_clip the CLIP loss of the same batch, from one fused pass.

    Returns (m2_loss, clip_loss); clip_loss is 0 without clip. Saves the inputs and the O(n)
    log-sum-exp statistics; the backward recomputes the mix and the tiles.
    """

    @staticmethod
    def forward(ctx, image, text, m2_scale, lam, clip_scale, with_clip: bool, backend: str):
        image, text = image.contiguous(), text.contiguous()
        m2, clip, lse = fused_ops(backend).m2mix_fwd(image, text, m2_scale, lam, clip_scale,
                                                     with_clip)
        ctx.save_for_backward(image, text, m2_scale, lam, clip_scale, lse)
        ctx.with_clip, ctx.backend = with_clip, backend
        if not with_clip:
            ctx.mark_non_differentiable(clip)
        return m2, clip

    @staticmethod
    def backward(ctx, grad_m2, grad_clip):
        image, text, m2_scale, lam, clip_scale, lse = ctx.saved_tensors
        if grad_m2 is None:
            grad_m2 = torch.zeros_like(lse[0, 0])
        if grad_clip is None or not ctx.with_clip:
            grad_clip = torch.zeros_like(lse[0, 0])
        gi, gt, gsm, gsc = fused_ops(ctx.backend).m2mix_bwd(
            grad_m2.contiguous(), grad_clip.contiguous(), image, text, m2_scale, lam,
            clip_scale, lse, ctx.with_clip)
        need = ctx.needs_input_grad
        return (gi if need[0] else None, gt if need[1] else None, gsm if need[2] else None,
                None, gsc if need[4] else None, None, None)
