"""The bounded dS workspace of the large-D backward passes, and its library GEMMs.

The large-D backward (contrastive_ops.py, step_ops.py) forms the unit dlogits U of one row
chunk at a time into a workspace (a dlogit kernel) and multiplies the chunk into the feature
gradients with library GEMMs. The chunk is as many rows as fit in robustft_ext.workspace's limit
(default 512 MiB), never fewer than one BLOCK_M row block, so the backward's extra memory is
bounded at any batch size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import workspace


def chunk_rows(n: int, bytes_per_row: int, block_m: int) -> int:
    """Rows per workspace chunk: as many multiples of block_m as fit in the workspace limit
    at bytes_per_row bytes per row, at least block_m, at most half the rows (rounded up to
    block_m, as csrc/workspace.h: the workspace never holds a whole n x m block of a problem
    larger than one row block), at most n."""
    fit = workspace.workspace_limit() // max(int(bytes_per_row), 1)
    half = -(-(-(-n // 2)) // block_m) * block_m
    return min(n, max(block_m, min(fit // block_m * block_m, half)))


def ds_dtype(dtype: torch.dtype) -> torch.dtype:
    """The workspace dtype for inputs of `dtype`: the 16-bit input dtype (U is O(1) and is
    rounded to it as flash-attention rounds P; the GEMMs then run on tensor cores), float32
    for float32 inputs."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _has_mm_out_dtype() -> bool:
    # torch.mm(..., out_dtype=) (aten::mm.dtype) exists since torch 2.8, for CUDA only.
    return hasattr(torch.ops.aten.mm, "dtype")


def mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """x @ y with float32 accumulation and a float32 result.

    16-bit CUDA operands: torch.mm(..., out_dtype=torch.float32), a cuBLAS GEMM on the tensor
    cores that keeps its float32 accumulator instead of rounding the product to 16 bits.
    Elsewhere (float32 operands, CPU under the interpreter, a torch without out_dtype): the
    operands are upcast to float32 (float32 CUDA GEMMs follow
    torch.get_float32_matmul_precision(), as every torch matmul does).
    """
    if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda \
            and _has_mm_out_dtype():
        return torch.mm(x, y, out_dtype=torch.float32)
    return torch.mm(x.to(torch.float32), y.to(torch.float32))


def add_mm_f32_(acc: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """acc += x @ y in place (acc float32), with float32 accumulation: mm_f32's product, added
    without an [m, D] temporary where the operands are float32 (addmm_ with beta = 1)."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        return acc.addmm_(x, y)
    return acc.add_(mm_f32(x, y))
