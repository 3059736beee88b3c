"""M2MixLoss: the geodesic multi-modal mixup objective as a module, and its Beta sampler."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import (Scalar, check_features, check_positive_float, check_same_batch,
                           check_same_dim, check_weight)
from ..ops.clip import clip_loss
from ..ops.m2mix import clip_m2mix_loss, m2mix_loss
from ..ops.slerp import slerp


def _standard_normal(generator: torch.Generator) -> float:
    return float(torch.randn((), generator=generator, device=generator.device))


def _uniform(generator: torch.Generator) -> float:
    # (0, 1]: log(u) stays finite.
    return 1.0 - float(torch.rand((), generator=generator, device=generator.device))


def _log_gamma_sample(shape: float, generator: torch.Generator) -> float:
    """log of one Gamma(shape, 1) draw (Marsaglia and Tsang 2000; shape < 1 boosted by
    U^(1/shape), kept in log space so tiny shapes do not underflow)."""
    log_boost = 0.0
    if shape < 1.0:
        log_boost = math.log(_uniform(generator)) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = _standard_normal(generator)
        v = (1.0 + c * x) ** 3
        if v <= 0.0:
            continue
        if math.log(_uniform(generator)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d * v) + log_boost


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of Beta(alpha, alpha) from `generator` (torch's default generator when None).

    torch.distributions.Beta cannot take a generator; this draws two Gamma(alpha) variates with
    the generator's own uniforms and normals, so a seeded generator reproduces the sequence.
    """
    alpha = check_positive_float(alpha, "alpha")
    gen = generator if generator is not None else torch.default_generator
    log_x = _log_gamma_sample(float(alpha), gen)
    log_y = _log_gamma_sample(float(alpha), gen)
    # x / (x + y) = sigmoid(log x - log y)
    return 1.0 / (1.0 + math.exp(min(log_y - log_x, 700.0)))


class LamSampler:
    """The mix ratio of each step: the fixed `lam`, else one Beta(alpha, alpha) draw from
    `generator` (torch's default generator when None)."""

    def __init__(self, alpha: float, lam: float | None, generator: torch.Generator | None,
                 names: tuple[str, str] = ("alpha", "lam")) -> None:
        self.alpha = check_positive_float(alpha, names[0])
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                                or not 0.0 <= lam <= 1.0):
            raise ValueError(f"{names[1]} must be None or a float in [0, 1], got {lam!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.lam = None if lam is None else float(lam)
        self.generator = generator

    def draw(self) -> float:
        return self.lam if self.lam is not None else sample_beta(self.alpha, self.generator)


class M2MixLoss(nn.Module):
    """Geodesic multi-modal mixup (m^2-mix, docs/maths.md, section 3) as a training objective.

    total = clip_weight * CLIP + m2_weight * m^2 + image_mix_weight * image-image mix
            + text_mix_weight * text-text mix
    Each call draws lam ~ Beta(alpha, alpha) from `generator` (one draw per call, shared by
    every term; reproducible with a seeded generator), or uses the fixed `lam`. The CLIP term
    uses the forward's logit_scale; the mixing terms use m2_logit_scale when given (the paper:
    CLIP at 100, m^2 at 1/0.07), else the same logit_scale. With clip_weight > 0, CLIP and m^2
    come from one fused pass. The uni-modal terms (m^3-mix) mix each row with its partner in the
    reversed batch and use soft targets lam E + (1 - lam) F (F the reversal).
    forward(image_features, text_features, logit_scale, output_dict=False) returns the total,
    or with output_dict=True the weighted enabled terms ("contrastive_loss", "m2mix_loss",
    "image_mix_loss", "text_mix_loss") as open_clip's losses do. `last_lam` holds the lam used.
    Distributed gathering is not done here: every rank mixes its local batch.
    """

    def __init__(self, alpha: float = 0.5, lam: float | None = None,
                 generator: torch.Generator | None = None, m2_weight: float = 1.0,
                 clip_weight: float = 0.0, image_mix_weight: float = 0.0,
                 text_mix_weight: float = 0.0, m2_logit_scale: float | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        self.sampler = LamSampler(alpha, lam, generator)
        self.m2_weight = check_weight(m2_weight, "m2_weight")
        self.clip_weight = check_weight(clip_weight, "clip_weight")
        self.image_mix_weight = check_weight(image_mix_weight, "image_mix_weight")
        self.text_mix_weight = check_weight(text_mix_weight, "text_mix_weight")
        if not any((self.m2_weight, self.clip_weight, self.image_mix_weight, self.text_mix_weight)):
            raise ValueError("every term weight is 0: enable at least one term")
        self.m2_logit_scale = check_positive_float(m2_logit_scale, "m2_logit_scale", optional=True)
        self.backend = backend
        self.last_lam: float | None = None

    def draw_lam(self) -> float:
        """The lam of the next step: the fixed lam, else one Beta(alpha, alpha) draw."""
        return self.sampler.draw()

    def _unimodal(self, mixed_first: bool, image: torch.Tensor, text: torch.Tensor,
                  scale: Scalar, lam: float) -> torch.Tensor:
        """Soft-target symmetric CE of one uni-modal mix: rows of the mixed modality paired
        with the other one. Y = lam E + (1 - lam) F makes it the CLIP loss of the pair plus
        (1 - lam) * mean_i (L_ii - L_i,p(i)), an O(N D) term."""
        if mixed_first:
            a = slerp(image, image.flip(0), lam, backend=self.backend)
            b = text
        else:
            a = image
            b = slerp(text, text.flip(0), lam, backend=self.backend)
        loss = clip_loss(a, b, scale, backend=self.backend)
        if lam < 1.0:
            af, bf = a.to(loss.dtype), b.to(loss.dtype)
            gap = (af * bf).sum(1) - (af * bf.flip(0)).sum(1)
            loss = loss + (1.0 - lam) * scale * gap.mean()
        return loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Scalar, output_dict: bool = False
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        image = check_features(image_features, "image_features")
        text = check_features(text_features, "text_features")
        check_same_dim(image, text, "image_features", "text_features")
        check_same_batch(image, text, "image_features", "text_features")
        lam = self.draw_lam()
        self.last_lam = lam
        mix_scale = logit_scale if self.m2_logit_scale is None else self.m2_logit_scale
        terms: dict[str, torch.Tensor] = {}
        if self.clip_weight > 0 and self.m2_weight > 0:
            clip, m2 = clip_m2mix_loss(image, text, logit_scale, lam,
                                       m2_logit_scale=mix_scale, backend=self.backend)
            terms["contrastive_loss"] = self.clip_weight * clip
            terms["m2mix_loss"] = self.m2_weight * m2
        elif self.clip_weight > 0:
            terms["contrastive_loss"] = self.clip_weight * clip_loss(
                image, text, logit_scale, backend=self.backend)
        elif self.m2_weight > 0:
            terms["m2mix_loss"] = self.m2_weight * m2mix_loss(
                image, text, mix_scale, lam, backend=self.backend)
        if self.image_mix_weight > 0:
            terms["image_mix_loss"] = self.image_mix_weight * self._unimodal(
                True, image, text, mix_scale, lam)
        if self.text_mix_weight > 0:
            terms["text_mix_loss"] = self.text_mix_weight * self._unimodal(
                False, image, text, mix_scale, lam)
        if output_dict:
            return terms
        return sum(terms.values())
