"""The bounded workspace of the fused backward passes.

The backward of every fused loss forms its dlogit tiles (dS) one row chunk at a time into a
workspace and multiplies the chunk into the feature gradients with library GEMMs. The chunk
is as many rows as fit in the limit set here (never fewer than one tile row block), so no
buffer of size N x N exists at any batch size beyond this limit. The same limit decides whether
the native CPU forward of CLIP or SigLIP keeps its N x N dot products for the backward (which
then recomputes nothing): only when they fit it. Both fused backends (native and triton) read
this one limit.

The default is 512 MiB. `ROBUSTFT_WORKSPACE_MB` sets it for a process; `set_workspace_limit`
changes it at run time.
"""
from __future__ import annotations

import os

import torch

from . import _extension

DEFAULT_WORKSPACE_BYTES = 512 * 2**20
ENV_VAR = "ROBUSTFT_WORKSPACE_MB"

_limit_bytes: int | None = None


def _from_env() -> int:
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_WORKSPACE_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a number of MiB, got {raw!r}") from None
    if not mb > 0:
        raise ValueError(f"{ENV_VAR} must be positive, got {raw!r}")
    return int(mb * 2**20)


def workspace_limit() -> int:
    """The most bytes a fused backward pass may hold as dS workspace, or a CPU forward keep as
    dot products (default 512 MiB)."""
    global _limit_bytes
    if _limit_bytes is None:
        _limit_bytes = _from_env()
        _push_to_native(_limit_bytes)
    return _limit_bytes


def set_workspace_limit(nbytes: int | None) -> None:
    """Set the workspace limit in bytes for both fused backends; None restores the default
    (or $ROBUSTFT_WORKSPACE_MB when set).

    Raises TypeError for a limit that is not an int (bool included) and ValueError for one
    that is not positive.
    """
    global _limit_bytes
    if nbytes is None:
        value = _from_env()
    else:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int or None, got {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        value = nbytes
    _limit_bytes = value
    _push_to_native(value)


def _push_to_native(nbytes: int) -> None:
    """The compiled ops keep their own copy of the limit (C++ cannot call back into Python)."""
    if _extension._C is not None:
        torch.ops.robustft_ext.set_workspace_limit(nbytes)
