"""Triton backend of robustft_ext: the ops `torch.ops.robustft_triton.{clip_fwd, clip_bwd,
siglip_fwd, siglip_bwd, slerp, slerp_bwd, m2mix_fwd, m2mix_bwd, lipsum_fwd, lipsum_bwd,
dive_fwd, dive_bwd, robust_step_fwd, robust_step_bwd}`, with the schemas and semantics of
`robustft_ext::*` (csrc/schemas.cpp). The modules mirror csrc:

  contrastive_ops.py / contrastive_kernels.py   CLIP and SigLIP (csrc/contrastive_ops.h,
                                                csrc/contrastive_kernels.h);
  step_ops.py / step_kernels.py                 the ops of a robust fine-tuning step: slerp,
                                                m^2-mix, Lipsum-FT, DiVE and their
                                                combination with CLIP (csrc/step_ops.h,
                                                csrc/step_kernels.h);
  slerp_kernels.py                              the row-wise kernels of the m^2 slerp;
  maths.py                                      the per-entry maths every tile kernel uses
                                                (csrc/robustft_maths.h);
  launch.py                                     what the op bodies share to launch kernels:
                                                the tensors as the kernels take them, the
                                                launch options, the interpreter shims;
  ds_workspace.py                               the bounded dS workspace and the library GEMMs
                                                of the large-D backward (csrc/workspace.h);
  configs.py                                    the tile configurations per architecture,
                                                dtype and D;
  device.py                                     the device guard of every op body, and the
                                                device limits the configurations are chosen by;
  offline.py                                    the kernels compiled for sm_90 / sm_80 without
                                                a GPU (benchmarks/kernel_report.py).

Importing this package registers the ops when Triton can be imported. Otherwise nothing is
registered and IMPORT_ERROR says why; device_unavailable_reason(device, dtype) says why the
kernels cannot launch on a CUDA device (compute capability, shared memory per block). On a
machine without a GPU the kernels run only under Triton's interpreter: set
TRITON_INTERPRET=1 before triton is first imported.
"""
from __future__ import annotations

import torch

# The dtypes the Triton kernels accept for a and b (float64 is C++-backend only).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

IMPORT_ERROR: str | None = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install raising something else
    IMPORT_ERROR = f"triton could not be imported: {type(exc).__name__}: {exc}"

if IMPORT_ERROR is None:
    try:
        from . import contrastive_ops  # noqa: F401  (registers the CLIP and SigLIP ops)
        from . import step_ops  # noqa: F401  (registers the step ops, m^2-mix included)
        from .configs import device_unavailable_reason, interpreting  # noqa: F401
    except Exception as exc:  # e.g. a torch without torch.library.triton_op
        IMPORT_ERROR = f"registering the Triton ops failed: {type(exc).__name__}: {exc}"

__all__ = ["IMPORT_ERROR", "SUPPORTED_DTYPES"]
