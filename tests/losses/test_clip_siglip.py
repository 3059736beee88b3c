"""Every fused backend against the float64 reference: forward and every gradient.

Covers dtypes with a per-dtype tolerance (helpers.TOLERANCE) bounded also by the eager
low-precision error, odd shapes, non-contiguous inputs, a non-unit upstream gradient, several
logit scales, with and without logit_bias, and the one-directional (local_loss) variant.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import DEVICES, require_backend
from helpers import LOWP_FACTOR, TOLERANCE, assert_close_rel, features, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 5), (3, 33), (129, 768), (40, 5)]
SCALES = [1.0, 14.3, 100.0]
TRITON_MAX = 64  # keep shapes small under the Triton interpreter


def _eager_lowp(kind: str, a, b, scale, bias, *, offset=0, symmetric=True):
    """open_clip-style eager loss in the inputs' own dtype: the low-precision baseline."""
    logits = scale.to(a.dtype) * a @ b.T
    if bias is not None:
        logits = logits + bias.to(a.dtype)
    if kind == "siglip":
        z = 2 * torch.eye(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device) - 1
        return -F.logsigmoid(z * logits).sum() / a.shape[0]
    labels = torch.arange(a.shape[0], device=a.device) + offset
    ce = F.cross_entropy(logits, labels)
    return (ce + F.cross_entropy(logits.T, labels)) / 2 if symmetric else ce


def _run(fn, inputs, upstream):
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None and t.requires_grad],
                                grad_outputs=upstream.to(loss.dtype))
    return loss, grads


def _check(kind, backend, device, dtype, n, d, scale_value, with_bias, noncontiguous,
           upstream_value=1.7, m=None, offset=0):
    require_backend(backend, device, dtype)
    if backend == "triton" and device == "cpu" and max(n, m or n, d) > TRITON_MAX:
        n, d = min(n, 17), min(d, 33)
    m = n if m is None else m
    a = features(n, d, dtype, device, noncontiguous=noncontiguous)
    b = features(m, d, dtype, device, noncontiguous=noncontiguous)
    scale = torch.tensor(scale_value, device=device, requires_grad=True)
    bias = torch.tensor(-3.0 if kind == "siglip" else 0.5, device=device,
                        requires_grad=True) if with_bias else None
    upstream = torch.tensor(upstream_value, device=device)
    symmetric = m == n and offset == 0

    def fused(a, b, s, bb):
        if kind == "siglip":
            return rft.siglip_loss(a, b, s, bb, backend=backend)
        if symmetric:
            return rft.clip_loss(a, b, s, bb, backend=backend)
        return rft.clip_rows_loss(a, b, s, bb, diag_offset=offset, backend=backend)

    def ref64(a, b, s, bb):
        a, b, s = a.double(), b.double(), s.double()
        bb = bb.double() if bb is not None else None
        if kind == "siglip":
            return rft.siglip_loss(a, b, s, bb, backend="reference")
        if symmetric:
            return rft.clip_loss(a, b, s, bb, backend="reference")
        return rft.clip_rows_loss(a, b, s, bb, diag_offset=offset, backend="reference")

    inputs = [a, b, scale, bias]
    loss, grads = _run(fused, inputs, upstream)
    ref_loss, ref_grads = _run(ref64, inputs, upstream)
    if dtype in (torch.float16, torch.bfloat16):
        lp_loss, lp_grads = _run(lambda *x: _eager_lowp(kind, *x, offset=offset, symmetric=symmetric),
                                 inputs, upstream)
    names = ["loss", "d image", "d text", "d logit_scale", "d logit_bias"]
    for name, x, ref, i in zip(names, [loss, *grads], [ref_loss, *ref_grads], range(5)):
        bound = TOLERANCE[dtype]
        if dtype in (torch.float16, torch.bfloat16):
            lp = [lp_loss, *lp_grads][i]
            bound = max(bound, LOWP_FACTOR * rel_err(lp, ref))
        if name == "d logit_bias" and kind == "clip":
            # Mathematically zero for CLIP: compare on an absolute scale.
            assert abs(x.item()) <= 10 * TOLERANCE[dtype] * max(1.0, scale_value), name
            continue
        assert_close_rel(x, ref, bound, f"{backend}/{device}/{dtype} {kind} {name}")
    assert grads[0].dtype == a.dtype and grads[1].dtype == b.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_shapes_and_dtypes(device, backend, kind, dtype, n, d):
    _check(kind, backend, device, dtype, n, d, 14.3, with_bias=kind == "siglip",
           noncontiguous=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("scale", SCALES)
def test_logit_scales_and_bias(device, backend, kind, scale):
    _check(kind, backend, device, torch.float32, 17, 33, scale, with_bias=True,
           noncontiguous=False, upstream_value=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_noncontiguous_inputs(device, backend, kind):
    _check(kind, backend, device, torch.float32, 9, 7, 14.3, with_bias=True, noncontiguous=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("n,m,offset", [(3, 9, 3), (4, 12, 0), (5, 10, 5)])
def test_clip_rows_with_offset(device, backend, n, m, offset):
    """The one-directional loss used by local_loss=True (positives at i + offset)."""
    _check("clip", backend, device, torch.float32, n, 16, 14.3, with_bias=True,
           noncontiguous=False, m=m, offset=offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_siglip_negative_only_rectangular(device, backend):
    require_backend(backend, device)
    a, b = features(5, 8, device=device), features(7, 8, device=device)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    out = rft.siglip_loss(a, b, scale, bias, negative_only=True, backend=backend)
    ref = rft.siglip_loss(a.double(), b.double(), scale.double(), bias.double(),
                          negative_only=True, backend="reference")
    assert_close_rel(out, ref, TOLERANCE[torch.float32], "negative-only loss")
    g = torch.autograd.grad(out, [a, b, scale, bias])
    gr = torch.autograd.grad(ref, [a, b, scale, bias])
    for x, r, name in zip(g, gr, ["a", "b", "scale", "bias"]):
        assert_close_rel(x, r, TOLERANCE[torch.float32], f"negative-only d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_float_scale_and_no_grad_inputs(device, backend):
    """A Python float logit_scale works and gets no gradient; the loss is float32."""
    require_backend(backend, device)
    a, b = features(6, 8, device=device), features(6, 8, device=device)
    loss = rft.clip_loss(a, b, 14.3, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = rft.clip_loss(a.double(), b.double(), 14.3, backend="reference")
    assert_close_rel(loss, ref, TOLERANCE[torch.float32], "float scale")
    with torch.no_grad():
        assert torch.isfinite(rft.siglip_loss(a, b, 10.0, -10.0, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_mixed_dtypes_under_autocast(device, backend):
    """Mixed input dtypes (as autocast produces) are promoted, not rejected."""
    require_backend(backend, device, torch.bfloat16)
    a = features(8, 16, torch.bfloat16, device)
    b = features(8, 16, torch.float32, device)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = rft.clip_loss(a, b, scale, backend=backend)
    ref = rft.clip_loss(a.double(), b.double(), scale.double(), backend="reference")
    assert_close_rel(loss, ref, TOLERANCE[torch.float32], "autocast loss")
    ga, gb = torch.autograd.grad(loss, [a, b])
    assert ga.dtype == torch.bfloat16 and gb.dtype == torch.float32
