"""The native CPU's float loops form CLIP's two softmax terms of an entry from one exp where
the log-sum-exps lie within maths::kSharedShiftSpread (50) of the largest (csrc/robustft_maths.h),
and from two where they spread wider. Both regimes against the float64 reference: fused CLIP
(its forward keeping the products or not, the backward in one chunk or several) and CLIP +
m^2 by the Gram formulation (the strips kept or recomputed).

Narrow: every pair a near-duplicate at logit scale 100 (each row's and column's log-sum-exp
about 95). Wide: half the pairs near-duplicates (log-sum-exp about 100), the other half's
image and text rows in dimensions that no other row uses (every logit of their rows and
columns 0, log-sum-exp log N): a spread of about 94, past the 87 at which exp(s - 100) is
below FLT_MIN, so the one-exp form would lose those rows' terms entirely (and overflow their
factors), and the loops must take two exps there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import TOLERANCE, assert_close_rel, require_backend
from robustft_ext import backends

N, D, SCALE = 300, 64, 100.0


def _pairs(spread: str):
    g = torch.Generator().manual_seed(11)
    I = torch.zeros(N, D, dtype=torch.float64)
    T = torch.zeros(N, D, dtype=torch.float64)
    dup = N if spread == "narrow" else N // 2
    width = D if spread == "narrow" else D // 2
    I[:dup, :width] = torch.randn(dup, width, generator=g, dtype=torch.float64)
    T[:dup, :width] = I[:dup, :width] + 0.05 * torch.randn(dup, width, generator=g,
                                                           dtype=torch.float64)
    if spread == "wide":  # I rows in dims 32..47, T rows in 48..63: orthogonal to all
        I[dup:, 32:48] = torch.randn(N - dup, 16, generator=g, dtype=torch.float64)
        T[dup:, 48:] = torch.randn(N - dup, 16, generator=g, dtype=torch.float64)
    return F.normalize(I, dim=1), F.normalize(T, dim=1)


def _lse_spread(I, T) -> float:
    logits = SCALE * I @ T.T
    lse = torch.cat([logits.logsumexp(1), logits.logsumexp(0)])
    return float(lse.max() - lse.min())


def _loss(kind, I, T, scale, backend):
    if kind == "clip":
        return rft.clip_loss(I, T, scale, backend=backend)
    clip, m2 = rft.clip_m2mix_loss(I, T, scale, 0.35, m2_logit_scale=14.3, backend=backend)
    return 0.7 * clip + m2


def _grads(kind, I, T, backend, dtype):
    leaves = [I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_(),
              torch.tensor(SCALE, dtype=dtype if dtype == torch.float64 else torch.float32,
                           requires_grad=True)]
    loss = _loss(kind, *leaves, backend)
    return loss, torch.autograd.grad(loss * 1.3, leaves)


@pytest.mark.parametrize("kind", ["clip", "clip_m2mix"])
@pytest.mark.parametrize("spread", ["narrow", "wide"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_one_exp_and_two_exp_regimes_against_the_reference(kind, spread, keep, monkeypatch):
    require_backend("native", "cpu")
    I, T = _pairs(spread)
    width = _lse_spread(I, T)
    assert (width < 20) if spread == "narrow" else (width > 90), width
    if not keep:  # nothing kept: CLIP's backward in chunks, the Gram strips recomputed
        monkeypatch.setattr(backends, "keeps_products", lambda *args, **kwargs: False)
        rft.set_workspace_limit(N * 4 * 128)
    try:
        loss, grads = _grads(kind, I, T, "native", torch.float32)
    finally:
        rft.set_workspace_limit(None)
    ref_loss, ref_grads = _grads(kind, I, T, "reference", torch.float64)
    bound = TOLERANCE[torch.float32]
    assert_close_rel(loss, ref_loss, bound, f"{kind} loss", floor=1.0)
    for name, x, y in zip(("I", "T", "scale"), grads, ref_grads):
        assert_close_rel(x, y, bound, f"{kind} d{name}", floor=1.0 if x.dim() == 0 else 1e-3)
