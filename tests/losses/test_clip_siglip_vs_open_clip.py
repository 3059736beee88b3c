"""The reference backend and the drop-in modules against open_clip's ClipLoss and SigLipLoss."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from helpers import require_backend
from helpers import assert_close_rel, features

open_clip_loss = pytest.importorskip("open_clip.loss", exc_type=ImportError)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("n,d", [(1, 5), (7, 33), (64, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_clip_matches_open_clip(n, d, with_bias, backend):
    require_backend(backend, "cpu", torch.float64)
    a, b = features(n, d, torch.float64), features(n, d, torch.float64)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True) if with_bias else None
    ours = rft.ClipLoss(backend=backend)(a, b, scale, bias, output_dict=True)
    theirs = open_clip_loss.ClipLoss()(a, b, scale, bias, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    inputs = [a, b, scale, bias]
    assert_close_rel(ours["contrastive_loss"], theirs["contrastive_loss"], 1e-10, "loss")
    for x, y, name in zip(_grads(ours["contrastive_loss"], inputs),
                          _grads(theirs["contrastive_loss"], inputs), ["a", "b", "scale", "bias"]):
        if name == "bias":  # zero for CLIP
            assert abs(x.item() - y.item()) < 1e-12
        else:
            assert_close_rel(x, y, 1e-10, f"d{name}")


@pytest.mark.parametrize("n,d", [(1, 5), (7, 33), (64, 128)])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_siglip_matches_open_clip(n, d, backend):
    require_backend(backend, "cpu", torch.float64)
    a, b = features(n, d, torch.float64), features(n, d, torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ours = rft.SigLipLoss(backend=backend)(a, b, scale, bias, output_dict=True)
    theirs = open_clip_loss.SigLipLoss()(a, b, scale, bias, output_dict=True)
    assert set(ours) == set(theirs)
    inputs = [a, b, scale, bias]
    assert_close_rel(ours["contrastive_loss"], theirs["contrastive_loss"], 1e-10, "loss")
    for x, y, name in zip(_grads(ours["contrastive_loss"], inputs),
                          _grads(theirs["contrastive_loss"], inputs), "ab" + "sb"):
        assert_close_rel(x, y, 1e-10, f"d{name}")


def test_reference_against_straightforward_formulas():
    """Independent formulas: explicit log-softmax sums, written without F.cross_entropy."""
    a, b = features(9, 6, torch.float64), features(9, 6, torch.float64)
    s, bias = 7.0, 0.25
    S = s * a @ b.T + bias
    row = (torch.logsumexp(S, 1) - S.diagonal()).mean()
    col = (torch.logsumexp(S, 0) - S.diagonal()).mean()
    assert torch.allclose(rft.clip_loss(a, b, s, bias, backend="reference"), (row + col) / 2)
    z = 2 * torch.eye(9, dtype=torch.float64) - 1
    sig = torch.log1p(torch.exp(-z * S)).sum() / 9
    assert torch.allclose(rft.siglip_loss(a, b, s, bias, backend="reference"), sig)
    # The closed-form gradient of the CLIP loss (docs/maths.md, section 1.1).
    P_r, P_c = torch.softmax(S, 1), torch.softmax(S, 0)
    E = torch.eye(9, dtype=torch.float64)
    dS = (P_r - E) / 18 + (P_c - E) / 18
    ga, gb = torch.autograd.grad(rft.clip_loss(a, b, s, bias, backend="reference"), [a, b])
    assert torch.allclose(ga, s * dS @ b) and torch.allclose(gb, s * dS.T @ a)
