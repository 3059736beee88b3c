"""Shared test helpers: random features, error measures and the per-dtype tolerance table."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustft_ext.backends import unavailable_reason

# Relative error bound (max |x - ref| / max |ref|) of a fused backend against the float64
# reference on the same (already rounded) inputs. A low-precision result must also be within
# LOWP_FACTOR times the error of the plain eager low-precision computation (open_clip-style),
# whichever bound is larger: fused kernels accumulate in fp32 and should never be worse.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 5e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
LOWP_FACTOR = 2.0


# The devices a test runs on: the CPU, and CUDA where a GPU is visible (marked "cuda").
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def require_backend(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip when a backend cannot serve this device (only ever for a missing GPU or build).

    A backend that *should* serve (native on CPU once built, triton under the interpreter)
    failing here is an error, not a skip.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    reason = unavailable_reason(backend, torch.device(device), dtype)
    if reason is None:
        return
    if device == "cpu" and backend in ("native", "triton") and dtype != torch.float64:
        pytest.fail(f"{backend} must serve CPU tensors in the test environment: {reason}")
    pytest.skip(reason)


def features(n: int, d: int, dtype=torch.float32, device="cpu", *,
             noncontiguous: bool = False) -> torch.Tensor:
    """L2-normalised random rows requiring grad; optionally a strided (non-contiguous) view."""
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)
    if noncontiguous:
        base = torch.zeros(n, 2 * d, dtype=dtype, device=device)
        base[:, ::2] = x
        base.requires_grad_()
        return base[:, ::2]
    return x.requires_grad_()


def m2mix_eager_lowp(I, T, s_m, lam, s_c):
    """m^2-mix and CLIP with the logits in the inputs' (16-bit) dtype, open_clip-style (the
    per-row slerp weights in float32, the mixed rows rounded to the inputs' dtype)."""
    c = (I.float() * T.float()).sum(1).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.acos(c)
    w_a = torch.sin(lam.float() * theta) / torch.sin(theta)
    w_b = torch.sin((1 - lam.float()) * theta) / torch.sin(theta)
    M = (w_a[:, None] * I.float() + w_b[:, None] * T.float()).to(I.dtype)
    eye = torch.eye(I.shape[0], dtype=torch.bool)
    diag = (s_m * (I * T).sum(1))[:, None]
    A = torch.where(eye, diag, s_m * I @ M.T)
    B = torch.where(eye, diag, s_m * T @ M.T)
    labels = torch.arange(I.shape[0])
    m2 = (F.cross_entropy(A.float(), labels) + F.cross_entropy(B.float(), labels)) / 2
    C = s_c * I @ T.T
    clip = (F.cross_entropy(C.float(), labels) + F.cross_entropy(C.T.float(), labels)) / 2
    return m2, clip


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """max |x - ref| / max |ref|, the denominator floored so exact zeros compare absolutely."""
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / max(scale, floor)


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, bound: float, what: str,
                     floor: float = 1e-3) -> None:
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = rel_err(x, ref, floor)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"


def assert_compiled_matches(step, args: tuple, wrt: list[torch.Tensor], device: str):
    """torch.compile(step, fullgraph=True) (aot_eager on CPU, where Inductor cannot compile user
    Triton kernels; Inductor on CUDA) gives eager's value and gradients wrt `wrt`. Returns the
    compiled function."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    out, eager = compiled(*args), step(*args)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), (out, eager)
    for x, y in zip(torch.autograd.grad(out, wrt), torch.autograd.grad(eager, wrt)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    return compiled


def run_gloo(worker, world: int, *args) -> None:
    """Runs worker(rank, *args) in `world` spawned processes joined in a gloo process group
    (file rendezvous: no TCP port to race for); a failing rank fails the test with every
    rank's traceback. `worker` must be a module-level function (spawn pickles it by name)."""
    import os
    import tempfile

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    store_file = os.path.join(tempfile.mkdtemp(prefix="rft_gloo_"), "store")
    try:
        mp.spawn(_gloo_rank, args=(world, store_file, errors, worker, args), nprocs=world,
                 join=True)
    except Exception as exc:  # noqa: BLE001
        details = []
        while not errors.empty():
            details.append(errors.get())
        pytest.fail(f"distributed worker failed: {exc}\n" + "\n".join(details))


def _gloo_rank(rank, world, store_file, errors, worker, args):
    import faulthandler
    import os
    import sys
    import traceback

    import torch.distributed as dist

    faulthandler.enable()  # a C++ abort still prints every thread's Python stack
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                world_size=world)
        worker(rank, *args)
        # open_clip's losses, the comparator of some workers, gather through
        # torch.distributed.nn, whose autograd Functions keep the process group alive after
        # destroy_process_group (its ClipLoss and SigLipLoss each leave the gloo threads
        # running): a comparator's defect, not the library's.
        comparator_holds_group = "open_clip" in sys.modules
        dist.barrier()
        dist.destroy_process_group()
        if not comparator_holds_group:
            assert_process_group_released()
    except Exception:  # report to the parent, which fails the test with the trace
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if comparator_holds_group:  # its teardown at exit could abort this rank: leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def assert_process_group_released() -> None:
    """After destroy_process_group no gloo thread may run on. A process group that something
    still references is torn down during interpreter shutdown instead, where it can abort the
    process ("terminate called without an active exception", no Python frame): torch 2.11's
    functional autograd all-gather keeps its group alive that way (so do torch.distributed.nn's
    gathers), which is why the library's gather is its own autograd Function over c10d
    collectives. Linux names the threads under /proc; elsewhere there is nothing to read."""
    import gc
    import os

    gc.collect()
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we listed
            pass
    live = [n for n in names if "gloo" in n]
    if live:
        raise AssertionError(f"gloo threads still run after destroy_process_group: {live}")


def import_triton_backend():
    """robustft_ext.triton_backend for the Triton test modules (tests/conftest.py has set
    TRITON_INTERPRET=1 when no GPU is visible): a module-level skip when Triton is not
    installed, an error when it is installed but the backend fails."""
    import pytest

    try:
        from robustft_ext import triton_backend
    except Exception as exc:  # pragma: no cover - robustft_ext itself broken
        pytest.skip(f"robustft_ext.triton_backend does not import: {exc}", allow_module_level=True)
    check_triton_backend(triton_backend)
    return triton_backend


def check_triton_backend(backend) -> None:
    """Skip (Triton not installed) or fail (installed but broken) on the backend's IMPORT_ERROR."""
    import importlib.util

    import pytest

    if backend.IMPORT_ERROR is None:
        return
    if importlib.util.find_spec("triton") is not None:
        raise RuntimeError(f"Triton is installed but the backend failed: {backend.IMPORT_ERROR}")
    pytest.skip(f"Triton backend unavailable: {backend.IMPORT_ERROR}", allow_module_level=True)


class CudaRules:
    """The native backend on CPU tensors through the namespace robustft_cuda_rules: the same
    op bodies (csrc/contrastive_ops.h, csrc/step_ops.h) under CUDA's rules (its workspace
    dtype, its launchers' checks, no kept dot products; csrc/cpu/cuda_rules_cpu.cpp).

    A context manager; `namespaces` holds the namespace of every custom op the native backend
    dispatched to meanwhile, so a test can show the hook was taken."""

    def __enter__(self):
        from unittest import mock

        from torch.utils._python_dispatch import TorchDispatchMode

        from robustft_ext import backends

        rules, fused = torch.ops.robustft_cuda_rules, backends.fused_ops
        self.namespaces: set[str] = set()
        record = self.namespaces

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace.startswith("robustft"):
                    record.add(func.namespace)
                return func(*args, **(kwargs or {}))

        self._patches = [
            mock.patch.object(backends, "fused_ops",
                              lambda backend: rules if backend == "native" else fused(backend)),
            mock.patch.object(backends, "keeps_products", lambda *args, **kwargs: False),
        ]
        for p in self._patches:
            p.start()
        self._mode = Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for p in reversed(self._patches):
            p.stop()
        return False


def largest_float_tensor_mode():
    """A TorchDispatchMode that records the most elements of any float tensor the ops run under
    it return (.largest). Float tensors only: the Triton interpreter's host copies of the
    kernel arguments are byte tensors of the arguments' size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestFloatTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
                    self.largest = max(self.largest, x.numel())
            return out

    return LargestFloatTensor()


def live_bytes_mode():
    """A TorchDispatchMode that counts the bytes of the storages the ops run under it
    allocate while they are alive, and their peak (.live, .peak): a storage counts from the
    op that returns it (unless it is a storage of that op's inputs: a view, an in-place
    result) until it is freed, which a weakref finalizer on it reports. Storages allocated
    before the mode (the inputs) do not count."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self._counted: set[int] = set()  # ids of the live storages counted

        def _free(self, key: int, nbytes: int) -> None:
            self._counted.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {id(x.untyped_storage()) if isinstance(x, torch.Tensor) else id(x)
                     for x in tree_leaves((args, kwargs))
                     if isinstance(x, (torch.Tensor, torch.UntypedStorage))}
            for x in tree_leaves(out):
                if not isinstance(x, torch.Tensor):
                    continue
                storage = x.untyped_storage()
                key, nbytes = id(storage), storage.nbytes()
                if key in given or key in self._counted or nbytes == 0:
                    continue
                self._counted.add(key)
                self.live += nbytes
                weakref.finalize(storage, self._free, key, nbytes)
            self.peak = max(self.peak, self.live)
            return out

    return LiveBytes()
