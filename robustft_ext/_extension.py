"""Loading the compiled extension (robustft_ext._C) and saying why it cannot be used."""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

_C: ModuleType | None = None
LOAD_ERROR: str | None = None
WITH_CUDA = False
# Why the loaded extension has no CUDA kernels (None when it has them or was not loaded).
NO_CUDA_REASON: str | None = None
# The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for ("8.0;9.0+PTX").
CUDA_ARCH_LIST = ""
REBUILD = "pip install -v --no-build-isolation --force-reinstall --no-deps ."


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
                f"rebuild it: {REBUILD}")
    if info.get("WITH_CUDA") and info["TORCH_CUDA_VERSION"] != torch.version.cuda:
        return (f"robustft_ext's CUDA kernels were built for CUDA {info['TORCH_CUDA_VERSION']} "
                f"but the installed torch uses CUDA {torch.version.cuda}; rebuild it: {REBUILD}")
    return None


def _no_cuda_reason(info: dict) -> str:
    """Why a loaded extension has no CUDA kernels, as the build said it (with how to get them
    when the build wanted them but the CUDA toolkit could not build against this torch)."""
    reason = info.get("CUDA_REASON")
    if not reason:
        return "the extension was built without CUDA kernels (CPU-only build)"
    return f"the extension was built without CUDA kernels: {reason}"


# The op namespaces of the compiled ops: the library's, and its twin whose CPU kernels run the
# ops' host code under CUDA's rules (a test hook, csrc/cpu/cuda_rules_cpu.cpp).
NAMESPACES = ("robustft_ext", "robustft_cuda_rules")


def register_fake(name: str) -> Callable[[Callable], Callable]:
    """torch.library.register_fake for the compiled op `name` in every namespace that has it,
    when the compiled ops are loaded (the op modules declare their fakes beside their
    Functions with it)."""

    def register(fn: Callable) -> Callable:
        if _C is not None:
            for namespace in NAMESPACES:
                torch.library.register_fake(f"{namespace}::{name}")(fn)
        return fn

    return register


def kernel_image_reason(major: int, minor: int, arch_list: str | None = None) -> str | None:
    """Why the CUDA kernels built for `arch_list` (default: this build's) hold no code that a
    device of compute capability major.minor runs, or None when they do: machine code for
    major.m with m <= minor (sm_80 code runs on sm_86 and sm_89), or PTX for an older or equal
    architecture, which the driver compiles for the device."""
    archs = CUDA_ARCH_LIST if arch_list is None else arch_list
    device = (major, minor)
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        match = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", entry.strip(), flags=re.IGNORECASE)
        if match is None:
            continue
        arch = (int(match[1]), int(match[2]))
        if (arch[0] == major and arch[1] <= minor) or (match[3] and arch <= device):
            return None
    return (f"the native CUDA kernels were built for {archs or 'no architecture'} and hold no "
            f"code a compute capability {major}.{minor} device runs; rebuild: "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" {REBUILD}")


def _load() -> None:
    global _C, LOAD_ERROR, WITH_CUDA, NO_CUDA_REASON, CUDA_ARCH_LIST
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
    CUDA_ARCH_LIST = str(info.get("CUDA_ARCH_LIST", ""))
    if not WITH_CUDA:
        NO_CUDA_REASON = _no_cuda_reason(info)
        # The build's own warning is easy to miss (pip hides build output without -v): say it
        # again where it matters, on a machine with a GPU.
        if info.get("CUDA_SKIPPED") and torch.cuda.is_available():
            warnings.warn(f"robustft_ext: {NO_CUDA_REASON}", RuntimeWarning, stacklevel=3)


_load()
