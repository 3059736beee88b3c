"""The shapes the op families' fake (meta) implementations return, so torch.compile can trace
the compiled ops: losses and statistics in the accumulation dtype, feature gradients in the
features' dtype."""
from __future__ import annotations

from torch import Tensor

from .._validation import acc_dtype


def like(x: Tensor) -> Tensor:
    """A contiguous tensor of x's shape and dtype."""
    return x.new_empty(x.shape)


def scalar(x: Tensor) -> Tensor:
    """A 0-d tensor of x's accumulation dtype."""
    return x.new_empty((), dtype=acc_dtype(x.dtype))


def acc_empty(x: Tensor, *shape: int) -> Tensor:
    """A tensor of `shape` in x's accumulation dtype."""
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))
