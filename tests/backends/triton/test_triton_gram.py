"""Tests of the Triton backend's symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md,
section 9.4; robustft_ext/triton_backend/gram_kernels.py and its launches in step_ops.py):
the forward over the triangle of tiles (gram_lse_kernel) and the backward strips with their
library GEMMs (gram_strip_kernel), against the float64 reference (robustft_ext.reference) and
against the three-product design (robustft_ext.step_design "products").

Without a CUDA device the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with 16 x 16 tiles and 2 persistent programs: n = 1, 16 (one whole tile),
17 (a ragged second tile), 40 (three row blocks, six tiles, the programs' runs crossing a row
block) cover the diagonal tiles, the ragged edges and the merge of the programs' partial
states; D = 5, 20, 33 are not multiples of 16 (the features reach the kernels padded), D = 33
loops over three feature chunks. Under the interpreter the `strips` fixture makes every D take
the Gram backward, which otherwise serves D > 16 there (the register-resident three-product
backward the smaller D), as it serves D > 64 on a GPU. test_gpu_tiles runs the sm_90 and sm_80
tables' tiles, test_several_strips a workspace of one tile row per strip.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import (LOWP_FACTOR, TOLERANCE, assert_close_rel, import_triton_backend,
                     m2mix_eager_lowp, rel_err)
import robustft_ext as rft
from robustft_ext import reference, workspace
from robustft_ext.step_design import GRAM_WEIGHT_LIMIT

pytestmark = pytest.mark.triton
tb = import_triton_backend()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.robustft_triton
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
G_M2, G_CLIP = 0.7, 1.3  # non-unit upstream gradients
LAM = 0.35
OUTPUTS = ("m2_loss", "clip_loss", "lse", "grad_image", "grad_text", "grad_m2_scale",
           "grad_clip_scale")
KERNELS = ("_GRAM_LSE", "_GRAM_STRIP", "_STEP_FWD", "_STEP_ROWS", "_STEP_COLS", "_STEP_DLOGIT",
           "_SLERP_MIX")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def design():
    """design("gram") or design("products") for the rest of the test."""
    yield rft.set_step_design
    rft.set_step_design(None)


@pytest.fixture
def strips(monkeypatch):
    """Under the interpreter, every D takes the Gram backward's strips (the register-resident
    backward serves none); on a GPU the D classes keep their designs (_strips_serve)."""
    if tb.interpreting():
        monkeypatch.setattr(tb.configs, "INTERPRETER_FUSED_BWD_MAX_D", 0)


def _strips_serve(D: int) -> bool:
    """Does a backward at feature dimension D take the Gram strips (not the register-resident
    kernels)?"""
    return not tb.configs.fused_backward("step", torch.device(DEVICE), tb.configs.aligned_dim(D))


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: launches} of the step ops' kernels, counted from here on."""
    counts = {}

    def counting(run, name):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return run(*args, **kwargs)
        return counted

    for name in KERNELS:
        kernel = getattr(tb.step_ops, name)
        if isinstance(kernel, tb.launch.InterpretedKernel):
            inner = kernel._interpreted
            monkeypatch.setattr(inner, "run", counting(inner.run, name))
        else:
            monkeypatch.setattr(kernel, "run", counting(kernel.run, name))
    return counts


# ----------------------------------------------------------------------------- helpers
def _pairs(n, D, dtype, seed=0, cos=None):
    """L2-normalised image / text rows (text correlated with its image), rounded to dtype;
    cos: row 0's pair at that cosine (near -1: a near-opposite pair)."""
    g = torch.Generator().manual_seed(seed)
    I = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    T = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64) + 1.5 * I, dim=1)
    if cos is not None:
        e = F.normalize(T[0] - (T[0] @ I[0]) * I[0], dim=0)
        T[0] = cos * I[0] + (1 - cos * cos) ** 0.5 * e
    return I.to(dtype).to(DEVICE), T.to(dtype).to(DEVICE)


def _scalars(m2_scale, clip_scale):
    f32 = dict(dtype=torch.float32, device=DEVICE)
    return (torch.tensor(m2_scale, **f32), torch.tensor(LAM, **f32),
            torch.tensor(clip_scale, **f32))


def _run(I, T, s_m, lam, s_c, with_clip):
    """The seven outputs of m2mix_fwd / m2mix_bwd (OUTPUTS)."""
    m2, clip, lse = ops.m2mix_fwd(I, T, s_m, lam, s_c, with_clip)
    g_m2, g_clip = (torch.tensor(x, device=DEVICE) for x in (G_M2, G_CLIP))
    return [m2, clip, lse, *ops.m2mix_bwd(g_m2, g_clip, I, T, s_m, lam, s_c, lse, with_clip)]


def _reference(I, T, s_m, lam, s_c, with_clip, lowp=False):
    """OUTPUTS from robustft_ext.reference in float64 on the same (rounded) inputs; lowp:
    from the plain eager computation in the inputs' 16-bit dtype (the baseline of the
    low-precision bound; its lse is not formed)."""
    dt = I.dtype if lowp else torch.float64
    Il, Tl = (x.detach().cpu().to(dt).requires_grad_() for x in (I, T))
    sm, sc = (x.detach().cpu().to(dt).requires_grad_() for x in (s_m, s_c))
    lam_d = lam.detach().cpu().to(dt)
    lse = None
    if lowp:
        m2, clip = m2mix_eager_lowp(Il, Tl, sm, lam_d, sc)
    else:
        clip, m2 = reference.clip_m2mix_loss(Il, Tl, sc, sm, lam_d)
        with torch.no_grad():
            A, B = reference._m2_logits(Il, Tl, sm, lam_d)
            C = sc * Il @ Tl.T
            lse = torch.stack([torch.logsumexp(A, 1), torch.logsumexp(B, 1),
                               torch.logsumexp(C, 1), torch.logsumexp(C, 0)])
            lse = lse if with_clip else lse[:2]
    if not with_clip:
        clip = clip * 0
    grads = torch.autograd.grad(G_M2 * m2 + G_CLIP * clip, [Il, Tl, sm, sc])
    return [m2.detach(), clip.detach(), lse, *grads]


def _check_against_reference(got, I, T, s_m, lam, s_c, with_clip, tag):
    ref = _reference(I, T, s_m, lam, s_c, with_clip)
    lowp = I.dtype != torch.float32
    base = _reference(I, T, s_m, lam, s_c, with_clip, lowp=True) if lowp else [None] * 7
    n = I.shape[0]
    assert got[2].shape == (4 if with_clip else 2, n)
    assert got[3].dtype == got[4].dtype == I.dtype
    for name, x, r, b in zip(OUTPUTS, got, ref, base):
        if name in ("clip_loss", "grad_clip_scale") and not with_clip:
            assert x.item() == 0.0, f"{tag} {name} without CLIP"
            continue
        bound = TOLERANCE[I.dtype]
        if b is not None:
            floor = 1.0 if x.dim() == 0 else 1e-3
            bound = max(bound, LOWP_FACTOR * rel_err(b, r, floor))
        # Losses and scale gradients relative to max(|ref|, 1): their rounding error is
        # absolute, a few ulp of the logits (test_triton_m2mix.py).
        assert_close_rel(x, r, bound, f"{tag} {name}", floor=1.0 if x.dim() == 0 else 1e-3)


# ----------------------------------------------------------------------------- the reference
# float32: every n x D x with / without CLIP; 16-bit: three shapes, both backward classes.
F32_CASES = [(n, D, clip) for n in (1, 16, 17, 40) for D in (5, 33) for clip in (False, True)]
LOWP_CASES = [(17, 33, True), (40, 20, False), (3, 5, True)]


def _reference_params():
    for n, D, clip in F32_CASES:
        yield pytest.param(n, D, clip, torch.float32, id=f"{n}-{D}-{clip}-f32")
    for n, D, clip in LOWP_CASES:
        for tag in ("bf16", "f16"):
            yield pytest.param(n, D, clip, DTYPES[tag], id=f"{n}-{D}-{clip}-{tag}")


@pytest.mark.parametrize("n,D,with_clip,dtype", list(_reference_params()))
def test_gram_matches_reference(n, D, with_clip, dtype, design, strips, launches):
    design("gram")
    I, T = _pairs(n, D, dtype)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    got = _run(I, T, s_m, lam, s_c, with_clip)
    assert launches.get("_GRAM_LSE") == 1
    if _strips_serve(D):
        assert launches.get("_GRAM_STRIP", 0) >= 1
        assert "_SLERP_MIX" not in launches  # no mixed-negative buffer
    _check_against_reference(got, I, T, s_m, lam, s_c, with_clip, f"n={n} D={D} {dtype}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("m2_scale,clip_scale", [(1 / 0.07, 100.0), (100.0, 1 / 0.07)],
                         ids=["paper-scales", "swapped"])
def test_both_scales(m2_scale, clip_scale, dtype, design, strips):
    # The paper's scales (m^2 at 1 / 0.07, CLIP at 100), and the other way round: the sharp
    # softmax on either term, both scales' gradients.
    design("gram")
    I, T = _pairs(40, 33, dtype, seed=2)
    s_m, lam, s_c = _scalars(m2_scale, clip_scale)
    got = _run(I, T, s_m, lam, s_c, True)
    _check_against_reference(got, I, T, s_m, lam, s_c, True, f"scales {m2_scale}, {clip_scale}")


@pytest.mark.parametrize("n,D", [(17, 5), (40, 16)])
def test_gram_forward_with_the_register_resident_backward(n, D, design, launches):
    # At small D the backward is the three products' register-resident pass, on the Gram
    # forward's statistics.
    design("gram")
    I, T = _pairs(n, D, torch.float32, seed=1)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    got = _run(I, T, s_m, lam, s_c, True)
    assert launches == {"_GRAM_LSE": 1, "_STEP_ROWS": 1, "_STEP_COLS": 1, "_SLERP_MIX": 1}
    assert not _strips_serve(D)
    _check_against_reference(got, I, T, s_m, lam, s_c, True, f"n={n} D={D}")


# ----------------------------------------------------------------------------- the products
@pytest.mark.parametrize("with_clip", [False, True])
@pytest.mark.parametrize("n,D", [(40, 33), (17, 5)])
def test_gram_agrees_with_the_products(n, D, with_clip, design, strips, launches):
    I, T = _pairs(n, D, torch.float32, seed=3)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    out = {}
    for name in ("gram", "products"):
        design(name)
        launches.clear()
        out[name] = _run(I, T, s_m, lam, s_c, with_clip)
        assert ("_GRAM_LSE" in launches) == (name == "gram")
        assert ("_GRAM_STRIP" in launches) == (name == "gram" and _strips_serve(D))
    for what, x, y in zip(OUTPUTS, out["gram"], out["products"]):
        assert_close_rel(x, y, 2e-6 if x.dim() < 2 else 2e-5, what,
                         floor=1.0 if x.dim() == 0 else 1e-3)
    # Different arithmetic, so not the same bits: the Gram path did run.
    assert not all(torch.equal(x, y) for x, y in zip(out["gram"], out["products"]))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cos", [-0.99, -1.0 + 1e-5, -1.0])
def test_a_near_opposite_pair_takes_the_products_bit_for_bit(cos, dtype, design, strips,
                                                            launches):
    """Row 0's pair past the weights' limit (robustft_ext.step_design.GRAM_WEIGHT_LIMIT,
    docs/maths.md 9.4): the batch is evaluated by the three products, whose M is formed in float64, bit for
    bit, and as accurately as the reference allows."""
    I, T = _pairs(24, 33, dtype, seed=5, cos=cos)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    from robustft_ext.slerp_maths import slerp_weights
    weights = slerp_weights((I.double() * T.double()).sum(1), lam)
    assert weights[:2].abs().max() > GRAM_WEIGHT_LIMIT
    out = {}
    for name in ("gram", "products"):
        design(name)
        launches.clear()
        out[name] = _run(I, T, s_m, lam, s_c, True)
        assert "_GRAM_LSE" not in launches and "_GRAM_STRIP" not in launches
    for what, x, y in zip(OUTPUTS, out["gram"], out["products"]):
        assert torch.equal(x, y), what
    if cos > -1.0 + 1e-6:  # (past the slerp's clamp the reference is the clamped mix)
        _check_against_reference(out["gram"], I, T, s_m, lam, s_c, True, f"cos={cos}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_a_far_but_not_opposite_pair_stays_gram(dtype, design, strips, launches):
    # Row 0 at 150 degrees (weights about 1.9): within the limit, so the Gram formulation
    # serves it, to the reference's accuracy.
    design("gram")
    I, T = _pairs(24, 33, dtype, seed=6, cos=-0.866)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    got = _run(I, T, s_m, lam, s_c, True)
    assert launches.get("_GRAM_LSE") == 1 and "_SLERP_MIX" not in launches
    _check_against_reference(got, I, T, s_m, lam, s_c, True, "cos=-0.866")


def test_the_choice_of_design(design):
    # _gram_serves: the design setting, the weights' limit, and traced (fake) weights, which
    # cannot be read and take the three products.
    from torch._subclasses.fake_tensor import FakeTensorMode

    serves = tb.step_ops._gram_serves
    ok = torch.tensor([[0.5, 3.9], [0.6, 0.2], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    over = ok.clone()
    over[1, 0] = -4.01
    design("gram")
    assert serves(ok) and not serves(over) and not serves(ok[:, :0])
    with FakeTensorMode() as mode:
        assert not serves(mode.from_tensor(ok))
    design("products")
    assert not serves(ok)


# ----------------------------------------------------------------------------- tile edges
@pytest.mark.skipif(not tb.interpreting(), reason="forces a table architecture on the "
                    "interpreter; on a GPU every test runs its own architecture's table")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("n,D,dtype", [(130, 136, torch.bfloat16), (70, 72, torch.float16),
                                       (33, 80, torch.float32)],
                         ids=["130-136-bf16", "70-72-f16", "33-80-f32"])
def test_gpu_tiles(monkeypatch, arch, n, D, dtype, design, launches):
    # The sm_90 / sm_80 tables' tiles (64 x 64 or 32 x 32 forward, 64 x 32 or 32 x 64 strips):
    # whole and ragged tiles, several row blocks and feature chunks.
    monkeypatch.setattr(tb.configs, "interpreter_arch", arch)
    design("gram")
    I, T = _pairs(n, D, dtype, seed=4)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    got = _run(I, T, s_m, lam, s_c, True)
    assert launches.get("_GRAM_LSE") == 1 and launches.get("_GRAM_STRIP", 0) >= 1
    _check_against_reference(got, I, T, s_m, lam, s_c, True, f"sm_{arch} n={n} D={D}")


@pytest.mark.parametrize("with_clip", [False, True])
def test_several_strips(with_clip, design, launches):
    # A workspace of one row block per strip (under the interpreter three strips of 16, 16 and
    # 8 rows), each against the columns from its first row on, the columns past its rows
    # transposed onto theirs. Equal to the fewest strips' result up to the GEMMs' summation
    # order, and to the reference.
    design("gram")
    n, D = 40, 72
    I, T = _pairs(n, D, torch.float32, seed=7)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    whole = _run(I, T, s_m, lam, s_c, with_clip)
    ws_dtype = tb.ds_workspace.ds_dtype(torch.float32)
    cfg = tb.configs.select("gram_strip", I.device, torch.float32, tb.configs.aligned_dim(D))
    row_block = tb.step_ops.gram_strip_row_bytes(n, ws_dtype, cfg) * cfg.block_m
    fewest = launches["_GRAM_STRIP"]  # (a strip holds at most half the rows)
    launches.clear()
    workspace.set_workspace_limit(row_block)
    try:
        split = _run(I, T, s_m, lam, s_c, with_clip)
    finally:
        workspace.set_workspace_limit(None)
    assert launches["_GRAM_STRIP"] == -(-n // cfg.block_m) >= fewest
    for what, x, y in zip(OUTPUTS, split, whole):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=what)
    _check_against_reference(split, I, T, s_m, lam, s_c, with_clip, "three strips")


def test_the_triangle_schedule():
    # maths.triangle_tile / triangle_next as gram_lse_kernel walks them: every tile of the
    # upper triangle exactly once, whatever the number of programs.
    import triton
    import triton.language as tl

    @triton.jit
    def walk(out_ptr, nb, per_program):
        pid = tl.program_id(0)
        t_begin = pid * per_program
        t_end = tl.minimum(nb * (nb + 1) // 2, t_begin + per_program)
        i, j = tb.maths.triangle_tile(t_begin, nb)
        for t in range(t_begin, t_end):
            tl.store(out_ptr + 2 * t, i)
            tl.store(out_ptr + 2 * t + 1, j)
            i, j = tb.maths.triangle_next(i, j, nb)

    kernel = tb.launch.traceable(walk)
    for nb in (1, 2, 3, 6):
        tiles = nb * (nb + 1) // 2
        want = [(i, j) for i in range(nb) for j in range(i, nb)]
        for programs in (1, 2, 4, tiles):
            per = triton.cdiv(tiles, programs)
            out = torch.full((tiles, 2), -1, dtype=torch.int32)
            kernel[(triton.cdiv(tiles, per),)](out, nb, per)
            assert [tuple(x) for x in out.tolist()] == want, (nb, programs)


# ----------------------------------------------------------------------------- the step
def test_robust_step_agrees_with_the_products(design, launches):
    # Every term: the tiles by the Gram kernels, Lipsum-FT and DiVE by the step kernels beside
    # them (one launch each pass), the pair pass joining the gradients.
    g = torch.Generator().manual_seed(8)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1).to(DEVICE)  # noqa: E731
    n, D = 17, 33
    I = unit(n, D)
    T = F.normalize(unit(n, D) + I, dim=1)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    s = [torch.tensor(x, **f32) for x in (10.0, 14.3, LAM, 14.3)]
    args = (I, T, s[0], s[1], s[2], True, True, unit(n, D), unit(7, D), s[3], unit(5, D),
            unit(5, D), unit(5, D), unit(5, D), 0.05 * torch.ones(D, **f32))
    grads = torch.tensor([1.3, 0.7, 0.9, 0.4, 1.1], **f32)
    out = {}
    for name in ("gram", "products"):
        design(name)
        launches.clear()
        terms, dm, lse = ops.robust_step_fwd(*args)
        out[name] = [terms, dm, lse, *ops.robust_step_bwd(grads, *args, lse)]
        if name == "gram" and tb.interpreting():  # (17 rows: two strips, two Lipsum chunks)
            assert launches == {"_GRAM_LSE": 1, "_GRAM_STRIP": 2, "_STEP_FWD": 1,
                                "_STEP_DLOGIT": 2}, launches
    for i, (x, y) in enumerate(zip(out["gram"], out["products"])):
        assert_close_rel(x, y, 2e-5, f"output {i}", floor=1.0 if x.dim() == 0 else 1e-3)


# ----------------------------------------------------------------------------- contract
def test_deterministic_mode_keeps_the_gram_formulation(design, strips, launches):
    # The partial statistics are merged in a fixed order: under torch's deterministic mode
    # the Gram formulation serves, bit for bit as outside it, run after run.
    design("gram")
    I, T = _pairs(40, 33, torch.float32, seed=9)
    s_m, lam, s_c = _scalars(14.3, 10.0)
    free = _run(I, T, s_m, lam, s_c, True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        launches.clear()
        first = _run(I, T, s_m, lam, s_c, True)
        assert launches.get("_GRAM_LSE") == 1
        second = _run(I, T, s_m, lam, s_c, True)
    finally:
        torch.use_deterministic_algorithms(previous)
    for what, x, y, z in zip(OUTPUTS, first, second, free):
        assert torch.equal(x, y) and torch.equal(x, z), what
