"""The native backend's ops (robustft_ext._C, csrc/schemas.cpp), one typed wrapper each, with
its fake (meta) implementation right below it so torch.compile can trace the op.

The wrappers are what `backends.fused_ops("native")` hands to the autograd Functions; the
Triton backend registers ops of the same names and schemas (triton_backend/), so the two are
interchangeable. Outputs: losses and statistics in the accumulation dtype (float64 for float64
inputs, float32 otherwise); feature gradients in the features' dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _extension
from ._validation import acc_dtype


def _fake(name: str) -> Callable:
    """register_fake for robustft_ext::<name> and its twin robustft_cuda_rules::<name> (the
    ops' host code under CUDA's rules, a test hook: csrc/cpu/cuda_rules_cpu.cpp), when the
    compiled ops are loaded."""

    def register(fn: Callable) -> Callable:
        if _extension._C is not None:
            for namespace in ("robustft_ext", "robustft_cuda_rules"):
                torch.library.register_fake(f"{namespace}::{name}")(fn)
        return fn

    return register


def _like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scalar(x: Tensor) -> Tensor:
    return x.new_empty((), dtype=acc_dtype(x.dtype))


def set_workspace_limit(nbytes: int) -> None:
    """Set the byte limit of the backward passes' dlogit workspace (robustft_ext.workspace)."""
    torch.ops.robustft_ext.set_workspace_limit(nbytes)


# ---- CLIP and SigLIP ------------------------------------------------------------------
def clip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
             symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, row_lse [n], col_lse [m if symmetric else 0]) of the CLIP loss of logits
    scale * a b^T + bias, positives at (i, i + diag_offset)."""
    return torch.ops.robustft_ext.clip_fwd.default(a, b, scale, bias, diag_offset, symmetric)


@_fake("clip_fwd")
def _clip_fwd_fake(a, b, scale, bias, diag_offset, symmetric):
    acc = acc_dtype(a.dtype)
    return (_scalar(a), a.new_empty((a.shape[0],), dtype=acc),
            a.new_empty((b.shape[0] if symmetric else 0,), dtype=acc))


def clip_bwd(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
             row_lse: Tensor, col_lse: Tensor, diag_offset: int,
             symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_a, grad_b, grad_scale, grad_bias) of grad_loss * clip loss."""
    return torch.ops.robustft_ext.clip_bwd.default(grad_loss, a, b, scale, bias, row_lse, col_lse,
                                                   diag_offset, symmetric)


@_fake("clip_bwd")
def _clip_bwd_fake(grad_loss, a, b, scale, bias, row_lse, col_lse, diag_offset, symmetric):
    return _like(a), _like(b), _scalar(a), _scalar(a)


def siglip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, negative_only: bool) -> Tensor:
    """The SigLIP loss of logits scale * a b^T + bias (every pair a negative if negative_only)."""
    return torch.ops.robustft_ext.siglip_fwd.default(a, b, scale, bias, negative_only)


@_fake("siglip_fwd")
def _siglip_fwd_fake(a, b, scale, bias, negative_only):
    return _scalar(a)


def siglip_bwd(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
               negative_only: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_a, grad_b, grad_scale, grad_bias) of grad_loss * SigLIP loss."""
    return torch.ops.robustft_ext.siglip_bwd.default(grad_loss, a, b, scale, bias, negative_only)


@_fake("siglip_bwd")
def _siglip_bwd_fake(grad_loss, a, b, scale, bias, negative_only):
    return _like(a), _like(b), _scalar(a), _scalar(a)


# ---- CLIP and SigLIP keeping their dot products (CPU) -----------------------------------
# When gradients will be wanted and the n x m dot products fit the workspace limit, the CPU
# forward keeps them, so that the backward needs no second pass over a b^T (6 n m D FLOPs in
# all instead of 8). The backward overwrites them with the dlogits.
def clip_fwd_keep(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                  symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """clip_fwd's outputs and the dot products a b^T [n, m] (accumulation dtype; CPU)."""
    return torch.ops.robustft_ext.clip_fwd_keep.default(a, b, scale, bias, diag_offset, symmetric)


@_fake("clip_fwd_keep")
def _clip_fwd_keep_fake(a, b, scale, bias, diag_offset, symmetric):
    return (*_clip_fwd_fake(a, b, scale, bias, diag_offset, symmetric),
            a.new_empty((a.shape[0], b.shape[0]), dtype=acc_dtype(a.dtype)))


def clip_bwd_kept(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
                  row_lse: Tensor, col_lse: Tensor, dots: Tensor, diag_offset: int,
                  symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """clip_bwd from the dot products clip_fwd_keep kept, which it overwrites."""
    return torch.ops.robustft_ext.clip_bwd_kept.default(grad_loss, a, b, scale, bias, row_lse,
                                                        col_lse, dots, diag_offset, symmetric)


@_fake("clip_bwd_kept")
def _clip_bwd_kept_fake(grad_loss, a, b, scale, bias, row_lse, col_lse, dots, diag_offset,
                        symmetric):
    return _like(a), _like(b), _scalar(a), _scalar(a)


def siglip_fwd_keep(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
                    negative_only: bool) -> tuple[Tensor, Tensor]:
    """(siglip_fwd's loss, the dot products a b^T [n, m]) (accumulation dtype; CPU)."""
    return torch.ops.robustft_ext.siglip_fwd_keep.default(a, b, scale, bias, negative_only)


@_fake("siglip_fwd_keep")
def _siglip_fwd_keep_fake(a, b, scale, bias, negative_only):
    return _scalar(a), a.new_empty((a.shape[0], b.shape[0]), dtype=acc_dtype(a.dtype))


def siglip_bwd_kept(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
                    dots: Tensor, negative_only: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """siglip_bwd from the dot products siglip_fwd_keep kept, which it overwrites."""
    return torch.ops.robustft_ext.siglip_bwd_kept.default(grad_loss, a, b, scale, bias, dots,
                                                          negative_only)


@_fake("siglip_bwd_kept")
def _siglip_bwd_kept_fake(grad_loss, a, b, scale, bias, dots, negative_only):
    return _like(a), _like(b), _scalar(a), _scalar(a)


# ---- m^2-mix ----------------------------------------------------------------------------
def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """Row-wise slerp(a_p, b_p; lam), lam weighting a (0-d, accumulation dtype)."""
    return torch.ops.robustft_ext.slerp.default(a, b, lam)


@_fake("slerp")
def _slerp_fake(a, b, lam):
    return _like(a)


def slerp_bwd(grad_out: Tensor, a: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of slerp for the upstream gradient grad_out."""
    return torch.ops.robustft_ext.slerp_bwd.default(grad_out, a, b, lam)


@_fake("slerp_bwd")
def _slerp_bwd_fake(grad_out, a, b, lam):
    return _like(a), _like(b)


def m2mix_fwd(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor, clip_scale: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(m2 loss, CLIP loss (0 without), lse [4 or 2, n]) from one pass over the tiles."""
    return torch.ops.robustft_ext.m2mix_fwd.default(image, text, m2_scale, lam, clip_scale,
                                                    with_clip)


@_fake("m2mix_fwd")
def _m2mix_fwd_fake(image, text, m2_scale, lam, clip_scale, with_clip):
    return (_scalar(image), _scalar(image),
            image.new_empty((4 if with_clip else 2, image.shape[0]), dtype=acc_dtype(image.dtype)))


def m2mix_bwd(grad_m2: Tensor, grad_clip: Tensor, image: Tensor, text: Tensor, m2_scale: Tensor,
              lam: Tensor, clip_scale: Tensor, lse: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_image, grad_text, grad_m2_scale, grad_clip_scale)."""
    return torch.ops.robustft_ext.m2mix_bwd.default(grad_m2, grad_clip, image, text, m2_scale,
                                                    lam, clip_scale, lse, with_clip)


@_fake("m2mix_bwd")
def _m2mix_bwd_fake(grad_m2, grad_clip, image, text, m2_scale, lam, clip_scale, lse, with_clip):
    return _like(image), _like(text), _scalar(image), _scalar(image)


# ---- DiVE and Lipsum-FT -----------------------------------------------------------------
def dive_fwd(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
             center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(AVL, PVL, diff_mean [D]) of the DiVE terms on a reference batch."""
    return torch.ops.robustft_ext.dive_fwd.default(image_ft, text_ft, image_pre, text_pre, center)


@_fake("dive_fwd")
def _dive_fwd_fake(fi, ft, pi, pt, center):
    return _scalar(fi), _scalar(fi), fi.new_empty((fi.shape[1],), dtype=acc_dtype(fi.dtype))


def dive_bwd(grad_avl: Tensor, grad_pvl: Tensor, image_ft: Tensor, text_ft: Tensor,
             image_pre: Tensor, text_pre: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_image_ft, grad_text_ft)."""
    return torch.ops.robustft_ext.dive_bwd.default(grad_avl, grad_pvl, image_ft, text_ft,
                                                   image_pre, text_pre, center)


@_fake("dive_bwd")
def _dive_bwd_fake(grad_avl, grad_pvl, fi, ft, pi, pt, center):
    return _like(fi), _like(ft)


def lipsum_fwd(image_ft: Tensor, image_pre: Tensor, texts: Tensor, scale: Tensor) -> Tensor:
    """The Lipsum-FT regulariser |s0 (F - F0) G^T|_F^2 / (2 K B)."""
    return torch.ops.robustft_ext.lipsum_fwd.default(image_ft, image_pre, texts, scale)


@_fake("lipsum_fwd")
def _lipsum_fwd_fake(image_ft, image_pre, texts, scale):
    return _scalar(image_ft)


def lipsum_bwd(grad_loss: Tensor, image_ft: Tensor, image_pre: Tensor, texts: Tensor,
               scale: Tensor) -> Tensor:
    """grad_image_ft of grad_loss * the Lipsum-FT regulariser."""
    return torch.ops.robustft_ext.lipsum_bwd.default(grad_loss, image_ft, image_pre, texts, scale)


@_fake("lipsum_bwd")
def _lipsum_bwd_fake(grad_loss, image_ft, image_pre, texts, scale):
    return _like(image_ft)


# ---- A whole step -----------------------------------------------------------------------
def robust_step_fwd(image: Tensor, text: Tensor, clip_scale: Tensor, m2_scale: Tensor, lam: Tensor,
                    with_m2: bool, with_clip: bool, image_pre: Optional[Tensor],
                    lipsum_texts: Optional[Tensor], lipsum_scale: Tensor,
                    ref_image_ft: Optional[Tensor], ref_text_ft: Optional[Tensor],
                    ref_image_pre: Optional[Tensor], ref_text_pre: Optional[Tensor],
                    center: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(terms [5] = clip, m2, lipsum, avl, pvl; diff_mean [D or 0]; lse [4, n]) of one step."""
    return torch.ops.robustft_ext.robust_step_fwd.default(
        image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre, lipsum_texts,
        lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center)


def _step_rows(image, with_m2, with_clip, image_pre, lipsum_texts, ref_image_ft):
    """(the tensor that sets the dtype and D, the training batch size)."""
    batch = with_m2 or with_clip or image_pre is not None or lipsum_texts is not None
    return (image if batch else ref_image_ft), (image.shape[0] if batch else 0)


@_fake("robust_step_fwd")
def _robust_step_fwd_fake(image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
                          lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt, center):
    ref, n = _step_rows(image, with_m2, with_clip, image_pre, lipsum_texts, rfi)
    acc = acc_dtype(ref.dtype)
    return (ref.new_empty((5,), dtype=acc),
            ref.new_empty((rfi.shape[1] if rfi is not None else 0,), dtype=acc),
            ref.new_empty((4, n), dtype=acc))


def robust_step_bwd(grad_terms: Tensor, image: Tensor, text: Tensor, clip_scale: Tensor,
                    m2_scale: Tensor, lam: Tensor, with_m2: bool, with_clip: bool,
                    image_pre: Optional[Tensor], lipsum_texts: Optional[Tensor],
                    lipsum_scale: Tensor, ref_image_ft: Optional[Tensor],
                    ref_text_ft: Optional[Tensor], ref_image_pre: Optional[Tensor],
                    ref_text_pre: Optional[Tensor], center: Optional[Tensor],
                    lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_image, grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft,
    grad_ref_text_ft) of sum_i grad_terms[i] * terms[i]."""
    return torch.ops.robustft_ext.robust_step_bwd.default(
        grad_terms, image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
        lipsum_texts, lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center,
        lse)


@_fake("robust_step_bwd")
def _robust_step_bwd_fake(grad_terms, image, text, clip_scale, m2_scale, lam, with_m2, with_clip,
                          image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt, center, lse):
    ref, n = _step_rows(image, with_m2, with_clip, image_pre, lipsum_texts, rfi)
    d = ref.shape[1]
    n_ref = rfi.shape[0] if rfi is not None else 0
    return (ref.new_empty((n, d)), ref.new_empty((n, d)), _scalar(ref), _scalar(ref),
            ref.new_empty((n_ref, d)), ref.new_empty((n_ref, d)))


def robust_step_fwd_keep(image: Tensor, text: Tensor, clip_scale: Tensor, m2_scale: Tensor,
                         lam: Tensor, with_m2: bool, with_clip: bool, image_pre: Optional[Tensor],
                         lipsum_texts: Optional[Tensor], lipsum_scale: Tensor,
                         ref_image_ft: Optional[Tensor], ref_text_ft: Optional[Tensor],
                         ref_image_pre: Optional[Tensor], ref_text_pre: Optional[Tensor],
                         center: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """robust_step_fwd's outputs and the tiles' dot products [V, n, n] (V = 2 with m^2, + 1 with
    CLIP; accumulation dtype; CPU, within the workspace limit)."""
    return torch.ops.robustft_ext.robust_step_fwd_keep.default(
        image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre, lipsum_texts,
        lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center)


@_fake("robust_step_fwd_keep")
def _robust_step_fwd_keep_fake(image, text, clip_scale, m2_scale, lam, with_m2, with_clip,
                               image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt, center):
    n = image.shape[0]
    views = 2 * with_m2 + with_clip
    return (*_robust_step_fwd_fake(image, text, clip_scale, m2_scale, lam, with_m2, with_clip,
                                   image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt,
                                   center),
            image.new_empty((views, n, n), dtype=acc_dtype(image.dtype)))


def robust_step_bwd_kept(grad_terms: Tensor, image: Tensor, text: Tensor, clip_scale: Tensor,
                         m2_scale: Tensor, lam: Tensor, with_m2: bool, with_clip: bool,
                         image_pre: Optional[Tensor], lipsum_texts: Optional[Tensor],
                         lipsum_scale: Tensor, ref_image_ft: Optional[Tensor],
                         ref_text_ft: Optional[Tensor], ref_image_pre: Optional[Tensor],
                         ref_text_pre: Optional[Tensor], center: Optional[Tensor], lse: Tensor,
                         kept: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """robust_step_bwd from the dot products robust_step_fwd_keep kept, which it overwrites."""
    return torch.ops.robustft_ext.robust_step_bwd_kept.default(
        grad_terms, image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
        lipsum_texts, lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center,
        lse, kept)


@_fake("robust_step_bwd_kept")
def _robust_step_bwd_kept_fake(grad_terms, image, text, clip_scale, m2_scale, lam, with_m2,
                               with_clip, image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi,
                               rpt, center, lse, kept):
    return _robust_step_bwd_fake(grad_terms, image, text, clip_scale, m2_scale, lam, with_m2,
                                 with_clip, image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi,
                                 rpt, center, lse)
