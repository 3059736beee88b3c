"""Tests of the Triton step ops: torch.ops.robustft_triton.{dive_fwd, dive_bwd, lipsum_fwd,
lipsum_bwd, robust_step_fwd, robust_step_bwd} (robustft_ext/triton_backend/step_ops.py,
step_kernels.py).

Without a CUDA device the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton). The interpreter is
slow, so shapes stay small; with its 16-wide tiles and 2 persistent programs they still cover
masking (n = 1, 3, 17; B' = 1, 5; K = 1, 7, 80; D = 5, 33 are not multiples of 16), the
register-resident backward (D = 5) and the large-D backward (D = 33: the dS workspace and
library GEMMs, the dlogit tiles looping over three feature chunks), several Lipsum column
blocks (K = 80: five) and DiVE programs next to the row programs. test_robust_step_gpu_tiles
runs the sm_90 / sm_80 configurations of configs.TABLE (64- and 128-row tiles) with full
tiles and ragged edges; test_workspace_chunks splits the dS workspace into row chunks.

Every output is compared with float64 eager formulas written here from docs/maths.md
(sections 4, 5; CLIP and m^2-mix from robustft_ext.reference, the oracle of sections 1, 3) on
the same (rounded) inputs: the terms, the lse statistics, diff_mean and every gradient
(autograd through the formulas), with the relative tolerances of tests/helpers.py.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import LOWP_FACTOR, TOLERANCE, assert_close_rel, import_triton_backend, rel_err
from helpers import largest_float_tensor_mode
from robustft_ext import reference, workspace

pytestmark = pytest.mark.triton
tb = import_triton_backend()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.robustft_triton
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
CLIP_SCALE, M2_SCALE, LIP_SCALE, LAM = 10.0, 14.3, 14.3, 0.3
# Non-unit upstream gradients, StepTerm order: clip, m2, lipsum, avl, pvl.
GRADS = (1.3, 0.7, 0.9, 0.4, 1.1)
TERMS = ("clip", "m2", "lipsum", "avl", "pvl")


# ----------------------------------------------------------------------------- inputs
def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _f32(x):
    return torch.tensor(x, dtype=torch.float32, device=DEVICE)


def _batch(n, D, K, dtype, seed=0):
    """Training batch, rounded to dtype: image / text rows (text correlated with its image,
    cos ~ 0.45, so that the m^2 loss is not saturated and its gradients are not dominated by
    the float32 rounding of exp(diag - lse) - 1), the pre-trained image features (near the
    fine-tuned ones, as in fine-tuning) and K random-text features."""
    g = torch.Generator().manual_seed(seed)
    I = _unit(g, n, D)
    T = F.normalize(_unit(g, n, D) + 0.5 * I, dim=1)
    P = F.normalize(I + 0.3 * _unit(g, n, D), dim=1)
    G = _unit(g, K, D)
    return [x.to(dtype).to(DEVICE) for x in (I, T, P, G)]


def _ref_batch(B, D, dtype, seed=1):
    """DiVE reference batch (fi, ft, pi, pt) rounded to dtype and a float32 centre [D]."""
    g = torch.Generator().manual_seed(seed)
    pi, pt = _unit(g, B, D), _unit(g, B, D)
    fi = F.normalize(pi + 0.2 * _unit(g, B, D), dim=1)
    ft = F.normalize(pt + 0.2 * _unit(g, B, D), dim=1)
    center = (0.05 * torch.randn(D, generator=g, dtype=torch.float64)).float().to(DEVICE)
    return [x.to(dtype).to(DEVICE) for x in (fi, ft, pi, pt)] + [center]


# ----------------------------------------------------------------------------- formulas
def _dive_formula(fi, ft, pi, pt, center):
    """docs/maths.md, section 4, float64: (AVL, PVL, diff_mean)."""
    u, v, m = fi - pi, ft - pt, center
    avl = ((u - m).pow(2).sum(1) + (v - m).pow(2).sum(1)).mean()
    pvl = (u - v).pow(2).sum(1).mean()
    return avl, pvl, ((u + v) / 2).mean(0)


def _lipsum_formula(F_, F0, G, s0):
    """docs/maths.md, section 5, float64: R = |s0 (F - F0) G^T|_F^2 / (2 K B)."""
    V = s0 * (F_ - F0) @ G.T
    return V.pow(2).sum() / (2 * G.shape[0] * F_.shape[0])


def _step_formula(with_m2, with_clip, with_lipsum, with_dive, batch, refs, dd=torch.float64):
    """The five terms of a step in float64 (absent ones 0), the lse [4, n] of the present
    tiles (0 elsewhere), diff_mean, and the gradients of sum_i GRADS[i] terms[i] with respect
    to (image, text, clip_scale, m2_scale, ref_image_ft, ref_text_ft). dd = float32: the same
    in plain float32 eager PyTorch, the baseline of the tolerance."""
    I, T, P, G = (x.detach().cpu().to(dd) for x in batch)
    I.requires_grad_()
    T.requires_grad_()
    s_c = torch.tensor(CLIP_SCALE, dtype=dd, requires_grad=True)
    s_m = torch.tensor(M2_SCALE, dtype=dd, requires_grad=True)
    lam = torch.tensor(LAM, dtype=dd)
    fi, ft, pi, pt, c = (x.detach().cpu().to(dd) for x in refs)
    fi.requires_grad_()
    ft.requires_grad_()
    zero = torch.zeros((), dtype=dd)
    n = I.shape[0]
    terms = [zero] * 5
    lse = torch.zeros(4, n, dtype=dd)
    if with_clip:
        terms[0] = reference.clip_loss(I, T, s_c, zero)
        with torch.no_grad():
            C = s_c * I @ T.T
            lse[2], lse[3] = torch.logsumexp(C, 1), torch.logsumexp(C, 0)
    if with_m2:
        terms[1] = reference.m2mix_loss(I, T, s_m, lam)
        with torch.no_grad():
            A, B = reference._m2_logits(I, T, s_m, lam)
            lse[0], lse[1] = torch.logsumexp(A, 1), torch.logsumexp(B, 1)
    if with_lipsum:
        terms[2] = _lipsum_formula(I, P, G, torch.tensor(LIP_SCALE, dtype=dd))
    diff_mean = torch.zeros(0, dtype=dd)
    if with_dive:
        terms[3], terms[4], diff_mean = _dive_formula(fi, ft, pi, pt, c)
    total = sum(g * t for g, t in zip(GRADS, terms))
    wrt = [I, T, s_c, s_m, fi, ft]
    if total.requires_grad:
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
    else:
        grads = [None] * 6
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
    return [t.detach() for t in terms], lse, diff_mean.detach(), grads


def _step_args(with_m2, with_clip, with_lipsum, with_dive, batch, refs):
    I, T, P, G = batch
    lip = (P, G) if with_lipsum else (None, None)
    dive = tuple(refs) if with_dive else (None,) * 5
    return (I, T, _f32(CLIP_SCALE), _f32(M2_SCALE), _f32(LAM), with_m2, with_clip, *lip,
            _f32(LIP_SCALE), *dive)


def _close_loss(x, ref, bound, what):
    # Losses are compared relative to max(|loss|, 1): the lse - positive-logit terms carry an
    # absolute rounding error of a few ulp of the logits (test_triton_m2mix.py).
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = rel_err(x, ref, floor=1.0)
    assert err <= bound, f"{what}: error {err:.3g} (relative to max(|ref|, 1)) > {bound:.3g}"


def _check_step(flags, n, D, K, B, dtype, seed=0):
    with_m2, with_clip, with_lipsum, with_dive = flags
    batch = _batch(n, D, K, dtype, seed)
    refs = _ref_batch(B, D, dtype, seed + 1)
    args = _step_args(*flags, batch, refs)
    terms, diff_mean, lse = ops.robust_step_fwd(*args)
    g = torch.tensor(GRADS, dtype=torch.float32, device=DEVICE)
    grads = ops.robust_step_bwd(g, *args, lse)
    r_terms, r_lse, r_diff, r_grads = _step_formula(*flags, batch, refs)
    # The bound of each output: the dtype's tolerance, or LOWP_FACTOR times the error of the
    # plain float32 eager computation where that is larger (as test_triton_m2mix.py:
    # the m^2 gradients are ill-conditioned at these scales, eager float32 misses 5e-5 too).
    e_terms, _, _, e_grads = _step_formula(*flags, batch, refs, dd=torch.float32)
    tag = f"flags={flags} n={n} D={D} K={K} B'={B} {dtype}"
    tol = TOLERANCE[dtype]

    def bound(eager, ref, floor=1e-3):
        return max(tol, LOWP_FACTOR * rel_err(eager, ref, floor))

    # Contract: shapes and dtypes as csrc/step_ops.h.
    # Without m^2, CLIP and Lipsum the training batch is not read: it counts as n = 0.
    n_used = n if (with_m2 or with_clip or with_lipsum) else 0
    assert terms.shape == (5,) and terms.dtype == torch.float32
    assert diff_mean.dtype == torch.float32 and diff_mean.shape == ((D,) if with_dive else (0,))
    assert lse.dtype == torch.float32 and lse.shape == (4, n_used)
    shapes = [(n_used, D), (n_used, D), (), (), (B, D) if with_dive else (0, D),
              (B, D) if with_dive else (0, D)]
    dts = [dtype, dtype, torch.float32, torch.float32, dtype, dtype]
    for i, (x, shp, dt) in enumerate(zip(grads, shapes, dts)):
        assert x.shape == shp and x.dtype == dt, f"{tag} output {i}: {x.shape} {x.dtype}"
    if n_used == 0:
        r_lse = r_lse[:, :0]
        r_grads[0], r_grads[1] = r_grads[0][:0], r_grads[1][:0]

    present = (with_clip, with_m2, with_lipsum, with_dive, with_dive)
    for i, name in enumerate(TERMS):
        if present[i]:
            _close_loss(terms[i], r_terms[i], bound(e_terms[i], r_terms[i], 1.0),
                        f"{tag} term {name}")
        else:
            assert terms[i].item() == 0.0, f"{tag} absent term {name}"
    if n_used:
        assert_close_rel(lse, r_lse, tol, f"{tag} lse")
    if not with_m2:
        assert not lse[:2].any()
    if not with_clip:
        assert not lse[2:].any()
    if with_dive:
        assert_close_rel(diff_mean, r_diff, tol, f"{tag} diff_mean")
    names = ("grad_image", "grad_text", "grad_clip_scale", "grad_m2_scale",
             "grad_ref_image_ft", "grad_ref_text_ft")
    for name, x, r, e in zip(names, grads, r_grads, e_grads):
        if x.numel() == 0:
            continue
        if not r.abs().max() > 0:  # terms absent: exactly zero
            assert not x.any(), f"{tag} {name} should be 0"
            continue
        assert_close_rel(x, r, bound(e[:x.shape[0]] if x.dim() else e, r), f"{tag} {name}")


# ----------------------------------------------------------------------------- DiVE
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B,D", [(1, 5), (5, 33), (17, 5), (5, 1)])
def test_dive_matches_formula(B, D, dtype):
    fi, ft, pi, pt, c = _ref_batch(B, D, dtype)
    avl, pvl, dm = ops.dive_fwd(fi, ft, pi, pt, c)
    ga, gp = _f32(0.4), _f32(1.1)
    gfi, gft = ops.dive_bwd(ga, gp, fi, ft, pi, pt, c)
    assert avl.dtype == pvl.dtype == dm.dtype == torch.float32
    assert avl.shape == pvl.shape == () and dm.shape == (D,)
    assert gfi.dtype == gft.dtype == dtype and gfi.shape == gft.shape == (B, D)
    x = [t.detach().double().cpu().requires_grad_() for t in (fi, ft)]
    r_avl, r_pvl, r_dm = _dive_formula(*x, pi.double().cpu(), pt.double().cpu(), c.double().cpu())
    r_gfi, r_gft = torch.autograd.grad(0.4 * r_avl + 1.1 * r_pvl, x)
    tol = TOLERANCE[dtype]
    tag = f"B'={B} D={D} {dtype}"
    assert_close_rel(avl, r_avl, tol, f"{tag} avl")
    assert_close_rel(pvl, r_pvl, tol, f"{tag} pvl")
    assert_close_rel(dm, r_dm.detach(), tol, f"{tag} diff_mean")
    assert_close_rel(gfi, r_gfi, tol, f"{tag} grad_image_ft")
    assert_close_rel(gft, r_gft, tol, f"{tag} grad_text_ft")
    # The closed form of the gradients, m constant (docs/maths.md, section 4).
    u, v = (fi - pi).double().cpu(), (ft - pt).double().cpu()
    m = c.double().cpu()
    assert_close_rel(gfi, 2 / B * (0.4 * (u - m) + 1.1 * (u - v)), tol, f"{tag} du")
    assert_close_rel(gft, 2 / B * (0.4 * (v - m) - 1.1 * (u - v)), tol, f"{tag} dv")


# ----------------------------------------------------------------------------- Lipsum-FT
LIPSUM_CASES = [(1, 1, 5), (3, 7, 33), (17, 80, 5), (17, 7, 33), (3, 80, 33)]


# float32 on every shape; 16-bit inputs on two (the interpreter is slow).
LIPSUM_DTYPE_CASES = [(shape, torch.float32) for shape in LIPSUM_CASES] + [
    (shape, dtype) for dtype in DTYPES.values() if dtype != torch.float32
    for shape in ((17, 80, 5), (3, 7, 33))]


@pytest.mark.parametrize("shape,dtype", LIPSUM_DTYPE_CASES, ids=lambda v: str(v))
def test_lipsum_matches_formula(shape, dtype):
    n, K, D = shape
    I, _, P, G = _batch(n, D, K, dtype)
    s0 = _f32(LIP_SCALE)
    r = ops.lipsum_fwd(I, P, G, s0)
    gI = ops.lipsum_bwd(_f32(0.9), I, P, G, s0)
    assert r.dtype == torch.float32 and r.shape == ()
    assert gI.dtype == dtype and gI.shape == (n, D)
    x = I.detach().double().cpu().requires_grad_()
    ref = _lipsum_formula(x, P.double().cpu(), G.double().cpu(), torch.tensor(LIP_SCALE).double())
    (r_g,) = torch.autograd.grad(0.9 * ref, [x])
    tol = TOLERANCE[dtype]
    tag = f"n={n} K={K} D={D} {dtype}"
    assert_close_rel(r, ref, tol, f"{tag} lipsum")
    assert_close_rel(gI, r_g, tol, f"{tag} grad_image_ft")
    # The closed form of docs/maths.md, section 5: dF = g s0 V G / (K B).
    V = LIP_SCALE * (I.double() - P.double()).cpu() @ G.double().cpu().T
    assert_close_rel(gI, 0.9 * LIP_SCALE * V @ G.double().cpu() / (K * n), tol, f"{tag} dF")


# ----------------------------------------------------------------------------- the step
ALL_FLAGS = [f for f in itertools.product((False, True), repeat=4) if any(f)]


def _flag_id(f):
    return "+".join(name for name, on in zip(("m2", "clip", "lipsum", "dive"), f) if on)


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=[_flag_id(f) for f in ALL_FLAGS])
def test_robust_step_every_combination(flags):
    # Every combination of enabled terms: the sum of the separate formulas.
    _check_step(flags, 17, 33, 7, 5, torch.float32)


STEP_SHAPES = [(1, 5, 1, 1), (3, 5, 80, 5), (3, 33, 1, 1), (17, 5, 80, 1)]


@pytest.mark.parametrize("n,D,K,B", STEP_SHAPES)
def test_robust_step_odd_shapes(n, D, K, B):
    _check_step((True, True, True, True), n, D, K, B, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("flags,n,D,K,B", [((True, True, True, True), 17, 33, 7, 5),
                                           ((True, False, True, True), 3, 5, 80, 1),
                                           ((False, True, True, False), 17, 5, 7, 5)])
def test_robust_step_low_precision(flags, n, D, K, B, dtype):
    _check_step(flags, n, D, K, B, dtype)


# The GPU tile configurations on the interpreter. (n, D, K, B'): n = 145 and D = 136 take the
# large-D design (128 x 64 dlogit tiles: one full row tile and a ragged one, two full 64-wide
# column / feature chunks and a ragged one), K = 70 and B' = 70 a full and a ragged block of
# Lipsum texts and DiVE rows; n = 80, D = 40 the register-resident backward (64-row tiles,
# one feature block); n = 80, D = 72 the d128 class (one-chunk forward, dS backward).
@pytest.mark.skipif(not tb.interpreting(), reason="forces a table architecture on the "
                    "interpreter; on a GPU every test runs its own architecture's table")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("n,D,K,B,dtype", [(145, 136, 70, 70, torch.bfloat16),
                                           (80, 40, 70, 5, torch.float16),
                                           (80, 72, 7, 5, torch.bfloat16)],
                         ids=["145-136-bf16", "80-40-f16", "80-72-bf16"])
def test_robust_step_gpu_tiles(monkeypatch, arch, n, D, K, B, dtype):
    monkeypatch.setattr(tb.configs, "interpreter_arch", arch)
    _check_step((True, True, True, True), n, D, K, B, dtype)


@pytest.fixture
def small_workspace():
    """Sets the workspace limit (bytes) for one test and restores the default after it."""
    yield workspace.set_workspace_limit
    workspace.set_workspace_limit(None)


@pytest.mark.parametrize("flags", [(True, True, True, True), (True, False, False, True),
                                   (False, True, True, False)], ids=lambda f: _flag_id(f))
def test_workspace_chunks(small_workspace, flags):
    # n = 40, D = 33 (the dS design under the interpreter) with a workspace of 16 rows: three
    # chunks (16, 16, 8), the DiVE rows riding on the first. Equal to the one-chunk result up
    # to the GEMMs' float32 summation order, and to the formulas.
    batch = _batch(40, 33, 20, torch.float32)
    refs = _ref_batch(9, 33, torch.float32)
    args = _step_args(*flags, batch, refs)
    _, _, lse = ops.robust_step_fwd(*args)
    g = torch.tensor(GRADS, device=DEVICE)
    whole = ops.robust_step_bwd(g, *args, lse)
    small_workspace(16 * (3 * 40 * 4 + 20 * 4))
    chunked = ops.robust_step_bwd(g, *args, lse)
    for x, y in zip(chunked, whole):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    _check_step(flags, 40, 33, 20, 9, torch.float32)


def test_robust_step_equals_separate_ops():
    # fused step == the separate ops of each term (which are the same kernels with the other
    # terms switched off): terms and gradients agree to float32 rounding.
    batch = _batch(17, 33, 7, torch.float32)
    refs = _ref_batch(5, 33, torch.float32)
    I, T, P, G = batch
    args = _step_args(True, True, True, True, batch, refs)
    terms, diff_mean, lse = ops.robust_step_fwd(*args)
    g = torch.tensor(GRADS, device=DEVICE)
    gI, gT, gsc, gsm, gfi, gft = ops.robust_step_bwd(g, *args, lse)
    s_c, s_m, lam, s_l = _f32(CLIP_SCALE), _f32(M2_SCALE), _f32(LAM), _f32(LIP_SCALE)
    m2, clip, lse_m = ops.m2mix_fwd(I, T, s_m, lam, s_c, True)
    lip = ops.lipsum_fwd(I, P, G, s_l)
    avl, pvl, dm = ops.dive_fwd(*refs)
    close = dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(terms, torch.stack([clip, m2, lip, avl, pvl]), **close)
    torch.testing.assert_close(lse, lse_m, **close)
    torch.testing.assert_close(diff_mean, dm, **close)
    mI, mT, msm, msc = ops.m2mix_bwd(g[1], g[0], I, T, s_m, lam, s_c, lse_m, True)
    lI = ops.lipsum_bwd(g[2], I, P, G, s_l)
    dfi, dft = ops.dive_bwd(g[3], g[4], *refs)
    torch.testing.assert_close(gI, mI + lI, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gT, mT, **close)
    torch.testing.assert_close(gsc, msc, **close)
    torch.testing.assert_close(gsm, msm, **close)
    torch.testing.assert_close(gfi, dfi, **close)
    torch.testing.assert_close(gft, dft, **close)


def test_robust_step_dive_only_ignores_batch():
    # Without m^2, CLIP and Lipsum the training batch is not read (csrc/step_ops.h): empty
    # image / text are fine, the image / text gradients are [0, D].
    refs = _ref_batch(5, 33, torch.float16)
    empty = torch.empty(0, device=DEVICE)
    args = (empty, empty, _f32(CLIP_SCALE), _f32(M2_SCALE), _f32(LAM), False, False, None,
            None, _f32(LIP_SCALE), *refs)
    terms, dm, lse = ops.robust_step_fwd(*args)
    assert lse.shape == (4, 0) and dm.shape == (33,)
    avl, pvl, dm2 = ops.dive_fwd(*refs)
    assert torch.equal(terms, torch.stack([avl * 0, avl * 0, avl * 0, avl, pvl]))
    assert torch.equal(dm, dm2)
    g = torch.tensor(GRADS, device=DEVICE)
    gI, gT, gsc, gsm, gfi, gft = ops.robust_step_bwd(g, *args, lse)
    assert gI.shape == gT.shape == (0, 33) and gI.dtype == torch.float16
    assert gsc.item() == 0.0 and gsm.item() == 0.0
    dfi, dft = ops.dive_bwd(g[3], g[4], *refs)
    assert torch.equal(gfi, dfi) and torch.equal(gft, dft)


# ----------------------------------------------------------------------------- contract
@pytest.mark.skipif(not tb.interpreting(), reason="counts the interpreter's kernel launches")
@pytest.mark.parametrize("design", ["products", "gram"])
def test_one_launch_per_pass(monkeypatch, design):
    # The fusion contract: the terms that share inputs share one pass. With the three
    # products a step's forward is one launch whatever its terms; its register-resident
    # backward one row launch (plus the column launch with m^2 or CLIP), its large-D backward
    # one dS launch per workspace chunk (the DiVE rows riding on the first). With the Gram
    # formulation the tiles of a step with m^2 take its own kernels instead (one forward
    # launch over the triangle, one per backward strip where the backward takes the dS
    # workspace), the other terms the same step kernels with the tiles switched off. No other
    # kernel of the backend runs.
    counts = {}

    class Counting:
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def run(self, *args, **kwargs):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.inner.run(*args, **kwargs)

    for mod, name in [(tb.step_ops, "_STEP_FWD"), (tb.step_ops, "_STEP_ROWS"),
                      (tb.step_ops, "_STEP_COLS"), (tb.step_ops, "_STEP_DLOGIT"),
                      (tb.step_ops, "_GRAM_LSE"), (tb.step_ops, "_GRAM_STRIP"),
                      (tb.contrastive_ops, "_CLIP_LSE"), (tb.contrastive_ops, "_SIGLIP_SUM"),
                      (tb.contrastive_ops, "_GRAD_ROWS"), (tb.contrastive_ops, "_DLOGIT")]:
        kernel = getattr(mod, name)
        monkeypatch.setattr(kernel, "_interpreted", Counting(kernel._interpreted, name))
    g = torch.tensor(GRADS, device=DEVICE)
    gram = design == "gram"
    rft.set_step_design(design)
    try:
        for D in (5, 33):  # register-resident backward; dS workspace
            batch = _batch(17, D, 7, torch.float32)
            refs = _ref_batch(5, D, torch.float32)
            for flags, cols in [((True, True, True, True), 1), ((True, False, False, False), 1),
                                ((False, False, True, True), 0), ((False, False, False, True), 0)]:
                counts.clear()
                args = _step_args(*flags, batch, refs)
                _, _, lse = ops.robust_step_fwd(*args)
                small = any(flags[2:])  # Lipsum-FT or DiVE
                if gram and flags[0]:
                    assert counts == {"_GRAM_LSE": 1, **({"_STEP_FWD": 1} if small else {})}
                else:
                    assert counts == {"_STEP_FWD": 1}, flags
                counts.clear()
                ops.robust_step_bwd(g, *args, lse)
                if D == 5:
                    want = {"_STEP_ROWS": 1, **({"_STEP_COLS": 1} if cols else {})}
                elif gram and flags[0]:
                    # 17 batch rows: two strips (chunk_rows never lets one hold more than
                    # half the rows, rounded up to BLOCK_M), and two Lipsum chunks.
                    want = {"_GRAM_STRIP": 2, **({"_STEP_DLOGIT": 2} if small else {})}
                else:
                    # Two chunks likewise; DiVE alone has no batch rows and its rows take
                    # one launch.
                    want = {"_STEP_DLOGIT": 2 if any(flags[:3]) else 1}
                assert counts == want, (D, flags)
    finally:
        rft.set_step_design(None)


@pytest.mark.parametrize("flags", [(False, False, True, True), (True, False, False, False),
                                   (False, True, True, False)], ids=lambda f: _flag_id(f))
def test_absent_terms_gradients_ignored(flags):
    # The upstream gradients of absent terms never enter the results, not even as 0 * g:
    # NaN there gives the same outputs as 0.
    batch = _batch(17, 5, 7, torch.float32)
    refs = _ref_batch(5, 5, torch.float32)
    args = _step_args(*flags, batch, refs)
    _, _, lse = ops.robust_step_fwd(*args)
    present = torch.tensor([flags[1], flags[0], flags[2], flags[3], flags[3]], device=DEVICE)
    g = torch.tensor(GRADS, device=DEVICE)
    want = ops.robust_step_bwd(torch.where(present, g, 0.0), *args, lse)
    got = ops.robust_step_bwd(torch.where(present, g, float("nan")), *args, lse)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_deterministic():
    batch = _batch(40, 33, 20, torch.float32)
    refs = _ref_batch(40, 33, torch.float32)  # B' = 40: three DiVE programs
    args = _step_args(True, True, True, True, batch, refs)
    g = torch.tensor(GRADS, device=DEVICE)
    first = ops.robust_step_fwd(*args)
    first = list(first) + list(ops.robust_step_bwd(g, *args, first[2]))
    second = ops.robust_step_fwd(*args)
    second = list(second) + list(ops.robust_step_bwd(g, *args, second[2]))
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_inputs_not_written():
    batch = _batch(17, 5, 7, torch.float32)
    refs = _ref_batch(5, 5, torch.float32)
    args = _step_args(True, True, True, True, batch, refs)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [x.clone() for x in tensors]
    _, _, lse = ops.robust_step_fwd(*args)
    ops.robust_step_bwd(torch.tensor(GRADS, device=DEVICE), *args, lse)
    for x, y in zip(tensors, before):
        assert torch.equal(x, y)


def test_noncontiguous_inputs():
    batch = _batch(17, 5, 7, torch.float32)
    refs = _ref_batch(5, 5, torch.float32)

    def strided(x):
        base = torch.zeros(x.shape[0], 2 * x.shape[1], device=DEVICE, dtype=x.dtype)
        base[:, ::2] = x
        return base[:, ::2]

    args = _step_args(True, True, True, True, batch, refs)
    sargs = _step_args(True, True, True, True, [strided(x) for x in batch],
                       [strided(x) for x in refs[:4]] + [refs[4]])
    assert not sargs[0].is_contiguous()
    g = torch.tensor(GRADS, device=DEVICE)
    want = list(ops.robust_step_fwd(*args))
    got = list(ops.robust_step_fwd(*sargs))
    want += list(ops.robust_step_bwd(g, *args, want[2]))
    got += list(ops.robust_step_bwd(g, *sargs, got[2]))
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("design", ["gram", "products"])
@pytest.mark.parametrize("n,D,K", [(48, 5, 64), (144, 17, 150)])  # fused and dS workspace
def test_no_n_by_n_or_n_by_k_buffers(small_workspace, n, D, K, design):
    # Record every float tensor the op bodies create (kernels launched directly, as in eager
    # mode): nothing may approach n x n or n x K. The dS workspace of the large-D backward is
    # bounded by the workspace limit, here 16 rows (one BLOCK_M): [2 * 16, n] for UA and UB,
    # [2 * 16, 2 n] (its row stride rounded up to 16) for the Gram formulation's strip of S.
    from torch._library.triton import set_wrap_triton_enabled
    record = largest_float_tensor_mode()

    small_workspace(16 * (3 * n * 4 + 4 * K))
    batch = _batch(n, D, K, torch.float32)
    refs = _ref_batch(5, D, torch.float32)
    args = _step_args(True, True, True, True, batch, refs)
    g = torch.tensor(GRADS, device=DEVICE)
    rft.set_step_design(design)
    try:
        with record, set_wrap_triton_enabled(False):
            _, _, lse = tb.step_ops.robust_step_fwd._init_fn(*args)
            tb.step_ops.robust_step_bwd._init_fn(g, *args, lse)
    finally:
        rft.set_step_design(None)
    # Inputs themselves are K x D (G); the largest buffer may be that, n x D, or (large D)
    # the workspace. (The kernels see D padded to a multiple of 16: configs.aligned_dim.)
    ws = 0
    if D > tb.configs.INTERPRETER_FUSED_BWD_MAX_D:
        ws = 2 * 16 * (tb.configs.aligned_dim(2 * n) if design == "gram" else n)
    Dk = tb.configs.aligned_dim(D)
    assert 0 < record.largest <= max(4 * n, n * Dk, K * Dk, ws) < min(n * n, n * K) // 2


def test_argument_checks():
    I, T, P, G = _batch(3, 5, 7, torch.float32)
    fi, ft, pi, pt, c = _ref_batch(2, 5, torch.float32)
    s = _f32(1.0)
    g = torch.ones(5, device=DEVICE)

    def step(**kw):
        a = dict(image=I, text=T, clip_scale=s, m2_scale=s, lam=s, with_m2=False,
                 with_clip=False, image_pre=None, lipsum_texts=None, lipsum_scale=s,
                 ref_image_ft=None, ref_text_ft=None, ref_image_pre=None, ref_text_pre=None,
                 center=None)
        a.update(kw)
        return ops.robust_step_fwd(*a.values())

    with pytest.raises(RuntimeError, match="no term"):
        step()
    with pytest.raises(RuntimeError, match="Lipsum needs both"):
        step(image_pre=P)
    with pytest.raises(RuntimeError, match="lipsum_texts"):  # wrong D
        step(image_pre=P, lipsum_texts=G[:, :4].contiguous())
    with pytest.raises(RuntimeError, match="image and image_pre"):
        step(image_pre=P[:2].contiguous(), lipsum_texts=G)
    with pytest.raises(RuntimeError, match="lipsum_scale"):
        step(image_pre=P, lipsum_texts=G, lipsum_scale=s.double())
    with pytest.raises(RuntimeError, match="DiVE needs"):
        step(ref_image_ft=fi, ref_text_ft=ft, ref_image_pre=pi, ref_text_pre=pt)
    with pytest.raises(RuntimeError, match="center"):
        ops.dive_fwd(fi, ft, pi, pt, c.double())
    with pytest.raises(RuntimeError, match="center"):
        ops.dive_fwd(fi, ft, pi, pt, c[:4])
    with pytest.raises(RuntimeError, match="ref_image_ft and ref_text_ft"):
        ops.dive_fwd(fi, ft[:1].contiguous(), pi, pt, c)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.dive_fwd(fi.double(), ft.double(), pi.double(), pt.double(), c)
    with pytest.raises(RuntimeError, match="training batch"):  # DiVE dtype != batch dtype
        step(with_clip=True, ref_image_ft=fi.half(), ref_text_ft=ft.half(),
             ref_image_pre=pi.half(), ref_text_pre=pt.half(), center=c)
    with pytest.raises(RuntimeError, match="lam"):
        step(with_m2=True, lam=s.reshape(1))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.lipsum_fwd(I.double(), P.double(), G.double(), s)
    with pytest.raises(RuntimeError, match="float32"):
        ops.lipsum_fwd(I, P, G, s.double())
    with pytest.raises(RuntimeError, match="image and text"):
        step(with_clip=True, text=T[:2].contiguous())
    args = (I, T, s, s, s, True, False, None, None, s, None, None, None, None, None)
    _, _, lse = ops.robust_step_fwd(*args)
    with pytest.raises(RuntimeError, match="grad_terms"):
        ops.robust_step_bwd(g[:4], *args, lse)
    with pytest.raises(RuntimeError, match="statistics"):
        ops.robust_step_bwd(g, *args, lse[:2])


def test_compile_fullgraph_aot_eager():
    # Dynamo + AOTAutograd functionalisation of the triton_ops (None arguments included),
    # executed eagerly.
    def f(I, T, P, G, fi, ft, pi, pt, c, s_c, s_m, lam, s_l, g):
        full = (I, T, s_c, s_m, lam, True, True, P, G, s_l, fi, ft, pi, pt, c)
        terms, dm, lse = ops.robust_step_fwd(*full)
        gi, gt, gsc, gsm, gfi, gft = ops.robust_step_bwd(g, *full, lse)
        part = (I, T, s_c, s_m, lam, False, True, None, None, s_l, None, None, None, None, None)
        terms2, _, lse2 = ops.robust_step_fwd(*part)
        gi2, gt2, _, _, _, _ = ops.robust_step_bwd(g, *part, lse2)
        lip = ops.lipsum_fwd(I, P, G, s_l)
        gl = ops.lipsum_bwd(g[2], I, P, G, s_l)
        avl, pvl, dm3 = ops.dive_fwd(fi, ft, pi, pt, c)
        da, db = ops.dive_bwd(g[3], g[4], fi, ft, pi, pt, c)
        return (terms + terms2, dm * 2 + dm3, lse + lse2, gi + gi2 + gl, gt + gt2, gsc + gsm,
                gfi + da, gft + db, lip + avl * pvl)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (5, 9):  # the second size reuses the dynamic-shape graph
        batch = _batch(n, 7, 3, torch.float32, seed=n)
        refs = _ref_batch(n - 2, 7, torch.float32, seed=n)
        args = [*batch, *refs, _f32(CLIP_SCALE), _f32(M2_SCALE), _f32(LAM), _f32(LIP_SCALE),
                torch.tensor(GRADS, device=DEVICE)]
        versions = [x._version for x in args]
        for x, y in zip(compiled(*args), f(*args)):
            torch.testing.assert_close(x, y)
        assert [x._version for x in args] == versions  # the ops must not write their inputs


# ----------------------------------------------------------------------------- native
def _native_or_skip(name):
    import robustft_ext  # noqa: F401  (loads the extension, if built)

    op = getattr(torch.ops.robustft_ext, name, None)
    if op is None:
        pytest.skip(f"torch.ops.robustft_ext.{name} does not exist in this build of the "
                    "extension (not rebuilt since the step ops were added)")
    return op


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, True, True, False),
                                   (True, False, False, True), (False, False, True, False),
                                   (False, False, False, True)],
                         ids=lambda f: _flag_id(f))
def test_matches_native(flags):
    # fused_ops("triton") and fused_ops("native") are interchangeable: same outputs, shapes
    # and dtypes (native on CPU copies of the inputs).
    _native_or_skip("robust_step_fwd")
    nat = torch.ops.robustft_ext
    batch = _batch(17, 33, 7, torch.float32)
    refs = _ref_batch(5, 33, torch.float32)
    args = _step_args(*flags, batch, refs)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    g = torch.tensor(GRADS)
    t_fwd = ops.robust_step_fwd(*args)
    n_fwd = nat.robust_step_fwd(*cpu)
    t_bwd = ops.robust_step_bwd(g.to(DEVICE), *args, t_fwd[2])
    n_bwd = nat.robust_step_bwd(g, *cpu, n_fwd[2])
    for x, y in zip(list(t_fwd) + list(t_bwd), list(n_fwd) + list(n_bwd)):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x.cpu(), y, rtol=5e-5, atol=5e-6)


def test_separate_ops_match_native():
    _native_or_skip("dive_fwd")
    _native_or_skip("lipsum_fwd")
    nat = torch.ops.robustft_ext
    I, _, P, G = _batch(17, 33, 80, torch.float32)
    refs = _ref_batch(5, 33, torch.float32)
    s, g = _f32(LIP_SCALE), _f32(0.9)
    pairs = [
        (ops.lipsum_fwd(I, P, G, s), nat.lipsum_fwd(I.cpu(), P.cpu(), G.cpu(), s.cpu())),
        (ops.lipsum_bwd(g, I, P, G, s),
         nat.lipsum_bwd(g.cpu(), I.cpu(), P.cpu(), G.cpu(), s.cpu())),
    ]
    pairs += list(zip(ops.dive_fwd(*refs), nat.dive_fwd(*(x.cpu() for x in refs))))
    pairs += list(zip(ops.dive_bwd(g, g * 2, *refs),
                      nat.dive_bwd(g.cpu(), g.cpu() * 2, *(x.cpu() for x in refs))))
    for x, y in pairs:
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x.cpu(), y, rtol=5e-5, atol=5e-6)
