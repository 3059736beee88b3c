"""Triton-backed m^2-mix ops, registered as `robustft_triton::{slerp, slerp_bwd, m2mix_fwd,
m2mix_bwd}` with torch.library.triton_op.

Same arguments, outputs, dtypes and checks as the C++ ops `robustft_ext::*` (csrc/schemas.cpp,
csrc/m2mix_ops.h), except that float64 inputs are not supported: fused_ops("triton") and
fused_ops("native") are interchangeable. As in ops.py, each op body uses only torch ops with
fake-able shapes plus `wrap_triton` kernel launches, so the body is also the fake (meta)
implementation and torch.compile(fullgraph=True) traces through to the kernels.

What the op bodies do with torch ops (all O(n D), as csrc/m2mix_ops.h):
  * the slerp prologue: c_p = <I_p, T_p>, the weights [4, n] from reference.slerp_weights
    (the one Python copy of maths::slerp_weights), M = w_a I + w_b T kept as one n x D buffer
    in the input dtype, read by the kernels like I and T;
  * the true-pair diagonal of A and B (value in the forward, gradient in the backward);
  * the backward of the slerp: dI += w_a dM + k T, dT += w_b dM + k I,
    k = <dM, I> dw_a/dc + <dM, T> dw_b/dc.
Everything of size n x n stays inside the kernels (m2mix_kernels.py). Besides the outputs, the
memory is O(n D) (M and the float32 gradient buffers) plus O(P n) column partials of the CLIP
forward (P persistent programs) and O(n / BLOCK) partial sums.
"""
from __future__ import annotations

import importlib
import pathlib
import sys
import types

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import m2mix_kernels
from .ops import (Config, _check_features, _dot_flags, _kernel_input, _traceable, choose_config,
                  interpreting)


def _load_reference():
    """robustft_ext.reference; when this backend was loaded on its own by path (the tests'
    fallback when robustft_ext does not import), reference.py is loaded from the package
    directory without running robustft_ext/__init__.py."""
    try:
        from .. import reference

        return reference
    except ImportError:
        pass
    name = "_robustft_ext_reference_standalone"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(pathlib.Path(__file__).resolve().parents[1])]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.reference")


slerp_weights = _load_reference().slerp_weights

_M2_LSE = _traceable(m2mix_kernels.m2mix_lse_kernel)
_M2_ROWS = _traceable(m2mix_kernels.m2mix_grad_rows_kernel)
_M2_COLS = _traceable(m2mix_kernels.m2mix_grad_cols_kernel)


def _m2_config(device: torch.device, dtype: torch.dtype, D: int) -> Config:
    """choose_config, adapted to the heavier m^2-mix tiles on GPU: they carry three logit
    tiles and (register-resident backward) up to three [BLOCK_M, BLOCK_D] accumulators,
    against one of each in the contrastive kernels. So one_chunk only for D <= 64, and 8 warps
    for the 64 x 64 (16-bit) tiles. A guess, neither tuned nor checked for register spills:
    no GPU was available when this was written. The interpreter configuration is unchanged."""
    cfg = choose_config(device, dtype, D)
    if device.type != "cuda" or interpreting():
        return cfg
    if cfg.one_chunk and D > 64:
        cfg = cfg._replace(block_d=cfg.block_m, one_chunk=False)
    return cfg._replace(num_warps=8 if cfg.block_m >= 64 else 4)


# ----------------------------------------------------------------------------- checks
def _check_pair(a: Tensor, b: Tensor, lam: Tensor) -> None:
    # csrc/m2mix_ops.h::check_m2_pair: check_features(a, b, lam, lam) and one shape.
    _check_features(a, b, lam, lam)
    torch._check(a.size(0) == b.size(0),
                 lambda: f"robustft_triton: the mixed pair must have one shape, got "
                 f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_scalar(t: Tensor, a: Tensor, name: str) -> None:
    # csrc/m2mix_ops.h::check_m2_scalar.
    if t.dim() != 0 or t.dtype != torch.float32 or t.device != a.device:
        raise RuntimeError(f"robustft_triton: {name} must be a 0-d torch.float32 tensor on "
                           f"{a.device}")


def _weights(af: Tensor, bf: Tensor, lam: Tensor) -> Tensor:
    """[4, n] = (w_a, w_b, dw_a/dc, dw_b/dc) of the matched rows (float32)."""
    return slerp_weights((af * bf).sum(1), lam)


def _mix(af: Tensor, bf: Tensor, w: Tensor) -> Tensor:
    return w[0].unsqueeze(1) * af + w[1].unsqueeze(1) * bf


def _mix_backward(dM: Tensor, af: Tensor, bf: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    # csrc/m2mix_ops.h::mix_rows_backward.
    k = ((dM * af).sum(1) * w[2] + (dM * bf).sum(1) * w[3]).unsqueeze(1)
    return w[0].unsqueeze(1) * dM + k * bf, w[1].unsqueeze(1) * dM + k * af


# ----------------------------------------------------------------------------- slerp
@triton_op("robustft_triton::slerp", mutates_args=())
def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """out_p = slerp(a_p, b_p; lam) (lam weights a), in the inputs' dtype; lam is a 0-d
    float32 tensor. O(n D) torch ops (no kernel: nothing here is n x n)."""
    _check_pair(a, b, lam)
    af, bf = a.to(torch.float32), b.to(torch.float32)
    return _mix(af, bf, _weights(af, bf, lam)).to(a.dtype)


@triton_op("robustft_triton::slerp_bwd", mutates_args=())
def slerp_bwd(grad_out: Tensor, a: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of slerp(a, b; lam) for the upstream gradient grad_out."""
    _check_pair(a, b, lam)
    torch._check(grad_out.dim() == 2 and grad_out.size(0) == a.size(0)
                 and grad_out.size(1) == a.size(1),
                 lambda: f"robustft_triton: slerp_bwd grad_out has shape "
                 f"{tuple(grad_out.shape)}, expected {tuple(a.shape)}")
    af, bf = a.to(torch.float32), b.to(torch.float32)
    ga, gb = _mix_backward(grad_out.to(torch.float32), af, bf, _weights(af, bf, lam))
    return ga.to(a.dtype), gb.to(b.dtype)


# ----------------------------------------------------------------------------- m^2-mix
class _Problem:
    """The inputs of one m^2-mix problem as the kernels read them (csrc M2Problem)."""

    def __init__(self, image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor,
                 clip_scale: Tensor) -> None:
        _check_pair(image, text, lam)
        _check_scalar(m2_scale, image, "m2_scale")
        _check_scalar(clip_scale, image, "clip_scale")
        self.I = _kernel_input(image)
        self.T = _kernel_input(text)
        self.m2_scale = _kernel_input(m2_scale)
        self.clip_scale = _kernel_input(clip_scale)
        self.If = self.I.to(torch.float32)
        self.Tf = self.T.to(torch.float32)
        self.weights = _weights(self.If, self.Tf, lam)
        self.M = _mix(self.If, self.Tf, self.weights).to(image.dtype).contiguous()
        self.pair_dot = (self.If * self.Tf).sum(1)
        self.n, self.D = image.shape
        self.cfg = _m2_config(image.device, image.dtype, self.D)
        self.prec, self.upcast = _dot_flags(image.dtype)


@triton_op("robustft_triton::m2mix_fwd", mutates_args=())
def m2mix_fwd(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor, clip_scale: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(m2_loss, clip_loss (0 without clip), lse [4 or 2, n]), all float32; see
    csrc/m2mix_kernels.h for the lse layout."""
    p = _Problem(image, text, m2_scale, lam, clip_scale)
    n, cfg = p.n, p.cfg
    f32 = dict(device=image.device, dtype=torch.float32)
    diag = p.pair_dot * p.m2_scale
    row_lse = torch.empty((3 if with_clip else 2, n), **f32)
    if with_clip:
        nprog = cfg.nprog
        col_max = torch.full((nprog, n), float("-inf"), **f32)
        col_sum = torch.zeros((nprog, n), **f32)
    else:  # no column partials: one program per row block
        nprog = triton.cdiv(n, cfg.block_m)
        col_max = col_sum = torch.empty(0, **f32)
    wrap_triton(_M2_LSE)[(nprog,)](
        p.I, p.T, p.M, diag, p.m2_scale, p.clip_scale, row_lse, col_max, col_sum,
        n, p.D, p.I.stride(0), nprog,
        WITH_CLIP=with_clip, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PREC=p.prec, UPCAST=p.upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # CE_rows(A) + CE_rows(B), both with the true pair diag on the diagonal, halved.
    m2_loss = (row_lse[0].sum() + row_lse[1].sum() - 2 * diag.sum()) / (2 * n)
    if with_clip:
        # Merge the per-program column partials in a fixed order: O(nprog * n).
        cmax = col_max.amax(0)
        cmax = torch.where(torch.isinf(cmax), torch.zeros_like(cmax), cmax)
        col_lse = cmax + torch.log((col_sum * torch.exp(col_max - cmax)).sum(0))
        lse = torch.cat([row_lse, col_lse.unsqueeze(0)])
        clip_loss = (lse[2].sum() + lse[3].sum()
                     - 2 * p.clip_scale * p.pair_dot.sum()) / (2 * n)
    else:
        lse = row_lse
        clip_loss = torch.zeros((), **f32)
    return m2_loss, clip_loss, lse


@triton_op("robustft_triton::m2mix_bwd", mutates_args=())
def m2mix_bwd(grad_m2: Tensor, grad_clip: Tensor, image: Tensor, text: Tensor,
              m2_scale: Tensor, lam: Tensor, clip_scale: Tensor, lse: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of grad_m2 * m2_loss + grad_clip * clip_loss: (grad_image, grad_text,
    grad_m2_scale, grad_clip_scale); the scale gradients are 0-d float32."""
    p = _Problem(image, text, m2_scale, lam, clip_scale)
    n, D, cfg = p.n, p.D, p.cfg
    torch._check(lse.dim() == 2 and lse.size(0) == (4 if with_clip else 2)
                 and lse.size(1) == n,
                 lambda: "robustft_triton: saved m2mix log-sum-exp statistics do not match "
                 "the inputs")
    f32 = dict(device=image.device, dtype=torch.float32)
    lse = _kernel_input(lse.to(torch.float32))
    grads = torch.stack([grad_m2.to(torch.float32).reshape(()),
                         grad_clip.to(torch.float32).reshape(())])
    alloc = torch.empty if cfg.one_chunk else torch.zeros
    grad_I = alloc((n, D), **f32)
    grad_T = alloc((n, D), **f32)
    grad_M = alloc((n, D), **f32)
    grad_Tc = alloc((n, D), **f32) if with_clip else torch.empty(0, **f32)
    grid_r = triton.cdiv(n, cfg.block_m)
    stats = torch.empty((grid_r, 2), **f32)
    common = dict(WITH_CLIP=with_clip, ONE_CHUNK=cfg.one_chunk,
                  LOWP_DS=image.dtype != torch.float32,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                  DOT_PREC=p.prec, UPCAST=p.upcast, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    wrap_triton(_M2_ROWS)[(grid_r,)](
        p.I, p.T, p.M, grads, p.m2_scale, p.clip_scale, lse, grad_I, grad_T, stats,
        n, D, p.I.stride(0), grad_I.stride(0), 2 * n, **common)
    wrap_triton(_M2_COLS)[(triton.cdiv(n, cfg.block_m),)](
        p.I, p.T, p.M, grads, p.m2_scale, p.clip_scale, lse, grad_M, grad_Tc,
        n, D, p.I.stride(0), grad_M.stride(0), 2 * n, **common)
    if with_clip:
        grad_T = grad_T + grad_Tc

    # The true pair on the diagonals of A and B: d(loss)/d(diag_p) summed over both.
    diag = p.pair_dot * p.m2_scale
    g_diag = grads[0] / (2 * n) * ((diag - lse[0]).exp() + (diag - lse[1]).exp() - 2)
    grad_I = grad_I + (p.m2_scale * g_diag).unsqueeze(1) * p.Tf
    grad_T = grad_T + (p.m2_scale * g_diag).unsqueeze(1) * p.If
    # Through the mix M = slerp(I, T; lam).
    mix_I, mix_T = _mix_backward(grad_M, p.If, p.Tf, p.weights)
    grad_I = grad_I + mix_I
    grad_T = grad_T + mix_T

    stats = stats.sum(0)
    grad_m2_scale = stats[0] + (g_diag * p.pair_dot).sum()
    grad_clip_scale = stats[1].clone()
    return grad_I.to(image.dtype), grad_T.to(text.dtype), grad_m2_scale, grad_clip_scale
