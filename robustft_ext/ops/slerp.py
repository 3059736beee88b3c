"""slerp: the row-wise geodesic mix of m^2-mix as a public function, its autograd Function over
the fused backends' slerp ops, and the fakes of those ops (csrc/step_ops.h holds their C++
bodies; docs/maths.md, section 3)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import Scalar, acc_dtype, check_lam, pair_inputs
from ._fake import like


class SlerpFunction(torch.autograd.Function):
    """Row-wise slerp(a, b; lam) on a fused backend (the O(n D) mix, with its explicit
    backward: autograd through arccos would give inf * 0 at identical rows)."""

    @staticmethod
    def forward(ctx, a, b, lam, backend: str):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b, lam)
        ctx.backend = backend
        return backends.fused_ops(backend).slerp(a, b, lam)

    @staticmethod
    def backward(ctx, grad):
        a, b, lam = ctx.saved_tensors
        ga, gb = backends.fused_ops(ctx.backend).slerp_bwd(grad.contiguous(), a, b, lam)
        need = ctx.needs_input_grad
        return ga if need[0] else None, gb if need[1] else None, None, None


def slerp(a: Tensor, b: Tensor, lam: Scalar, *, backend: str | None = None) -> Tensor:
    """Row-wise spherical interpolation slerp(a_i, b_i; lam) of matched [N, D] unit rows.

    lam weights a (lam = 1 gives a, 0 gives b); computed in float64 and returned in the
    inputs' dtype, with gradients to a and b. Stable where the paper's formula divides by
    zero: identical rows use the small-angle limit, opposite rows are clamped
    (docs/maths.md, section 3.2).
    """
    x = pair_inputs(a, b, 1.0, names=("a", "b"))
    lam_t = check_lam(lam, x.a.device, acc_dtype(x.a.dtype))
    return backends.dispatch(backend, x.a,
                             reference=lambda: reference.slerp(x.a, x.b, lam_t),
                             fused=lambda name: SlerpFunction.apply(x.a, x.b, lam_t, name))


# ---- The fakes of the slerp ops (schemas: csrc/schemas.cpp) -------------------------------
@_extension.register_fake("slerp")
def _slerp_fake(a, b, lam):
    return like(a)


@_extension.register_fake("slerp_bwd")
def _slerp_bwd_fake(grad_out, a, b, lam):
    """(grad_a, grad_b)."""
    return like(a), like(b)
