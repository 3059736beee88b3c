"""Fake (meta) implementations of the compiled ops, so torch.compile can trace them."""
from __future__ import annotations

import torch

from . import _extension
from ._validation import acc_dtype


def _register_fakes() -> None:
    @torch.library.register_fake("robustft_ext::clip_fwd")
    def _clip_fwd(a, b, scale, bias, diag_offset, symmetric):
        acc = acc_dtype(a.dtype)
        return (a.new_empty((), dtype=acc), a.new_empty((a.shape[0],), dtype=acc),
                a.new_empty((b.shape[0] if symmetric else 0,), dtype=acc))

    @torch.library.register_fake("robustft_ext::clip_bwd")
    def _clip_bwd(grad_loss, a, b, scale, bias, row_lse, col_lse, diag_offset, symmetric):
        acc = acc_dtype(a.dtype)
        return (torch.empty_like(a, memory_format=torch.contiguous_format),
                torch.empty_like(b, memory_format=torch.contiguous_format),
                a.new_empty((), dtype=acc), a.new_empty((), dtype=acc))

    @torch.library.register_fake("robustft_ext::siglip_fwd")
    def _siglip_fwd(a, b, scale, bias, negative_only):
        return a.new_empty((), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake("robustft_ext::siglip_bwd")
    def _siglip_bwd(grad_loss, a, b, scale, bias, negative_only):
        acc = acc_dtype(a.dtype)
        return (torch.empty_like(a, memory_format=torch.contiguous_format),
                torch.empty_like(b, memory_format=torch.contiguous_format),
                a.new_empty((), dtype=acc), a.new_empty((), dtype=acc))

    @torch.library.register_fake("robustft_ext::slerp")
    def _slerp(a, b, lam):
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    @torch.library.register_fake("robustft_ext::slerp_bwd")
    def _slerp_bwd(grad_out, a, b, lam):
        return (torch.empty_like(a, memory_format=torch.contiguous_format),
                torch.empty_like(b, memory_format=torch.contiguous_format))

    @torch.library.register_fake("robustft_ext::m2mix_fwd")
    def _m2mix_fwd(image, text, m2_scale, lam, clip_scale, with_clip):
        acc = acc_dtype(image.dtype)
        return (image.new_empty((), dtype=acc), image.new_empty((), dtype=acc),
                image.new_empty((4 if with_clip else 2, image.shape[0]), dtype=acc))

    @torch.library.register_fake("robustft_ext::m2mix_bwd")
    def _m2mix_bwd(grad_m2, grad_clip, image, text, m2_scale, lam, clip_scale, lse, with_clip):
        acc = acc_dtype(image.dtype)
        return (torch.empty_like(image, memory_format=torch.contiguous_format),
                torch.empty_like(text, memory_format=torch.contiguous_format),
                image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))

    @torch.library.register_fake("robustft_ext::dive_fwd")
    def _dive_fwd(fi, ft, pi, pt, center):
        acc = acc_dtype(fi.dtype)
        return (fi.new_empty((), dtype=acc), fi.new_empty((), dtype=acc),
                fi.new_empty((fi.shape[1],), dtype=acc))

    @torch.library.register_fake("robustft_ext::dive_bwd")
    def _dive_bwd(grad_avl, grad_pvl, fi, ft, pi, pt, center):
        return (torch.empty_like(fi, memory_format=torch.contiguous_format),
                torch.empty_like(ft, memory_format=torch.contiguous_format))

    @torch.library.register_fake("robustft_ext::lipsum_fwd")
    def _lipsum_fwd(image_ft, image_pre, texts, scale):
        return image_ft.new_empty((), dtype=acc_dtype(image_ft.dtype))

    @torch.library.register_fake("robustft_ext::lipsum_bwd")
    def _lipsum_bwd(grad_loss, image_ft, image_pre, texts, scale):
        return torch.empty_like(image_ft, memory_format=torch.contiguous_format)

    @torch.library.register_fake("robustft_ext::robust_step_fwd")
    def _robust_step_fwd(image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
                         lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt, center):
        batch = with_m2 or with_clip or image_pre is not None or lipsum_texts is not None
        ref = image if batch else rfi
        acc = acc_dtype(ref.dtype)
        n = image.shape[0] if batch else 0
        return (ref.new_empty((5,), dtype=acc),
                ref.new_empty((rfi.shape[1] if rfi is not None else 0,), dtype=acc),
                ref.new_empty((4, n), dtype=acc))

    @torch.library.register_fake("robustft_ext::robust_step_bwd")
    def _robust_step_bwd(grad_terms, image, text, clip_scale, m2_scale, lam, with_m2, with_clip,
                         image_pre, lipsum_texts, lipsum_scale, rfi, rft, rpi, rpt, center, lse):
        batch = with_m2 or with_clip or image_pre is not None or lipsum_texts is not None
        ref = image if batch else rfi
        acc = acc_dtype(ref.dtype)
        n = image.shape[0] if batch else 0
        d = ref.shape[1]
        n_ref = rfi.shape[0] if rfi is not None else 0
        return (ref.new_empty((n, d)), ref.new_empty((n, d)), ref.new_empty((), dtype=acc),
                ref.new_empty((), dtype=acc), ref.new_empty((n_ref, d)), ref.new_empty((n_ref, d)))


if _extension._C is not None:
    _register_fakes()
