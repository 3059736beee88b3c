"""Shared test helpers: random features, error measures and the per-dtype tolerance table."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative error bound (max |x - ref| / max |ref|) of a fused backend against the float64
# reference on the same (already rounded) inputs. A low-precision result must also be within
# LOWP_FACTOR times the error of the plain eager low-precision computation (open_clip-style),
# whichever bound is larger: fused kernels accumulate in fp32 and should never be worse.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 5e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
LOWP_FACTOR = 2.0


def features(n: int, d: int, dtype=torch.float32, device="cpu", *,
             noncontiguous: bool = False) -> torch.Tensor:
    """L2-normalised random rows requiring grad; optionally a strided (non-contiguous) view."""
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)
    if noncontiguous:
        base = torch.zeros(n, 2 * d, dtype=dtype, device=device)
        base[:, ::2] = x
        base.requires_grad_()
        return base[:, ::2]
    return x.requires_grad_()


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """max |x - ref| / max |ref|, the denominator floored so exact zeros compare absolutely."""
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / max(scale, floor)


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, bound: float, what: str,
                     floor: float = 1e-3) -> None:
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = rel_err(x, ref, floor)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"


def assert_compiled_matches(step, args: tuple, wrt: list[torch.Tensor], device: str):
    """torch.compile(step, fullgraph=True) (aot_eager on CPU, where Inductor cannot compile user
    Triton kernels; Inductor on CUDA) gives eager's value and gradients wrt `wrt`. Returns the
    compiled function."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    out, eager = compiled(*args), step(*args)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), (out, eager)
    for x, y in zip(torch.autograd.grad(out, wrt), torch.autograd.grad(eager, wrt)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    return compiled
