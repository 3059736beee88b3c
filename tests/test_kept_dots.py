"""The CPU forward that keeps its n x m dot products for the backward (native backend, CLIP and
SigLIP): used exactly when gradients are wanted and the products fit the workspace limit, the
same losses and gradients as the forward that keeps nothing, the ops' contract (opcheck, the
limit, bad dot products) and a second backward through a retained graph."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from robustft_ext import native
from conftest import require_backend
from helpers import assert_close_rel, features

LOSSES = {
    "clip": lambda a, b, s, c: rft.clip_loss(a, b, s, backend="native"),
    "clip_bias": lambda a, b, s, c: rft.clip_loss(a, b, s, c, backend="native"),
    "siglip": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, backend="native"),
    "siglip_neg": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, negative_only=True,
                                                     backend="native"),
}


@pytest.fixture
def calls(monkeypatch):
    """The names of the native ops the autograd Functions call, in order."""
    seen: list[str] = []
    for name in ("clip_fwd", "clip_fwd_keep", "clip_bwd", "clip_bwd_kept", "siglip_fwd",
                 "siglip_fwd_keep", "siglip_bwd", "siglip_bwd_kept"):
        op = getattr(native, name)

        def record(*args, _op=op, _name=name):
            seen.append(_name)
            return _op(*args)

        monkeypatch.setattr(native, name, record)
    return seen


def _run(kind, n, m, dtype, grad=True):
    a = features(n, 24, dtype).requires_grad_(grad)
    b = features(m, 24, dtype).requires_grad_(grad)
    s = torch.tensor(7.5, requires_grad=grad)
    c = torch.tensor(-1.5, requires_grad=grad)
    loss = LOSSES[kind](a, b, s, c)
    if not grad or not torch.is_grad_enabled():
        return loss, None
    loss.backward()
    return loss, [x.grad for x in (a, b, s, c)]


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_products_give_the_recomputed_results(kind, dtype, calls):
    """n = 300 spans several row blocks and column tiles of neither size's multiple."""
    require_backend("native", "cpu", dtype)
    n, m = 300, (300 if kind != "siglip_neg" else 170)
    torch.manual_seed(0)
    kept_loss, kept_grads = _run(kind, n, m, dtype)
    assert any(c.endswith("_keep") for c in calls) and any(c.endswith("_kept") for c in calls)
    calls.clear()
    rft.set_workspace_limit(1)  # nothing fits: the forward keeps nothing
    try:
        torch.manual_seed(0)
        loss, grads = _run(kind, n, m, dtype)
    finally:
        rft.set_workspace_limit(None)
    assert not any("kept" in c or "keep" in c for c in calls)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_rel(kept_loss, loss, tol, "loss")
    for name, g_kept, g in zip("a b scale bias".split(), kept_grads, grads):
        if kind == "clip" and name == "bias":
            assert g_kept is None and g is None
            continue
        assert_close_rel(g_kept, g, tol, name)


def test_forward_without_gradients_keeps_nothing(calls):
    require_backend("native", "cpu")
    with torch.no_grad():
        _run("clip", 64, 64, torch.float32, grad=True)  # inputs require grad, no graph
    _run("siglip", 64, 64, torch.float32, grad=False)
    assert calls == ["clip_fwd", "siglip_fwd"]


def test_products_over_the_limit_are_not_kept(calls):
    """The limit is on the products' bytes: 64 x 64 floats are 16 KiB."""
    require_backend("native", "cpu")
    rft.set_workspace_limit(64 * 64 * 4 - 1)
    try:
        _run("clip", 64, 64, torch.float32)
        rft.set_workspace_limit(64 * 64 * 4)
        _run("clip", 64, 64, torch.float32)
    finally:
        rft.set_workspace_limit(None)
    assert calls == ["clip_fwd", "clip_bwd", "clip_fwd_keep", "clip_bwd_kept"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_second_backward_through_a_retained_graph(kind, calls):
    """The first backward turns the kept products into dlogits; the second recomputes."""
    require_backend("native", "cpu")
    a = features(40, 16).requires_grad_()
    b = features(40, 16).requires_grad_()
    s = torch.tensor(5.0, requires_grad=True)
    loss = LOSSES[kind](a, b, s, torch.tensor(-0.5))
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    loss.backward()
    torch.testing.assert_close(a.grad, first, rtol=1e-5, atol=1e-7)
    assert calls[1].endswith("_kept") and calls[2] == f"{kind}_bwd"


def test_keep_ops_refuse_products_over_the_limit():
    require_backend("native", "cpu")
    a, b = features(64, 8).detach(), features(64, 8).detach()
    one = torch.tensor(1.0)
    rft.set_workspace_limit(1024)
    try:
        with pytest.raises(RuntimeError, match="more than the workspace limit"):
            native.clip_fwd_keep(a, b, one, one, 0, True)
        with pytest.raises(RuntimeError, match="more than the workspace limit"):
            native.siglip_fwd_keep(a, b, one, one, False)
    finally:
        rft.set_workspace_limit(None)


def test_kept_backward_rejects_mismatched_products():
    require_backend("native", "cpu")
    a, b = features(16, 8).detach(), features(16, 8).detach()
    one, g = torch.tensor(1.0), torch.tensor(1.0)
    _, r, c, dots = native.clip_fwd_keep(a, b, one, one, 0, True)
    for bad in (dots[:8], dots.t(), dots.double()):
        with pytest.raises(RuntimeError, match="kept dot products must be a contiguous"):
            native.clip_bwd_kept(g, a, b, one, one, r, c, bad, 0, True)


def test_opcheck_kept_ops():
    require_backend("native", "cpu")
    ops = torch.ops.robustft_ext
    a, b, b_wide = (features(n, 7).detach() for n in (5, 5, 9))
    scale, bias, g = torch.tensor(3.0), torch.tensor(0.2), torch.tensor(1.3)
    _, r, c, dots = ops.clip_fwd_keep(a, b, scale, bias, 0, True)
    _, r2, c2, dots2 = ops.clip_fwd_keep(a, b_wide, scale, bias, 3, False)
    _, sdots = ops.siglip_fwd_keep(a, b_wide, scale, bias, True)
    cases = [
        (ops.clip_fwd_keep.default, (a, b, scale, bias, 0, True)),
        (ops.clip_fwd_keep.default, (a, b_wide, scale, bias, 3, False)),
        (ops.clip_bwd_kept.default, (g, a, b, scale, bias, r, c, dots, 0, True)),
        (ops.clip_bwd_kept.default, (g, a, b_wide, scale, bias, r2, c2, dots2, 3, False)),
        (ops.siglip_fwd_keep.default, (a, b, scale, bias, False)),
        (ops.siglip_bwd_kept.default, (g, a, b_wide, scale, bias, sdots, True)),
    ]
    for op, args in cases:
        # The backward overwrites its dots: each check starts from a fresh copy.
        args = tuple(x.clone() if x is dots or x is dots2 or x is sdots else x for x in args)
        torch.library.opcheck(op, args)


def test_gradcheck_float64_through_kept_products():
    require_backend("native", "cpu", torch.float64)
    a = features(6, 5, torch.float64).requires_grad_()
    b = features(6, 5, torch.float64).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    for kind in ("clip_bias", "siglip"):
        assert torch.autograd.gradcheck(LOSSES[kind], (a, b, s, c), eps=1e-6, atol=1e-7)
