"""Triton-backed contrastive ops, registered as `robustft_triton::{clip_fwd, clip_bwd,
siglip_fwd, siglip_bwd}` with torch.library.triton_op: the twin of csrc/contrastive_ops.h.

The four ops have the semantics of the C++ ops `robustft_ext::*` (csrc/schemas.cpp,
csrc/contrastive_ops.h): same arguments, outputs, dtypes and checks, except that float64
inputs are not supported. Each op body uses only torch ops with fake-able shapes plus
`wrap_triton` kernel launches, so the body is also the fake (meta) implementation and
torch.compile(fullgraph=True) traces through to the kernels. Every body runs under its
inputs' device guard (device.triton_op), and the kernels receive the features padded to a
multiple of 16 columns, 16-byte aligned (launch.kernel_features, launch.kernel_input).
check_features, the op-level checks of a feature pair, serves the step ops too (as
csrc/step_ops.h uses contrastive_ops.h's).

Note on schemas: the schema comes from the body's signature (device.triton_op), in which
`diag_offset: int` becomes `SymInt diag_offset` where the C++ schema says `int`. SymInt
accepts every int, so calls are interchangeable.

Memory: besides the outputs, O(P * m) for the column partials of the symmetric CLIP forward
(P = number of persistent programs, the SM count on GPU), O(n * D) float32 gradient buffers
in the backward (as the C++ backends), O(n / BLOCK_M) partial sums and, for large D, the dS
workspace of ds_workspace.py (bounded by robustft_ext.workspace's limit). Nothing else is
n x m.

Backward designs (configs.fused_backward decides): small D keeps each gradient row block in
registers (contrastive_kernels.contrastive_grad_rows_kernel, once per view); large D writes
the unit dlogits of one row chunk at a time into the workspace
(contrastive_kernels.contrastive_dlogit_kernel) and forms both gradients with library GEMMs
(_grads_workspace).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import SUPPORTED_DTYPES, configs, contrastive_kernels, ds_workspace, maths
from .configs import interpreting
from .device import triton_op
from .launch import (kernel_features, kernel_input, launch_opts, persistent_programs,
                     traceable, unpad)

_CLIP_LSE = traceable(contrastive_kernels.clip_lse_kernel)
_SIGLIP_SUM = traceable(contrastive_kernels.siglip_softplus_sum_kernel)
_GRAD_ROWS = traceable(contrastive_kernels.contrastive_grad_rows_kernel)
_DLOGIT = traceable(contrastive_kernels.contrastive_dlogit_kernel)


def check_features(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor) -> None:
    """The op-level contract of a feature pair and its two scalars
    (csrc/contrastive_ops.h::check_features), plus what the Triton kernels can run: the
    dtype, and a GPU or the interpreter."""
    if a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(
            f"robustft_triton: a and b must be 2-D, got {a.dim()}-D and {b.dim()}-D")
    torch._check(a.size(0) > 0 and b.size(0) > 0 and a.size(1) > 0,
                 lambda: "robustft_triton: empty feature matrix")
    torch._check(a.size(1) == b.size(1),
                 lambda: f"robustft_triton: feature dims differ: {a.size(1)} vs {b.size(1)}")
    if a.dtype != b.dtype:
        raise RuntimeError("robustft_triton: a and b dtypes differ")
    if a.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"robustft_triton: unsupported dtype {a.dtype} "
                           f"(the Triton backend supports {SUPPORTED_DTYPES})")
    if not (a.device == b.device == scale.device == bias.device):
        raise RuntimeError("robustft_triton: all tensors must be on one device")
    if scale.dim() != 0 or bias.dim() != 0:
        raise RuntimeError("robustft_triton: scale and bias must be 0-d")
    if scale.dtype != torch.float32 or bias.dtype != torch.float32:
        raise RuntimeError("robustft_triton: scale and bias must have dtype torch.float32")
    if a.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"robustft_triton: tensors on {a.device} need a GPU, or TRITON_INTERPRET=1 set "
            "before triton is imported")


def _launch_lse(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                with_col: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """row_lse [n], col_lse [m] (with_col) and the sum of the positive logits (0-d)."""
    n, D = a.shape
    m = b.shape[0]
    cfg = configs.select("clip_lse", a.device, a.dtype, D)
    f32 = dict(device=a.device, dtype=torch.float32)
    row_lse = torch.empty(n, **f32)
    if with_col:
        nprog = persistent_programs(a.device)
        col_max = torch.full((nprog, m), float("-inf"), **f32)
        col_sum = torch.zeros((nprog, m), **f32)
    else:  # no column partials: one program per row block
        nprog = triton.cdiv(n, cfg.block_m)
        col_max = col_sum = torch.empty(0, **f32)
    pos = torch.empty(triton.cdiv(n, cfg.block_m), **f32)
    wrap_triton(_CLIP_LSE)[(nprog,)](
        a, b, scale, bias, row_lse, col_max, col_sum, pos,
        n, m, D, a.stride(0), b.stride(0), diag_offset, nprog,
        WITH_COL=with_col, ONE_CHUNK=D <= cfg.block_d, **launch_opts(cfg, a.dtype))
    col_lse = maths.merge_lse_partials(col_max, col_sum) if with_col else None
    return row_lse, col_lse, pos.sum()


def _grad_rows_fused(p: Tensor, q: Tensor, scale: Tensor, bias: Tensor, g: Tensor, *,
                     siglip: bool, row_lse: Tensor | None, col_lse: Tensor | None,
                     pos_coef: int, pos_offset: int, norm: int,
                     want_stats: bool) -> tuple[Tensor, Tensor | None]:
    """The register-resident backward of one view (small D): grad_p [n, D] float32 =
    scale * dS @ q; with want_stats also (sum dS <p,q>, sum dS) as a [2] tensor."""
    n, D = p.shape
    m = q.shape[0]
    cfg = configs.select("grad_rows", p.device, p.dtype, D)
    f32 = dict(device=p.device, dtype=torch.float32)
    grid = triton.cdiv(n, cfg.block_m)
    grad = torch.empty((n, D), **f32)
    stats = torch.empty((grid, 2) if want_stats else (1, 2), **f32)
    dummy = torch.empty(0, **f32)
    wrap_triton(_GRAD_ROWS)[(grid,)](
        p, q, scale, bias, g,
        row_lse if row_lse is not None else dummy,
        col_lse if col_lse is not None else dummy,
        grad, stats,
        n, m, D, p.stride(0), q.stride(0), grad.stride(0), pos_offset, norm,
        SIGLIP=siglip, HAS_ROW=row_lse is not None, HAS_COL=col_lse is not None,
        POS_COEF=pos_coef, WANT_STATS=want_stats, **launch_opts(cfg, p.dtype))
    return grad, (stats.sum(0) if want_stats else None)


def _grads(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, g: Tensor, *, siglip: bool,
           row_lse: Tensor | None, col_lse: Tensor | None, pos_coef: int, diag_offset: int,
           norm: int, D: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_a, grad_b) [., D] in the inputs' dtype and (grad_scale, grad_bias) 0-d float32 of
    a contrastive loss with dS = (g / norm) U (contrastive_kernels._unit_dlogits): the row
    LSE of S (CLIP), its column LSE (symmetric CLIP), positives at q - p == diag_offset
    weighted pos_coef. a and b are the kernel inputs (kernel_features), D the callers'
    feature dimension.

    Small D: the register-resident kernel, once per view (rows of a against b; rows of b
    against a with the LSEs swapped and the offset negated). Large D: the dS workspace
    (_grads_workspace)."""
    if not configs.fused_backward("contrastive", a.device, a.shape[1]):
        grad_a, grad_b, grad_scale, grad_bias = _grads_workspace(
            a, b, scale, bias, g, siglip=siglip, row_lse=row_lse, col_lse=col_lse,
            pos_coef=pos_coef, diag_offset=diag_offset, norm=norm)
        return unpad(grad_a, D), unpad(grad_b, D), grad_scale, grad_bias
    grad_a, stats = _grad_rows_fused(
        a, b, scale, bias, g, siglip=siglip, row_lse=row_lse, col_lse=col_lse,
        pos_coef=pos_coef, pos_offset=diag_offset, norm=norm, want_stats=True)
    grad_b, _ = _grad_rows_fused(
        b, a, scale, bias, g, siglip=siglip, row_lse=col_lse, col_lse=row_lse,
        pos_coef=pos_coef, pos_offset=-diag_offset, norm=norm, want_stats=False)
    # Separate reductions: the returned tensors must not alias one another.
    return (unpad(grad_a.to(a.dtype), D), unpad(grad_b.to(b.dtype), D), stats[0].clone(),
            stats[1].clone())


def _grads_workspace(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, g: Tensor, *,
                     siglip: bool, row_lse: Tensor | None, col_lse: Tensor | None,
                     pos_coef: int, diag_offset: int,
                     norm: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """_grads for large D: for each row chunk of a, the dlogit kernel writes U [chunk, m]
    (ds_workspace.ds_dtype) into the workspace, then
        grad_a[chunk] = U @ b,   grad_b += U^T @ a[chunk]
    as float32-output GEMMs (ds_workspace.mm_f32); both are scaled by s g / norm once at the
    end, so no 16-bit operand carries the loss weight (which would underflow in fp16 at large
    n). The scalar gradients come from the same pass (the kernel's per-tile partials of
    sum U <a, b> and sum U, from the float32 U)."""
    n, D = a.shape
    m = b.shape[0]
    cfg = configs.select("dlogit", a.device, a.dtype, D)
    f32 = dict(device=a.device, dtype=torch.float32)
    ws_dtype = ds_workspace.ds_dtype(a.dtype)
    width = configs.aligned_dim(m)  # the row stride: a multiple of 16, as D's
    rows = ds_workspace.chunk_rows(n, width * ws_dtype.itemsize, cfg.block_m)
    ds = torch.empty((rows, width), device=a.device, dtype=ws_dtype)
    dummy = torch.empty(0, **f32)
    grad_a = torch.empty((n, D), **f32)
    grad_b = torch.zeros((m, D), **f32)
    stats = torch.zeros(2, **f32)
    for row0 in range(0, n, rows):
        chunk = min(rows, n - row0)
        grid = triton.cdiv(chunk, cfg.block_m) * triton.cdiv(m, cfg.block_n)
        partials = torch.empty((grid, 2), **f32)
        wrap_triton(_DLOGIT)[(grid,)](
            a, b, scale, bias,
            row_lse if row_lse is not None else dummy,
            col_lse if col_lse is not None else dummy,
            ds, partials,
            row0, chunk, n, m, D, a.stride(0), b.stride(0), ds.stride(0), diag_offset,
            SIGLIP=siglip, HAS_ROW=row_lse is not None, HAS_COL=col_lse is not None,
            POS_COEF=pos_coef, GROUP_M=8, **launch_opts(cfg, a.dtype))
        u = ds[:chunk, :m]
        grad_a[row0:row0 + chunk] = ds_workspace.mm_f32(u, b)
        ds_workspace.add_mm_f32_(grad_b, u.T, a[row0:row0 + chunk])
        stats += partials.sum(0)
    gw = g / norm
    factor = gw * scale
    stats = stats * gw
    return ((grad_a * factor).to(a.dtype), (grad_b * factor).to(b.dtype), stats[0].clone(),
            stats[1].clone())


@triton_op("robustft_triton::clip_fwd")
def clip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
             symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP / InfoNCE loss over S = scale * a b^T + bias (see csrc/schemas.cpp).

    symmetric: n == m, diag_offset == 0, loss = (CE_rows(S) + CE_rows(S^T)) / 2, returns
    (loss, row_lse [n], col_lse [n]); otherwise loss = CE_rows(S) with positives at
    (i, i + diag_offset), returns (loss, row_lse [n], col_lse [0]). All float32.
    """
    check_features(a, b, scale, bias)
    n, m = a.shape[0], b.shape[0]
    if symmetric:
        torch._check(n == m, lambda: "robustft_triton: symmetric clip loss needs a square "
                     "problem, offset 0")
        torch._check(diag_offset == 0, lambda: "robustft_triton: symmetric clip loss needs "
                     "a square problem, offset 0")
    else:
        torch._check(diag_offset >= 0, lambda: f"robustft_triton: positives (i, i + "
                     f"{diag_offset}) fall outside {m} columns")
        torch._check(diag_offset + n <= m, lambda: f"robustft_triton: positives (i, i + "
                     f"{diag_offset}) fall outside {m} columns")
    a, b = kernel_features(a), kernel_features(b)
    scale, bias = kernel_input(scale), kernel_input(bias)
    row_lse, col_lse, pos = _launch_lse(a, b, scale, bias, diag_offset, symmetric)
    if symmetric:
        loss = (row_lse.sum() + col_lse.sum() - 2 * pos) / (2 * n)
    else:
        loss = (row_lse.sum() - pos) / n
        col_lse = torch.empty(0, device=a.device, dtype=torch.float32)
    return loss, row_lse, col_lse


@triton_op("robustft_triton::clip_bwd")
def clip_bwd(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
             row_lse: Tensor, col_lse: Tensor, diag_offset: int,
             symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of clip_fwd's loss: (grad_a, grad_b, grad_scale, grad_bias).

    dS = (g / norm) U with U = exp(S - r) [+ exp(S - c)] - pos_coef E (maths.clip_dlogit):
    symmetric, norm = 2n, both LSE terms, pos_coef 2; one-sided, norm = n, the row term,
    pos_coef 1. grad_a = s dS b, grad_b = s dS^T a (as csrc/contrastive_ops.h::clip_bwd_impl),
    through the register-resident kernel or the dS workspace (_grads).
    """
    check_features(a, b, scale, bias)
    (n, D), m = a.shape, b.shape[0]
    torch._check(row_lse.numel() == n and (not symmetric or col_lse.numel() == m),
                 lambda: "robustft_triton: saved log-sum-exp statistics do not match the "
                 "inputs")
    a, b = kernel_features(a), kernel_features(b)
    scale, bias = kernel_input(scale), kernel_input(bias)
    g = kernel_input(grad_loss.to(torch.float32).reshape(()))
    row_lse = kernel_input(row_lse.to(torch.float32))
    col_lse = kernel_input(col_lse.to(torch.float32))
    return _grads(a, b, scale, bias, g, siglip=False, row_lse=row_lse,
                  col_lse=col_lse if symmetric else None, pos_coef=2 if symmetric else 1,
                  diag_offset=diag_offset, norm=2 * n if symmetric else n, D=D)


@triton_op("robustft_triton::siglip_fwd")
def siglip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
               negative_only: bool) -> Tensor:
    """SigLIP loss (1/n) sum_ij -log sigmoid(z_ij S_ij), z = +1 on the diagonal unless
    negative_only (then b may have any number of rows). 0-d float32."""
    check_features(a, b, scale, bias)
    n, m = a.shape[0], b.shape[0]
    torch._check(negative_only or m == n, lambda: "robustft_triton: siglip with positives "
                 "needs as many rows in b as in a")
    a, b = kernel_features(a), kernel_features(b)
    scale, bias = kernel_input(scale), kernel_input(bias)
    D = a.shape[1]
    cfg = configs.select("siglip_sum", a.device, a.dtype, D)
    nprog = persistent_programs(a.device)
    partial = torch.empty(nprog, device=a.device, dtype=torch.float32)
    wrap_triton(_SIGLIP_SUM)[(nprog,)](
        a, b, scale, bias, partial, n, m, D, a.stride(0), b.stride(0), nprog,
        HAS_POS=not negative_only, ONE_CHUNK=D <= cfg.block_d,
        **launch_opts(cfg, a.dtype))
    return partial.sum() / n


@triton_op("robustft_triton::siglip_bwd")
def siglip_bwd(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
               negative_only: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of siglip_fwd's loss: dS = (g / n) (sigmoid(S) - [i == j, positives])."""
    check_features(a, b, scale, bias)
    (n, D), m = a.shape, b.shape[0]
    torch._check(negative_only or m == n, lambda: "robustft_triton: siglip with positives "
                 "needs as many rows in b as in a")
    a, b = kernel_features(a), kernel_features(b)
    scale, bias = kernel_input(scale), kernel_input(bias)
    g = kernel_input(grad_loss.to(torch.float32).reshape(()))
    return _grads(a, b, scale, bias, g, siglip=True, row_lse=None, col_lse=None,
                  pos_coef=0 if negative_only else 1, diag_offset=0, norm=n, D=D)
