"""Backend selection: which implementation serves an input, and why the others cannot.

Order of choice: the `backend=` argument, else $ROBUSTFT_BACKEND, else automatic:
CUDA tensors -> native, triton, reference; CPU tensors -> native, reference.
(The CUDA order is provisional until the GPU benchmarks in benchmarks/ have been run on a GPU;
see docs/backends.md.) A requested backend that cannot serve raises BackendUnavailableError
with every backend's reason; automatic selection falls through to the next one.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch

from . import _extension
from ._validation import acc_dtype
from .workspace import workspace_limit

BACKENDS = ("reference", "native", "triton")
AUTO_ORDER = {"cuda": ("native", "triton", "reference"), "cpu": ("native", "reference")}
ENV_VAR = "ROBUSTFT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve these inputs."""


def _triton_module() -> tuple[ModuleType | None, str | None]:
    """Import the Triton backend on first use (importing triton is slow)."""
    try:
        from . import triton_backend
    except Exception as exc:  # noqa: BLE001 - any failure makes the backend unavailable
        return None, f"the Triton backend failed to import ({type(exc).__name__}: {exc})"
    if triton_backend.IMPORT_ERROR is not None:
        return None, triton_backend.IMPORT_ERROR
    return triton_backend, None


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot serve tensors of this device and dtype, or None when it can."""
    if backend == "reference":
        return None
    if backend == "native":
        if _extension._C is None:
            return _extension.LOAD_ERROR or "the compiled extension is not built"
        if device.type == "cuda" and not _extension.WITH_CUDA:
            return _extension.NO_CUDA_REASON or "the extension was built without CUDA kernels"
        if device.type == "cuda" and torch.cuda.is_available():
            return _native_cuda_reason(device)
        if device.type not in ("cpu", "cuda"):
            return f"no native kernels for device type {device.type!r}"
        return None
    if backend == "triton":
        module, err = _triton_module()
        if err is not None:
            return err
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on device type {device.type!r}"
        if dtype not in module.SUPPORTED_DTYPES:
            return f"Triton kernels take float32/bfloat16/float16 inputs, not {dtype}"
        return module.device_unavailable_reason(device, dtype)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _native_cuda_reason(device: torch.device) -> str | None:
    """Why the native CUDA kernels cannot launch on this device: its compute capability, no
    kernel image of the build that it can run, or too little shared memory per block for
    either tile configuration (csrc/cuda/tile_plan.h); None when they can."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"the native CUDA kernels need compute capability 8.0 or newer "
                f"(tensor-core mma.sync); this device has {major}.{minor}")
    image = _extension.kernel_image_reason(major, minor)
    if image is not None:
        return image
    props = torch.cuda.get_device_properties(device)
    optin = props.shared_memory_per_block_optin
    contrastive, step, need = torch.ops.robustft_ext.native_cuda_tiles(optin)
    if "none" in (contrastive, step):
        return (f"the native CUDA kernels need {need} bytes of shared memory per block; this "
                f"device ({props.name}) offers {optin}")
    return None


def select_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves these inputs (see the module docstring for the rules)."""
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        reason = unavailable_reason(requested, device, dtype)
        if reason is not None:
            others = "; ".join(f"{b}: {unavailable_reason(b, device, dtype) or 'available'}"
                               for b in BACKENDS)
            raise BackendUnavailableError(
                f"backend {requested!r} cannot serve {dtype} tensors on {device}: {reason} "
                f"[{others}]")
        return requested
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if unavailable_reason(name, device, dtype) is None:
            return name
    return "reference"


def fused_ops(backend: str):
    """The torch.ops namespace of a fused backend's ops: torch.ops.robustft_ext (the compiled
    ops, csrc/schemas.cpp) or torch.ops.robustft_triton (triton_backend/); the two hold ops of
    the same names and schemas, so the autograd Functions call either alike."""
    if backend == "native":
        return torch.ops.robustft_ext
    if backend == "triton":
        _triton_module()
        return torch.ops.robustft_triton
    raise ValueError(f"{backend!r} is not a fused backend")


T = TypeVar("T")


def dispatch(requested: str | None, like: torch.Tensor, *, reference: Callable[[], T],
             fused: Callable[[str], T]) -> T:
    """reference() on the reference backend, else fused(name) on the fused backend `name`
    that serves tensors like `like` (select_backend's rules): every public function's one
    choice of backend."""
    name = select_backend(requested, like.device, like.dtype)
    return reference() if name == "reference" else fused(name)


def keeps_products(ctx, backend: str, grad_enabled: bool, a: torch.Tensor,
                   entries: int | Callable[[], int]) -> bool:
    """Whether a fused forward keeps its dot products (`entries` of them, or a function that
    counts them, asked only when the rest holds) for the backward: the native backend on the
    CPU (the only one with _keep ops), when some gradient will be wanted (grad mode was on at
    the call, which forward cannot see, and an input requires grad) and they fit the
    workspace limit. The CPU then runs no second GEMM over the same operands: CLIP 6 n m D
    FLOPs instead of 8."""
    if not (backend == "native" and a.device.type == "cpu" and grad_enabled
            and any(ctx.needs_input_grad)):
        return False
    count = entries() if callable(entries) else entries
    return 0 < count and count * acc_dtype(a.dtype).itemsize <= workspace_limit()


class BackendReport(dict):
    """What each backend can serve on this machine: {backend: {"cpu": reason or None,
    "cuda": reason or None, "available": bool}} (a None reason means it serves that device).

    A dict for code; str() reads plainly, one line per backend, e.g.
    "native: cpu ok; cuda: no CUDA device visible".
    """

    def __str__(self) -> str:
        lines = []
        for name, entry in self.items():
            parts = [f"{device} ok" if entry[device] is None else f"{device}: {entry[device]}"
                     for device in ("cpu", "cuda")]
            lines.append(f"{name}: {'; '.join(parts)}")
        return "\n".join(lines)


def available_backends() -> BackendReport:
    """What each backend can serve on this machine, and why not where it cannot.

    Returns a BackendReport, a dict {backend: {"cpu": reason-or-None, "cuda": reason-or-None,
    "available": bool}} for float32 inputs (a None reason means the backend serves that
    device) whose str() is one plain line per backend: print(available_backends()).
    """
    report = BackendReport()
    for name in BACKENDS:
        entry: dict[str, object] = {}
        for key, dev in (("cpu", torch.device("cpu")), ("cuda", torch.device("cuda"))):
            if key == "cuda" and not torch.cuda.is_available():
                base = unavailable_reason(name, dev, torch.float32)
                entry[key] = "no CUDA device visible" + (f"; {base}" if base else "")
            else:
                entry[key] = unavailable_reason(name, dev, torch.float32)
        entry["available"] = any(entry[k] is None for k in ("cpu", "cuda"))
        report[name] = entry
    return report
