"""torch.library.opcheck on every custom op of every fused backend: the schema (aliasing,
mutation), the fake implementation against the real one, and the op's autograd registration.

One table of sample arguments per op (SAMPLES) serves the native ops (and their CUDA-rules twin,
csrc/cpu/cuda_rules_cpu.cpp: the op bodies CUDA runs, on the CPU) and the Triton ops (under the
interpreter on a machine without a GPU), which share names and schemas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, require_backend
from robustft_ext import set_step_design
from robustft_ext.backends import fused_ops
from robustft_ext.ops.robust_step import StepArgs

# opcheck's checks, the last of them the comparison of eager and traced outputs.
DEFAULT_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
                  "test_aot_dispatch_dynamic")
KEPT_OPS = {"clip_fwd_keep", "clip_bwd_kept", "siglip_fwd_keep", "siglip_bwd_kept",
            "m2mix_fwd_keep", "m2mix_bwd_kept", "robust_step_fwd_keep", "robust_step_bwd_kept"}


def _unit(n: int, d: int, device: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)


def _samples(ops, device: str) -> dict[str, list[tuple]]:
    """op name -> argument tuples: square and offset CLIP, SigLIP with and without positives,
    the m^2 ops with and without CLIP, a whole step, one with absent (None) terms, DiVE alone;
    the step ops with bfloat16 features too."""
    t = lambda v: torch.tensor(v, device=device)  # noqa: E731
    a, b, b_wide = _unit(5, 7, device), _unit(5, 7, device, seed=1), _unit(9, 7, device, seed=2)
    s, bias, g = t(3.0), t(0.2), t(1.3)
    _, r, c = ops.clip_fwd(a, b, s, bias, 0, True)
    _, r2, c2 = ops.clip_fwd(a, b_wide, s, bias, 3, False)
    lam, m2s = t(0.3), t(9.0)
    _, _, lse4 = ops.m2mix_fwd(a, b, s, lam, m2s, True)
    _, _, lse2 = ops.m2mix_fwd(a, b, s, lam, m2s, False)
    pre, texts = _unit(5, 7, device, seed=3), _unit(3, 7, device, seed=4)
    refs = [_unit(4, 7, device, seed=5 + i) for i in range(4)]
    center = t([0.01] * 7)
    full = tuple(StepArgs(a, b, s, m2s, lam, True, True, pre, texts, t(2.0), *refs, center))
    part = tuple(StepArgs(a, b, s, m2s, lam, False, True, pre, texts, t(2.0), *[None] * 5))
    dive = tuple(StepArgs(a, b, s, m2s, lam, False, False, None, None, t(2.0), *refs, center))
    grads = t([1.0, 0.1, 0.5, 2.0, 3.0])
    # bfloat16 features (the scalars and DiVE's centre stay float32).
    ah, bh, preh, textsh = (x.to(torch.bfloat16) for x in (a, b, pre, texts))
    refsh = [x.to(torch.bfloat16) for x in refs]
    _, _, lse2h = ops.m2mix_fwd(ah, bh, s, lam, m2s, False)
    parth = tuple(StepArgs(ah, bh, s, m2s, lam, False, True, preh, textsh, t(2.0), *[None] * 5))
    diveh = tuple(StepArgs(ah, bh, s, m2s, lam, False, False, None, None, t(2.0), *refsh, center))
    lse = {name: ops.robust_step_fwd(*args)[2] for name, args in
           (("full", full), ("part", part), ("dive", dive), ("parth", parth), ("diveh", diveh))}
    samples = {
        "clip_fwd": [(a, b, s, bias, 0, True), (a, b_wide, s, bias, 3, False)],
        "clip_bwd": [(g, a, b, s, bias, r, c, 0, True), (g, a, b_wide, s, bias, r2, c2, 3, False)],
        "siglip_fwd": [(a, b, s, bias, False), (a, b_wide, s, bias, True)],
        "siglip_bwd": [(g, a, b, s, bias, False), (g, a, b_wide, s, bias, True)],
        "slerp": [(a, b, lam), (ah, bh, lam)],
        "slerp_bwd": [(torch.randn_like(a), a, b, lam)],
        "m2mix_fwd": [(a, b, s, lam, m2s, True), (a, b, s, lam, m2s, False),
                      (ah, bh, s, lam, m2s, False)],
        "m2mix_bwd": [(g, t(0.7), a, b, s, lam, m2s, lse4, True),
                      (g, t(0.0), a, b, s, lam, m2s, lse2, False),
                      (g, g, ah, bh, s, lam, m2s, lse2h, False)],
        "lipsum_fwd": [(a, pre, texts, t(2.0)), (ah, preh, textsh, t(2.0))],
        "lipsum_bwd": [(t(0.7), a, pre, texts, t(2.0))],
        "dive_fwd": [(*refs, center), (*refsh, center)],
        "dive_bwd": [(t(1.2), t(0.4), *refs, center), (t(1.2), t(0.4), *refsh, center)],
        "robust_step_fwd": [full, part, dive, parth, diveh],
        "robust_step_bwd": [(grads, *full, lse["full"]), (grads, *part, lse["part"]),
                            (grads, *dive, lse["dive"]), (grads, *parth, lse["parth"]),
                            (grads, *diveh, lse["diveh"])],
    }
    if device == "cpu" and ops is torch.ops.robustft_ext:
        _, r, c, dots = ops.clip_fwd_keep(a, b, s, bias, 0, True)
        _, sdots = ops.siglip_fwd_keep(a, b, s, bias, False)
        _, _, lse_m, kept_m, carried_m = ops.m2mix_fwd_keep(a, b, s, lam, m2s, True)
        _, _, lse_s, kept_s, carried_s = ops.robust_step_fwd_keep(*full)
        samples.update({
            "clip_fwd_keep": [(a, b, s, bias, 0, True)],
            "clip_bwd_kept": [(g, a, b, s, bias, r, c, dots, 0, True)],
            "siglip_fwd_keep": [(a, b, s, bias, False)],
            "siglip_bwd_kept": [(g, a, b, s, bias, sdots, False)],
            "m2mix_fwd_keep": [(a, b, s, lam, m2s, True)],
            "m2mix_bwd_kept": [(g, t(0.7), a, b, s, lam, m2s, lse_m, kept_m, carried_m, True)],
            "robust_step_fwd_keep": [full],
            "robust_step_bwd_kept": [(grads, *full, lse_s, kept_s, carried_s)],
        })
    return samples


def _kept_copy(name: str, args: tuple) -> tuple:
    """The _kept ops overwrite their products: each check gets its own copy."""
    if name not in KEPT_OPS or not name.endswith("_kept"):
        return args
    return tuple(x.clone() if isinstance(x, torch.Tensor) and x.dim() >= 2 and i >= len(args) - 3
                 else x for i, x in enumerate(args))


OP_NAMES = ["clip_fwd", "clip_bwd", "siglip_fwd", "siglip_bwd", "slerp", "slerp_bwd",
            "m2mix_fwd", "m2mix_bwd", "lipsum_fwd", "lipsum_bwd", "dive_fwd", "dive_bwd",
            "robust_step_fwd", "robust_step_bwd", *sorted(KEPT_OPS)]


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "native-cuda-rules", "triton"])
def test_opcheck(backend, device, name):
    if backend == "native-cuda-rules":
        if device != "cpu":
            pytest.skip("the CUDA-rules twin runs on CPU tensors")
        require_backend("native", device)
        ops = torch.ops.robustft_cuda_rules
    else:
        require_backend(backend, device)
        ops = fused_ops(backend)
    samples = _samples(ops, device)
    if name not in samples:
        assert name in KEPT_OPS  # the kept-product ops exist for the native CPU only
        pytest.skip(f"{name} is the native CPU's alone")
    op = getattr(ops, name).default
    for args in samples[name]:
        if backend != "triton":
            torch.library.opcheck(op, _kept_copy(name, args))
            continue
        # A traced Triton body cannot read the slerp weights, so it takes the three products
        # (triton_backend/step_ops.py, _gram_serves): the comparison of eager and traced
        # outputs runs under that design, the other checks under the Gram formulation too.
        for design, checks in (("products", DEFAULT_CHECKS),
                               ("gram", DEFAULT_CHECKS[:-1])):
            set_step_design(design)
            try:
                torch.library.opcheck(op, _kept_copy(name, args), test_utils=checks)
            finally:
                set_step_design(None)


def test_every_op_is_checked():
    """OP_NAMES covers every loss op the extension registers, so a new op cannot go unchecked."""
    require_backend("native", "cpu")
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("robustft_ext::")}
    registered -= {"set_workspace_limit", "set_step_design", "native_cuda_tiles",
                   "native_cuda_tile_plan", "gram_strips", "kept_cache_free_bytes"}
    assert registered == set(OP_NAMES), registered ^ set(OP_NAMES)
