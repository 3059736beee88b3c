"""m^2-mix (docs/maths.md, section 3): the reference against an independent straightforward
implementation, every fused backend against the reference, the edges where the paper's code
fails, and M2MixLoss (terms, Beta sampling)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import DEVICES, require_backend
from helpers import (LOWP_FACTOR, TOLERANCE, assert_close_rel, assert_compiled_matches, features,
                     rel_err)

TRITON_MAX = 40  # keep shapes small under the Triton interpreter


# ---- The independent implementation: explicit mixing, full logits, F.cross_entropy ------
def plain_slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's sph_inter, row by row; a row mixed with itself is itself."""
    rows = []
    for x, y in zip(a, b):
        if torch.equal(x, y):
            rows.append(x)
            continue
        theta = torch.acos((x * y).sum())
        rows.append((torch.sin(lam * theta) * x + torch.sin((1 - lam) * theta) * y) / torch.sin(theta))
    return torch.stack(rows)


def plain_m2(I, T, s, lam):
    M = plain_slerp(I, T, lam)
    eye = torch.eye(I.shape[0], dtype=torch.bool)
    pos = s * (I * T).sum(1, keepdim=True)
    A = torch.where(eye, pos, s * I @ M.T)
    B = torch.where(eye, pos, s * T @ M.T)
    labels = torch.arange(I.shape[0])
    return (F.cross_entropy(A, labels) + F.cross_entropy(B, labels)) / 2


def plain_unimodal(I, T, s, lam, mix_image: bool):
    """Soft-target symmetric CE with partner p(i) = N - 1 - i and Y = lam E + (1 - lam) F."""
    n = I.shape[0]
    if mix_image:
        logits = s * plain_slerp(I, I.flip(0), lam) @ T.T
    else:
        logits = s * I @ plain_slerp(T, T.flip(0), lam).T
    Y = lam * torch.eye(n, dtype=I.dtype) + (1 - lam) * torch.eye(n, dtype=I.dtype).flip(0)
    ce = lambda L, Y: -(Y * F.log_softmax(L, dim=1)).sum(1).mean()  # noqa: E731
    return (ce(logits, Y) + ce(logits.T, Y.T)) / 2


def plain_clip(I, T, s):
    logits = s * I @ T.T
    labels = torch.arange(I.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _pair64(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    I = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    T = F.normalize(I + 0.8 * torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    return I.requires_grad_(), T.requires_grad_()


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_reference_matches_independent_formula(lam, n):
    I, T = _pair64(n, 6)
    s = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    ours = rft.m2mix_loss(I, T, s, lam, backend="reference")
    plain = plain_m2(I, T, s, lam)
    assert abs(ours.item() - plain.item()) <= 1e-12 * max(1.0, abs(plain.item()))
    for g, r, name in zip(torch.autograd.grad(ours, [I, T, s]), torch.autograd.grad(plain, [I, T, s]),
                          ["image", "text", "logit_scale"]):
        assert_close_rel(g, r, 1e-10, f"d{name} lam={lam} n={n}")


@pytest.mark.parametrize("mix_image", [True, False])
@pytest.mark.parametrize("n", [4, 5])
def test_unimodal_terms_match_independent_formula(mix_image, n):
    """Odd n mixes the middle row with itself (theta = 0)."""
    I, T = _pair64(n, 6, seed=1)
    lam = 0.35
    key = "image_mix_loss" if mix_image else "text_mix_loss"
    loss_fn = rft.M2MixLoss(lam=lam, m2_weight=0.0, backend="reference",
                            **{"image_mix_weight" if mix_image else "text_mix_weight": 1.0})
    ours = loss_fn(I, T, 9.0, output_dict=True)[key]
    plain = plain_unimodal(I, T, 9.0, lam, mix_image)
    assert abs(ours.item() - plain.item()) <= 1e-10
    for x, g, r in zip([I, T], torch.autograd.grad(ours, [I, T]), torch.autograd.grad(plain, [I, T])):
        assert torch.isfinite(g).all()
        # slerp is defined on the sphere: a row mixed with itself is itself there, but the two
        # formulas extend differently off it (ours through c = <x, x>), so compare the
        # gradients' tangent components, all that reaches features normalised upstream.
        tangent = lambda v: v - (v * x).sum(1, keepdim=True) * x  # noqa: E731
        assert_close_rel(tangent(g), tangent(r), 1e-8, f"{key} gradient")


# ---- Fused backends against the reference ----------------------------------------------
def _eager_lowp(I, T, s, lam, s_clip=None):
    """The eager computation in the inputs' own dtype: the low-precision baseline."""
    M = rft.slerp(I, T, lam, backend="reference")
    eye = torch.eye(I.shape[0], dtype=torch.bool, device=I.device)
    sd = s.to(I.dtype)
    pos = sd * (I * T).sum(1, keepdim=True)
    A = torch.where(eye, pos, sd * I @ M.T)
    B = torch.where(eye, pos, sd * T @ M.T)
    labels = torch.arange(I.shape[0], device=I.device)
    m2 = (F.cross_entropy(A, labels) + F.cross_entropy(B, labels)) / 2
    if s_clip is None:
        return m2
    logits = s_clip.to(I.dtype) * I @ T.T
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return m2 + 0.5 * clip


def _check_backend(backend, device, dtype, n, d, lam, with_clip, *, noncontiguous=False,
                   s_m=14.3, s_c=100.0, upstream=1.7):
    require_backend(backend, device, dtype)
    if backend == "triton" and device == "cpu":
        n, d = min(n, TRITON_MAX), min(d, 33)
    I = features(n, d, dtype, device, noncontiguous=noncontiguous)
    T = features(n, d, dtype, device, noncontiguous=noncontiguous)
    sm = torch.tensor(s_m, device=device, requires_grad=True)
    sc = torch.tensor(s_c, device=device, requires_grad=True)

    def run(backend_, I_, T_, sm_, sc_):
        if with_clip:
            clip, m2 = rft.clip_m2mix_loss(I_, T_, sc_, lam, m2_logit_scale=sm_, backend=backend_)
            return m2 + 0.5 * clip
        return rft.m2mix_loss(I_, T_, sm_, lam, backend=backend_)

    inputs = [I, T, sm, sc] if with_clip else [I, T, sm]
    up = torch.tensor(upstream, device=device)
    out = run(backend, I, T, sm, sc)
    grads = torch.autograd.grad(out, inputs, grad_outputs=up)
    ref = run("reference", I.double(), T.double(), sm.double(), sc.double())
    ref_grads = torch.autograd.grad(ref, inputs, grad_outputs=up.double())
    if dtype in (torch.float16, torch.bfloat16):
        lp = _eager_lowp(I, T, sm, lam, sc if with_clip else None)
        lp_grads = torch.autograd.grad(lp, inputs, grad_outputs=up.to(lp.dtype))
    names = ["loss", "d image", "d text", "d m2 scale", "d clip scale"]
    for i, (name, x, r) in enumerate(zip(names, [out, *grads], [ref, *ref_grads])):
        bound = TOLERANCE[dtype]
        if dtype in (torch.float16, torch.bfloat16):
            bound = max(bound, LOWP_FACTOR * rel_err([lp, *lp_grads][i], r))
        # A loss is a difference of log-sum-exps of logits of size ~scale: its rounding error
        # scales with the logits, not with the loss (which is ~0 for n = 1).
        floor = max(s_m, s_c if with_clip else 0.0) if name == "loss" else 1e-3
        assert_close_rel(x, r, bound, f"{backend}/{device}/{dtype} n={n} d={d} lam={lam} "
                                      f"clip={with_clip} {name}", floor)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (3, 33), (129, 768), (40, 5)])
@pytest.mark.parametrize("with_clip", [False, True], ids=["m2", "clip+m2"])
def test_backends_shapes_dtypes(device, backend, dtype, n, d, with_clip):
    _check_backend(backend, device, dtype, n, d, 0.3, with_clip)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.87, 1.0])
def test_backends_lam_values(device, backend, lam):
    _check_backend(backend, device, torch.float32, 17, 20, lam, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backends_noncontiguous_and_scales(device, backend):
    _check_backend(backend, device, torch.float32, 9, 7, 0.6, True, noncontiguous=True,
                   s_m=1.0, s_c=14.3, upstream=1.0)


@pytest.mark.parametrize("device,backend", [("cpu", "native"),
                                            pytest.param("cuda", "native", marks=pytest.mark.cuda),
                                            pytest.param("cuda", "triton", marks=pytest.mark.cuda)])
def test_multiblock_sizes(device, backend):
    """Sizes past the CPU kernels' row blocks (512) and column tiles (1024), and several CUDA
    column splits (too large for the Triton interpreter on CPU)."""
    _check_backend(backend, device, torch.float32, 1100, 8, 0.4, True)


# ---- Combined entry point and slerp --------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_combined_equals_sum_of_separate_losses(device, backend):
    require_backend(backend, device)
    I, T = features(11, 9, device=device), features(11, 9, device=device)
    sc = torch.tensor(100.0, device=device, requires_grad=True)
    sm = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    clip, m2 = rft.clip_m2mix_loss(I, T, sc, 0.3, m2_logit_scale=sm, backend=backend)
    sep_clip = rft.clip_loss(I, T, sc, backend=backend)
    sep_m2 = rft.m2mix_loss(I, T, sm, 0.3, backend=backend)
    assert_close_rel(clip, sep_clip, 1e-5, "clip term")
    assert_close_rel(m2, sep_m2, 1e-5, "m2 term")
    g = torch.autograd.grad(clip + 0.1 * m2, [I, T, sc, sm])
    gs = torch.autograd.grad(sep_clip + 0.1 * sep_m2, [I, T, sc, sm])
    for x, r, name in zip(g, gs, ["image", "text", "clip scale", "m2 scale"]):
        assert_close_rel(x, r, 1e-5, f"combined d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_slerp_backends(device, backend, dtype):
    require_backend(backend, device, dtype)
    a, b = features(13, 10, dtype, device), features(13, 10, dtype, device)
    b.data[3] = a.data[3]  # identical rows: theta = 0
    out = rft.slerp(a, b, 0.3, backend=backend)
    ref = rft.slerp(a.double(), b.double(), 0.3, backend="reference")
    assert out.dtype == dtype
    up = torch.randn(13, 10, device=device)
    g = torch.autograd.grad(out, [a, b], up.to(dtype))
    gr = torch.autograd.grad(ref, [a, b], up.double())
    bound = TOLERANCE[dtype]
    assert_close_rel(out, ref, bound, "slerp")
    for x, r in zip(g, gr):
        assert_close_rel(x, r, max(bound, 1e-4), "slerp gradient")


def test_slerp_matches_plain_formula_and_stays_on_the_sphere():
    a, b = _pair64(6, 5, seed=3)
    for lam in (0.0, 0.2, 0.5, 1.0):
        out = rft.slerp(a, b, lam, backend="native")
        assert_close_rel(out, plain_slerp(a, b, lam), 1e-12, f"slerp lam={lam}")
        assert torch.allclose(out.norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-12)


# ---- The edges: theta -> 0, theta -> pi, lam = 0 / 1, bf16 --------------------------------
EDGE_BACKENDS = ["reference", "native", "triton"]


def _edge_pair(kind: str, n: int, d: int, dtype, device):
    I = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    if kind == "identical":
        T = I.clone()
    elif kind == "nearly_identical":
        T = F.normalize(I + 1e-5 * torch.randn(n, d, dtype=torch.float64), dim=1)
    elif kind == "opposite":
        T = -I
    else:
        raise ValueError(kind)
    return (I.to(device=device, dtype=dtype).requires_grad_(),
            T.to(device=device, dtype=dtype).requires_grad_())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("kind", ["identical", "nearly_identical", "opposite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 0.3])
def test_edges_are_finite(device, backend, kind, dtype, lam):
    require_backend(backend, device, dtype)
    I, T = _edge_pair(kind, 7, 12, dtype, device)
    s = torch.tensor(14.3, device=device, requires_grad=True)
    loss_fn = rft.M2MixLoss(lam=lam, clip_weight=1.0, m2_weight=0.5, image_mix_weight=0.2,
                            text_mix_weight=0.2, backend=backend)
    terms = loss_fn(I, T, s, output_dict=True)
    total = sum(terms.values())
    assert all(torch.isfinite(v) for v in terms.values()), terms
    grads = torch.autograd.grad(total, [I, T, s])
    for g, name in zip(grads, ["image", "text", "logit_scale"]):
        assert torch.isfinite(g).all(), f"{backend} {kind} lam={lam}: d{name} not finite"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_limiting_formulas(device, backend):
    """lam = 1 makes M = I, lam = 0 makes M = T; identical rows mix to themselves."""
    require_backend(backend, device)
    I, T = features(9, 8, device=device), features(9, 8, device=device)
    assert torch.allclose(rft.slerp(I, T, 1.0, backend=backend), I, atol=1e-6)
    assert torch.allclose(rft.slerp(I, T, 0.0, backend=backend), T, atol=1e-6)
    for lam in (0.0, 0.3, 1.0):
        assert torch.allclose(rft.slerp(I, I, lam, backend=backend), I, atol=1e-6)
    s = 11.0
    labels = torch.arange(9, device=device)
    eye = torch.eye(9, dtype=torch.bool, device=device)
    pos = s * (I * T).sum(1, keepdim=True)
    for lam, M in ((1.0, I), (0.0, T)):
        A = torch.where(eye, pos, s * I @ M.T)
        B = torch.where(eye, pos, s * T @ M.T)
        expect = (F.cross_entropy(A, labels) + F.cross_entropy(B, labels)) / 2
        got = rft.m2mix_loss(I, T, s, lam, backend=backend)
        assert abs(got.item() - expect.item()) <= 1e-5 * abs(expect.item()), (lam, got, expect)
    # lam = 0: A is the CLIP logit matrix; lam = 1: B is its transpose.
    S = s * I @ T.T
    a0 = F.cross_entropy(S, labels)
    assert abs(F.cross_entropy(torch.where(eye, pos, s * I @ T.T), labels).item() - a0.item()) < 1e-6


def test_identical_rows_gradient_matches_small_angle_limit():
    """At theta = 0 the gradient is the limit of the gradient at theta -> 0 (no jump)."""
    I, _ = _pair64(5, 6, seed=4)
    I = I.detach()
    s, lam = 7.0, 0.3
    exact = I.clone().requires_grad_()
    g0 = torch.autograd.grad(rft.m2mix_loss(I, exact, s, lam, backend="native"), exact)[0]
    near = F.normalize(I + 1e-7 * torch.randn_like(I), dim=1).requires_grad_()
    g1 = torch.autograd.grad(rft.m2mix_loss(I, near, s, lam, backend="native"), near)[0]
    assert_close_rel(g0, g1, 1e-5, "gradient at theta = 0 vs theta ~ 1e-7")


# ---- gradcheck, torch.compile ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_gradcheck_float64(backend, lam):
    I, T = _pair64(5, 4, seed=5)
    sm = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    sc = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)

    def fn(I, T, sm, sc):
        clip, m2 = rft.clip_m2mix_loss(I, T, sc, lam, m2_logit_scale=sm, backend=backend)
        return clip + 2 * m2

    assert torch.autograd.gradcheck(fn, (I, T, sm, sc), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda a, b: rft.slerp(a, b, lam, backend=backend), (I, T),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(backend, device)
    I, T = features(6, 8, device=device), features(6, 8, device=device)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    lam = torch.tensor(0.3, device=device)

    def step(I, T, scale, lam):
        clip, m2 = rft.clip_m2mix_loss(I, T, scale, lam, backend=backend)
        return clip + 0.1 * m2 + rft.slerp(I, T, lam, backend=backend).sum()

    compiled = assert_compiled_matches(step, (I, T, scale, lam), [I, T, scale], device)
    # A new lam is a new tensor value, not a recompilation.
    lam2 = torch.tensor(0.8, device=device)
    assert torch.allclose(compiled(I, T, scale, lam2), step(I, T, scale, lam2), rtol=1e-5, atol=1e-6)


# ---- M2MixLoss ---------------------------------------------------------------------------
def test_module_terms_and_total():
    I, T = features(10, 8), features(10, 8)
    loss_fn = rft.M2MixLoss(lam=0.4, clip_weight=1.0, m2_weight=0.05, image_mix_weight=0.3,
                            text_mix_weight=0.2, m2_logit_scale=1 / 0.07)
    terms = loss_fn(I, T, 100.0, output_dict=True)
    assert set(terms) == {"contrastive_loss", "m2mix_loss", "image_mix_loss", "text_mix_loss"}
    total = loss_fn(I, T, 100.0)
    assert torch.allclose(total, sum(terms.values()))
    assert torch.allclose(terms["contrastive_loss"], rft.clip_loss(I, T, 100.0))
    assert torch.allclose(terms["m2mix_loss"], 0.05 * rft.m2mix_loss(I, T, 1 / 0.07, 0.4))
    assert loss_fn.last_lam == 0.4
    only_m2 = rft.M2MixLoss(lam=0.4)(I, T, 3.0, output_dict=True)
    assert set(only_m2) == {"m2mix_loss"}


def test_module_sampling_is_reproducible():
    I, T = features(6, 4), features(6, 4)
    a = rft.M2MixLoss(alpha=0.5, generator=torch.Generator().manual_seed(123))
    b = rft.M2MixLoss(alpha=0.5, generator=torch.Generator().manual_seed(123))
    c = rft.M2MixLoss(alpha=0.5, generator=torch.Generator().manual_seed(124))
    lams_a, lams_b, lams_c = [], [], []
    for _ in range(5):
        la, lb = a(I, T, 5.0), b(I, T, 5.0)
        assert torch.equal(la, lb)
        c(I, T, 5.0)
        lams_a.append(a.last_lam)
        lams_b.append(b.last_lam)
        lams_c.append(c.last_lam)
    assert lams_a == lams_b and lams_a != lams_c
    assert len(set(lams_a)) == 5 and all(0.0 <= x <= 1.0 for x in lams_a)


def test_beta_sampler_follows_beta_distribution():
    """alpha = 0.5: Beta(1/2, 1/2) is the arcsine law, F(x) = 2/pi asin(sqrt(x)): a KS test.
    alpha = 2: mean 1/2 and variance 1 / (4 (2 alpha + 1)) = 1/20."""
    g = torch.Generator().manual_seed(2024)
    n = 4000
    xs = torch.tensor(sorted(rft.sample_beta(0.5, g) for _ in range(n)), dtype=torch.float64)
    cdf = 2 / math.pi * torch.asin(xs.sqrt())
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.max(torch.maximum(i / n - cdf, cdf - (i - 1) / n)).item()
    assert ks < 1.63 / math.sqrt(n), f"KS statistic {ks:.4f} (1% critical {1.63 / math.sqrt(n):.4f})"
    ys = torch.tensor([rft.sample_beta(2.0, g) for _ in range(n)], dtype=torch.float64)
    assert abs(ys.mean().item() - 0.5) < 4 * math.sqrt(0.05 / n)
    assert abs(ys.var().item() - 0.05) < 0.006
    tiny = [rft.sample_beta(0.01, g) for _ in range(200)]  # mass near 0 and 1, no NaN
    assert all(0.0 <= x <= 1.0 for x in tiny) and min(tiny) < 1e-3 and max(tiny) > 1 - 1e-3


# ---- Bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("lam,err", [(-0.1, "lam must lie in"), (1.5, "lam must lie in"),
                                     (float("nan"), "lam must be finite"),
                                     (torch.ones(2), "lam must be a 0-d"), ("x", "lam must be a float")])
def test_bad_lam(lam, err):
    I, T = features(4, 3), features(4, 3)
    with pytest.raises((ValueError, TypeError), match=err):
        rft.m2mix_loss(I, T, 2.0, lam)


def test_bad_features_and_scales():
    I, T = features(4, 3), features(4, 3)
    with pytest.raises(ValueError, match="different batch sizes"):
        rft.m2mix_loss(I, features(5, 3), 2.0, 0.5)
    with pytest.raises(ValueError, match="different feature dims"):
        rft.clip_m2mix_loss(I, features(4, 2), 2.0, 0.5)
    with pytest.raises(ValueError, match="m2_logit_scale must be finite"):
        rft.clip_m2mix_loss(I, T, 2.0, 0.5, m2_logit_scale=float("inf"))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        rft.m2mix_loss(I, T, float("nan"), 0.5)
    with pytest.raises(ValueError, match="a must be a 2-D"):
        rft.slerp(I[0], T[0], 0.5)


@pytest.mark.parametrize("kwargs,err", [
    ({"alpha": 0.0}, "alpha must be"), ({"alpha": float("inf")}, "alpha must be"),
    ({"lam": 1.2}, "lam must be None or"), ({"m2_weight": -1.0}, "m2_weight must be finite"),
    ({"clip_weight": float("nan")}, "clip_weight must be finite"),
    ({"m2_weight": 0.0}, "every term weight is 0"), ({"generator": 3}, "generator must be"),
    ({"m2_logit_scale": 0.0}, "m2_logit_scale must be"),
])
def test_bad_module_arguments(kwargs, err):
    with pytest.raises((ValueError, TypeError), match=err):
        rft.M2MixLoss(**kwargs)
