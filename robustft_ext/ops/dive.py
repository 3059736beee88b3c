"""DiVE: dive_loss and dive_terms, their autograd Function over the fused backends' dive ops,
and the fakes of those ops (csrc/step_ops.h holds their C++ bodies; docs/maths.md, section 4)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import check_dive_inputs
from ._fake import acc_empty, like, scalar


class DiveFunction(torch.autograd.Function):
    """DiVE's (AVL, PVL, diff_mean) on a fused backend; gradients to the fine-tuned features."""

    @staticmethod
    def forward(ctx, fi, ft, pi, pt, center, backend: str):
        fi, ft, pi, pt = (t.contiguous() for t in (fi, ft, pi, pt))
        avl, pvl, diff_mean = backends.fused_ops(backend).dive_fwd(fi, ft, pi, pt, center)
        ctx.save_for_backward(fi, ft, pi, pt, center)
        ctx.backend = backend
        ctx.mark_non_differentiable(diff_mean)
        return avl, pvl, diff_mean

    @staticmethod
    def backward(ctx, grad_avl, grad_pvl, _grad_mean):
        fi, ft, pi, pt, center = ctx.saved_tensors
        zero = torch.zeros((), dtype=center.dtype, device=center.device)
        g_fi, g_ft = backends.fused_ops(ctx.backend).dive_bwd(
            zero if grad_avl is None else grad_avl.contiguous(),
            zero if grad_pvl is None else grad_pvl.contiguous(), fi, ft, pi, pt, center)
        need = ctx.needs_input_grad
        return g_fi if need[0] else None, g_ft if need[1] else None, None, None, None, None


def dive_terms(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
               center: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(AVL, PVL, diff_mean) of DiVE (docs/maths.md, section 4) from one pass; diff_mean [D] =
    mean_j (u_j + v_j) / 2 is detached (the batch mean of the centre update)."""
    fi, ft, pi, pt, c = check_dive_inputs(image_ft, text_ft, image_pre, text_pre, center)
    return backends.dispatch(backend, fi,
                             reference=lambda: reference.dive_terms(fi, ft, pi, pt, c),
                             fused=lambda name: DiveFunction.apply(fi, ft, pi, pt, c, name))


def dive_loss(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
              center: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """DiVE's (AVL, PVL) (docs/maths.md, section 4) on B' reference pairs.

    u = image_ft - image_pre, v = text_ft - text_pre; AVL = mean_j |u_j - m|^2 + |v_j - m|^2,
    PVL = mean_j |u_j - v_j|^2, m = center [D]. Gradients reach image_ft and text_ft only
    (the pre-trained features and the centre are constants). 0-d float32 (float64) results.
    """
    avl, pvl, _ = dive_terms(image_ft, text_ft, image_pre, text_pre, center, backend=backend)
    return avl, pvl


# ---- The fakes of the dive ops (schemas: csrc/schemas.cpp) --------------------------------
@_extension.register_fake("dive_fwd")
def _dive_fwd_fake(fi, ft, pi, pt, center):
    """(AVL, PVL, diff_mean [D])."""
    return scalar(fi), scalar(fi), acc_empty(fi, fi.shape[1])


@_extension.register_fake("dive_bwd")
def _dive_bwd_fake(grad_avl, grad_pvl, fi, ft, pi, pt, center):
    """(grad_image_ft, grad_text_ft)."""
    return like(fi), like(ft)
