"""The peak tensor memory of a training phase, above what was allocated when it began (so: the
activations, gradients, optimiser state, cached features and batches it adds to the model and the
data already there).

On CUDA it is the allocator's own count (torch.cuda.max_memory_allocated), which costs nothing. On
the CPU torch keeps no such count: a dispatch mode adds the bytes of every storage an op returns
until that storage is freed. That is exact for the tensors ops return (not for the temporaries a
native op allocates and frees inside itself), and costs a Python call per op, so the CPU count is
opt-in (--measure-memory).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageBytes(TorchDispatchMode):
    """Counts the bytes of the storages the ops run under it return while they are alive (`live`)
    and their peak (`peak`); a view or an in-place result (a storage of the op's inputs) is not
    counted again."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(x.untyped_storage()) for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
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


class PeakMemory:
    """A context: `peak_bytes` afterwards is the phase's peak tensor memory above its start (None
    on the CPU unless `count_cpu`)."""

    def __init__(self, device: torch.device, count_cpu: bool = False):
        self.device, self.count_cpu = device, count_cpu
        self.peak_bytes: int | None = None
        self._mode: LiveStorageBytes | None = None
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.count_cpu:
            self._mode = LiveStorageBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
        return False
