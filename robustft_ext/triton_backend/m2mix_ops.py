"""The m^2-mix ops under their earlier module name: they are steps now (m^2, optionally with
CLIP) and live in step_ops.py with the other step ops; this module only re-exports them."""
from .step_ops import m2mix_bwd, m2mix_fwd, slerp, slerp_bwd  # noqa: F401
