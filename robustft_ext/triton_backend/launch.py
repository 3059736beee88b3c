"""How the op bodies hand tensors to the Triton kernels and launch them: the launch code that
contrastive_ops.py and step_ops.py share.

  kernel_input, kernel_features, unpad   an op's tensors as the kernels receive them
                                         (contiguous, 16-byte aligned, features padded to a
                                         multiple of 16 columns) and the results cut back;
  launch_opts                            the tile, dot and warp arguments of every launch;
  persistent_programs                    the grid of the persistent forward kernels;
  traceable                              a kernel in the form wrap_triton accepts.

Interpreter support (TRITON_INTERPRET=1, CPU): two shims, active only in that mode, make
wrap_triton and Triton 3.6's interpreter work here: InterpretedKernel and
_fix_interpreter_index.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import configs
from .configs import interpreting


# ----------------------------------------------------------------------------- interpreter
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


class InterpretedKernel(JITFunction):
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


def traceable(kernel):
    """The kernel in a form wrap_triton accepts (see InterpretedKernel)."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    return InterpretedKernel(kernel)


if interpreting():
    _fix_interpreter_index()


# ----------------------------------------------------------------------------- grids, options
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device) -> int:
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


def launch_opts(cfg: configs.Config, dtype: torch.dtype) -> dict:
    """The launch arguments every tile kernel takes: tiles, dot flags, warps and stages."""
    prec, upcast = _dot_flags(dtype)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_PREC=prec, UPCAST=upcast, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------- tensors
def kernel_input(t: Tensor) -> Tensor:
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


def kernel_features(t: Tensor) -> Tensor:
    """A feature matrix [rows, D] (or vector [D]) as the kernels receive it: padded with zero
    columns to configs.aligned_dim(D) columns when D is not a multiple of 16 (a fresh
    contiguous copy: zero columns change no dot product, and D and the row strides then carry
    Triton's divisibility hint), else as kernel_input. Gradients come back through unpad."""
    pad = configs.aligned_dim(t.shape[-1]) - t.shape[-1]
    return F.pad(t, (0, pad)) if pad else kernel_input(t)


def unpad(x: Tensor, D: int) -> Tensor:
    """A kernel result [..., aligned_dim(D)] cut back to the inputs' D columns."""
    if x.shape[-1] == D:
        return x
    return x[..., :D].clone(memory_format=torch.contiguous_format)
