"""One autograd Function per loss over the fused backends' forward and backward ops."""
from __future__ import annotations

import torch

from ._validation import acc_dtype
from .backends import fused_ops
from .workspace import workspace_limit


def untied(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x, or a differentiable copy of it when it is the very tensor `other`.

    Two inputs of one Function that are the same tensor (the CLIP and m^2 scales by default):
    under torch.compile (AOT autograd, torch 2.11) only one of the two gradients reached it
    (tests/test_m2mix.py::test_torch_compile_fullgraph).
    """
    return x.clone() if x is other else x


def keeps_dots(ctx, backend: str, grad_enabled: bool, a: torch.Tensor, entries: int) -> bool:
    """Whether a fused forward keeps its dot products (`entries` of them, n x m per product)
    for the backward: the native backend on CPU, when some gradient will be wanted (grad mode
    was on at the call, which forward cannot see, and an input requires grad) and they fit the
    workspace limit. The CPU then runs no second GEMM over the same operands: CLIP 6 n m D
    FLOPs instead of 8."""
    return (backend == "native" and a.device.type == "cpu" and grad_enabled
            and any(ctx.needs_input_grad)
            and entries * acc_dtype(a.dtype).itemsize <= workspace_limit())


class ClipLossFunction(torch.autograd.Function):
    """CLIP loss on a fused backend; saves the O(n) row/column log-sum-exp (and, on CPU within
    the workspace limit, the dot products: keeps_dots)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, diag_offset: int, symmetric: bool, backend: str,
                grad_enabled: bool):
        a, b = a.contiguous(), b.contiguous()
        ops = fused_ops(backend)
        dots = None
        if keeps_dots(ctx, backend, grad_enabled, a, a.shape[0] * b.shape[0]):
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
        ops = fused_ops(ctx.backend)
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


class SigLipLossFunction(torch.autograd.Function):
    """SigLIP loss on a fused backend; saves the inputs (and, on CPU within the workspace
    limit, the dot products: keeps_dots)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, negative_only: bool, backend: str, grad_enabled: bool):
        a, b = a.contiguous(), b.contiguous()
        ops = fused_ops(backend)
        dots = None
        if keeps_dots(ctx, backend, grad_enabled, a, a.shape[0] * b.shape[0]):
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
        ops = fused_ops(ctx.backend)
        args = (grad_loss.contiguous(), a, b, scale, bias)
        if dots is not None and not ctx.dots_used:
            ctx.dots_used = True
            ga, gb, gs, gbias = ops.siglip_bwd_kept(*args, dots, ctx.negative_only)
        else:
            ga, gb, gs, gbias = ops.siglip_bwd(*args, ctx.negative_only)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gbias if need[3] else None, None, None, None)


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


def _keeps_step_dots(ctx, backend: str, grad_enabled: bool, image: torch.Tensor,
                     views: int) -> bool:
    """keeps_dots for a fused step's `views` n x n products (A and B with m^2, C with CLIP);
    eager only: the kept tensor is held on ctx (not saved for backward, which it outlives
    once overwritten), which a traced graph could not follow."""
    n = image.shape[0]
    return (views > 0 and not torch.compiler.is_compiling()
            and keeps_dots(ctx, backend, grad_enabled, image, views * n * n))


class M2MixFunction(torch.autograd.Function):
    """m^2-mix loss, and with_clip the CLIP loss of the same batch, from one fused pass.

    Returns (m2_loss, clip_loss); clip_loss is 0 without clip. Saves the inputs and the O(n)
    log-sum-exp statistics; the backward recomputes the mix and the tiles (on CPU within the
    workspace limit it takes the tiles' products the forward kept: _keeps_step_dots).
    """

    @staticmethod
    def forward(ctx, image, text, m2_scale, lam, clip_scale, with_clip: bool, backend: str,
                grad_enabled: bool):
        image, text = image.contiguous(), text.contiguous()
        ctx.kept = None
        if _keeps_step_dots(ctx, backend, grad_enabled, image, 2 + with_clip):
            # The robust step with only m^2 (and CLIP) on: its lse rows are m2mix_fwd's.
            terms, _, lse, kept = fused_ops(backend).robust_step_fwd_keep(
                image, text, clip_scale, m2_scale, lam, True, with_clip, None, None,
                torch.zeros_like(m2_scale), None, None, None, None, None)
            m2, clip = terms[1].clone(), terms[0].clone()
            lse = lse if with_clip else lse[:2].clone()
            # Not saved for backward: the backward overwrites it (once) and drops it.
            ctx.kept = kept
        else:
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
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) recomputes
        if kept is not None:
            zero = torch.zeros_like(grad_m2)
            grads = torch.stack([grad_clip.reshape(()), grad_m2.reshape(()), zero, zero, zero])
            lse4 = lse if ctx.with_clip else torch.cat([lse, torch.zeros_like(lse)])
            gi, gt, gsc, gsm, _, _ = fused_ops(ctx.backend).robust_step_bwd_kept(
                grads, image, text, clip_scale, m2_scale, lam, True, ctx.with_clip, None, None,
                torch.zeros_like(m2_scale), None, None, None, None, None, lse4, kept)
            need = ctx.needs_input_grad
            return (gi if need[0] else None, gt if need[1] else None, gsm if need[2] else None,
                    None, gsc if need[4] else None, None, None, None)
        gi, gt, gsm, gsc = fused_ops(ctx.backend).m2mix_bwd(
            grad_m2.contiguous(), grad_clip.contiguous(), image, text, m2_scale, lam,
            clip_scale, lse, ctx.with_clip)
        need = ctx.needs_input_grad
        return (gi if need[0] else None, gt if need[1] else None, gsm if need[2] else None,
                None, gsc if need[4] else None, None, None, None)


class DiveFunction(torch.autograd.Function):
    """DiVE's (AVL, PVL, diff_mean) on a fused backend; gradients to the fine-tuned features."""

    @staticmethod
    def forward(ctx, fi, ft, pi, pt, center, backend: str):
        fi, ft, pi, pt = (t.contiguous() for t in (fi, ft, pi, pt))
        avl, pvl, diff_mean = fused_ops(backend).dive_fwd(fi, ft, pi, pt, center)
        ctx.save_for_backward(fi, ft, pi, pt, center)
        ctx.backend = backend
        ctx.mark_non_differentiable(diff_mean)
        return avl, pvl, diff_mean

    @staticmethod
    def backward(ctx, grad_avl, grad_pvl, _grad_mean):
        fi, ft, pi, pt, center = ctx.saved_tensors
        zero = torch.zeros((), dtype=center.dtype, device=center.device)
        g_fi, g_ft = fused_ops(ctx.backend).dive_bwd(
            zero if grad_avl is None else grad_avl.contiguous(),
            zero if grad_pvl is None else grad_pvl.contiguous(), fi, ft, pi, pt, center)
        need = ctx.needs_input_grad
        return g_fi if need[0] else None, g_ft if need[1] else None, None, None, None, None


class LipsumFunction(torch.autograd.Function):
    """The Lipsum-FT regulariser on a fused backend; gradient to the fine-tuned features."""

    @staticmethod
    def forward(ctx, image_ft, image_pre, texts, scale, backend: str):
        image_ft, image_pre, texts = image_ft.contiguous(), image_pre.contiguous(), texts.contiguous()
        ctx.save_for_backward(image_ft, image_pre, texts, scale)
        ctx.backend = backend
        return fused_ops(backend).lipsum_fwd(image_ft, image_pre, texts, scale)

    @staticmethod
    def backward(ctx, grad):
        image_ft, image_pre, texts, scale = ctx.saved_tensors
        g = fused_ops(ctx.backend).lipsum_bwd(grad.contiguous(), image_ft, image_pre, texts, scale)
        return (g if ctx.needs_input_grad[0] else None), None, None, None, None


class RobustStepFunction(torch.autograd.Function):
    """Every term of a robust fine-tuning step (CLIP, m^2-mix, Lipsum-FT, DiVE) from one fused
    pass: returns (terms [5] = clip, m2, lipsum, avl, pvl, diff_mean [D or 0]). Inputs
    after `with_clip` may be None (their terms are then off)."""

    @staticmethod
    def forward(ctx, image, text, clip_scale, m2_scale, lam, with_m2: bool, with_clip: bool,
                image_pre, texts, lipsum_scale, rfi, rft, rpi, rpt, center, backend: str,
                grad_enabled: bool):
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        args = (c(image), c(text), clip_scale, m2_scale, lam, with_m2, with_clip, c(image_pre),
                c(texts), lipsum_scale, c(rfi), c(rft), c(rpi), c(rpt), center)
        ctx.kept = None
        if _keeps_step_dots(ctx, backend, grad_enabled, image, 2 * with_m2 + with_clip):
            terms, diff_mean, lse, kept = fused_ops(backend).robust_step_fwd_keep(*args)
            # Not saved for backward: the backward overwrites it (once) and drops it.
            ctx.kept = kept
        else:
            terms, diff_mean, lse = fused_ops(backend).robust_step_fwd(*args)
        ctx.args_nonlist = (with_m2, with_clip)
        ctx.optional = [t is not None for t in (args[7], args[8], args[10], args[11], args[12],
                                                args[13], args[14])]
        tensors = [args[0], args[1], clip_scale, m2_scale, lam, lipsum_scale, lse]
        tensors += [t for t in (args[7], args[8], args[10], args[11], args[12], args[13], args[14])
                    if t is not None]
        ctx.save_for_backward(*tensors)
        ctx.backend = backend
        ctx.mark_non_differentiable(diff_mean)
        return terms, diff_mean

    @staticmethod
    def backward(ctx, grad_terms, _grad_mean):
        saved = list(ctx.saved_tensors)
        image, text, clip_scale, m2_scale, lam, lipsum_scale, lse = saved[:7]
        rest = iter(saved[7:])
        ip, g, rfi, rft, rpi, rpt, center = (next(rest) if has else None for has in ctx.optional)
        with_m2, with_clip = ctx.args_nonlist
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) recomputes
        args = (grad_terms.contiguous(), image, text, clip_scale, m2_scale, lam, with_m2,
                with_clip, ip, g, lipsum_scale, rfi, rft, rpi, rpt, center, lse)
        if kept is not None:
            gi, gt, gsc, gsm, gfi, gft = fused_ops(ctx.backend).robust_step_bwd_kept(*args, kept)
        else:
            gi, gt, gsc, gsm, gfi, gft = fused_ops(ctx.backend).robust_step_bwd(*args)
        need = ctx.needs_input_grad
        return (gi if need[0] else None, gt if need[1] else None, gsc if need[2] else None,
                gsm if need[3] else None, None, None, None, None, None, None,
                gfi if need[10] else None, gft if need[11] else None, None, None, None, None,
                None)
