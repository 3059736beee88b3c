"""The geodesic mix (slerp) of m^2-mix in float64: the Python twin of `slerp_weights` in
csrc/robustft_maths.h and of the row passes `mix_rows` / `mix_backward` (csrc/step_kernels.h;
csrc/cpu/step_cpu.cpp, csrc/cuda/row_device.cuh), shared by
the reference and Triton backends (docs/maths.md, section 3).

slerp(a, b; lam) = w_a a + w_b b with w_a = sin(lam theta) / sin theta, w_b = sin((1 - lam)
theta) / sin theta, theta = arccos c, c = <a, b>. Everything here is O(n D) and runs in float64:
near theta = pi the weights grow like 1 / sin theta while the mix stays a unit vector, so the
mix cancels, and c must be exact there for the weights and their derivatives to be right.

Stabilisation (ours; the paper's code divides by sin theta and returns NaN for identical rows):
  * c is clamped to [-1 + SLERP_COS_EPS, 1]; below the clamp c carries no gradient.
  * sin theta = sqrt((1 - c)(1 + c)).
  * dw/dc = -N / sin^3 theta with N = l cos(l theta) sin theta - sin(l theta) cos theta, written
    as sin((1 - l) theta) - (1 - l) cos(l theta) sin theta for l > 1/2, where the first form
    cancels catastrophically (at lam = 1 the true derivative of w_a is exactly 0).
  * below theta = SMALL_ANGLE (eps_mach^(1/6) of float64) the weights and derivatives come from
    their Taylor series in theta.
"""
from __future__ import annotations

import torch

SLERP_COS_EPS = 1e-6
SMALL_ANGLE = 2.4566e-3  # float64 eps ** (1/6): the series' and the closed form's errors balance


def _weight(l: torch.Tensor, theta: torch.Tensor, sin_t: torch.Tensor, cos_t: torch.Tensor,
            small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin(l theta) / sin(theta) and its derivative in c = cos(theta)."""
    t2, one_m = theta * theta, 1 - l * l
    w_series = l * (1 + one_m * t2 / 6 + one_m * (7 - 3 * l * l) * t2 * t2 / 360)
    dw_series = -l * one_m * (1.0 / 3 + (4 - l * l) * t2 / 30)
    safe_sin = torch.where(small, torch.ones_like(sin_t), sin_t)
    s = torch.sin(l * theta)
    num = torch.where(l > 0.5,
                      torch.sin((1 - l) * theta) - (1 - l) * torch.cos(l * theta) * safe_sin,
                      l * torch.cos(l * theta) * safe_sin - s * cos_t)
    return torch.where(small, w_series, s / safe_sin), torch.where(small, dw_series,
                                                                   -num / safe_sin ** 3)


def slerp_weights(cos: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """[4, n] float64 = (w_a, w_b, dw_a/dc, dw_b/dc) for c = cos [n] (any float dtype) and a
    0-d lam weighting a."""
    cos = cos.to(torch.float64)
    lam = lam.to(torch.float64)
    c = cos.clamp(-1 + SLERP_COS_EPS, 1)
    theta = torch.acos(c)
    sin_t = torch.sqrt((1 - c) * (1 + c))
    small = theta < SMALL_ANGLE
    wa, dwa = _weight(lam, theta, sin_t, c, small)
    wb, dwb = _weight(1 - lam, theta, sin_t, c, small)
    passes = cos > -1 + SLERP_COS_EPS
    return torch.stack([wa, wb, torch.where(passes, dwa, 0), torch.where(passes, dwb, 0)])


def mix_rows(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [n, D], weights [4, n]), both float64: out_p = slerp(a_p, b_p; lam)."""
    ad, bd = a.to(torch.float64), b.to(torch.float64)
    w = slerp_weights((ad * bd).sum(1), lam)
    return w[0, :, None] * ad + w[1, :, None] * bd, w


def mix_rows_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a, grad_b) in float64 of mix_rows for the upstream gradient `grad`:
    dA = w_a dM + k b, dB = w_b dM + k a with k = <dM, a> dw_a/dc + <dM, b> dw_b/dc."""
    gd, ad, bd = grad.to(torch.float64), a.to(torch.float64), b.to(torch.float64)
    k = ((gd * ad).sum(1) * w[2] + (gd * bd).sum(1) * w[3])[:, None]
    return w[0, :, None] * gd + k * bd, w[1, :, None] * gd + k * ad
