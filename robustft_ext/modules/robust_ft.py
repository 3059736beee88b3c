"""RobustFTLoss: every term of a robust fine-tuning step (CLIP/FLYP, m^2-mix, Lipsum-FT, DiVE)
from one module, and on the fused backends from one pass; under torch.distributed with
open_clip's ClipLoss semantics."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import reference
from .._validation import (PairInputs, Scalar, check_dive_inputs, check_lam, check_lipsum_inputs,
                           check_positive_float, check_scalar, check_weight, pair_inputs)
from ..backends import select_backend
from ..distributed import broadcast_from_rank0, check_rank, gather_rows, require_distributed
from ..ops.clip import clip_rows_loss
from ..ops.dive import dive_terms
from ..ops.m2mix import untied
from ..ops.robust_step import RobustStepFunction, StepArgs
from .dive import DiVELoss
from .m2mix import LamSampler

TERMS = ("contrastive_loss", "m2mix_loss", "lipsum_loss", "dive_avl_loss", "dive_pvl_loss")


class _StepInputs(NamedTuple):
    """What one step's pass computes on: the training rows (local, or gathered over the ranks)
    with their scales, and the optional terms' inputs (None: off)."""

    rows: PairInputs
    clip_in_pass: bool
    m2: tuple[torch.Tensor, torch.Tensor] | None     # (m2_scale, lam)
    lipsum: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (image_pre, G, s0)
    dive: tuple[torch.Tensor, ...] | None            # (4 reference features, centre)
    columns: PairInputs | None = None                # local_loss CLIP's gathered columns

    def dive_args(self) -> tuple:
        """(ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center), None when off."""
        return self.dive if self.dive is not None else (None,) * 5


class RobustFTLoss(nn.Module):
    """One module for a robust fine-tuning step (docs/maths.md, sections 1, 3, 4, 5, 6):

        total = clip_weight * CLIP(I, T; logit_scale)                    (FLYP's contrastive loss)
              + m2_weight * m^2(I, T; m2_logit_scale or logit_scale, lam)
              + lipsum_weight * R(I, I_pre, G; pre_logit_scale)
              + dive_weight * (AVL + PVL)(reference batch; centre m)

    I, T: the fine-tuned image and text features of the training batch; I_pre: the pre-trained
    image features of the same images and G the random-text features of the frozen pre-trained
    text encoder (LipsumLoss.random_text_features), pre_logit_scale its logit scale; the DiVE
    terms take the fine-tuned and pre-trained features of the reference batch. A term with
    weight 0 is off (its inputs may be omitted). lam is drawn per call from Beta(m2_alpha,
    m2_alpha) with `generator` unless m2_lam fixes it. The DiVE centre lives in the submodule
    `dive` (a DiVELoss: state_dict key "dive.center"), updated after each training forward.

    On the fused backends every enabled term comes from one pass (robust_step ops): the CLIP
    and mixed-negative similarity tiles, the Lipsum rows and the DiVE rows in one launch per
    pass; its values and gradients equal the sum of the separate functions. forward returns
    the total, or with output_dict=True the weighted enabled terms under the keys of TERMS.

    world_size > 1 (rank, local_loss, gather_with_grad as open_clip's ClipLoss; every rank
    calls forward): when CLIP or m^2 is on, the training features of all ranks are gathered
    and the batch terms are those of the whole global batch:
    - CLIP: local_loss=False, the full loss over the gathered batch, in the same pass as the
      other terms; local_loss=True, this rank's rows against all columns, positives at column
      n * rank + i (clip_rows_loss, beside the pass: the step kernels' CLIP block is square);
    - m^2: over the gathered batch, its mixed negatives from every rank, so the objective does
      not depend on how the batch is split; lam is rank 0's draw, broadcast;
    - Lipsum-FT: over the gathered rows (image_pre gathered too); random_text_features must be
      the same on every rank (draw them from identically seeded generators);
    - DiVE: this rank's reference batch, the centre averaged over the ranks (DiVELoss).
    With Lipsum and/or DiVE alone nothing is gathered: both are means over rows, so each rank's
    local term already averages (over DDP's gradient averaging) to the global batch's.
    With gather_with_grad=True each rank's feature gradient is world_size times the
    single-process gradient of the global batch for every term, which DDP's averaging of
    parameter gradients turns into the single-process step. gather_with_grad=False gathers
    without gradient, this rank's own rows carrying it (for CLIP with local_loss=True only the
    rows, as open_clip).
    """

    def __init__(self, clip_weight: float = 1.0, m2_weight: float = 0.0, dive_weight: float = 0.0,
                 lipsum_weight: float = 0.0, *, m2_alpha: float = 0.5, m2_lam: float | None = None,
                 generator: torch.Generator | None = None, m2_logit_scale: float | None = None,
                 dive_momentum: float = 0.99, dive_center_mode: str = "ema",
                 dive_dim: int | None = None, rank: int = 0, world_size: int = 1,
                 local_loss: bool = False, gather_with_grad: bool = False,
                 backend: str | None = None) -> None:
        super().__init__()
        self.clip_weight = check_weight(clip_weight, "clip_weight")
        self.m2_weight = check_weight(m2_weight, "m2_weight")
        self.dive_weight = check_weight(dive_weight, "dive_weight")
        self.lipsum_weight = check_weight(lipsum_weight, "lipsum_weight")
        if not any((self.clip_weight, self.m2_weight, self.dive_weight, self.lipsum_weight)):
            raise ValueError("every term weight is 0: enable at least one term")
        self.sampler = LamSampler(m2_alpha, m2_lam, generator, names=("m2_alpha", "m2_lam"))
        self.m2_logit_scale = check_positive_float(m2_logit_scale, "m2_logit_scale", optional=True)
        # The DiVE centre and its update rule; its weight is applied here.
        self.dive = DiVELoss(weight=1.0, momentum=dive_momentum, center_mode=dive_center_mode,
                             dim=dive_dim, backend=backend)
        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.local_loss, self.gather_with_grad = bool(local_loss), bool(gather_with_grad)
        self.backend = backend
        # The lam of the last call, as the tensor the step used: read as a float only when
        # asked (a GPU step need not wait for it, a compiled one need not break its graph).
        self._last_lam: torch.Tensor | None = None

    @property
    def last_lam(self) -> float | None:
        """The m^2 mix ratio of the last call (rank 0's under torch.distributed)."""
        return None if self._last_lam is None else float(self._last_lam)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Scalar, *, image_pre: torch.Tensor | None = None,
                random_text_features: torch.Tensor | None = None,
                pre_logit_scale: Scalar | None = None, ref_image_ft: torch.Tensor | None = None,
                ref_text_ft: torch.Tensor | None = None, ref_image_pre: torch.Tensor | None = None,
                ref_text_pre: torch.Tensor | None = None, output_dict: bool = False
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        x = pair_inputs(image_features, text_features, logit_scale)
        if self.world_size > 1:
            require_distributed(self.world_size)
        m2 = self._m2_inputs(x) if self.m2_weight > 0 else None
        lipsum = (self._lipsum_inputs(x, image_pre, random_text_features, pre_logit_scale)
                  if self.lipsum_weight > 0 else None)
        dive, batch_center = None, None
        if self.dive_weight > 0:
            dive, batch_center = self._dive_inputs(x, ref_image_ft, ref_text_ft, ref_image_pre,
                                                   ref_text_pre)
        with_clip = self.clip_weight > 0
        step = _StepInputs(x, with_clip, m2, lipsum, dive)
        gathered = self.world_size > 1 and (with_clip or m2 is not None)
        if gathered:
            step = self._gathered(step)
        name = select_backend(self.backend, x.a.device, x.a.dtype)
        terms, diff_mean = self._terms(name, step)
        if with_clip and not step.clip_in_pass:
            terms[0] = self._local_rows_clip(x, step.columns, name)
        if dive is not None:
            self.dive.update_center(diff_mean, batch_center)
        weights = (self.clip_weight, self.m2_weight, self.lipsum_weight, self.dive_weight,
                   self.dive_weight)
        out = {k: w * t for k, w, t in zip(TERMS, weights, terms) if w > 0}
        if output_dict:
            return out
        return sum(out.values())

    def _m2_inputs(self, x: PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(m2_scale, lam) of this call; lam is rank 0's draw under torch.distributed."""
        device, acc = x.a.device, x.scale.dtype
        lam_t = check_lam(self.sampler.draw(), device, acc)
        if self.world_size > 1:
            lam_t = broadcast_from_rank0(lam_t)
        self._last_lam = lam_t.detach()
        m2_scale = x.scale if self.m2_logit_scale is None else check_scalar(
            self.m2_logit_scale, "m2_logit_scale", device, acc)
        return m2_scale, lam_t

    @staticmethod
    def _lipsum_inputs(x: PairInputs, image_pre, random_text_features, pre_logit_scale):
        missing = [n for n, v in (("image_pre", image_pre),
                                  ("random_text_features", random_text_features),
                                  ("pre_logit_scale", pre_logit_scale)) if v is None]
        if missing:
            raise ValueError(f"lipsum_weight > 0 needs {', '.join(missing)}")
        _, f0, g = check_lipsum_inputs(x.a, image_pre, random_text_features)
        if f0.shape != x.a.shape:
            raise ValueError("image_pre must have image_features' shape")
        s0 = check_scalar(pre_logit_scale, "pre_logit_scale", x.a.device, x.scale.dtype).detach()
        return f0.to(x.a.dtype), g.to(x.a.dtype), s0

    def _dive_inputs(self, x: PairInputs, *refs):
        names = ("ref_image_ft", "ref_text_ft", "ref_image_pre", "ref_text_pre")
        missing = [n for n, v in zip(names, refs) if v is None]
        if missing:
            raise ValueError(f"dive_weight > 0 needs {', '.join(missing)}")
        feats = self.dive._check_inputs(tuple(refs))
        if feats[0].shape[1] != x.a.shape[1] or feats[0].device != x.a.device:
            raise ValueError("the reference batch must have the training batch's feature "
                             f"dim and device: {tuple(feats[0].shape)} on {feats[0].device}")
        center, batch_center = self.dive.center_for_loss(*feats)
        return check_dive_inputs(*(t.to(x.a.dtype) for t in feats), center), batch_center

    def _gathered(self, step: _StepInputs) -> _StepInputs:
        """The step's batch terms over every rank's rows (see the class docstring)."""
        x = step.rows

        def gather(t: torch.Tensor, put_back: bool, with_grad: bool) -> torch.Tensor:
            return gather_rows(t, gather_with_grad=with_grad, put_back=put_back, rank=self.rank,
                               world_size=self.world_size)

        clip_in_pass = step.clip_in_pass and not self.local_loss
        rows, lipsum, columns = x, step.lipsum, None
        if clip_in_pass or step.m2 is not None or lipsum is not None:
            grad = self.gather_with_grad
            rows = PairInputs(gather(x.a, True, grad), gather(x.b, True, grad), x.scale, x.bias)
            if lipsum is not None:
                lipsum = (gather(lipsum[0], False, False), *lipsum[1:])
        if step.clip_in_pass and self.local_loss:
            # open_clip's columns: the gathered rows themselves when they carry gradient, else a
            # gather without gradient, this rank's shard included
            columns = rows if (rows is not x and self.gather_with_grad) else PairInputs(
                gather(x.a, False, self.gather_with_grad), gather(x.b, False, self.gather_with_grad),
                x.scale, x.bias)
        return step._replace(rows=rows, lipsum=lipsum, clip_in_pass=clip_in_pass, columns=columns)

    def _local_rows_clip(self, x: PairInputs, columns: PairInputs, backend: str) -> torch.Tensor:
        """open_clip's local_loss CLIP term: this rank's images against every rank's texts and
        this rank's texts against every rank's images, positives at n * rank + i."""
        offset = x.a.shape[0] * self.rank
        return (clip_rows_loss(x.a, columns.b, x.scale, diag_offset=offset, backend=backend)
                + clip_rows_loss(x.b, columns.a, x.scale, diag_offset=offset,
                                 backend=backend)) / 2

    @staticmethod
    def _terms(name: str, step: _StepInputs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The five unweighted terms (zeros where off) and DiVE's diff_mean."""
        x = step.rows
        zero = torch.zeros((), dtype=x.scale.dtype, device=x.a.device)
        terms, diff_mean = [zero] * 5, None
        m2_scale, lam_t = step.m2 if step.m2 is not None else (None, None)
        if name == "reference":
            if step.clip_in_pass:
                terms[0] = reference.clip_loss(x.a, x.b, x.scale, x.bias)
            if step.m2 is not None:
                terms[1] = reference.m2mix_loss(x.a, x.b, m2_scale, lam_t)
            if step.lipsum is not None:
                terms[2] = reference.lipsum_loss(x.a, *step.lipsum)
            if step.dive is not None:
                terms[3], terms[4], diff_mean = reference.dive_terms(*step.dive)
            return terms, diff_mean
        if not (step.clip_in_pass or step.m2 is not None or step.lipsum is not None):
            if step.dive is not None:
                terms[3], terms[4], diff_mean = dive_terms(*step.dive, backend=name)
            return terms, diff_mean
        clip_scale = x.scale
        m2_scale = zero if m2_scale is None else untied(m2_scale, clip_scale)
        lam_t = zero if lam_t is None else lam_t
        image_pre, texts, s0 = step.lipsum if step.lipsum is not None else (None, None, zero)
        args = StepArgs(x.a, x.b, clip_scale, m2_scale, lam_t, step.m2 is not None,
                        step.clip_in_pass, image_pre, texts, s0, *step.dive_args())
        out, diff_mean = RobustStepFunction.apply(name, torch.is_grad_enabled(), *args)
        return list(out.unbind(0)), (diff_mean if step.dive is not None else None)
