"""SigLIP: siglip_loss, its autograd Function over the fused backends' siglip ops, and the fakes
of those ops (csrc/contrastive_ops.h holds their C++ bodies; docs/maths.md, section 2)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import Scalar, pair_inputs
from ._fake import acc_empty, like, scalar


class SigLipLossFunction(torch.autograd.Function):
    """SigLIP loss on a fused backend; saves the inputs (and, on the native CPU within the
    workspace limit, the dot products: backends.keeps_products)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, negative_only: bool, backend: str, grad_enabled: bool):
        a, b = a.contiguous(), b.contiguous()
        ops = backends.fused_ops(backend)
        dots = None
        if backends.keeps_products(ctx, backend, grad_enabled, a, a.shape[0] * b.shape[0]):
            loss, dots = ops.siglip_fwd_keep(a, b, scale, bias, negative_only)
        else:
            loss = ops.siglip_fwd(a, b, scale, bias, negative_only)
        ctx.save_for_backward(a, b, scale, bias, dots)
        ctx.negative_only, ctx.backend = negative_only, backend
        ctx.dots_used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, scale, bias, dots = ctx.saved_tensors
        ops = backends.fused_ops(ctx.backend)
        args = (grad_loss.contiguous(), a, b, scale, bias)
        if dots is not None and not ctx.dots_used:
            ctx.dots_used = True
            ga, gb, gs, gbias = ops.siglip_bwd_kept(*args, dots, ctx.negative_only)
        else:
            ga, gb, gs, gbias = ops.siglip_bwd(*args, ctx.negative_only)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gbias if need[3] else None, None, None, None)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Scalar | None, *, negative_only: bool = False,
                backend: str | None = None) -> Tensor:
    """SigLIP sigmoid loss, as open_clip's SigLipLoss: -(1/N) sum_ij log sigmoid(z_ij S_ij).

    z = +1 on the diagonal and -1 elsewhere; with negative_only=True every pair is a negative
    and text_features may have another batch size (the remote blocks of distributed SigLIP).
    """
    x = pair_inputs(image_features, text_features, logit_scale, logit_bias,
                    same_batch=not negative_only)
    return backends.dispatch(
        backend, x.a,
        reference=lambda: reference.siglip_loss(x.a, x.b, x.scale, x.bias, negative_only),
        fused=lambda name: SigLipLossFunction.apply(x.a, x.b, x.scale, x.bias, negative_only,
                                                    name, torch.is_grad_enabled()))


# ---- The fakes of the siglip ops (schemas: csrc/schemas.cpp) ------------------------------
@_extension.register_fake("siglip_fwd")
def _siglip_fwd_fake(a, b, scale, bias, negative_only):
    return scalar(a)


@_extension.register_fake("siglip_bwd")
def _siglip_bwd_fake(grad_loss, a, b, scale, bias, negative_only):
    """(grad_a, grad_b, grad_scale, grad_bias)."""
    return like(a), like(b), scalar(a), scalar(a)


# The native CPU's forward that keeps its n x m dot products, and the backward that takes them.
@_extension.register_fake("siglip_fwd_keep")
def _siglip_fwd_keep_fake(a, b, scale, bias, negative_only):
    return scalar(a), acc_empty(a, a.shape[0], b.shape[0])


@_extension.register_fake("siglip_bwd_kept")
def _siglip_bwd_kept_fake(grad_loss, a, b, scale, bias, dots, negative_only):
    return _siglip_bwd_fake(grad_loss, a, b, scale, bias, negative_only)
