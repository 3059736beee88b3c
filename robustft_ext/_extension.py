"""Loading the compiled extension (robustft_ext._C) and saying why it cannot be used."""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

_C: ModuleType | None = None
LOAD_ERROR: str | None = None
WITH_CUDA = False
# Why the loaded extension has no CUDA kernels (None when it has them or was not loaded).
NO_CUDA_REASON: str | None = None


def _build_info() -> dict:
    try:
        from . import _build_info as info
    except ImportError:
        return {}
    return {k: getattr(info, k) for k in dir(info) if k.isupper()}


def _mismatch(info: dict) -> str | None:
    """A message when the running torch is not the one the extension was built against."""
    if not info:
        return None
    built, running = info["TORCH_VERSION"], torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        return (f"robustft_ext was built against torch {built} but torch {running} is installed; "
                "rebuild it: pip install -v --no-build-isolation --force-reinstall --no-deps .")
    if info.get("WITH_CUDA") and info["TORCH_CUDA_VERSION"] != torch.version.cuda:
        return (f"robustft_ext's CUDA kernels were built for CUDA {info['TORCH_CUDA_VERSION']} "
                f"but the installed torch uses CUDA {torch.version.cuda}; rebuild it: "
                "pip install -v --no-build-isolation --force-reinstall --no-deps .")
    return None


def _no_cuda_reason(info: dict) -> str:
    """Why a loaded extension has no CUDA kernels, as the build said it (with how to get them
    when the build wanted them but the CUDA toolkit could not build against this torch)."""
    reason = info.get("CUDA_REASON")
    if not reason:
        return "the extension was built without CUDA kernels (CPU-only build)"
    return f"the extension was built without CUDA kernels: {reason}"


def _load() -> None:
    global _C, LOAD_ERROR, WITH_CUDA, NO_CUDA_REASON
    info = _build_info()
    mismatch = _mismatch(info)
    if mismatch is not None:
        LOAD_ERROR = mismatch
        warnings.warn(mismatch, RuntimeWarning, stacklevel=3)
        return
    try:
        from . import _C as compiled
    except ImportError as exc:  # not built, or an ABI problem the version check missed
        LOAD_ERROR = f"the compiled extension robustft_ext._C could not be imported ({exc})"
        if info:  # it was built, so failing to load is worth a warning
            warnings.warn(LOAD_ERROR, RuntimeWarning, stacklevel=3)
        return
    _C = compiled
    WITH_CUDA = bool(info.get("WITH_CUDA", False))
    if not WITH_CUDA:
        NO_CUDA_REASON = _no_cuda_reason(info)
        # The build's own warning is easy to miss (pip hides build output without -v): say it
        # again where it matters, on a machine with a GPU.
        if info.get("CUDA_SKIPPED") and torch.cuda.is_available():
            warnings.warn(f"robustft_ext: {NO_CUDA_REASON}", RuntimeWarning, stacklevel=3)


_load()
