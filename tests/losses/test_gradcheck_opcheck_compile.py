"""gradcheck in float64 (reference and native on CPU) and torch.compile(fullgraph=True) of the
public functions (opcheck of every custom op: tests/backends/test_opcheck.py)."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from helpers import DEVICES, assert_compiled_matches, features, require_backend


def _inputs(n=4, m=4, d=3, device="cpu", dtype=torch.float64):
    a, b = features(n, d, dtype, device), features(m, d, dtype, device)
    scale = torch.tensor(2.5, dtype=dtype if dtype == torch.float64 else torch.float32,
                         device=device, requires_grad=True)
    bias = torch.tensor(-0.7, dtype=scale.dtype, device=device, requires_grad=True)
    return a, b, scale, bias


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind", ["clip", "clip_rows", "siglip", "siglip_neg"])
def test_gradcheck_float64(backend, kind):
    require_backend(backend, "cpu", torch.float64)
    n, m = (3, 7) if kind in ("clip_rows", "siglip_neg") else (4, 4)
    a, b, scale, bias = _inputs(n, m)
    fns = {
        "clip": lambda a, b, s, c: rft.clip_loss(a, b, s, c, backend=backend),
        "clip_rows": lambda a, b, s, c: rft.clip_rows_loss(a, b, s, c, diag_offset=2, backend=backend),
        "siglip": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, backend=backend),
        "siglip_neg": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, negative_only=True, backend=backend),
    }
    assert torch.autograd.gradcheck(fns[kind], (a, b, scale, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(backend, device)
    a, b, scale, bias = _inputs(6, 6, 8, device, torch.float32)

    def step(a, b, scale, bias):
        return (rft.clip_loss(a, b, scale, backend=backend)
                + rft.siglip_loss(a, b, scale, bias, backend=backend))

    assert_compiled_matches(step, (a, b, scale, bias), [a, b, scale, bias], device)
