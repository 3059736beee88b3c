"""The modes, the timing policy, and the timed calls of one mode.

Modes: forward (a grad-enabled forward, as in training), backward (the backward of a forward
run outside the timed region), full (forward + backward).

Per (provider, mode, N, D, dtype): warm-up, then repeated calls; the median, p20 and p80 of
the time in ms (CUDA: torch.cuda.Event timing after synchronize; CPU: time.perf_counter, with
the median process CPU time beside it, for shared machines) and the largest peak memory over
the timed calls (memory.py).
"""
from __future__ import annotations

import math
import time

import torch

from harness.memory import MemProbe

MODES = ("forward", "backward", "full")

# `warmup` untimed forward+backward calls once per (provider, N, D, dtype) run (all its modes
# share inputs and compiled graphs), `warmup_next` more before each mode, then
# clamp(ceil(budget_s / first_time), min_reps, max_reps) timed calls.
TIMING = dict(cuda=dict(warmup=5, warmup_next=3, min_reps=10, max_reps=100, budget_s=1.0),
              cpu=dict(warmup=1, warmup_next=0, min_reps=3, max_reps=30, budget_s=4.0))
QUICK_TIMING = dict(cuda=dict(warmup=2, warmup_next=1, min_reps=5, max_reps=20, budget_s=0.2),
                    cpu=dict(warmup=1, warmup_next=0, min_reps=3, max_reps=5, budget_s=0.5))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_call(fn, inputs, mode: str, device: torch.device, probe: MemProbe
               ) -> tuple[float, float, float, float]:
    """One call: (ms, peak bytes, loss value, process CPU ms; NaN on CUDA)."""
    a, b, scale, bias = inputs
    leaves = [t for t in inputs if t is not None]
    cuda = device.type == "cuda"
    for t in leaves:
        t.grad = None
    probe.begin()
    if mode == "backward":
        out = fn(a, b, scale, bias)
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe.mark()
    if cuda:
        start.record()
    else:
        c0 = time.process_time()
        t0 = time.perf_counter()
    if mode == "forward":
        out = fn(a, b, scale, bias)
    elif mode == "backward":
        out.backward()
    else:
        out = fn(a, b, scale, bias)
        out.backward()
    if cuda:
        end.record()
        end.synchronize()
        ms, cpu_ms = start.elapsed_time(end), float("nan")
    else:
        ms = (time.perf_counter() - t0) * 1e3
        cpu_ms = (time.process_time() - c0) * 1e3
    peak = probe.peak_bytes()
    value = float(out.detach().float())
    del out
    for t in leaves:
        t.grad = None
    return ms, peak, value, cpu_ms


def run_mode(fn, inputs, mode: str, device: torch.device, *, warmup: int, min_reps: int,
             max_reps: int, budget_s: float) -> dict:
    """Time one mode; returns ms_median/p20/p80, peak_mb, loss value and the rep count."""
    probe = MemProbe(device)
    for _ in range(warmup):
        timed_call(fn, inputs, mode, device, probe)
    calls = [timed_call(fn, inputs, mode, device, probe)]
    reps = max(min_reps, min(max_reps, math.ceil(budget_s * 1e3 / max(calls[0][0], 1e-3))))
    calls += [timed_call(fn, inputs, mode, device, probe) for _ in range(reps - 1)]
    times = [c[0] for c in calls]
    return {"ms_median": percentile(times, 50), "ms_p20": percentile(times, 20),
            "ms_p80": percentile(times, 80), "peak_mb": max(c[1] for c in calls) / 2**20,
            "cpu_ms_median": percentile([c[3] for c in calls], 50), "loss_value": calls[-1][2],
            "reps": len(calls)}
