"""How CLIP + m^2-mix and the robust step evaluate their n x n work, on every fused backend.

"gram" (the default): the symmetric Gram formulation (docs/maths.md, section 9.4), every logit
from the Gram entries of [I; T], one triangle of tile products: about twice CLIP's work.
"products": the three tile products I M^T, T M^T, I T^T (section 9.3): three times CLIP's.
Both give the same losses and gradients to rounding; "products" is there to compare them, and
is what a batch with a near-opposite image-text pair takes under either setting (section 9.4).

`ROBUSTFT_STEP_DESIGN` sets it for a process; `set_step_design` changes it at run time.
"""
from __future__ import annotations

import os

import torch

from . import _extension

DESIGNS = ("gram", "products")
ENV_VAR = "ROBUSTFT_STEP_DESIGN"

# The largest slerp weight the Gram formulation takes (csrc/step_kernels.h kGramWeightLimit;
# docs/maths.md, section 9.4, "near-opposite pairs"): a batch with a larger one is evaluated
# by the three products, which form M in float64. (tests/losses/test_gram.py checks the two
# agree.)
GRAM_WEIGHT_LIMIT = 4.0

_design: str | None = None


def _from_env() -> str:
    value = os.environ.get(ENV_VAR) or "gram"
    if value not in DESIGNS:
        raise ValueError(f"{ENV_VAR} must be one of {DESIGNS}, got {value!r}")
    return value


def step_design() -> str:
    """The design CLIP + m^2 and the robust step are evaluated with: "gram" or "products"."""
    global _design
    if _design is None:
        _design = _from_env()
        _push_to_native(_design)
    return _design


def set_step_design(design: str | None) -> None:
    """Set the design for both fused backends; None restores the default ("gram", or
    $ROBUSTFT_STEP_DESIGN when set). Raises ValueError for another name."""
    global _design
    value = _from_env() if design is None else design
    if value not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS} or None, got {design!r}")
    _design = value
    _push_to_native(value)


def _push_to_native(design: str) -> None:
    """The compiled ops keep their own copy (C++ cannot call back into Python)."""
    if _extension._C is not None:
        torch.ops.robustft_ext.set_step_design(design)
