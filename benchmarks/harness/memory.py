"""The peak-memory probe: the memory a step allocates above what was allocated before it began
(the inputs; in backward mode the step begins with the untimed forward, so the tensors it saves
for the backward count, as they are alive during it).

  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
        torch.cuda.memory_allocated() before the step.
  CPU:  growth of the resident set: VmHWM after resetting it (writing "5" to
        /proc/self/clear_refs) minus VmRSS before the step. Freed memory must go back to the
        OS for the next step's growth to show, hence a fresh process per configuration with a
        fixed glibc mmap threshold (isolation.py).
"""
from __future__ import annotations

import re

import torch

_STATUS_RE = {k: re.compile(rf"^{k}:\s+(\d+)\s+kB", re.M) for k in ("VmRSS", "VmHWM")}


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = _STATUS_RE[key].search(f.read())
    if m is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(m.group(1))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_supported() -> str | None:
    """None when the resettable VmHWM probe works here, else why not."""
    try:
        _proc_status_kb("VmRSS")
        _reset_hwm()
        _proc_status_kb("VmHWM")
    except OSError as exc:
        return f"no resettable peak RSS ({exc})"
    return None


class MemProbe:
    """begin() before the step, mark() right before the timed region, peak_bytes() after."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and cpu_peak_supported() is None
        self.base = 0

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            self.base = _proc_status_kb("VmRSS") * 1024

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            _reset_hwm()

    def peak_bytes(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.cpu_ok:
            return float(_proc_status_kb("VmHWM") * 1024 - self.base)
        return float("nan")
