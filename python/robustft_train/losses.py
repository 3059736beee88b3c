"""The loss of one method for one training run: every CLIP/FLYP, m^2-mix, Lipsum-FT and DiVE term
of a step from one robustft_ext.RobustFTLoss call (one fused pass), plus ft's cross-entropy.

Per-step randomness is seeded by (seed, step): m^2-mix's lam and Lipsum's random texts are the
same on every process (the gathered batch is one objective: RobustFTLoss takes rank 0's lam and
needs the same texts on every rank), DiVE's reference pairs also by the process's rank (each
process draws its own). So a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import robustft_ext as rft
import torch
import torch.nn.functional as F

from .config import Config
from .data import TrainView
from .methods import Method
from .models import FrozenEncoders

# RobustFTLoss's output keys -> the names of the logged terms (logs/<phase>.jsonl: loss_<name>)
TERM_NAMES = {"contrastive_loss": "clip", "m2mix_loss": "m2mix", "lipsum_loss": "lipsum",
              "dive_avl_loss": "dive", "dive_pvl_loss": "dive"}
_M2_SALT, _LIPSUM_SALT, _DIVE_SALT = 29, 43, 17


@dataclass
class StepInputs:
    """What one training step feeds the model beyond the batch (DiVE's reference pairs)."""

    extra_images: torch.Tensor | None = None
    extra_texts: torch.Tensor | None = None


def step_seed(seed: int, step: int, salt: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + salt) % (2**63 - 1)


@dataclass
class MethodLoss:
    """The weighted loss terms of a method's training steps (their sum is the loss); `state_dict`
    holds DiVE's centre. Distributed: the CLIP term over the gathered batch (open_clip's
    gather_with_grad, every rank the full loss), in the same pass as the other terms."""

    method: Method
    cfg: Config
    rank: int
    world_size: int
    frozen: FrozenEncoders | None = None
    tokenizer: object | None = None
    reference: TrainView | None = None    # where DiVE's reference pairs come from
    device: torch.device = torch.device("cpu")
    step_loss: rft.RobustFTLoss | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        cfg, regs = self.cfg, self.method.regularisers
        weights = dict(clip_weight=1.0 if self.method.base == "flyp" else 0.0,
                       m2_weight=cfg.m2mix_weight if "m2mix" in regs else 0.0,
                       dive_weight=cfg.dive_lambda if "dive" in regs else 0.0,
                       lipsum_weight=cfg.lipsum_lambda if "lipsum" in regs else 0.0)
        self.generator = torch.Generator()
        self.lipsum_texts = rft.LipsumLoss(num_texts=cfg.lipsum_num_texts, text_length=cfg.lipsum_text_length)
        if any(weights.values()):
            self.step_loss = rft.RobustFTLoss(
                **weights, m2_alpha=cfg.m2mix_alpha, generator=self.generator,
                m2_logit_scale=cfg.m2mix_logit_scale, dive_momentum=cfg.dive_momentum, rank=self.rank,
                world_size=self.world_size, local_loss=False, gather_with_grad=True).to(self.device)

    def step_inputs(self, step: int, device: torch.device) -> StepInputs:
        if not self.method.needs_reference:
            return StepInputs()
        rnd = random.Random(step_seed(self.cfg.seed, step, _DIVE_SALT, self.rank))
        idx = [rnd.randrange(len(self.reference)) for _ in range(self.cfg.dive_ref_batch_size)]
        items = [self.reference[(-1 - step, i)] for i in idx]
        images = torch.stack([it[0] for it in items]).to(device)
        texts = self.tokenizer([it[2] for it in items]).to(device)
        return StepInputs(images, texts)

    def pre_image_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """The frozen pre-trained model's features of a batch's images, where a term reads them
        (Lipsum-FT); None otherwise. A batch split into micro-batches may take them per micro-batch."""
        return self.frozen.image_features(images) if "lipsum" in self.method.regularisers else None

    def _inputs(self, out: dict[str, torch.Tensor], image_pre: torch.Tensor | None, inputs: StepInputs,
                step: int) -> dict:
        """RobustFTLoss's keyword inputs of the enabled regularisers."""
        regs, kw = self.method.regularisers, {}
        if "m2mix" in regs:
            self.generator.manual_seed(step_seed(self.cfg.seed, step, _M2_SALT))
        if "lipsum" in regs:
            g = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, _LIPSUM_SALT))
            kw.update(image_pre=image_pre, pre_logit_scale=self.frozen.logit_scale,
                      random_text_features=self.lipsum_texts.random_text_features(
                          self.frozen.clip, self.tokenizer, g).float())
        if "dive" in regs:
            kw.update(ref_image_ft=out["extra_image_features"], ref_text_ft=out["extra_text_features"],
                      ref_image_pre=self.frozen.image_features(inputs.extra_images),
                      ref_text_pre=self.frozen.text_features(inputs.extra_texts))
        return kw

    def __call__(self, out: dict[str, torch.Tensor], labels: torch.Tensor, image_pre: torch.Tensor | None,
                 inputs: StepInputs, step: int) -> dict[str, torch.Tensor]:
        """The weighted loss terms of this step, by name (clip, m2mix, lipsum, dive, ce): `out` is
        the model's output on the batch, `image_pre` what pre_image_features gives for its images."""
        terms: dict[str, torch.Tensor] = {}
        if self.method.base == "ft":
            terms["ce"] = F.cross_entropy(out["logits"].float(), labels)
        if self.step_loss is None:
            return terms
        img = out["image_features"]
        # ft has no text features: its step (Lipsum only) reads none, the image rows stand in
        text = out["text_features"] if self.method.base == "flyp" else img
        parts = self.step_loss(img, text, out["logit_scale"], output_dict=True,
                               **self._inputs(out, image_pre, inputs, step))
        for key, value in parts.items():
            name = TERM_NAMES[key]
            terms[name] = terms[name] + value if name in terms else value
        return terms

    def state_dict(self) -> dict:
        if self.step_loss is None or "dive" not in self.method.regularisers:
            return {}
        return {"dive": self.step_loss.dive.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "dive" in state and self.step_loss is not None:
            self.step_loss.dive.load_state_dict(state["dive"])
            self.step_loss.dive.to(self.device)
