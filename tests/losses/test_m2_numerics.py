"""Two numerics defects of m^2-mix, each against an independent float64 oracle:

1. The slerp gradient near antipodal pairs. The closed form of dw/dc cancels catastrophically
   as lam -> 1 near theta = pi (where sin^3 theta is tiny), on every backend. The kernels now
   run the prologue in float64 with the cancellation-free form (docs/maths.md, section 3).
2. The 16-bit mixed negatives. A fused backend may round M to the input dtype (the tensor-core
   operand) but must then stay as accurate as the plain eager low-precision computation, as
   flash-attention's tests bound theirs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import DEVICES, require_backend
from helpers import LOWP_FACTOR, rel_err

BACKENDS = ["reference", "native", "triton"]
COS_EPS = 1e-6  # the clamp of c (docs/maths.md, section 3)


def _pair_at_angle(n: int, d: int, theta: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 unit rows a and b = cos(theta) a + sin(theta) u with u a unit vector orthogonal
    to a: the angle between a and b is theta."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    u = torch.randn(n, d, dtype=torch.float64, generator=g)
    u = F.normalize(u - (u * a).sum(1, keepdim=True) * a, dim=1)
    return a, math.cos(theta) * a + math.sin(theta) * u


def _oracle_slerp_grads(a: torch.Tensor, b: torch.Tensor, lam: float,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 autograd through the plain closed form (clamped like the kernels), on the
    rounded inputs upcast: an implementation independent of the kernels' stabilisation."""
    a = a.detach().double().requires_grad_()
    b = b.detach().double().requires_grad_()
    c = (a * b).sum(1).clamp(-1 + COS_EPS, 1)
    theta = torch.acos(c)
    wa = torch.sin(lam * theta) / torch.sin(theta)
    wb = torch.sin((1 - lam) * theta) / torch.sin(theta)
    M = wa[:, None] * a + wb[:, None] * b
    return torch.autograd.grad((M * grad.double()).sum(), [a, b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [3e-3, 1e-2, 1.6e-3], ids=["pi-3e-3", "pi-1e-2", "near-clamp"])
@pytest.mark.parametrize("lam", [1.0, 0.75, 0.5, 0.0])
def test_slerp_gradient_near_antipodal_float32(device, backend, gap, lam):
    """float32 rows at theta = pi - gap: the gradient matches the float64 oracle to float32
    accuracy relative to its size (the old closed form was off by 0.975 at lam = 1, where the
    weights' derivatives vanish)."""
    require_backend(backend, device)
    a64, b64 = _pair_at_angle(6, 16, math.pi - gap, seed=1)
    a, b = a64.float().to(device), b64.float().to(device)
    grad = torch.randn(6, 16, dtype=torch.float64).float().to(device)
    a_ = a.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    out = rft.slerp(a_, b_, lam, backend=backend)
    ga, gb = torch.autograd.grad(out, [a_, b_], grad)
    oa, ob = _oracle_slerp_grads(a.cpu(), b.cpu(), lam, grad.cpu())
    floor = grad.abs().max().item()  # at lam = 1 (0) the gradient of b (a) is exactly 0
    for name, x, ref in (("a", ga, oa), ("b", gb, ob)):
        assert torch.isfinite(x).all()
        err = rel_err(x.cpu(), ref, floor=floor)
        assert err <= 2e-5, f"{backend} lam={lam} gap={gap}: grad {name} error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_slerp_gradient_exactly_opposite_bf16(device, backend, lam):
    """Exactly opposite bf16 rows: rounding makes |a|^2 != 1, so c lands inside the window
    above the clamp. The gradient matches the float64 oracle on the same bf16 values (before:
    0.2-0.6 off, even at lam = 1)."""
    require_backend(backend, device, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(6, 16, dtype=torch.float64, generator=g), dim=1).bfloat16()
    b = -a
    c = (a.double() * b.double()).sum(1)
    assert (c > -1 + COS_EPS).any(), "the test needs pairs inside the window"
    grad = torch.randn(6, 16, dtype=torch.float64, generator=g).bfloat16()
    a_ = a.to(device).requires_grad_()
    b_ = b.to(device).requires_grad_()
    out = rft.slerp(a_, b_, lam, backend=backend)
    ga, gb = torch.autograd.grad(out, [a_, b_], grad.to(device))
    oa, ob = _oracle_slerp_grads(a, b, lam, grad)
    for name, x, ref in (("a", ga, oa), ("b", gb, ob)):
        assert torch.isfinite(x).all()
        err = rel_err(x.cpu(), ref, floor=grad.abs().max().item())
        assert err <= 1e-2, f"{backend} lam={lam}: grad {name} error {err:.3g}"


# ---- The 16-bit mixed negatives ----------------------------------------------------------
def _m2_loss(I: torch.Tensor, T: torch.Tensor, M: torch.Tensor, scale: float) -> torch.Tensor:
    """m^2-mix from given mixed negatives: 1/2 [CE_rows(A) + CE_rows(B)], the true pair on the
    diagonal, the logits in float32 as cross-entropy takes them."""
    n = I.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=I.device)
    diag = scale * (I.float() * T.float()).sum(1, keepdim=True)
    A = torch.where(eye, diag, scale * (I @ M.T).float())
    B = torch.where(eye, diag, scale * (T @ M.T).float())
    labels = torch.arange(n, device=I.device)
    return (F.cross_entropy(A, labels) + F.cross_entropy(B, labels)) / 2


def _oracle_and_eager(I: torch.Tensor, T: torch.Tensor, lam: float, scale: float):
    """(float64 oracle loss and grads, eager low-precision loss and grads): the same maths
    once in float64 on the rounded inputs, once as plain eager code in their dtype (the mix
    rounded to it, 16-bit matmuls), the way user code would compute it."""
    out = []
    for dtype in (torch.float64, I.dtype):
        a = I.detach().to(dtype).requires_grad_()
        b = T.detach().to(dtype).requires_grad_()
        M = rft.slerp(a, b, lam, backend="reference").to(dtype)
        loss = _m2_loss(a, b, M, scale)
        out.append([loss.detach()] + list(torch.autograd.grad(loss, [a, b])))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_m2mix_lowp_error_bounded_by_eager_lowp_error(device, backend, dtype):
    require_backend(backend, device, dtype)
    n, d, lam, scale = 96, 64, 0.3, 1 / 0.07
    g = torch.Generator().manual_seed(3)
    I = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    T = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    oracle, eager = _oracle_and_eager(I, T, lam, scale)
    a = I.to(device).requires_grad_()
    b = T.to(device).requires_grad_()
    loss = rft.m2mix_loss(a, b, scale, lam, backend=backend)
    fused = [loss.detach()] + list(torch.autograd.grad(loss, [a, b]))
    for name, x, o, e in zip(("loss", "grad_image", "grad_text"), fused, oracle, eager):
        err = rel_err(x.cpu(), o)
        bound = LOWP_FACTOR * rel_err(e, o) + 1e-6
        assert err <= bound, f"{backend} {dtype} {name}: error {err:.3g} > bound {bound:.3g}"
