"""Every mode of one (loss, provider, N, D, dtype), in this process: a result per mode with its
status (ok, nonfinite, oom, error) and a note, never raising.

A spec is a dict: loss, provider, n, d, dtype (a key of losses.DTYPES), device, modes, timing
(timing.TIMING's keys), seed, threads; it travels as JSON to the worker processes.
"""
from __future__ import annotations

import gc
import math
import os

import torch

from harness import floor
from harness.losses import DTYPES, make_inputs
from harness.memory import cpu_peak_supported
from harness.providers import make_loss_fn
from harness.timing import is_oom, run_mode


def flops_note(loss: str, provider: str, mode: str, n: int, d: int, ms: float) -> str:
    """Achieved TFLOP/s of the fused CLIP kernels in full mode, against 8 N^2 D."""
    if loss == "clip" and mode == "full" and provider in ("native", "triton") and ms > 0:
        return f"; {8 * n * n * d / (ms * 1e-3) / 1e12:.3g} TFLOP/s (8N^2D)"
    return ""


def measure_config(spec: dict) -> list[dict]:
    """All modes of one (loss, provider, N, D, dtype). Never raises for OOM."""
    device = torch.device(spec["device"])
    try:
        fn = make_loss_fn(spec["loss"], spec["provider"], spec["d"])
        inputs = make_inputs(spec["loss"], spec["n"], spec["d"], DTYPES[spec["dtype"]], device,
                             seed=spec.get("seed", 0))
    except Exception as exc:  # noqa: BLE001
        status = "oom" if is_oom(exc) else "error"
        return [dict(mode=m, status=status, note=f"setup: {type(exc).__name__}: {exc}"[:300])
                for m in spec["modes"]]
    _warm_up(fn, inputs, spec, device)
    results = []
    for mode in spec["modes"]:
        results.append(_measure_mode(fn, inputs, mode, spec, device))
        if results[-1]["status"] != "ok":
            # After the failed mode's except block, so that its traceback's frames (and their
            # tensors) are gone.
            for tensor in inputs:
                if tensor is not None:
                    tensor.grad = None
            _release(device)
    del fn, inputs   # the provider's own buffers (the floor's, compiled graphs) too
    _release(device)
    return results


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up(fn, inputs, spec: dict, device: torch.device) -> None:
    """The first warm-up: forward and backward (when any mode needs it), so that lazy
    initialisation and torch.compile's forward and backward graphs are all done before any
    timed call."""
    t = spec["timing"]
    needs_bwd = any(m != "forward" for m in spec["modes"])
    try:
        if t["warmup"] > 0:
            run_mode(fn, inputs, "full" if needs_bwd else "forward", device,
                     warmup=t["warmup"] - 1, min_reps=1, max_reps=1, budget_s=0.0)
    except Exception:  # noqa: BLE001 - the per-mode runs record what goes wrong
        pass
    _release(device)


def _measure_mode(fn, inputs, mode: str, spec: dict, device: torch.device) -> dict:
    """One mode's result: times and peak, or the status and why there are none."""
    t = spec["timing"]
    try:
        load0 = os.getloadavg()[0] if device.type == "cpu" else None
        r = run_mode(fn, inputs, mode, device, warmup=t["warmup_next"], min_reps=t["min_reps"],
                     max_reps=t["max_reps"], budget_s=t["budget_s"])
    except Exception as exc:  # noqa: BLE001 - record and go on with the next mode
        return dict(mode=mode, status="oom" if is_oom(exc) else "error",
                    note=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
    return dict(mode=mode, status="ok" if math.isfinite(r["loss_value"]) else "nonfinite",
                note=_note(spec, mode, r, load0, device), ms_median=r["ms_median"],
                ms_p20=r["ms_p20"], ms_p80=r["ms_p80"], peak_mb=r["peak_mb"])


def _note(spec: dict, mode: str, r: dict, load0: float | None, device: torch.device) -> str:
    """The loss value and repeats; on CPU the 1-minute load average before and after (to tell
    a busy, shared machine) and the median process CPU time (all threads), which other
    processes do not inflate; the work rate where it is counted."""
    loss, provider, n, d = spec["loss"], spec["provider"], spec["n"], spec["d"]
    load = (f"; load1={load0:.1f}..{os.getloadavg()[0]:.1f}; "
            f"cpu_ms={r['cpu_ms_median']:.4g} ({torch.get_num_threads()} threads)"
            if load0 is not None else "")
    if provider == "floor":
        note = f"reps={r['reps']}{load}; " + floor.floor_note(loss, mode, n, d, r["ms_median"])
    else:
        note = f"loss={r['loss_value']:.6g}; reps={r['reps']}{load}"
    note += flops_note(loss, provider, mode, n, d, r["ms_median"])
    if provider == "reference+compile":
        note += "; compile time excluded"
    if device.type == "cpu" and not math.isfinite(r["peak_mb"]):
        note += "; " + (cpu_peak_supported() or "peak unavailable")
    return note
