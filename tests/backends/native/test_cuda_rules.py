"""The native ops' host code under CUDA's rules, on the CPU (helpers.CudaRules).

The op bodies between a public call and the kernels (csrc/contrastive_ops.h, csrc/step_ops.h)
are shared by the devices; CUDA differs in its workspace dtype (16-bit chunks and mixed
negatives for 16-bit inputs), in what its launchers accept (cuBLAS takes one operand dtype)
and in having no kept dot products. The namespace robustft_cuda_rules runs the same bodies
under those rules on CPU tensors, so every op's forward and backward is checked here in
bfloat16, float16, float32 and float64 against the float64 reference, as a GPU would run it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import require_backend
from helpers import TOLERANCE, CudaRules, assert_close_rel

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# The dlogits of 16-bit inputs are rounded to the input dtype (as on CUDA): gradients carry
# that rounding on top of the inputs' own.
BOUND = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _unit(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _leaves(dtype, n=37, d=24, seed=0):
    return [_unit(n, d, dtype=dtype, seed=seed + i).requires_grad_() for i in range(2)]


def _compare(fn, inputs, dtype, what, n_grads=None):
    """fn on `inputs` under CUDA's rules against fn's float64 reference, value and gradients."""
    with CudaRules() as rules:
        out = fn(inputs, "native")
        grads = torch.autograd.grad(out, inputs[:n_grads], torch.ones_like(out) * 1.3)
    assert rules.namespaces == {"robustft_cuda_rules"}, rules.namespaces
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    ref = fn(ref_inputs, "reference")
    ref_grads = torch.autograd.grad(ref, ref_inputs[:n_grads], torch.ones_like(ref) * 1.3)
    bound = BOUND[dtype]
    assert_close_rel(out, ref, bound, f"{what} {dtype} value")
    for i, (x, y) in enumerate(zip(grads, ref_grads)):
        assert x.dtype == inputs[i].dtype
        # A float32 logit_scale beside float64 features gets a float32 gradient; a scalar's
        # gradient (a sum of O(1) dlogits, exactly 0 for CLIP's bias) compares absolutely.
        assert_close_rel(x, y, max(bound, BOUND[x.dtype]), f"{what} {dtype} grad {i}",
                         floor=1.0 if x.dim() == 0 else 1e-3)


@pytest.fixture(autouse=True)
def _native():
    require_backend("native", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["clip", "clip_rows", "siglip", "siglip_negatives"])
def test_contrastive_ops(kind, dtype):
    a, b = _leaves(dtype)
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)

    def fn(x, backend):
        a, b, s, t = x
        if kind == "clip":
            return rft.clip_loss(a, b, s, t, backend=backend)
        if kind == "clip_rows":
            return rft.clip_rows_loss(a[:20], b, s, t, diag_offset=9, backend=backend)
        return rft.siglip_loss(a, b[:30] if kind == "siglip_negatives" else b, s, t,
                               negative_only=kind == "siglip_negatives", backend=backend)

    _compare(fn, [a, b, scale, bias], dtype, kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["m2mix", "clip_m2mix", "slerp"])
def test_m2mix_ops(kind, dtype):
    a, b = _leaves(dtype)
    scale = torch.tensor(20.0, requires_grad=True)

    def fn(x, backend):
        a, b, s = x
        if kind == "m2mix":
            return rft.m2mix_loss(a, b, s, 0.3, backend=backend)
        if kind == "slerp":
            return rft.slerp(a, b, 0.3, backend=backend).float().square().mul(
                torch.linspace(0, 1, a.shape[1])).sum()
        clip, m2 = rft.clip_m2mix_loss(a, b, s, 0.3, m2_logit_scale=14.3, backend=backend)
        return clip + 0.7 * m2

    _compare(fn, [a, b, scale], dtype, kind, n_grads=2 if kind == "slerp" else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lipsum(dtype):
    """The backward whose 16-bit GEMM took a float32 and a 16-bit operand (a failure on every
    CUDA run): its operands now share the accumulation dtype."""
    f, = _leaves(dtype)[:1]
    f0 = _unit(37, 24, dtype=dtype, seed=5)
    g = _unit(11, 24, dtype=dtype, seed=6)
    _compare(lambda x, backend: rft.lipsum_loss(x[0], f0, g, 20.0, backend=backend), [f], dtype,
             "lipsum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dive(dtype):
    fi, ft = _leaves(dtype, n=19, seed=3)
    pi, pt = (_unit(19, 24, dtype=dtype, seed=s) for s in (7, 8))
    center = _unit(24, dtype=torch.float64, seed=9) * 0.1

    def fn(x, backend):
        c = center.to(torch.float64 if x[0].dtype == torch.float64 else torch.float32)
        avl, pvl = rft.dive_loss(x[0], x[1], pi, pt, c, backend=backend)
        return avl + 0.5 * pvl

    _compare(fn, [fi, ft], dtype, "dive")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_robust_step(dtype, chunked):
    """Every term of the step at once; chunked: a 1-byte workspace limit, so the backward runs
    over 128-row chunks of a 300-row batch."""
    n = 300 if chunked else 37
    image, text = _leaves(dtype, n=n, seed=11)
    image_pre = _unit(n, 24, dtype=dtype, seed=13)
    texts = _unit(9, 24, dtype=dtype, seed=14)
    refs = _leaves(dtype, n=17, seed=15)
    ref_pre = [_unit(17, 24, dtype=dtype, seed=s) for s in (17, 18)]
    scale = torch.tensor(25.0, requires_grad=True)

    def fn(x, backend):
        loss = rft.RobustFTLoss(1.0, m2_weight=0.5, lipsum_weight=2.0, dive_weight=3.0,
                                m2_lam=0.4, m2_logit_scale=14.3, backend=backend)
        if x[0].dtype == torch.float64:
            loss = loss.double()
        return loss(x[0], x[1], x[2], image_pre=image_pre.to(x[0].dtype),
                    random_text_features=texts.to(x[0].dtype), pre_logit_scale=20.0,
                    ref_image_ft=x[3], ref_text_ft=x[4], ref_image_pre=ref_pre[0].to(x[0].dtype),
                    ref_text_pre=ref_pre[1].to(x[0].dtype))

    if chunked:
        rft.set_workspace_limit(1)
    try:
        _compare(fn, [image, text, scale, *refs], dtype, "robust step")
    finally:
        rft.set_workspace_limit(None)


def test_the_ops_called_directly_agree_with_the_cpu_and_keep_nothing():
    """The namespace's ops, called as the Functions call them: the CPU's values to the 16-bit
    rounding of the mixed negatives, and, as on CUDA, no op that keeps dot products."""
    image, text = _leaves(torch.bfloat16)
    args = (image.detach(), text.detach(), torch.tensor(14.3), torch.tensor(0.3),
            torch.tensor(10.0), True)
    cpu = torch.ops.robustft_ext.m2mix_fwd(*args)
    rules = torch.ops.robustft_cuda_rules.m2mix_fwd(*args)
    for x, y in zip(cpu, rules):
        assert_close_rel(y, x, TOLERANCE[torch.bfloat16], "m2mix_fwd under CUDA's rules")
    with pytest.raises(NotImplementedError):  # CUDA keeps no dot products
        torch.ops.robustft_cuda_rules.clip_fwd_keep(image.detach(), text.detach(),
                                                    torch.tensor(1.0), torch.tensor(0.0), 0, True)
