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


if _extension._C is not None:
    _register_fakes()
