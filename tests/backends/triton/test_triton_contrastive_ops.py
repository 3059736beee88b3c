"""Tests of the Triton contrastive ops: torch.ops.robustft_triton.{clip_fwd, clip_bwd, siglip_fwd,
siglip_bwd} (robustft_ext/triton_backend/contrastive_ops.py, contrastive_kernels.py).

Without a CUDA device the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton). The interpreter is slow, so most shapes
stay small (n, m <= 40, D <= 33) with the interpreter's 16-wide tiles; they still cover
masking (sizes that are not multiples of 16), both backward designs (D = 5: the
register-resident kernel; D = 33: the dS workspace with library GEMMs, its dlogit tiles
looping over three feature chunks), several persistent programs (n = 40: 3 row blocks over 2
programs) and diagonal offsets that cross tile boundaries. test_gpu_tile_configs runs the
sm_90 / sm_80 configurations of configs.TABLE (128-row tiles) on a problem with one full tile
and a ragged edge; test_workspace_chunks splits the dS workspace into several row chunks.

Every op is compared with an eager float64 formula on the same (rounded) inputs: full logits,
torch.logsumexp, F.cross_entropy / F.logsigmoid, autograd for the four gradients.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import import_triton_backend
from helpers import largest_float_tensor_mode
from robustft_ext import workspace

pytestmark = pytest.mark.triton
tb = import_triton_backend()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.robustft_triton


# ----------------------------------------------------------------------------- helpers
def _inputs(n, m, D, dtype, scale, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(m, D, generator=g, dtype=torch.float64), dim=1)
    if m >= n:  # correlated positives, so the loss is not at its random-pair value
        b[:n] = F.normalize(b[:n] + 2 * a.roll(0, 0), dim=1)
    a = a.to(dtype).to(DEVICE)
    b = b.to(dtype).to(DEVICE)
    s = torch.tensor(scale, dtype=torch.float32, device=DEVICE)
    t = torch.tensor(bias, dtype=torch.float32, device=DEVICE)
    return a, b, s, t


def _leaves(*xs):
    return [x.detach().double().cpu().requires_grad_() for x in xs]


def _ref_clip(a, b, scale, bias, off, sym, g):
    a, b, s, t = _leaves(a, b, scale, bias)
    S = s * a @ b.T + t
    n = a.shape[0]
    target = torch.arange(n) + off
    r = torch.logsumexp(S, 1)
    if sym:
        c = torch.logsumexp(S, 0)
        loss = (F.cross_entropy(S, target) + F.cross_entropy(S.T, target)) / 2
    else:
        c = torch.empty(0, dtype=torch.float64)
        loss = F.cross_entropy(S, target)
    grads = torch.autograd.grad(loss * g, [a, b, s, t])
    return (loss.detach(), r.detach(), c.detach()), grads


def _ref_siglip(a, b, scale, bias, negative_only, g):
    a, b, s, t = _leaves(a, b, scale, bias)
    S = s * a @ b.T + t
    n, m = S.shape
    z = -torch.ones(n, m, dtype=torch.float64)
    if not negative_only:
        z += 2 * torch.eye(n, m, dtype=torch.float64)
    loss = -F.logsigmoid(z * S).sum() / n
    grads = torch.autograd.grad(loss * g, [a, b, s, t])
    return loss.detach(), grads


# Tolerances: |x - ref| <= atol + rtol * max|ref| (per output).
# On GPU, tl.exp / tl.log are the fast hardware approximations (a few ulp): 4x the slack.
_SLACK = 4.0 if DEVICE == "cuda" else 1.0
TOL = {
    torch.float32: (2e-6 * _SLACK, 2e-5 * _SLACK),
    torch.float16: (1e-4, 5e-3),
    torch.bfloat16: (1e-3, 1e-2),
}


def _close(name, x, ref, dtype, atol_scale=1.0):
    atol, rtol = TOL[dtype]
    x = x.detach().double().cpu()
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (x - ref).abs().max().item()
    bound = atol * atol_scale + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _check_grads(out, ref_grads, a, b, dtype, scale):
    ga, gb, gs, gt = out
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    assert gs.dtype == torch.float32 and gt.dtype == torch.float32
    assert gs.shape == () and gt.shape == ()
    for name, x, r in zip(("grad_a", "grad_b", "grad_scale", "grad_bias"), out, ref_grads):
        # Scalar gradients sum O(n m) terms of size ~scale / n: scale their absolute slack.
        _close(name, x, r, dtype, atol_scale=max(1.0, scale) if x.dim() == 0 else 1.0)


# ----------------------------------------------------------------------------- CLIP
# (n, m, D, diag_offset, symmetric, scale, bias): every n = m in {1, 3, 17} x D in {5, 33}
# x scale in {1, 14.3, 100}, plus more programs than row blocks (40), a bias, and one-sided
# losses with offsets inside and across tiles.
CLIP_CASES = [(n, n, D, 0, True, scale, 0.0)
              for n in (1, 3, 17) for D in (5, 33) for scale in (1.0, 14.3, 100.0)] + [
    (17, 17, 33, 0, True, 14.3, -10.0),
    (40, 40, 5, 0, True, 14.3, 0.0),
    (3, 9, 5, 3, False, 14.3, 0.0),
    (3, 9, 33, 3, False, 100.0, 0.0),
    (17, 37, 33, 11, False, 14.3, 0.5),
]
CLIP_LOWP = [(17, 17, 33, 0, True, 14.3, 0.0), (3, 9, 5, 3, False, 100.0, 0.0)]


def _clip_params():
    for case in CLIP_CASES:
        yield pytest.param(*case, torch.float32, id="-".join(map(str, case)) + "-f32")
    for case in CLIP_LOWP:
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
            yield pytest.param(*case, dt, id="-".join(map(str, case)) + "-" + tag)


@pytest.mark.parametrize("n,m,D,off,sym,scale,bias,dtype", list(_clip_params()))
def test_clip_matches_reference(n, m, D, off, sym, scale, bias, dtype):
    a, b, s, t = _inputs(n, m, D, dtype, scale, bias)
    g = 0.7
    loss, row_lse, col_lse = ops.clip_fwd(a, b, s, t, off, sym)
    (ref_loss, ref_r, ref_c), ref_grads = _ref_clip(a, b, s, t, off, sym, g)
    assert loss.dtype == row_lse.dtype == col_lse.dtype == torch.float32
    assert loss.shape == () and row_lse.shape == (n,)
    assert col_lse.shape == ((m,) if sym else (0,))
    _close("loss", loss, ref_loss, dtype)
    _close("row_lse", row_lse, ref_r, dtype)
    _close("col_lse", col_lse, ref_c, dtype)
    out = ops.clip_bwd(torch.tensor(g, device=DEVICE), a, b, s, t, row_lse, col_lse, off, sym)
    _check_grads(out, ref_grads, a, b, dtype, scale)


# ----------------------------------------------------------------------------- SigLIP
# (n, m, D, negative_only, scale, bias): every n = m in {1, 3, 17} x D in {5, 33} x scale in
# {1, 14.3, 100}, with bias 0 at scale 1 and -10 (the SigLIP initialisation) otherwise; then
# 40 x 40 and negative-only problems with n != m.
SIGLIP_CASES = [(n, n, D, False, scale, 0.0 if scale == 1.0 else -10.0)
                for n in (1, 3, 17) for D in (5, 33) for scale in (1.0, 14.3, 100.0)] + [
    (17, 17, 33, False, 14.3, 0.0),
    (40, 40, 5, False, 14.3, -10.0),
    (3, 9, 5, True, 14.3, -10.0),
    (17, 5, 33, True, 100.0, -10.0),
]
SIGLIP_LOWP = [(17, 17, 33, False, 14.3, -10.0), (3, 9, 5, True, 100.0, 0.0)]


def _siglip_params():
    for case in SIGLIP_CASES:
        yield pytest.param(*case, torch.float32, id="-".join(map(str, case)) + "-f32")
    for case in SIGLIP_LOWP:
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
            yield pytest.param(*case, dt, id="-".join(map(str, case)) + "-" + tag)


@pytest.mark.parametrize("n,m,D,neg,scale,bias,dtype", list(_siglip_params()))
def test_siglip_matches_reference(n, m, D, neg, scale, bias, dtype):
    a, b, s, t = _inputs(n, m, D, dtype, scale, bias)
    g = 0.7
    loss = ops.siglip_fwd(a, b, s, t, neg)
    ref_loss, ref_grads = _ref_siglip(a, b, s, t, neg, g)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _close("loss", loss, ref_loss, dtype)
    out = ops.siglip_bwd(torch.tensor(g, device=DEVICE), a, b, s, t, neg)
    _check_grads(out, ref_grads, a, b, dtype, scale)


# ----------------------------------------------------------------------------- GPU tiles
def _check_clip_and_siglip(n, D, dtype, scale=14.3):
    a, b, s, t = _inputs(n, n, D, dtype, scale, 0.0)
    g = 0.7
    loss, row_lse, col_lse = ops.clip_fwd(a, b, s, t, 0, True)
    (ref_loss, ref_r, ref_c), ref_grads = _ref_clip(a, b, s, t, 0, True, g)
    _close("clip loss", loss, ref_loss, dtype)
    _close("row_lse", row_lse, ref_r, dtype)
    _close("col_lse", col_lse, ref_c, dtype)
    out = ops.clip_bwd(torch.tensor(g, device=DEVICE), a, b, s, t, row_lse, col_lse, 0, True)
    _check_grads(out, ref_grads, a, b, dtype, scale)
    # One-sided, positives off the diagonal (offset 3 within the first tile).
    a1 = a[: n - 3].contiguous()
    loss, row_lse, col_lse = ops.clip_fwd(a1, b, s, t, 3, False)
    (ref_loss, ref_r, _), ref_grads = _ref_clip(a1, b, s, t, 3, False, g)
    _close("one-sided clip loss", loss, ref_loss, dtype)
    out = ops.clip_bwd(torch.tensor(g, device=DEVICE), a1, b, s, t, row_lse, col_lse, 3,
                       False)
    _check_grads(out, ref_grads, a1, b, dtype, scale)
    t = torch.tensor(-10.0, device=DEVICE)
    loss = ops.siglip_fwd(a, b, s, t, False)
    ref_loss, ref_grads = _ref_siglip(a, b, s, t, False, g)
    _close("siglip loss", loss, ref_loss, dtype)
    out = ops.siglip_bwd(torch.tensor(g, device=DEVICE), a, b, s, t, False)
    _check_grads(out, ref_grads, a, b, dtype, scale)


# n = 145: one full 128-row tile and a ragged one. D = 136: the large-D design (dS workspace,
# tiles looping over two full 64-wide feature chunks and a ragged one); D = 72: the
# register-resident backward of the d128 class (64-row tiles, one 128-wide feature block).
@pytest.mark.skipif(not tb.interpreting(), reason="forces a table architecture on the "
                    "interpreter; on a GPU every test runs its own architecture's table")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("D,dtype", [(136, torch.bfloat16), (72, torch.float16),
                                     (136, torch.float32)], ids=["136-bf16", "72-f16", "136-f32"])
def test_gpu_tile_configs(monkeypatch, arch, D, dtype):
    monkeypatch.setattr(tb.configs, "interpreter_arch", arch)
    cfg = tb.configs.select("dlogit" if D > 128 else "grad_rows", torch.device(DEVICE), dtype, D)
    if dtype != torch.float32:
        assert cfg.block_m >= 64 and cfg.block_m % 64 == 0, cfg
    _check_clip_and_siglip(145, D, dtype)


# ----------------------------------------------------------------------------- workspace
@pytest.fixture
def small_workspace():
    """Sets the workspace limit (bytes) for one test and restores the default after it."""
    yield workspace.set_workspace_limit
    workspace.set_workspace_limit(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_workspace_chunks(small_workspace, dtype):
    # n = 40 rows, D = 33 (the dS design under the interpreter): a workspace of 16 rows
    # (one BLOCK_M) makes three chunks (16, 16, 8). The chunked gradients equal the one-chunk
    # ones up to the GEMMs' float32 summation order, and match the reference.
    n, D = 40, 33
    a, b, s, t = _inputs(n, n, D, dtype, 14.3, 0.0)
    g = torch.tensor(0.7, device=DEVICE)
    _, r, c = ops.clip_fwd(a, b, s, t, 0, True)
    whole = ops.clip_bwd(g, a, b, s, t, r, c, 0, True) + ops.siglip_bwd(g, a, b, s, t, True)
    row_bytes = n * (2 if dtype == torch.bfloat16 else 4)
    for limit in (16 * row_bytes, 1):  # 16 rows; and below one row block: still 16 rows
        small_workspace(limit)
        chunked = (ops.clip_bwd(g, a, b, s, t, r, c, 0, True)
                   + ops.siglip_bwd(g, a, b, s, t, True))
        for x, y in zip(chunked, whole):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    (_, _, _), ref_grads = _ref_clip(a, b, s, t, 0, True, 0.7)
    _check_grads(chunked[:4], ref_grads, a, b, dtype, 14.3)


# ----------------------------------------------------------------------------- contract
def test_deterministic():
    a, b, s, t = _inputs(17, 17, 33, torch.float32, 14.3, 0.0)
    f1 = ops.clip_fwd(a, b, s, t, 0, True)
    f2 = ops.clip_fwd(a, b, s, t, 0, True)
    g = torch.tensor(1.0, device=DEVICE)
    b1 = ops.clip_bwd(g, a, b, s, t, f1[1], f1[2], 0, True)
    b2 = ops.clip_bwd(g, a, b, s, t, f1[1], f1[2], 0, True)
    for x, y in zip(f1 + b1, f2 + b2):
        assert torch.equal(x, y)


def test_no_n_by_m_buffers():
    # Record every float tensor the op bodies create (the kernels launched directly, as in
    # eager mode): nothing may approach n x m. (Float tensors only: the interpreter's host
    # copies of the kernel arguments are byte tensors of the arguments' size, 4 n 16 bytes
    # for the inputs padded to 16 columns.)
    from torch._library.triton import set_wrap_triton_enabled
    record = largest_float_tensor_mode()

    n = m = 48
    a, b, s, t = _inputs(n, m, 5, torch.float32, 14.3, -10.0)
    g = torch.tensor(1.0, device=DEVICE)
    with record, set_wrap_triton_enabled(False):
        _, r, c = tb.contrastive_ops.clip_fwd._init_fn(a, b, s, t, 0, True)
        tb.contrastive_ops.clip_bwd._init_fn(g, a, b, s, t, r, c, 0, True)
        tb.contrastive_ops.siglip_fwd._init_fn(a, b, s, t, False)
        tb.contrastive_ops.siglip_bwd._init_fn(g, a, b, s, t, False)
    assert 0 < record.largest < n * m // 2


def test_argument_checks():
    a, b, s, t = _inputs(3, 9, 5, torch.float32, 14.3, 0.0)
    with pytest.raises(RuntimeError):  # symmetric needs n == m
        ops.clip_fwd(a, b, s, t, 0, True)
    with pytest.raises(RuntimeError):  # positives past the last column
        ops.clip_fwd(a, b, s, t, 7, False)
    with pytest.raises(RuntimeError):  # siglip with positives needs n == m
        ops.siglip_fwd(a, b, s, t, False)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.siglip_fwd(a.double(), b.double(), s, t, True)
    with pytest.raises(RuntimeError, match="float32"):
        ops.siglip_fwd(a, b, s.double(), t, True)
    with pytest.raises(RuntimeError):
        ops.siglip_fwd(a, b[:, :4].contiguous(), s, t, True)


def _compile_smoke(backend, D=7):
    def f(a, b, s, t):
        loss, r, c = ops.clip_fwd(a, b, s, t, 0, True)
        ga, gb, gs, gt = ops.clip_bwd(loss.detach() * 0 + 1, a, b, s, t, r, c, 0, True)
        sl = ops.siglip_fwd(a * 2.0, b, s, t, False)
        ha, hb, hs, ht = ops.siglip_bwd(sl.detach() * 0 + 1, a * 2.0, b, s, t, False)
        return loss * 3.0 + sl, r - c, ga + ha, gb + hb, gs + hs + gt + ht

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=True)
    for n in (5, 9):  # the second size reuses the dynamic-shape graph
        a, b, s, t = _inputs(n, n, D, torch.float32, 14.3, -1.0)
        versions = [x._version for x in (a, b, s, t)]
        for x, y in zip(compiled(a, b, s, t), f(a, b, s, t)):
            torch.testing.assert_close(x, y)
        # The ops must not write their inputs (in traced graphs too).
        assert [x._version for x in (a, b, s, t)] == versions


@pytest.mark.parametrize("D", [7, 33], ids=["fused", "workspace"])
def test_compile_fullgraph_aot_eager(D):
    # Dynamo + AOTAutograd functionalisation of the triton_op (the kernel becomes a
    # triton_kernel_wrapper_functional node), executed eagerly: works under the interpreter,
    # for both backward designs (the workspace's chunk loop over symbolic sizes included).
    _compile_smoke("aot_eager", D)


@pytest.mark.skipif(
    DEVICE == "cpu",
    reason="Inductor cannot compile user-defined Triton kernels without a GPU driver: "
           "WrapperCodeGen.define_user_defined_triton_kernel -> inductor_meta_common -> "
           "torch.utils._triton.triton_hash_with_backend reads triton.runtime.driver.active, "
           "which raises '0 active drivers' on CPU (TRITON_INTERPRET=1 provides no driver)")
def test_compile_fullgraph_inductor():
    _compile_smoke("inductor")
