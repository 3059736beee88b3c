"""CLIP (InfoNCE): clip_loss and clip_rows_loss, their autograd Function over the fused
backends' clip ops, and the fakes of those ops (csrc/contrastive_ops.h holds their C++ bodies;
docs/maths.md, section 1)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import PairInputs, Scalar, pair_inputs
from ._fake import acc_empty, like, scalar


class ClipLossFunction(torch.autograd.Function):
    """CLIP loss on a fused backend; saves the O(n) row/column log-sum-exp (and, on the native
    CPU within the workspace limit, the dot products: backends.keeps_products)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, diag_offset: int, symmetric: bool, backend: str,
                grad_enabled: bool):
        a, b = a.contiguous(), b.contiguous()
        ops = backends.fused_ops(backend)
        dots = None
        if backends.keeps_products(ctx, backend, grad_enabled, a, a.shape[0] * b.shape[0]):
            loss, row_lse, col_lse, dots = ops.clip_fwd_keep(a, b, scale, bias, diag_offset,
                                                             symmetric)
        else:
            loss, row_lse, col_lse = ops.clip_fwd(a, b, scale, bias, diag_offset, symmetric)
        ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse, dots)
        ctx.diag_offset, ctx.symmetric, ctx.backend = diag_offset, symmetric, backend
        ctx.dots_used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, scale, bias, row_lse, col_lse, dots = ctx.saved_tensors
        ops = backends.fused_ops(ctx.backend)
        args = (grad_loss.contiguous(), a, b, scale, bias, row_lse, col_lse)
        # The kept products become the dlogits: a second backward (retain_graph) recomputes.
        if dots is not None and not ctx.dots_used:
            ctx.dots_used = True
            ga, gb, gs, gbias = ops.clip_bwd_kept(*args, dots, ctx.diag_offset, ctx.symmetric)
        else:
            ga, gb, gs, gbias = ops.clip_bwd(*args, ctx.diag_offset, ctx.symmetric)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gbias if need[3] else None, None, None, None, None)


def _clip(x: PairInputs, diag_offset: int, symmetric: bool, backend: str | None) -> Tensor:
    return backends.dispatch(
        backend, x.a,
        reference=lambda: reference.clip_loss(x.a, x.b, x.scale, x.bias, diag_offset, symmetric),
        fused=lambda name: ClipLossFunction.apply(x.a, x.b, x.scale, x.bias, diag_offset,
                                                  symmetric, name, torch.is_grad_enabled()))


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
              logit_bias: Scalar | None = None, *, backend: str | None = None) -> Tensor:
    """Symmetric CLIP (InfoNCE) loss of matched [N, D] feature rows, as open_clip's ClipLoss.

    logits = logit_scale * image_features @ text_features.T (+ logit_bias); returns the mean of
    the image->text and text->image cross-entropies with positives on the diagonal, as a 0-d
    float32 tensor (float64 for float64 inputs). backend: "reference", "native", "triton" or
    None (automatic, see robustft_ext.backends).
    """
    x = pair_inputs(image_features, text_features, logit_scale, logit_bias)
    return _clip(x, 0, True, backend)


def clip_rows_loss(row_features: Tensor, column_features: Tensor, logit_scale: Scalar,
                   logit_bias: Scalar | None = None, *, diag_offset: int = 0,
                   backend: str | None = None) -> Tensor:
    """One-directional cross-entropy: row i of `row_features` against all [M, D] columns, with
    its positive at column i + diag_offset (open_clip's local_loss uses this per direction)."""
    x = pair_inputs(row_features, column_features, logit_scale, logit_bias,
                    names=("row_features", "column_features"), same_batch=False)
    if not isinstance(diag_offset, int) or diag_offset < 0 or diag_offset + x.a.shape[0] > x.b.shape[0]:
        raise ValueError(f"diag_offset must be an int with 0 <= diag_offset <= "
                         f"{x.b.shape[0] - x.a.shape[0]}, got {diag_offset!r}")
    return _clip(x, diag_offset, False, backend)


# ---- The fakes of the clip ops (schemas: csrc/schemas.cpp) --------------------------------
# Losses and statistics in the accumulation dtype, feature gradients in the features' dtype.
@_extension.register_fake("clip_fwd")
def _clip_fwd_fake(a, b, scale, bias, diag_offset, symmetric):
    """(loss, row_lse [n], col_lse [m if symmetric else 0])."""
    return scalar(a), acc_empty(a, a.shape[0]), acc_empty(a, b.shape[0] if symmetric else 0)


@_extension.register_fake("clip_bwd")
def _clip_bwd_fake(grad_loss, a, b, scale, bias, row_lse, col_lse, diag_offset, symmetric):
    """(grad_a, grad_b, grad_scale, grad_bias)."""
    return like(a), like(b), scalar(a), scalar(a)


# The native CPU's forward that keeps its n x m dot products for the backward (6 n m D FLOPs in
# all instead of 8), and the backward that overwrites them with the dlogits.
@_extension.register_fake("clip_fwd_keep")
def _clip_fwd_keep_fake(a, b, scale, bias, diag_offset, symmetric):
    """clip_fwd's outputs and the dot products a b^T [n, m]."""
    return (*_clip_fwd_fake(a, b, scale, bias, diag_offset, symmetric),
            acc_empty(a, a.shape[0], b.shape[0]))


@_extension.register_fake("clip_bwd_kept")
def _clip_bwd_kept_fake(grad_loss, a, b, scale, bias, row_lse, col_lse, dots, diag_offset,
                        symmetric):
    return _clip_bwd_fake(grad_loss, a, b, scale, bias, row_lse, col_lse, diag_offset, symmetric)
