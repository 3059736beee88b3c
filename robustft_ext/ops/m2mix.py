"""m^2-mix: m2mix_loss and clip_m2mix_loss, their autograd Function over the fused backends'
m2mix ops, and the fakes of those ops (csrc/step_ops.h holds their C++ bodies; docs/maths.md,
section 3)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _extension, backends, reference
from .._validation import PairInputs, Scalar, acc_dtype, check_lam, check_scalar, pair_inputs
from ..step_design import step_design
from ..workspace import workspace_limit
from ._fake import acc_empty, like, scalar


def untied(x: Tensor, other: Tensor) -> Tensor:
    """x, or a differentiable copy of it when it is the very tensor `other`.

    Two inputs of one Function that are the same tensor (the CLIP and m^2 scales by default):
    under torch.compile (AOT autograd, torch 2.11) only one of the two gradients reached it
    (tests/losses/test_m2mix.py::test_torch_compile_fullgraph).
    """
    return x.clone() if x is other else x


def step_views(with_m2: bool, with_clip: bool) -> int:
    """The n x n dot-product views of a step's tiles: A and B with m^2, C with CLIP."""
    return 2 * with_m2 + with_clip


def kept_shape(n: int, dtype: torch.dtype, with_m2: bool, with_clip: bool) -> tuple[int, ...]:
    """The shape of what the native CPU's m2mix / robust_step _keep ops keep for their
    backward: with m^2 under the Gram design (robustft_ext.step_design) the Gram blocks of
    the strips of R rows that fit the workspace limit, packed, [E] (E may be 0: nothing
    fits); otherwise the views' dot products [V, n, n]."""
    if with_m2 and step_design() == "gram":
        _, _, entries = torch.ops.robustft_ext.gram_strips(n, acc_dtype(dtype).itemsize)
        return (entries,)
    n_views = step_views(with_m2, with_clip)
    return (n_views, n, n)


def carry_fakes(image: Tensor, with_m2: bool, with_clip: bool,
                lipsum_texts: Tensor | None = None) -> list[Tensor]:
    """The list `carried` that the native CPU's m2mix / robust_step _keep ops hand their
    backward besides the kept products (csrc/step_ops.h, StepCarry): <I_p, T_p> [n], the slerp
    weights [4, n] float64, the Gram strips' stacked rows [2 n, D] and Lipsum's V [n, K] where
    one chunk of the workspace limit holds it; an entry the step does not form is [0]."""
    n, d = image.shape
    none = acc_empty(image, 0)
    pair = acc_empty(image, n) if with_m2 or with_clip else none
    weights = image.new_empty((4, n), dtype=torch.float64) if with_m2 else none
    stacked = acc_empty(image, 2 * n, d) if with_m2 and step_design() == "gram" else none
    v = none
    if lipsum_texts is not None:
        k = lipsum_texts.shape[0]
        if 0 < n * k * acc_dtype(image.dtype).itemsize <= workspace_limit():
            v = acc_empty(image, n, k)
    return [pair, weights, stacked, v]


def kept_entries(n: int, dtype: torch.dtype, with_m2: bool, with_clip: bool) -> int:
    """How many values the _keep ops would keep (0: nothing the limit allows)."""
    shape = kept_shape(n, dtype, with_m2, with_clip)
    return math.prod(shape)


class M2MixFunction(torch.autograd.Function):
    """m^2-mix loss, and with_clip the CLIP loss of the same batch, from one fused pass.

    Returns (m2_loss, clip_loss); clip_loss is 0 without clip. Saves the inputs and the O(n)
    log-sum-exp statistics; the backward recomputes the mix and the tiles (on the native CPU
    within the workspace limit it takes the tiles' products the forward kept, in eager mode:
    the kept tensor is held on ctx, which it outlives once overwritten, and a traced graph
    could not follow that).
    """

    @staticmethod
    def forward(ctx, image, text, m2_scale, lam, clip_scale, with_clip: bool, backend: str,
                grad_enabled: bool):
        image, text = image.contiguous(), text.contiguous()
        ops = backends.fused_ops(backend)
        ctx.kept = ctx.carried = None
        if not torch.compiler.is_compiling() and backends.keeps_products(
                ctx, backend, grad_enabled, image,
                lambda: kept_entries(image.shape[0], image.dtype, True, with_clip)):
            m2, clip, lse, ctx.kept, ctx.carried = ops.m2mix_fwd_keep(image, text, m2_scale, lam,
                                                                      clip_scale, with_clip)
        else:
            m2, clip, lse = ops.m2mix_fwd(image, text, m2_scale, lam, clip_scale, with_clip)
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
        ops = backends.fused_ops(ctx.backend)
        args = (grad_m2.contiguous(), grad_clip.contiguous(), image, text, m2_scale, lam,
                clip_scale, lse)
        # (A second backward, retain_graph, recomputes.)
        kept, carried, ctx.kept, ctx.carried = ctx.kept, ctx.carried, None, None
        if kept is not None:
            gi, gt, gsm, gsc = ops.m2mix_bwd_kept(*args, kept, carried, ctx.with_clip)
        else:
            gi, gt, gsm, gsc = ops.m2mix_bwd(*args, ctx.with_clip)
        need = ctx.needs_input_grad
        return (gi if need[0] else None, gt if need[1] else None, gsm if need[2] else None,
                None, gsc if need[4] else None, None, None, None)


def _m2(x: PairInputs, lam: Scalar, m2_scale: Tensor, clip_scale: Tensor | None,
        backend: str | None) -> tuple[Tensor, Tensor | None]:
    """(m2_loss, clip_loss or None) of validated inputs."""
    lam_t = check_lam(lam, x.a.device, x.scale.dtype)
    with_clip = clip_scale is not None

    def on_reference():
        m2 = reference.m2mix_loss(x.a, x.b, m2_scale, lam_t)
        return m2, None if clip_scale is None else reference.clip_loss(x.a, x.b, clip_scale, x.bias)

    def fused(name):
        m2, clip = M2MixFunction.apply(
            x.a, x.b, m2_scale, lam_t,
            untied(clip_scale, m2_scale) if with_clip else m2_scale.detach(), with_clip, name,
            torch.is_grad_enabled())
        return m2, (clip if with_clip else None)

    return backends.dispatch(backend, x.a, reference=on_reference, fused=fused)


def m2mix_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
               lam: Scalar, *, backend: str | None = None) -> Tensor:
    """Geodesic multi-modal mixup (m^2-mix) loss of matched [N, D] unit rows (docs/maths.md, 3).

    The negatives off the diagonal are M_j = slerp(image_j, text_j; lam) (lam = 1 gives the
    image, 0 the text), the true pair stays on the diagonal; returns
    1/2 [CE_rows(s I M^T) + CE_rows(s T M^T)] as a 0-d float32 tensor (float64 for float64
    inputs). Gradients reach both features through the slerp and logit_scale; lam (a float or
    0-d tensor in [0, 1]) gets none. Stable for identical or opposite rows.
    """
    x = pair_inputs(image_features, text_features, logit_scale)
    return _m2(x, lam, x.scale, None, backend)[0]


def clip_m2mix_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                    lam: Scalar, *, m2_logit_scale: Scalar | None = None,
                    backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(CLIP loss, m^2-mix loss) of one batch from one fused pass over the similarity tiles.

    The CLIP term uses logit_scale, the m^2 term m2_logit_scale (default: logit_scale; the
    paper's code uses 100 and 1/0.07). Each value and gradient equals that of clip_loss and
    m2mix_loss called separately; weight and add them as the objective needs.
    """
    x = pair_inputs(image_features, text_features, logit_scale)
    m2_scale = x.scale if m2_logit_scale is None else check_scalar(
        m2_logit_scale, "m2_logit_scale", x.a.device, x.scale.dtype)
    m2, clip = _m2(x, lam, m2_scale, x.scale, backend)
    return clip, m2


# ---- The fakes of the m2mix ops (schemas: csrc/schemas.cpp) -------------------------------
@_extension.register_fake("m2mix_fwd")
def _m2mix_fwd_fake(image, text, m2_scale, lam, clip_scale, with_clip):
    """(m2 loss, CLIP loss (0 without), lse [4 or 2, n])."""
    return scalar(image), scalar(image), acc_empty(image, 4 if with_clip else 2, image.shape[0])


@_extension.register_fake("m2mix_bwd")
def _m2mix_bwd_fake(grad_m2, grad_clip, image, text, m2_scale, lam, clip_scale, lse, with_clip):
    """(grad_image, grad_text, grad_m2_scale, grad_clip_scale)."""
    return like(image), like(text), scalar(image), scalar(image)


# The native CPU's forward that keeps the tiles' products and what else its backward would
# form again, and that backward.
@_extension.register_fake("m2mix_fwd_keep")
def _m2mix_fwd_keep_fake(image, text, m2_scale, lam, clip_scale, with_clip):
    return (*_m2mix_fwd_fake(image, text, m2_scale, lam, clip_scale, with_clip),
            acc_empty(image, *kept_shape(image.shape[0], image.dtype, True, with_clip)),
            carry_fakes(image, True, with_clip))


@_extension.register_fake("m2mix_bwd_kept")
def _m2mix_bwd_kept_fake(grad_m2, grad_clip, image, text, m2_scale, lam, clip_scale, lse, kept,
                         carried, with_clip):
    return _m2mix_bwd_fake(grad_m2, grad_clip, image, text, m2_scale, lam, clip_scale, lse,
                           with_clip)
