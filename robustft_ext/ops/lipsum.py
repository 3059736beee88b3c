"""Lipsum-FT: lipsum_loss, its autograd Function over the fused backends' lipsum ops, and the
fakes of those ops (csrc/step_ops.h holds their C++ bodies; docs/maths.md, section 5)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import Scalar, acc_dtype, check_lipsum_inputs, check_scalar
from ._fake import like, scalar


class LipsumFunction(torch.autograd.Function):
    """The Lipsum-FT regulariser on a fused backend; gradient to the fine-tuned features."""

    @staticmethod
    def forward(ctx, image_ft, image_pre, texts, scale, backend: str):
        image_ft, image_pre, texts = image_ft.contiguous(), image_pre.contiguous(), texts.contiguous()
        ctx.save_for_backward(image_ft, image_pre, texts, scale)
        ctx.backend = backend
        return backends.fused_ops(backend).lipsum_fwd(image_ft, image_pre, texts, scale)

    @staticmethod
    def backward(ctx, grad):
        image_ft, image_pre, texts, scale = ctx.saved_tensors
        g = backends.fused_ops(ctx.backend).lipsum_bwd(grad.contiguous(), image_ft, image_pre,
                                                       texts, scale)
        return (g if ctx.needs_input_grad[0] else None), None, None, None, None


def lipsum_loss(image_ft: Tensor, image_pre: Tensor, random_text_features: Tensor,
                logit_scale: Scalar, *, backend: str | None = None) -> Tensor:
    """The Lipsum-FT regulariser (docs/maths.md, section 5): R = |V|_F^2 / (2 K B) with
    V = s0 (F - F0) G^T, F = image_ft, F0 = image_pre [B, D], G = random_text_features [K, D],
    s0 = logit_scale (the pre-trained model's multiplier). Gradient to image_ft only."""
    f, f0, g = check_lipsum_inputs(image_ft, image_pre, random_text_features)
    scale = check_scalar(logit_scale, "logit_scale", f.device, acc_dtype(f.dtype)).detach()
    return backends.dispatch(backend, f,
                             reference=lambda: reference.lipsum_loss(f, f0, g, scale),
                             fused=lambda name: LipsumFunction.apply(f, f0, g, scale, name))


# ---- The fakes of the lipsum ops (schemas: csrc/schemas.cpp) ------------------------------
@_extension.register_fake("lipsum_fwd")
def _lipsum_fwd_fake(image_ft, image_pre, texts, scale):
    return scalar(image_ft)


@_extension.register_fake("lipsum_bwd")
def _lipsum_bwd_fake(grad_loss, image_ft, image_pre, texts, scale):
    """grad_image_ft."""
    return like(image_ft)
