"""RobustFTLoss: every term of a robust fine-tuning step (CLIP/FLYP, m^2-mix, Lipsum-FT, DiVE)
from one module, and on the fused backends from one pass."""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._validation import (check_dive_inputs, check_lam, check_lipsum_inputs, check_positive_float,
                          check_scalar, check_weight, pair_inputs)
from .autograd import RobustStepFunction, untied
from .backends import select_backend
from .functional import Scalar, dive_terms
from .m2mix import LamSampler
from .regularisers import DiVELoss

TERMS = ("contrastive_loss", "m2mix_loss", "lipsum_loss", "dive_avl_loss", "dive_pvl_loss")


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
    """

    def __init__(self, clip_weight: float = 1.0, m2_weight: float = 0.0, dive_weight: float = 0.0,
                 lipsum_weight: float = 0.0, *, m2_alpha: float = 0.5, m2_lam: float | None = None,
                 generator: torch.Generator | None = None, m2_logit_scale: float | None = None,
                 dive_momentum: float = 0.99, dive_center_mode: str = "ema",
                 dive_dim: int | None = None, backend: str | None = None) -> None:
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
        self.backend = backend
        self.last_lam: float | None = None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Scalar, *, image_pre: torch.Tensor | None = None,
                random_text_features: torch.Tensor | None = None,
                pre_logit_scale: Scalar | None = None, ref_image_ft: torch.Tensor | None = None,
                ref_text_ft: torch.Tensor | None = None, ref_image_pre: torch.Tensor | None = None,
                ref_text_pre: torch.Tensor | None = None, output_dict: bool = False
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        with_clip, with_m2 = self.clip_weight > 0, self.m2_weight > 0
        with_lipsum, with_dive = self.lipsum_weight > 0, self.dive_weight > 0
        x = pair_inputs(image_features, text_features, logit_scale)
        dtype, device, acc = x.a.dtype, x.a.device, x.scale.dtype
        lam_t = m2_scale = None
        if with_m2:
            lam = self.sampler.draw()
            self.last_lam = lam
            lam_t = check_lam(lam, device, acc)
            m2_scale = x.scale if self.m2_logit_scale is None else check_scalar(
                self.m2_logit_scale, "m2_logit_scale", device, acc)
        lip = dive = None
        if with_lipsum:
            missing = [n for n, v in (("image_pre", image_pre),
                                      ("random_text_features", random_text_features),
                                      ("pre_logit_scale", pre_logit_scale)) if v is None]
            if missing:
                raise ValueError(f"lipsum_weight > 0 needs {', '.join(missing)}")
            f, f0, g = check_lipsum_inputs(x.a, image_pre, random_text_features)
            if f0.shape != x.a.shape:
                raise ValueError("image_pre must have image_features' shape")
            s0 = check_scalar(pre_logit_scale, "pre_logit_scale", device, acc).detach()
            lip = (f0.to(dtype), g.to(dtype), s0)
        if with_dive:
            refs = {"ref_image_ft": ref_image_ft, "ref_text_ft": ref_text_ft,
                    "ref_image_pre": ref_image_pre, "ref_text_pre": ref_text_pre}
            missing = [n for n, v in refs.items() if v is None]
            if missing:
                raise ValueError(f"dive_weight > 0 needs {', '.join(missing)}")
            feats = self.dive._check_inputs(tuple(refs.values()))
            if feats[0].shape[1] != x.a.shape[1] or feats[0].device != device:
                raise ValueError("the reference batch must have the training batch's feature "
                                 f"dim and device: {tuple(feats[0].shape)} on {feats[0].device}")
            center, batch_center = self.dive.center_for_loss(*feats)
            dive = check_dive_inputs(*(t.to(dtype) for t in feats), center)

        name = select_backend(self.backend, device, dtype)
        terms, diff_mean = self._terms(name, x, with_clip, with_m2, m2_scale, lam_t, lip, dive)
        if with_dive:
            self.dive.update_center(diff_mean, batch_center)
        weights = (self.clip_weight, self.m2_weight, self.lipsum_weight, self.dive_weight,
                   self.dive_weight)
        out = {k: w * t for k, w, t in zip(TERMS, weights, terms) if w > 0}
        if output_dict:
            return out
        return sum(out.values())

    @staticmethod
    def _terms(name, x, with_clip, with_m2, m2_scale, lam_t, lip, dive):
        """The five unweighted terms (zeros where off) and DiVE's diff_mean."""
        zero = torch.zeros((), dtype=x.scale.dtype, device=x.a.device)
        if name == "reference":
            terms = [zero] * 5
            if with_clip:
                terms[0] = reference.clip_loss(x.a, x.b, x.scale, x.bias)
            if with_m2:
                terms[1] = reference.m2mix_loss(x.a, x.b, m2_scale, lam_t)
            if lip is not None:
                terms[2] = reference.lipsum_loss(x.a, *lip)
            diff_mean = None
            if dive is not None:
                terms[3], terms[4], diff_mean = reference.dive_terms(*dive)
            return terms, diff_mean
        if not (with_clip or with_m2 or lip is not None):
            avl, pvl, diff_mean = dive_terms(*dive, backend=name)
            return [zero, zero, zero, avl, pvl], diff_mean
        clip_scale = x.scale
        if m2_scale is None:
            m2_scale, lam_t = zero, zero
        else:
            m2_scale = untied(m2_scale, clip_scale)
        image_pre, texts, s0 = lip if lip is not None else (None, None, zero)
        rfi, rft, rpi, rpt, center = dive if dive is not None else (None,) * 5
        terms, diff_mean = RobustStepFunction.apply(
            x.a, x.b, clip_scale, m2_scale, lam_t, with_m2, with_clip, image_pre, texts, s0,
            rfi, rft, rpi, rpt, center, name)
        return list(terms.unbind(0)), (diff_mean if dive is not None else None)
