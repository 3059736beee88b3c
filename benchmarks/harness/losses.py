"""The losses the benchmarks time, their settings, and the inputs every provider is called with."""
from __future__ import annotations

import torch

LOSSES = ("clip", "siglip", "m2mix", "clip_m2mix", "robust_step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {"clip": "CLIP", "siglip": "SigLIP", "m2mix": "m^2-mix",
         "clip_m2mix": "CLIP + m^2-mix (one fused pass)",
         "robust_step": "a RobustFTLoss step: CLIP + m^2 + Lipsum-FT + DiVE"}

# SigLIP init of the paper (t' = log 10, b = -10); CLIP's 1/0.07.
CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
# m^2-mix: the paper's code puts CLIP at scale 100 and the m^2 term at 1/0.07, weight w.
M2_LAM, M2_SCALE, M2_WEIGHT = 0.3, 1.0 / 0.07, 0.01
# A robust fine-tuning step: CLIP + w m^2 + Lipsum-FT (K random texts, lambda 1) + DiVE
# (lambda 1000) on a reference batch of the training batch's size.
LIPSUM_K, LIPSUM_WEIGHT, DIVE_WEIGHT = 80, 1.0, 1000.0
PRE_LOGIT_SCALE = 100.0   # the pre-trained model's multiplier (Lipsum-FT)


def make_inputs(loss: str, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """L2-normalised features requiring grad, a 0-d fp32 scale requiring grad, SigLIP's bias."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(n, d, generator=g), dim=1)
    a = a.to(device=device, dtype=dtype).requires_grad_()
    b = b.to(device=device, dtype=dtype).requires_grad_()
    if loss in ("clip", "m2mix", "clip_m2mix", "robust_step"):
        scale = torch.tensor(CLIP_SCALE if loss in ("clip", "m2mix") else 100.0,
                             device=device).requires_grad_()
        bias = None
    else:
        scale = torch.tensor(SIGLIP_SCALE, device=device).requires_grad_()
        bias = torch.tensor(SIGLIP_BIAS, device=device).requires_grad_()
    return a, b, scale, bias


def robust_step_extras(a: torch.Tensor) -> dict:
    """The step's other inputs for a training batch like `a`, from a fixed seed: pre-trained
    image features, K random-text features and a DiVE reference batch of the same size (its
    fine-tuned features require grad, so their gradients are part of the backward)."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(
            device=a.device, dtype=a.dtype)
    n, d = a.shape
    return dict(image_pre=unit(n, d), random_text_features=unit(LIPSUM_K, d),
                ref_image_ft=unit(n, d).requires_grad_(), ref_text_ft=unit(n, d).requires_grad_(),
                ref_image_pre=unit(n, d), ref_text_pre=unit(n, d))
