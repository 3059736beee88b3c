"""A whole robust fine-tuning step in one pass (CLIP, m^2-mix, Lipsum-FT and DiVE together):
the step ops' arguments (StepArgs), the autograd Function over the fused backends'
robust_step ops, and the fakes of those ops (csrc/step_ops.h holds their C++ bodies;
docs/maths.md, section 9). RobustFTLoss (robustft_ext.modules.robust_ft) is its public face."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _extension, backends
from ._fake import acc_empty, scalar
from .m2mix import carry_fakes, kept_entries, kept_shape, step_views


class StepArgs(NamedTuple):
    """The arguments of the robust_step ops, in their schema's order (the C++ twin is
    csrc/step_args.h). A term is on when its inputs are given: CLIP (with_clip) and m^2
    (with_m2, m2_scale, lam) on image and text; Lipsum-FT with image_pre and lipsum_texts at
    lipsum_scale; DiVE with the four ref_* features and center. Scalars are 0-d tensors of the
    accumulation dtype (zeros where their term is off)."""

    image: Tensor
    text: Tensor
    clip_scale: Tensor
    m2_scale: Tensor
    lam: Tensor
    with_m2: bool
    with_clip: bool
    image_pre: Optional[Tensor]
    lipsum_texts: Optional[Tensor]
    lipsum_scale: Tensor
    ref_image_ft: Optional[Tensor]
    ref_text_ft: Optional[Tensor]
    ref_image_pre: Optional[Tensor]
    ref_text_pre: Optional[Tensor]
    center: Optional[Tensor]

    def contiguous(self) -> StepArgs:
        return StepArgs(*(t.contiguous() if isinstance(t, Tensor) and t.dim() > 0 else t
                          for t in self))

    @property
    def with_batch(self) -> bool:
        """Whether a term runs on the training batch (else DiVE alone, on its reference rows)."""
        return (self.with_m2 or self.with_clip or self.image_pre is not None
                or self.lipsum_texts is not None)

    @property
    def views(self) -> int:
        """The n x n dot-product views of the tiles (A and B with m^2, C with CLIP)."""
        return step_views(self.with_m2, self.with_clip)


# The fields that receive gradients, as robust_step_bwd returns them.
_GRAD_FIELDS = ("image", "text", "clip_scale", "m2_scale", "ref_image_ft", "ref_text_ft")


class RobustStepFunction(torch.autograd.Function):
    """Every term of a robust fine-tuning step from one fused pass: apply(backend, grad_enabled,
    *StepArgs) returns (terms [5] = clip, m2, lipsum, avl, pvl; diff_mean [D or 0]).

    On the native CPU within the workspace limit the forward keeps the tiles' products for the
    backward (in eager mode only, as M2MixFunction)."""

    @staticmethod
    def forward(ctx, backend: str, grad_enabled: bool, *fields):
        args = StepArgs(*fields).contiguous()
        ops = backends.fused_ops(backend)
        ctx.kept = ctx.carried = None
        if args.views and not torch.compiler.is_compiling() and backends.keeps_products(
                ctx, backend, grad_enabled, args.image,
                lambda: kept_entries(args.image.shape[0], args.image.dtype, args.with_m2,
                                     args.with_clip)):
            terms, diff_mean, lse, ctx.kept, ctx.carried = ops.robust_step_fwd_keep(*args)
        else:
            terms, diff_mean, lse = ops.robust_step_fwd(*args)
        # Which fields are tensors (the absent optional ones are None), to rebuild StepArgs.
        ctx.present = [isinstance(t, Tensor) for t in args]
        ctx.flags = [t for t in args if not isinstance(t, Tensor)]
        ctx.save_for_backward(*(t for t in args if isinstance(t, Tensor)), lse)
        ctx.backend = backend
        ctx.mark_non_differentiable(diff_mean)
        return terms, diff_mean

    @staticmethod
    def backward(ctx, grad_terms, _grad_mean):
        *tensors, lse = ctx.saved_tensors
        tensors, flags = iter(tensors), iter(ctx.flags)
        args = StepArgs(*(next(tensors) if present else next(flags) for present in ctx.present))
        ops = backends.fused_ops(ctx.backend)
        # (A second backward, retain_graph, recomputes.)
        kept, carried, ctx.kept, ctx.carried = ctx.kept, ctx.carried, None, None
        if kept is not None:
            grads = ops.robust_step_bwd_kept(grad_terms.contiguous(), *args, lse, kept, carried)
        else:
            grads = ops.robust_step_bwd(grad_terms.contiguous(), *args, lse)
        by_field = dict(zip(_GRAD_FIELDS, grads))
        need = ctx.needs_input_grad[2:]
        return (None, None, *(by_field.get(name) if need[i] else None
                              for i, name in enumerate(StepArgs._fields)))


# ---- The fakes of the robust_step ops (schemas: csrc/schemas.cpp, csrc/step_args.h) -------
def _batch_rows(args: StepArgs) -> tuple[Tensor, int]:
    """(the tensor that sets the dtype and D, the training batch size)."""
    return (args.image, args.image.shape[0]) if args.with_batch else (args.ref_image_ft, 0)


@_extension.register_fake("robust_step_fwd")
def _robust_step_fwd_fake(*fields):
    """(terms [5], diff_mean [D or 0], lse [4, n])."""
    args = StepArgs(*fields)
    ref, n = _batch_rows(args)
    d = args.ref_image_ft.shape[1] if args.ref_image_ft is not None else 0
    return acc_empty(ref, 5), acc_empty(ref, d), acc_empty(ref, 4, n)


@_extension.register_fake("robust_step_bwd")
def _robust_step_bwd_fake(grad_terms, *fields_and_lse):
    """(grad_image, grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft,
    grad_ref_text_ft ([0, D] without DiVE))."""
    args = StepArgs(*fields_and_lse[:len(StepArgs._fields)])
    ref, n = _batch_rows(args)
    d = ref.shape[1]
    n_ref = args.ref_image_ft.shape[0] if args.ref_image_ft is not None else 0
    return (ref.new_empty((n, d)), ref.new_empty((n, d)), scalar(ref), scalar(ref),
            ref.new_empty((n_ref, d)), ref.new_empty((n_ref, d)))


# The native CPU's forward that keeps the tiles' products and what else its backward would
# form again, and that backward.
@_extension.register_fake("robust_step_fwd_keep")
def _robust_step_fwd_keep_fake(*fields):
    args = StepArgs(*fields)
    shape = kept_shape(args.image.shape[0], args.image.dtype, args.with_m2, args.with_clip)
    lipsum = args.lipsum_texts if args.image_pre is not None else None
    return (*_robust_step_fwd_fake(*fields), acc_empty(args.image, *shape),
            carry_fakes(args.image, args.with_m2, args.with_clip, lipsum))


@_extension.register_fake("robust_step_bwd_kept")
def _robust_step_bwd_kept_fake(grad_terms, *fields_lse_kept_carried):
    return _robust_step_bwd_fake(grad_terms, *fields_lse_kept_carried[:-2])
