"""The fused backends allocate no N x N matrix beyond the workspace limit
(robustft_ext.set_workspace_limit, $ROBUSTFT_WORKSPACE_MB): the backward's dlogit chunks stay
within it, and on CPU the CLIP/SigLIP dot products kept for the backward are held only when
they fit it.

CPU: peak resident-memory growth of a fresh process computing loss and gradients, at a size
where N x N float32 (256 MiB at N = 8192) would be unmistakable; the reference backend run the
same way shows the measurement does see it. CUDA: peak allocated bytes. Triton on CPU (its
interpreter): the tensors its op bodies allocate, with the dS workspace of the large-D
backward bounded by robustft_ext.workspace's limit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import robustft_ext

from helpers import require_backend

N, D = 8192, 64
NXN_MB = N * N * 4 / 2**20

# The peak is the process's VmHWM after resetting it (writing 5 to /proc/self/clear_refs) just
# before the measured call, minus the resident set at that moment: the high-water mark of the
# imports (torch's CUDA libraries alone can exceed an N x N matrix) does not hide the call's.
_SCRIPT = textwrap.dedent("""
    import contextlib, json, sys, torch
    import robustft_ext as rft

    def status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(key + " missing from /proc/self/status")

    kind, backend, n, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dtype = getattr(torch, sys.argv[5])
    rules = contextlib.nullcontext()
    if sys.argv[6] == "cuda":  # the op bodies under CUDA's rules (helpers.CudaRules)
        sys.path.insert(0, sys.argv[7])
        from helpers import CudaRules
        rules = CudaRules()
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    fn = {"clip": rft.clip_loss, "siglip": rft.siglip_loss,
          "m2mix": lambda a, b, s, bias, backend: rft.m2mix_loss(a, b, s, 0.3, backend=backend),
          "clip_m2mix": lambda a, b, s, bias, backend: sum(
              rft.clip_m2mix_loss(a, b, s, 0.3, backend=backend))}[kind]
    with rules:
        # Warm up on a tiny problem so lazy initialisation is not counted.
        t = torch.randn(8, d, dtype=dtype)
        fn(t, t, 1.0, 0.0, backend=backend)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = status_kb("VmRSS")
        loss = fn(a, b, s, -1.0, backend=backend)
        loss.backward()
        after = status_kb("VmHWM")
    print(json.dumps({"growth_mb": (after - before) / 1024, "loss": loss.item()}))
""")


def _peak_growth_mb(kind: str, backend: str, workspace_mb: float | None = None, *,
                    n: int = N, d: int = D, dtype: str = "float32", rules: str = "cpu") -> float:
    """Peak resident growth of loss and gradients in a fresh process; rules="cuda": the native
    op bodies under CUDA's rules (helpers.CudaRules)."""
    env = dict(os.environ)
    env.pop("ROBUSTFT_WORKSPACE_MB", None)
    if workspace_mb is not None:
        env["ROBUSTFT_WORKSPACE_MB"] = str(workspace_mb)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # helpers.py
    out = subprocess.run([sys.executable, "-c", _SCRIPT, kind, backend, str(n), str(d), dtype,
                          rules, tests],
                         capture_output=True, text=True, timeout=600, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loss"] == result["loss"], "NaN loss"
    return result["growth_mb"]


# Besides the workspace: O(N D) buffers (features, gradients, float copies; the m^2 prologue's
# float64 copies and mixed negatives), the forward's per-thread tiles, and the thread pool's and
# BLAS's own buffers: about 30 MiB for CLIP at N = 8192, D = 64 measured with a 1-byte limit.
OVERHEAD_MB = {"clip": 48.0, "siglip": 48.0, "m2mix": 80.0, "clip_m2mix": 80.0}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip", "m2mix", "clip_m2mix"])
def test_cpu_native_stays_within_the_workspace_limit(kind):
    """With the default 512 MiB limit. CLIP and SigLIP keep their N x N dot products for the
    backward (256 MiB), which is then the only N x N buffer; the m^2 losses keep the Gram
    strips that fit the limit (2 N^2 + 2 N R entries in all: not all of them here) and form
    the others' dlogits in the first strip's entries, within the 512 MiB."""
    require_backend("native", "cpu")
    fused = _peak_growth_mb(kind, "native")
    limit_mb = robustft_ext.workspace.DEFAULT_WORKSPACE_BYTES / 2**20
    bound = NXN_MB if kind in ("clip", "siglip") else limit_mb
    assert fused < bound + OVERHEAD_MB[kind], (
        f"native {kind} grew {fused:.0f} MiB; N x N is {NXN_MB:.0f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_cpu_native_keeps_no_products_past_the_limit(kind):
    """A 255 MiB limit, just short of the N x N products: the backward's chunks hold at most
    half the rows' dlogits."""
    require_backend("native", "cpu")
    fused = _peak_growth_mb(kind, "native", workspace_mb=255)
    assert fused < NXN_MB / 2 + OVERHEAD_MB[kind], (
        f"native {kind} grew {fused:.0f} MiB; N x N is {NXN_MB:.0f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip", "clip_m2mix"])
def test_cpu_native_workspace_limit_bounds_memory(kind):
    """ROBUSTFT_WORKSPACE_MB = 8: the growth is the workspace (at least one row block of 128
    rows per dlogit block) plus the rest, far below N x N."""
    require_backend("native", "cpu")
    fused = _peak_growth_mb(kind, "native", workspace_mb=8)
    blocks = 3 if kind == "clip_m2mix" else 1
    workspace = max(8.0, blocks * 128 * N * 4 / 2**20)
    assert fused < workspace + OVERHEAD_MB[kind], (
        f"native {kind} grew {fused:.0f} MiB with an 8 MiB workspace")


@pytest.mark.slow
def test_cpu_measurement_sees_nxn():
    """The same measurement on the reference backend shows the N x N logits."""
    assert _peak_growth_mb("clip", "reference") > NXN_MB


# CLIP + m^2 with a 64 MiB workspace at a size where the O(N D) buffers dominate: the CUDA
# test below allows the workspace plus 12 N D float32 (gradients, float copies, mixed
# negatives); the CPU process adds its fixed overhead (threads, BLAS buffers, the emulation's
# float copies of 16-bit operands and scratch, OVERHEAD_MB). The native op bodies run here
# under CUDA's rules, the slerp backward and DiVE as the device's one-pass launchers: a
# dozen whole n x D float64 temporaries (the ATen forms they replace) would add 14 N D 4
# bytes at once and break the bound.
RULES_N, RULES_D, RULES_WORKSPACE_MB = 4096, 1024, 64


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_op_bodies_under_cuda_rules_stay_within_the_cuda_bound(dtype):
    require_backend("native", "cpu")
    linear_mb = 12 * RULES_N * RULES_D * 4 / 2**20
    growth = _peak_growth_mb("clip_m2mix", "native", RULES_WORKSPACE_MB, n=RULES_N, d=RULES_D,
                             dtype=dtype, rules="cuda")
    # The emulation's own scratch, which a GPU does not allocate: a 16-bit Gram strip (the
    # workspace's size at most) is computed by the CPU kernel as a float strip of twice its
    # bytes, from float copies of I and T, and then rounded into the workspace.
    emulation_mb = 0.0
    if dtype != "float32":
        emulation_mb = 2 * RULES_WORKSPACE_MB + 2 * RULES_N * RULES_D * 4 / 2**20
    bound = RULES_WORKSPACE_MB + linear_mb + OVERHEAD_MB["clip_m2mix"] + emulation_mb
    assert growth < bound, (
        f"clip_m2mix {dtype} under CUDA's rules grew {growth:.0f} MiB, over {bound:.0f} MiB "
        f"(workspace {RULES_WORKSPACE_MB} + 12 N D 4 = {linear_mb:.0f} + overhead + the "
        f"emulation's float strip and copies {emulation_mb:.0f})")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip", "clip_m2mix"])
def test_cuda_peak_allocated_has_no_nxn(backend, kind):
    require_backend(backend, "cuda")
    import robustft_ext as rft

    n, d = 16384, 256
    a = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    fn = {"clip": rft.clip_loss, "siglip": rft.siglip_loss,
          "clip_m2mix": lambda a, b, s, bias, backend: sum(
              rft.clip_m2mix_loss(a, b, s, 0.3, backend=backend))}[kind]
    fn(a[:8], b[:8], s, -1.0, backend=backend).backward()  # warm-up, autotuning
    limit = 64 * 2**20
    rft.set_workspace_limit(limit)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(a, b, s, -1.0, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - base
    finally:
        rft.set_workspace_limit(None)
    nxn, linear = n * n * 4, 12 * n * d * 4  # gradients, float copies, mixed negatives
    assert growth < limit + linear, (
        f"{backend} {kind}: peak growth {growth / 2**20:.0f} MiB with a 64 MiB workspace "
        f"(N x N is {nxn / 2**20:.0f} MiB)")


# ----------------------------------------------------------------------------- Triton
# The large-D backward of the Triton backend writes its dlogits into a workspace of row
# chunks bounded by robustft_ext.workspace's limit. On CPU (Triton's interpreter) the
# allocations of the op bodies are recorded: with the limit set to two row blocks (32 rows;
# one, 16 rows, for the step, whose rows are three times as wide, and for the Gram
# formulation's strips of S, four times) the backward works in several chunks, no tensor it
# allocates exceeds the limit, and the gradients equal the one-chunk ones.
TRITON_N, TRITON_D, TRITON_K = 96, 24, 8  # D > 16: the dS design under the interpreter


def _triton_backward(kind, tb, lam):
    """(backward op body, its arguments, bytes per workspace row) of a forward run (kind
    robust_step: under the current step design)."""
    import torch.nn.functional as F

    n, D, K = TRITON_N, TRITON_D, TRITON_K
    g = torch.Generator().manual_seed(0)
    a, b, p, G = (F.normalize(torch.randn(r, D, generator=g), dim=1) for r in (n, n, n, K))
    s, t, one = torch.tensor(14.3), torch.tensor(-1.0), torch.tensor(1.0)
    if kind == "clip":
        _, r, c = tb.contrastive_ops.clip_fwd._init_fn(a, b, s, t, 0, True)
        return tb.contrastive_ops.clip_bwd._init_fn, (one, a, b, s, t, r, c, 0, True), 4 * n
    if kind == "siglip":
        return tb.contrastive_ops.siglip_bwd._init_fn, (one, a, b, s, t, False), 4 * n
    args = (a, b, s, s, lam, True, True, p, G, s, None, None, None, None, None)
    _, _, lse = tb.step_ops.robust_step_fwd._init_fn(*args)
    row_bytes = 4 * (3 * n + K)
    if robustft_ext.step_design() == "gram":
        cfg = tb.configs.select("gram_strip", a.device, a.dtype, tb.configs.aligned_dim(D))
        row_bytes = tb.step_ops.gram_strip_row_bytes(n, torch.float32, cfg)
    return tb.step_ops.robust_step_bwd._init_fn, (torch.ones(5), *args, lse), row_bytes


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["clip", "siglip", "robust_step-products", "robust_step-gram"])
def test_triton_workspace_bounded(kind):
    from torch._library.triton import set_wrap_triton_enabled
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from helpers import import_triton_backend
    from robustft_ext import workspace

    tb = import_triton_backend()
    if not tb.interpreting():
        pytest.skip("records the op bodies' CPU allocations under the interpreter")

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes, self.largest = set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                # (Float tensors only: the interpreter's host copies of the kernel arguments
                # are byte tensors of the arguments' size.)
                if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                    self.shapes.add(tuple(x.shape))
                    self.largest = max(self.largest, x.numel() * x.element_size())
            return out

    n = TRITON_N
    kind, _, design = kind.partition("-")
    robustft_ext.set_step_design(design or None)
    try:
        with set_wrap_triton_enabled(False):
            bwd, args, row_bytes = _triton_backward(kind, tb, torch.tensor(0.3))
            whole = bwd(*args)
            rows = 16 if kind == "robust_step" else 32
            limit = rows * row_bytes
            workspace.set_workspace_limit(limit)
            try:
                rec = Record()
                with rec:
                    chunked = bwd(*args)
            finally:
                workspace.set_workspace_limit(None)
    finally:
        robustft_ext.set_step_design(None)
    for x, y in zip(chunked, whole):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    # Chunks of `rows` rows (m^2: the [UA; UB] block of 2 x 16 rows; the Gram formulation:
    # the strip of S, 2 x 16 rows of 2 n), nothing above the limit, nothing near n x n.
    chunk = {"products": (2 * rows, n), "gram": (2 * rows, 2 * n)}.get(design, (rows, n))
    assert chunk in rec.shapes, sorted(rec.shapes)
    assert 0 < rec.largest <= limit < n * n * 4


# The live memory of the CLIP + m^2 op bodies: every storage they allocate, from the op that
# returns it until it is freed (helpers.live_bytes_mode), on CPU under the interpreter. The
# bound is the CUDA test's, 12 N D float32 plus the workspace limit (the workspace at its
# minimum of one 16-row block of the three dlogit blocks, so that several chunks run). At
# N = 12 D an N x N float32 buffer is as large as the 12 N D 4 bytes, so one held beside what
# the bodies hold would break the bound.
def _m2_step_bodies(kind, tb, n, D):
    """(forward body, its arguments, backward body, a function of the forward's outputs
    giving the backward's arguments) of CLIP + m^2 on n x D float32 features."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(n, D, generator=g), dim=1)
    b = F.normalize(torch.randn(n, D, generator=g) + a, dim=1)
    s_m, s_c, lam, one = (torch.tensor(x) for x in (14.3, 10.0, 0.3, 1.0))
    if kind == "m2mix":
        args = (a, b, s_m, lam, s_c, True)
        return (tb.step_ops.m2mix_fwd._init_fn, args, tb.step_ops.m2mix_bwd._init_fn,
                lambda out: (one, one, *args[:5], out[2], True))
    args = (a, b, s_c, s_m, lam, True, True, None, None, s_m, None, None, None, None, None)
    return (tb.step_ops.robust_step_fwd._init_fn, args, tb.step_ops.robust_step_bwd._init_fn,
            lambda out: (torch.ones(5), *args, out[2]))


@pytest.mark.triton
@pytest.mark.parametrize("D", [16, 32], ids=["fused", "workspace"])  # the two backwards
@pytest.mark.parametrize("kind", ["m2mix", "robust_step"])
def test_triton_m2_peak_live_bytes(kind, D):
    from torch._library.triton import set_wrap_triton_enabled

    from helpers import import_triton_backend, live_bytes_mode
    from robustft_ext import workspace

    tb = import_triton_backend()
    if not tb.interpreting():
        pytest.skip("records the op bodies' CPU allocations under the interpreter")
    n = 12 * D
    limit = 16 * 3 * n * 4
    bound = 12 * n * D * 4 + limit
    fwd, fwd_args, bwd, bwd_args = _m2_step_bodies(kind, tb, n, D)
    workspace.set_workspace_limit(limit)
    try:
        with set_wrap_triton_enabled(False):
            with live_bytes_mode() as forward:
                out = fwd(*fwd_args)
            with live_bytes_mode() as backward:
                bwd(*bwd_args(out))
    finally:
        workspace.set_workspace_limit(None)
    for name, mode in (("forward", forward), ("backward", backward)):
        assert mode.peak + n * n * 4 > bound  # (the bound would show an N x N buffer)
        assert mode.peak <= bound, (
            f"{kind} {name} body, N = {n}, D = {D}: {mode.peak / 2**10:.0f} KiB live at its "
            f"peak, above 12 N D 4 + workspace = {bound / 2**10:.0f} KiB")
