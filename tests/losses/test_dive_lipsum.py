"""DiVE and Lipsum-FT (docs/maths.md, sections 4-5): the reference against independent formulas,
every fused backend against the reference, gradcheck, torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from robustft_ext.functional import dive_terms
from helpers import DEVICES, require_backend
from helpers import LOWP_FACTOR, TOLERANCE, assert_close_rel, assert_compiled_matches, rel_err

TRITON_MAX = 24


def _rand(shape, dtype=torch.float32, device="cpu", grad=False, scale=1.0):
    x = (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def _dive_inputs(b, d, dtype=torch.float32, device="cpu", noncontiguous=False):
    fi, ft = _rand((b, d), dtype, device, True), _rand((b, d), dtype, device, True)
    pi = (fi.detach() + 0.1 * _rand((b, d), dtype, device)).requires_grad_()
    pt = (ft.detach() + 0.1 * _rand((b, d), dtype, device)).requires_grad_()
    center = 0.05 * torch.randn(d, device=device)
    if noncontiguous:
        fi, ft = (x.detach().t().contiguous().t().requires_grad_() for x in (fi, ft))
    return fi, ft, pi, pt, center


def plain_dive(fi, ft, pi, pt, m):
    """docs/maths.md, section 4, term by term."""
    B = fi.shape[0]
    u, v = fi - pi.detach(), ft - pt.detach()
    avl = sum(((u[j] - m) ** 2).sum() + ((v[j] - m) ** 2).sum() for j in range(B)) / B
    pvl = sum(((u[j] - v[j]) ** 2).sum() for j in range(B)) / B
    return avl, pvl


def plain_lipsum(F, F0, G, s0):
    V = s0 * (F - F0.detach()) @ G.T
    return (V ** 2).sum() / (2 * G.shape[0] * F.shape[0])


@pytest.mark.parametrize("b,d", [(1, 3), (5, 7), (16, 33)])
def test_reference_matches_independent_formulas(b, d):
    fi, ft, pi, pt, m = _dive_inputs(b, d, torch.float64)
    m = m.double()
    avl, pvl, mean = dive_terms(fi, ft, pi, pt, m, backend="reference")
    pavl, ppvl = plain_dive(fi, ft, pi, pt, m)
    assert_close_rel(avl, pavl, 1e-12, "avl")
    assert_close_rel(pvl, ppvl, 1e-12, "pvl")
    assert_close_rel(mean, ((fi - pi + ft - pt) / 2).mean(0), 1e-12, "diff_mean")
    g = torch.autograd.grad(avl + 3 * pvl, [fi, ft])
    gp = torch.autograd.grad(pavl + 3 * ppvl, [fi, ft])
    for x, r in zip(g, gp):
        assert_close_rel(x, r, 1e-12, "dive grads")
    F, F0, G = _rand((b, d), torch.float64, grad=True), _rand((b, d), torch.float64), _rand((7, d), torch.float64)
    out = rft.lipsum_loss(F, F0, G, 14.3, backend="reference")
    ref = plain_lipsum(F, F0, G, 14.3)
    assert_close_rel(out, ref, 1e-12, "lipsum")
    assert_close_rel(torch.autograd.grad(out, F)[0], torch.autograd.grad(ref, F)[0], 1e-12, "dF")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,d", [(1, 5), (5, 33), (70, 768)])
def test_dive_backends(device, backend, dtype, b, d):
    require_backend(backend, device, dtype)
    if backend == "triton" and device == "cpu":
        b, d = min(b, TRITON_MAX), min(d, 33)
    fi, ft, pi, pt, m = _dive_inputs(b, d, dtype, device)
    avl, pvl, mean = dive_terms(fi, ft, pi, pt, m, backend=backend)
    up = (torch.tensor(1.3, device=device), torch.tensor(0.4, device=device))
    g = torch.autograd.grad([avl, pvl], [fi, ft], up)
    d64 = [x.double() for x in (fi, ft, pi, pt, m)]
    ravl, rpvl, rmean = dive_terms(*d64, backend="reference")
    rg = torch.autograd.grad([ravl, rpvl], [fi, ft], [u.double() for u in up])
    for name, x, r in (("avl", avl, ravl), ("pvl", pvl, rpvl), ("diff_mean", mean, rmean),
                       ("d image_ft", g[0], rg[0]), ("d text_ft", g[1], rg[1])):
        assert_close_rel(x, r, TOLERANCE[dtype] if dtype != torch.float32 else 2e-5,
                         f"{backend}/{dtype} {name}")
    assert g[0].dtype == dtype and avl.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,k,d", [(1, 1, 5), (3, 7, 33), (129, 80, 512)])
def test_lipsum_backends(device, backend, dtype, b, k, d):
    require_backend(backend, device, dtype)
    if backend == "triton" and device == "cpu":
        b, k, d = min(b, TRITON_MAX), min(k, 9), min(d, 33)
    F = torch.nn.functional.normalize(_rand((b, d), device=device), dim=1).to(dtype).requires_grad_()
    F0 = torch.nn.functional.normalize(_rand((b, d), device=device), dim=1).to(dtype)
    G = torch.nn.functional.normalize(_rand((k, d), device=device), dim=1).to(dtype)
    out = rft.lipsum_loss(F, F0, G, 14.3, backend=backend)
    g = torch.autograd.grad(out, F, torch.tensor(1.7, device=device))[0]
    ref = rft.lipsum_loss(F.double(), F0.double(), G.double(), 14.3, backend="reference")
    rg = torch.autograd.grad(ref, F, torch.tensor(1.7, dtype=torch.float64, device=device))[0]
    bound_l, bound_g = TOLERANCE[dtype], TOLERANCE[dtype]
    if dtype in (torch.float16, torch.bfloat16):
        lp = plain_lipsum(F, F0, G, 14.3)
        lg = torch.autograd.grad(lp, F, torch.tensor(1.7, dtype=lp.dtype, device=device))[0]
        bound_l = max(bound_l, LOWP_FACTOR * rel_err(lp, ref))
        bound_g = max(bound_g, LOWP_FACTOR * rel_err(lg, rg))
    assert_close_rel(out, ref, bound_l, f"{backend}/{dtype} lipsum")
    assert_close_rel(g, rg, bound_g, f"{backend}/{dtype} lipsum dF")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_noncontiguous_inputs(device, backend):
    require_backend(backend, device)
    fi, ft, pi, pt, m = _dive_inputs(6, 9, device=device, noncontiguous=True)
    out = rft.dive_loss(fi, ft, pi, pt, m, backend=backend)
    ref = rft.dive_loss(fi, ft, pi, pt, m, backend="reference")
    for x, r in zip(out, ref):
        assert_close_rel(x, r, 2e-5, "noncontiguous dive")
    G = _rand((5, 9), device=device).t().contiguous().t()
    out = rft.lipsum_loss(fi, pi, G, 3.0, backend=backend)
    assert_close_rel(out, rft.lipsum_loss(fi, pi, G, 3.0, backend="reference"), 2e-5, "noncontig lipsum")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_gradcheck_float64(backend):
    require_backend(backend, "cpu", torch.float64)
    fi, ft, pi, pt, m = _dive_inputs(4, 3, torch.float64)
    m = m.double()
    assert torch.autograd.gradcheck(
        lambda a, b: sum(rft.dive_loss(a, b, pi, pt, m, backend=backend)), (fi, ft))
    F, F0, G = _rand((3, 4), torch.float64, grad=True), _rand((3, 4), torch.float64), _rand((5, 4), torch.float64)
    assert torch.autograd.gradcheck(lambda f: rft.lipsum_loss(f, F0, G, 2.5, backend=backend), (F,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(backend, device)
    fi, ft, pi, pt, m = _dive_inputs(6, 8, device=device)
    G = _rand((4, 8), device=device)

    def step(fi, ft, pi, pt, m, G):
        avl, pvl = rft.dive_loss(fi, ft, pi, pt, m, backend=backend)
        return avl + pvl + rft.lipsum_loss(fi, pi, G, 5.0, backend=backend)

    assert_compiled_matches(step, (fi, ft, pi, pt, m, G), [fi, ft], device)


def test_bad_inputs():
    fi, ft, pi, pt, m = _dive_inputs(4, 3)
    with pytest.raises(ValueError, match="one shape: image_ft is .* but text_pre"):
        rft.dive_loss(fi, ft, pi, pt[:3], m)
    with pytest.raises(ValueError, match="one shape"):
        rft.dive_loss(fi, ft[:, :2], pi, pt, m)
    with pytest.raises(ValueError, match=r"center must be a \[D\]"):
        rft.dive_loss(fi, ft, pi, pt, torch.zeros(4))
    with pytest.raises(TypeError, match="center must be a torch.Tensor"):
        rft.dive_loss(fi, ft, pi, pt, [0.0, 0.0, 0.0])
    G = torch.randn(5, 3)
    with pytest.raises(ValueError, match="image_pre must have image_ft's shape"):
        rft.lipsum_loss(fi, pi[:2], G, 1.0)
    with pytest.raises(ValueError, match="image_ft and random_text_features have different feature dims"):
        rft.lipsum_loss(fi, pi, torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="random_text_features is an empty batch"):
        rft.lipsum_loss(fi, pi, torch.randn(0, 3), 1.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        rft.lipsum_loss(fi, pi, G, float("inf"))
