"""Triton-backed contrastive ops, registered as `robustft_triton::*` with torch.library.triton_op.

The four ops have the semantics of the C++ ops `robustft_ext::*` (csrc/schemas.cpp,
csrc/contrastive_ops.h): same arguments, outputs, dtypes and checks, except that float64
inputs are not supported. Each op body uses only torch ops with fake-able shapes plus
`wrap_triton` kernel launches, so the body is also the fake (meta) implementation and
torch.compile(fullgraph=True) traces through to the kernels. Every body runs under its
inputs' device guard (device.triton_op), and the kernels receive the features padded to a
multiple of 16 columns, 16-byte aligned (_kernel_features, _kernel_input).

Note on schemas: `triton_op` infers the schema from the annotations and (torch 2.11) ignores
its `schema=` argument, so `diag_offset: int` becomes `SymInt diag_offset` where the C++
schema says `int`. SymInt accepts every int, so calls are interchangeable.

Interpreter support (TRITON_INTERPRET=1, CPU): two shims, active only in that mode, make
wrap_triton and Triton 3.6's interpreter work here: see _InterpretedKernel and
_fix_interpreter_index.

Memory: besides the outputs, O(P * m) for the column partials of the symmetric CLIP forward
(P = number of persistent programs, the SM count on GPU), O(n * D) float32 gradient buffers
in the backward (as the C++ backends), O(n / BLOCK_M) partial sums and, for large D, the dS
workspace of ds_workspace.py (bounded by robustft_ext.workspace's limit). Nothing else is
n x m.

Backward designs (configs.fused_backward decides): small D keeps each gradient row block in
registers (kernels.contrastive_grad_rows_kernel, once per view); large D writes the unit
dlogits of one row chunk at a time into the workspace (kernels.contrastive_dlogit_kernel) and
forms both gradients with library GEMMs (_grads_workspace).
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import SUPPORTED_DTYPES, configs, ds_workspace, kernels, maths
from .configs import interpreting
from .device import triton_op


def _fix_interpreter_index() -> None:
    """Make Triton 3.6's interpreter work with numpy >= 2.4 (interpreter mode only).

    The interpreter implements `tensor.__index__` (used by `for i in range(lo, hi, step)` with
    runtime bounds) as int() of a 1-element 1-d numpy array, which numpy 2.4 turned into a
    TypeError ("only 0-dimensional arrays can be converted to Python scalars";
    triton-lang/triton#9171). Every kernel here loops over runtime bounds, so we re-patch
    __index__ after Triton's own patching, reading the single element explicitly. No effect
    on compiled (GPU) kernels.
    """
    from triton.runtime import interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_robustft_index_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._robustft_index_fix = True
    interp._patch_lang_tensor = patched


class _InterpretedKernel(JITFunction):
    """A JITFunction whose launches run in Triton's interpreter.

    Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction, which
    torch.library.wrap_triton rejects ("wrap_triton only works on functions annotated with
    triton.jit or triton.autotune", pytorch/pytorch#152868, open for torch 2.11). This
    subclass carries the JIT metadata that wrap_triton and its tracing need (arg_names,
    params, fn) and forwards every launch to the interpreter, so the same op bodies work in
    eager mode, under fake tensors / opcheck and in traced graphs that run the kernel eagerly.
    """

    def __init__(self, interpreted) -> None:
        super().__init__(interpreted.fn)
        self._interpreted = interpreted

    @property
    def cache_key(self) -> str:
        # JITFunction's key walks the kernel's dependencies and rejects the interpreted
        # helper functions it calls; the interpreter compiles nothing, so the source suffices.
        return hashlib.sha256(f"{self.fn.__module__}.{self.fn.__qualname__}\n{self.src}"
                              .encode()).hexdigest()

    def run(self, *args, grid, warmup, **kwargs):
        return self._interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._interpreted.run(*args, grid=grid, warmup=False,
                                                             **kwargs)


def _traceable(kernel):
    """The kernel in a form wrap_triton accepts (see _InterpretedKernel)."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    return _InterpretedKernel(kernel)


if interpreting():
    _fix_interpreter_index()

_CLIP_LSE = _traceable(kernels.clip_lse_kernel)
_SIGLIP_SUM = _traceable(kernels.siglip_softplus_sum_kernel)
_GRAD_ROWS = _traceable(kernels.contrastive_grad_rows_kernel)
_DLOGIT = _traceable(kernels.contrastive_dlogit_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent forward kernels: one per SM (2 under the interpreter, so
    that small tests cover the merge of several programs' partials)."""
    if device.type == "cuda" and not interpreting():
        try:
            return _sm_count(device.index if device.index is not None
                             else torch.cuda.current_device())
        except Exception:  # e.g. tracing with fake CUDA tensors and no device
            return 132
    return 2


def _dot_flags(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot, see maths.mma."""
    return configs.dot_precision(dtype), interpreting() and dtype == torch.bfloat16


def _launch_opts(cfg: configs.Config, dtype: torch.dtype) -> dict:
    """The launch arguments every kernel takes: tiles, dot flags, warps and stages."""
    prec, upcast = _dot_flags(dtype)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_PREC=prec, UPCAST=upcast, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def _check_features(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor) -> None:
    # The op-level contract of csrc/contrastive_ops.h::check_features.
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


def _kernel_input(t: Tensor) -> Tensor:
    """An op input as the kernels receive it: contiguous and 16-byte aligned, and a private
    copy under the interpreter.

    Why aligned: Triton specialises a pointer that is a multiple of 16 bytes (vectorised
    loads), and the kernels are compiled and checked for that case
    (triton_backend/offline.py); a view at an odd offset is copied instead.

    Why the copy: torch finds out which arguments a wrap_triton launch writes by lowering the
    kernel to TTIR, which needs a GPU driver; without one it assumes that *every* tensor
    argument is written (torch/_higher_order_ops/triton_kernel_wrap.py,
    identify_mutated_tensors). Traced graphs (torch.compile, AOTAutograd) then copy the
    "written" values back into the op's inputs, bumping their version counters and breaking
    autograd of anything that saved them. Private copies keep the op's inputs out of the
    kernels' argument lists. On a GPU the analysis works and inputs are passed as they are.
    """
    t = t.contiguous()
    misaligned = t.storage_offset() * t.element_size() % 16 != 0
    return t.clone() if interpreting() or misaligned else t


def _kernel_features(t: Tensor) -> Tensor:
    """A feature matrix [rows, D] (or vector [D]) as the kernels receive it: padded with zero
    columns to configs.aligned_dim(D) columns when D is not a multiple of 16 (a fresh
    contiguous copy: zero columns change no dot product, and D and the row strides then carry
    Triton's divisibility hint), else as _kernel_input. Gradients come back through _unpad."""
    pad = configs.aligned_dim(t.shape[-1]) - t.shape[-1]
    return F.pad(t, (0, pad)) if pad else _kernel_input(t)


def _unpad(x: Tensor, D: int) -> Tensor:
    """A kernel result [..., aligned_dim(D)] cut back to the inputs' D columns."""
    if x.shape[-1] == D:
        return x
    return x[..., :D].clone(memory_format=torch.contiguous_format)


def _launch_lse(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                with_col: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """row_lse [n], col_lse [m] (with_col) and the sum of the positive logits (0-d)."""
    n, D = a.shape
    m = b.shape[0]
    cfg = configs.select("clip_lse", a.device, a.dtype, D)
    f32 = dict(device=a.device, dtype=torch.float32)
    row_lse = torch.empty(n, **f32)
    if with_col:
        nprog = _persistent_programs(a.device)
        col_max = torch.full((nprog, m), float("-inf"), **f32)
        col_sum = torch.zeros((nprog, m), **f32)
    else:  # no column partials: one program per row block
        nprog = triton.cdiv(n, cfg.block_m)
        col_max = col_sum = torch.empty(0, **f32)
    pos = torch.empty(triton.cdiv(n, cfg.block_m), **f32)
    wrap_triton(_CLIP_LSE)[(nprog,)](
        a, b, scale, bias, row_lse, col_max, col_sum, pos,
        n, m, D, a.stride(0), b.stride(0), diag_offset, nprog,
        WITH_COL=with_col, ONE_CHUNK=D <= cfg.block_d, **_launch_opts(cfg, a.dtype))
    col_lse = maths.merge_col_partials(col_max, col_sum) if with_col else None
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
        POS_COEF=pos_coef, WANT_STATS=want_stats, **_launch_opts(cfg, p.dtype))
    return grad, (stats.sum(0) if want_stats else None)


def _grads(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, g: Tensor, *, siglip: bool,
           row_lse: Tensor | None, col_lse: Tensor | None, pos_coef: int, diag_offset: int,
           norm: int, D: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_a, grad_b) [., D] in the inputs' dtype and (grad_scale, grad_bias) 0-d float32 of
    a contrastive loss with dS = (g / norm) U (kernels._unit_dlogits): the row LSE of S
    (CLIP), its column LSE (symmetric CLIP), positives at q - p == diag_offset weighted
    pos_coef. a and b are the kernel inputs (_kernel_features), D the callers' feature
    dimension.

    Small D: the register-resident kernel, once per view (rows of a against b; rows of b
    against a with the LSEs swapped and the offset negated). Large D: the dS workspace
    (_grads_workspace)."""
    if not configs.fused_backward("contrastive", a.device, a.shape[1]):
        grad_a, grad_b, grad_scale, grad_bias = _grads_workspace(
            a, b, scale, bias, g, siglip=siglip, row_lse=row_lse, col_lse=col_lse,
            pos_coef=pos_coef, diag_offset=diag_offset, norm=norm)
        return _unpad(grad_a, D), _unpad(grad_b, D), grad_scale, grad_bias
    grad_a, stats = _grad_rows_fused(
        a, b, scale, bias, g, siglip=siglip, row_lse=row_lse, col_lse=col_lse,
        pos_coef=pos_coef, pos_offset=diag_offset, norm=norm, want_stats=True)
    grad_b, _ = _grad_rows_fused(
        b, a, scale, bias, g, siglip=siglip, row_lse=col_lse, col_lse=row_lse,
        pos_coef=pos_coef, pos_offset=-diag_offset, norm=norm, want_stats=False)
    # Separate reductions: the returned tensors must not alias one another.
    return (_unpad(grad_a.to(a.dtype), D), _unpad(grad_b.to(b.dtype), D), stats[0].clone(),
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
            POS_COEF=pos_coef, GROUP_M=8, **_launch_opts(cfg, a.dtype))
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
    _check_features(a, b, scale, bias)
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
    a, b = _kernel_features(a), _kernel_features(b)
    scale, bias = _kernel_input(scale), _kernel_input(bias)
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
    _check_features(a, b, scale, bias)
    (n, D), m = a.shape, b.shape[0]
    torch._check(row_lse.numel() == n and (not symmetric or col_lse.numel() == m),
                 lambda: "robustft_triton: saved log-sum-exp statistics do not match the "
                 "inputs")
    a, b = _kernel_features(a), _kernel_features(b)
    scale, bias = _kernel_input(scale), _kernel_input(bias)
    g = _kernel_input(grad_loss.to(torch.float32).reshape(()))
    row_lse = _kernel_input(row_lse.to(torch.float32))
    col_lse = _kernel_input(col_lse.to(torch.float32))
    return _grads(a, b, scale, bias, g, siglip=False, row_lse=row_lse,
                  col_lse=col_lse if symmetric else None, pos_coef=2 if symmetric else 1,
                  diag_offset=diag_offset, norm=2 * n if symmetric else n, D=D)


@triton_op("robustft_triton::siglip_fwd")
def siglip_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
               negative_only: bool) -> Tensor:
    """SigLIP loss (1/n) sum_ij -log sigmoid(z_ij S_ij), z = +1 on the diagonal unless
    negative_only (then b may have any number of rows). 0-d float32."""
    _check_features(a, b, scale, bias)
    n, m = a.shape[0], b.shape[0]
    torch._check(negative_only or m == n, lambda: "robustft_triton: siglip with positives "
                 "needs as many rows in b as in a")
    a, b = _kernel_features(a), _kernel_features(b)
    scale, bias = _kernel_input(scale), _kernel_input(bias)
    D = a.shape[1]
    cfg = configs.select("siglip_sum", a.device, a.dtype, D)
    nprog = _persistent_programs(a.device)
    partial = torch.empty(nprog, device=a.device, dtype=torch.float32)
    wrap_triton(_SIGLIP_SUM)[(nprog,)](
        a, b, scale, bias, partial, n, m, D, a.stride(0), b.stride(0), nprog,
        HAS_POS=not negative_only, ONE_CHUNK=D <= cfg.block_d,
        **_launch_opts(cfg, a.dtype))
    return partial.sum() / n


@triton_op("robustft_triton::siglip_bwd")
def siglip_bwd(grad_loss: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor,
               negative_only: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of siglip_fwd's loss: dS = (g / n) (sigmoid(S) - [i == j, positives])."""
    _check_features(a, b, scale, bias)
    (n, D), m = a.shape, b.shape[0]
    torch._check(negative_only or m == n, lambda: "robustft_triton: siglip with positives "
                 "needs as many rows in b as in a")
    a, b = _kernel_features(a), _kernel_features(b)
    scale, bias = _kernel_input(scale), _kernel_input(bias)
    g = _kernel_input(grad_loss.to(torch.float32).reshape(()))
    return _grads(a, b, scale, bias, g, siglip=True, row_lse=None, col_lse=None,
                  pos_coef=0 if negative_only else 1, diag_offset=0, norm=n, D=D)
