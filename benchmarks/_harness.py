"""Shared machinery of the loss benchmarks (bench_clip.py, bench_siglip.py).

Providers (what computes the loss):
  reference           rft.*_loss(backend="reference"): eager PyTorch, materialises N x N logits
  reference+compile   torch.compile of that same call (compile time is not timed)
  native              rft.*_loss(backend="native"): the compiled C++/CUDA extension
  triton              rft.*_loss(backend="triton"): CUDA only (on CPU only under
                      TRITON_INTERPRET=1, which is far too slow to benchmark: skipped)
  open_clip           open_clip.loss.ClipLoss / SigLipLoss, eager
  inf_cl              Inf-CL's triton kernel (CUDA, CLIP only, when `import inf_cl` works):
                      (cal_inf_loss(s*img, txt) + cal_inf_loss(s*txt, img)) / 2

Modes: forward (grad-enabled forward, as in training), backward (the backward of a forward
run outside the timed region), full (forward + backward).

Per (provider, mode, N, D, dtype): warm-up, then repeated runs; median, p20 and p80 of the
time in ms (CUDA: torch.cuda.Event timing after synchronize; CPU: time.perf_counter, with the
median process CPU time and the load average in the note, for shared machines) and the
peak memory in MB above what was allocated before the step began, i.e. beyond the inputs
(in backward mode the step begins with the untimed forward, so the tensors it saves for the
backward count, as they are alive during it):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
        torch.cuda.memory_allocated() before the step (the inputs).
  CPU:  growth of the resident set: VmHWM after resetting it (writing "5" to
        /proc/self/clear_refs) minus VmRSS before the step, in a fresh subprocess per
        (provider, N, D, dtype) run with a fixed glibc mmap threshold so that freed large
        buffers go back to the OS and the next step's growth is visible again.
The reported peak is the largest over the timed runs.

Output (the checkout stays clean unless asked): by default each run writes a new CSV,
benchmarks/results/<device>_<UTC time>_<loss>.csv (the folder is ignored by git), and draws its
plots into the folder beside it, <same name>_plots/. --append adds the rows to the tracked
benchmarks/results.csv instead (then redraw the tracked plots with `plot.py --tracked`);
--csv PATH appends to any other file. Rows are appended (header only when the file is new);
see CSV_COLUMNS.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# plot.py needs only the standard library at import. TRACKED_CSV: the committed results
# (written only with --append); RESULTS_DIR: ignored by git, the default home of each run's CSV.
from plot import RESULTS_DIR, TRACKED_CSV, slug  # noqa: E402

LOSSES = ("clip", "siglip", "m2mix", "clip_m2mix", "robust_step")
PROVIDERS = ("reference", "reference+compile", "native", "triton", "open_clip", "inf_cl",
             "native-separate")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CSV_COLUMNS = ["timestamp", "device", "torch", "triton", "robustft_ext", "loss", "provider",
               "mode", "dtype", "N", "D", "ms_median", "ms_p20", "ms_p80", "peak_mb",
               "status", "note"]

# Defaults of the CLIs, per device type.
GPU_DEFAULTS = dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536], d=[512, 768, 1024],
                    dtype="bf16", providers=list(PROVIDERS))
CPU_DEFAULTS = dict(n=[1024, 2048, 4096, 8192], d=[512], dtype="fp32",
                    providers=["reference", "reference+compile", "native", "native-separate",
                               "open_clip", "triton", "inf_cl"])  # the last two: "skipped" rows, with why
QUICK = dict(cuda=dict(n=[1024, 4096], d=[512]), cpu=dict(n=[256, 1024], d=[512]))

# Timing policy: `warmup` untimed forward+backward calls once per (provider, N, D, dtype) run
# (all its modes share inputs and compiled graphs), `warmup_next` more before each mode, then
# clamp(ceil(budget_s / first_time), min_reps, max_reps) timed calls.
TIMING = dict(cuda=dict(warmup=5, warmup_next=3, min_reps=10, max_reps=100, budget_s=1.0),
              cpu=dict(warmup=1, warmup_next=0, min_reps=3, max_reps=30, budget_s=4.0))
QUICK_TIMING = dict(cuda=dict(warmup=2, warmup_next=1, min_reps=5, max_reps=20, budget_s=0.2),
                    cpu=dict(warmup=1, warmup_next=0, min_reps=3, max_reps=5, budget_s=0.5))

# SigLIP init of the paper (t' = log 10, b = -10); CLIP's 1/0.07.
CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
# m^2-mix: the paper's code puts CLIP at scale 100 and the m^2 term at 1/0.07, weight w.
M2_LAM, M2_SCALE, M2_WEIGHT = 0.3, 1.0 / 0.07, 0.01
# A robust fine-tuning step: CLIP + w m^2 + Lipsum-FT (K random texts, lambda 1) + DiVE
# (lambda 1000) on a reference batch of the training batch's size.
LIPSUM_K, LIPSUM_WEIGHT, DIVE_WEIGHT = 80, 1.0, 1000.0

# Fixed glibc mmap threshold for CPU workers: without it glibc raises the threshold after
# large frees and later buffers come from the heap, whose pages are not returned.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# --------------------------------------------------------------------------- environment

def cpu_model() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform
        name = platform.processor() or name
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{name} ({cores} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def utc_stamp() -> str:
    """The current UTC time as 20261201T013000Z (sorts as time, safe in file names)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def default_csv(device: str, loss: str) -> Path:
    """A new results file of this run: benchmarks/results/<device>_<UTC time>_<loss>.csv."""
    return RESULTS_DIR / f"{slug(device)}_{utc_stamp()}_{loss}.csv"


def plots_dir_for(csv_path: Path) -> Path:
    """The plot folder of a results file: <its folder>/<its name without .csv>_plots."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + "_plots")


def versions() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure: report it as absent
        triton_version = "none"
    try:
        import robustft_ext
        rft_version = robustft_ext.__version__
    except Exception:  # noqa: BLE001
        rft_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "robustft_ext": rft_version}


# --------------------------------------------------------------------------- providers

def skip_reason(loss: str, provider: str, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """Why this provider is not benchmarked here (None: it is)."""
    if provider in ("reference", "reference+compile"):
        return None
    if provider in ("native", "triton"):
        if provider == "triton" and device.type != "cuda":
            return ("triton runs on CUDA only (on CPU only under TRITON_INTERPRET=1, an "
                    "interpreter far too slow to benchmark): skipped on CPU")
        try:
            from robustft_ext.backends import unavailable_reason
            return unavailable_reason(provider, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a broken backend is a skip with the reason
            return f"{provider} backend check failed ({type(exc).__name__}: {exc})"
    if provider == "native-separate" and loss != "robust_step":
        if loss != "clip_m2mix":
            return ("native-separate (the terms by separate fused calls) is for clip_m2mix and "
                    "robust_step")
        from robustft_ext.backends import unavailable_reason
        return unavailable_reason("native", device, dtype)
    if provider == "native-separate" and loss == "robust_step":
        from robustft_ext.backends import unavailable_reason
        return unavailable_reason("native", device, dtype)
    if loss in ("m2mix", "clip_m2mix", "robust_step") and provider in ("open_clip", "inf_cl"):
        return f"{provider} has no m^2-mix loss"
    if provider == "open_clip":
        try:
            import open_clip.loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"open_clip not importable ({type(exc).__name__}: {exc})"
        return None
    if provider == "inf_cl":
        if loss != "clip":
            return "inf_cl has no SigLIP loss"
        try:
            import inf_cl  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"inf_cl not installed ({type(exc).__name__}: {exc}); pip install inf_cl"
        if device.type != "cuda":
            return "inf_cl's kernels are Triton/CUDA only: skipped on CPU"
        if _inf_cl_head_dim(d) is None:
            return f"inf_cl needs D divisible by 16, got D={d}"
        return None
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _inf_cl_head_dim(d: int) -> int | None:
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    return None


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_loss_fn(loss: str, provider: str, d: int | None = None) -> LossFn:
    """fn(image_features, text_features, logit_scale, logit_bias) -> 0-d loss tensor."""
    import robustft_ext as rft

    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
    if loss in ("m2mix", "clip_m2mix"):
        return _m2mix_loss_fn(loss, provider)
    if loss == "robust_step":
        return _robust_step_fn(provider)
    if provider in ("reference", "native", "triton"):
        backend = provider
        if loss == "clip":
            return lambda a, b, s, bias: rft.clip_loss(a, b, s, bias, backend=backend)
        return lambda a, b, s, bias: rft.siglip_loss(a, b, s, bias, backend=backend)
    if provider == "reference+compile":
        torch._dynamo.reset()  # a fresh cache per configuration: static shapes, no fallback
        if loss == "clip":
            def ref(a, b, s, bias):
                return rft.clip_loss(a, b, s, bias, backend="reference")
        else:
            def ref(a, b, s, bias):
                return rft.siglip_loss(a, b, s, bias, backend="reference")
        return torch.compile(ref, dynamic=False)
    if provider == "open_clip":
        import open_clip.loss as ocl
        module = ocl.ClipLoss() if loss == "clip" else ocl.SigLipLoss()
        return lambda a, b, s, bias: module(a, b, s, bias)
    if provider == "inf_cl":
        if loss != "clip":
            raise ValueError("inf_cl has no SigLIP loss")
        from inf_cl import cal_inf_loss
        head_dim = _inf_cl_head_dim(d or 0) or 256

        def inf(a, b, s, bias):
            if bias is not None:
                raise ValueError("inf_cl takes no logit bias")
            # The scale is applied here (as inf_cl does internally) rather than through its
            # `scale=` argument, whose backward all-reduces and needs torch.distributed.
            i2t = cal_inf_loss(s * a, b, head_dim=head_dim)
            t2i = cal_inf_loss(s * b, a, head_dim=head_dim)
            return (i2t + t2i) / 2
        return inf
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _m2mix_loss_fn(loss: str, provider: str) -> LossFn:
    """m^2 alone, or the paper's objective CLIP + w m^2 (from one fused pass, or, for
    native-separate, two fused calls). The reference materialises the mixed logits, as the
    paper's code does."""
    import robustft_ext as rft

    def fn(backend: str):
        if loss == "m2mix":
            return lambda a, b, s, bias: rft.m2mix_loss(a, b, s, M2_LAM, backend=backend)
        return lambda a, b, s, bias: _weighted(*rft.clip_m2mix_loss(
            a, b, s, M2_LAM, m2_logit_scale=M2_SCALE, backend=backend))

    if provider in ("reference", "native", "triton"):
        return fn(provider)
    if provider == "native-separate":
        return lambda a, b, s, bias: _weighted(
            rft.clip_loss(a, b, s, backend="native"),
            rft.m2mix_loss(a, b, M2_SCALE, M2_LAM, backend="native"))
    if provider == "reference+compile":
        torch._dynamo.reset()
        return torch.compile(fn("reference"), dynamic=False)
    raise ValueError(f"{provider!r} has no m^2-mix loss")


def _robust_step_fn(provider: str) -> LossFn:
    """A RobustFTLoss step with every term on. The extra inputs (pre-trained image features,
    random-text features, the reference batch) are made once per shape from a fixed seed;
    their gradients (the reference batch's) are part of the backward."""
    import robustft_ext as rft

    extras: dict = {}

    def inputs(a: torch.Tensor) -> dict:
        key = (a.shape, a.dtype, a.device)
        if key not in extras:
            g = torch.Generator(device="cpu").manual_seed(1)
            unit = lambda *s: torch.nn.functional.normalize(  # noqa: E731
                torch.randn(*s, generator=g), dim=-1).to(device=a.device, dtype=a.dtype)
            n, d = a.shape
            extras.clear()
            extras[key] = dict(image_pre=unit(n, d), random_text_features=unit(LIPSUM_K, d),
                               ref_image_ft=unit(n, d).requires_grad_(),
                               ref_text_ft=unit(n, d).requires_grad_(), ref_image_pre=unit(n, d),
                               ref_text_pre=unit(n, d))
        return extras[key]

    weights = dict(m2_weight=M2_WEIGHT, lipsum_weight=LIPSUM_WEIGHT, dive_weight=DIVE_WEIGHT)
    if provider == "native-separate":
        def separate(a, b, s, bias):
            x = inputs(a)
            avl, pvl = rft.dive_loss(x["ref_image_ft"], x["ref_text_ft"], x["ref_image_pre"],
                                     x["ref_text_pre"], torch.zeros(a.shape[1], device=a.device),
                                     backend="native")
            return (rft.clip_loss(a, b, s, backend="native")
                    + M2_WEIGHT * rft.m2mix_loss(a, b, M2_SCALE, M2_LAM, backend="native")
                    + LIPSUM_WEIGHT * rft.lipsum_loss(a, x["image_pre"], x["random_text_features"],
                                                      100.0, backend="native")
                    + DIVE_WEIGHT * (avl + pvl))
        return separate
    backend = "reference" if provider == "reference+compile" else provider
    module = rft.RobustFTLoss(**weights, m2_lam=M2_LAM, m2_logit_scale=M2_SCALE, backend=backend)

    def step(a, b, s, bias):
        return module(a, b, s, pre_logit_scale=100.0, **inputs(a))
    if provider == "reference+compile":
        torch._dynamo.reset()
        return torch.compile(step, dynamic=False)
    return step


def _weighted(clip: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    return clip + M2_WEIGHT * m2


def make_inputs(loss: str, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """L2-normalised features requiring grad, a 0-d fp32 scale requiring grad, SigLIP's bias."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(n, d, generator=g), dim=1)
    a = a.to(device=device, dtype=dtype).requires_grad_()
    b = b.to(device=device, dtype=dtype).requires_grad_()
    if loss in ("clip", "m2mix", "clip_m2mix", "robust_step"):
        scale = torch.tensor(CLIP_SCALE if loss in ("clip", "m2mix") else 100.0,
                             device=device).requires_grad_()
        bias = None
    else:
        scale = torch.tensor(SIGLIP_SCALE, device=device).requires_grad_()
        bias = torch.tensor(SIGLIP_BIAS, device=device).requires_grad_()
    return a, b, scale, bias


# --------------------------------------------------------------------------- memory probes

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


# --------------------------------------------------------------------------- timing

def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_mode(fn: LossFn, inputs, mode: str, device: torch.device, *, warmup: int, min_reps: int,
             max_reps: int, budget_s: float) -> dict:
    """Time one mode; returns ms_median/p20/p80, peak_mb, loss value and the rep count."""
    a, b, scale, bias = inputs
    leaves = [t for t in (a, b, scale, bias) if t is not None]
    cuda = device.type == "cuda"
    probe = MemProbe(device)

    def clear():
        for t in leaves:
            t.grad = None

    def once() -> tuple[float, float, float, float]:
        clear()
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
            ms = start.elapsed_time(end)
            cpu_ms = float("nan")
        else:
            ms = (time.perf_counter() - t0) * 1e3
            cpu_ms = (time.process_time() - c0) * 1e3
        peak = probe.peak_bytes()
        value = float(out.detach().float())
        del out
        clear()
        return ms, peak, value, cpu_ms

    for _ in range(warmup):
        once()
    times, peaks, cpu_times = [], [], []
    ms, peak, value, cpu_ms = once()
    times.append(ms)
    peaks.append(peak)
    cpu_times.append(cpu_ms)
    reps = max(min_reps, min(max_reps, math.ceil(budget_s * 1e3 / max(ms, 1e-3))))
    for _ in range(reps - 1):
        ms, peak, value, cpu_ms = once()
        times.append(ms)
        peaks.append(peak)
        cpu_times.append(cpu_ms)
    return {"ms_median": _percentile(times, 50), "ms_p20": _percentile(times, 20),
            "ms_p80": _percentile(times, 80), "peak_mb": max(peaks) / 2**20,
            "cpu_ms_median": _percentile(cpu_times, 50), "loss_value": value,
            "reps": len(times)}


def flops_note(loss: str, provider: str, mode: str, n: int, d: int, ms: float) -> str:
    """Achieved TFLOP/s of the fused CLIP kernels in full mode, against 8 N^2 D."""
    if loss == "clip" and mode == "full" and provider in ("native", "triton") and ms > 0:
        return f"; {8 * n * n * d / (ms * 1e-3) / 1e12:.3g} TFLOP/s (8N^2D)"
    return ""


def measure_config(spec: dict) -> list[dict]:
    """All modes of one (loss, provider, N, D, dtype), in this process. Never raises for OOM."""
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    loss, provider, n, d = spec["loss"], spec["provider"], spec["n"], spec["d"]
    t = spec["timing"]
    results = []
    inputs = None
    try:
        fn = make_loss_fn(loss, provider, d)
        inputs = make_inputs(loss, n, d, dtype, device, seed=spec.get("seed", 0))
    except Exception as exc:  # noqa: BLE001
        status = "oom" if _is_oom(exc) else "error"
        return [dict(mode=m, status=status, note=f"setup: {type(exc).__name__}: {exc}"[:300])
                for m in spec["modes"]]
    # First warm-up: forward and backward (when any mode needs it), so that lazy initialisation
    # and torch.compile's forward and backward graphs are all done before any timed call.
    needs_bwd = any(m != "forward" for m in spec["modes"])
    try:
        warm_mode = "full" if needs_bwd else "forward"
        if t["warmup"] > 0:
            run_mode(fn, inputs, warm_mode, device, warmup=t["warmup"] - 1, min_reps=1,
                     max_reps=1, budget_s=0.0)
    except Exception:  # noqa: BLE001 - the per-mode runs below record what goes wrong
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for mode in spec["modes"]:
        try:
            load0 = os.getloadavg()[0] if device.type == "cpu" else None
            r = run_mode(fn, inputs, mode, device, warmup=t["warmup_next"],
                         min_reps=t["min_reps"], max_reps=t["max_reps"], budget_s=t["budget_s"])
            # CPU: the 1-minute load average before and after, to tell a busy (shared) machine.
            # and the median process CPU time (all threads), which other processes do not inflate.
            load = (f"; load1={load0:.1f}..{os.getloadavg()[0]:.1f}; "
                    f"cpu_ms={r['cpu_ms_median']:.4g} ({torch.get_num_threads()} threads)"
                    if load0 is not None else "")
            note = f"loss={r['loss_value']:.6g}; reps={r['reps']}{load}"
            if not math.isfinite(r["loss_value"]):
                status = "nonfinite"
            else:
                status = "ok"
            note += flops_note(loss, provider, mode, n, d, r["ms_median"])
            if provider == "reference+compile":
                note += "; compile time excluded"
            if device.type == "cpu" and not math.isfinite(r["peak_mb"]):
                note += "; " + (cpu_peak_supported() or "peak unavailable")
            results.append(dict(mode=mode, status=status, note=note, ms_median=r["ms_median"],
                                ms_p20=r["ms_p20"], ms_p80=r["ms_p80"], peak_mb=r["peak_mb"]))
        except Exception as exc:  # noqa: BLE001 - record and go on with the next mode
            status = "oom" if _is_oom(exc) else "error"
            results.append(dict(mode=mode, status=status,
                                note=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]))
        if results[-1]["status"] != "ok":
            # After the except block, so that the traceback's frames (and their tensors) are gone.
            for tensor in inputs:
                if tensor is not None:
                    tensor.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- subprocess workers

_RESULT_TAG = "RFT_BENCH_RESULT "


def _worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    for r in measure_config(spec):
        print(_RESULT_TAG + json.dumps(r), flush=True)


def run_config_isolated(spec: dict, timeout_s: float | None = None) -> list[dict]:
    """measure_config in a fresh Python process (fresh peak RSS, no state between configs)."""
    env = dict(os.environ, **WORKER_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [dict(mode=m, status="error", note=f"worker timed out after {timeout_s:.0f} s")
                for m in spec["modes"]]
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            r = json.loads(line[len(_RESULT_TAG):])
            got[r["mode"]] = r
    out = []
    for m in spec["modes"]:
        if m in got:
            out.append(got[m])
            continue
        if proc.returncode in (-9, 137):
            out.append(dict(mode=m, status="oom", note="worker killed by SIGKILL (likely the OOM killer)"))
        else:
            tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
            out.append(dict(mode=m, status="error",
                            note=f"worker exited {proc.returncode}: {tail}"[:300]))
    return out


# --------------------------------------------------------------------------- CSV and table

def append_rows(csv_path: Path, rows: list[dict]) -> None:
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not new:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_COLUMNS:
            print(f"warning: {csv_path} has another header ({header}); appending anyway",
                  file=sys.stderr)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in CSV_COLUMNS})


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def print_table(rows: list[dict], file=sys.stdout) -> None:
    hdr = f"{'provider':<18} {'mode':<8} {'dtype':<5} {'N':>6} {'D':>5} {'ms_med':>10} " \
          f"{'ms_p20':>10} {'ms_p80':>10} {'peak_MB':>9}  status  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        def num(k, w, p=1):
            v = r.get(k, "")
            return f"{v:>{w}.{p}f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>{w}}"
        print(f"{r['provider']:<18} {r['mode']:<8} {r['dtype']:<5} {r['N']:>6} {r['D']:>5} "
              f"{num('ms_median', 10, 2)} {num('ms_p20', 10, 2)} {num('ms_p80', 10, 2)} "
              f"{num('peak_mb', 9)}  {r['status']:<6}  {r.get('note', '')}", file=file)


def print_ratios(rows: list[dict], file=sys.stdout) -> None:
    """Time and peak-memory ratios of each provider to `reference`, full mode."""
    ref = {(r["N"], r["D"], r["dtype"]): r for r in rows
           if r["provider"] == "reference" and r["mode"] == "full" and r["status"] == "ok"}
    lines = []
    for r in rows:
        k = (r["N"], r["D"], r["dtype"])
        if r["mode"] != "full" or r["status"] != "ok" or r["provider"] == "reference" or k not in ref:
            continue
        t = r["ms_median"] / ref[k]["ms_median"]
        m = (r["peak_mb"] / ref[k]["peak_mb"]) if ref[k]["peak_mb"] > 0 else float("nan")
        lines.append(f"  {r['provider']:<18} N={r['N']:<6} D={r['D']:<5} {r['dtype']:<5} "
                     f"time x{t:.2f}  peak x{m:.3f}")
    if lines:
        print("\nfull mode, relative to reference (time ratio, peak-memory ratio):", file=file)
        print("\n".join(lines), file=file)


# --------------------------------------------------------------------------- CLI

def _default_for(loss: str, provider: str) -> bool:
    """Whether a provider is in this loss's default list (no rows for providers that have no
    such loss at all)."""
    if provider == "native-separate":
        return loss in ("clip_m2mix", "robust_step")
    if provider in ("open_clip", "inf_cl"):
        return loss not in ("m2mix", "clip_m2mix", "robust_step")
    return True


def build_parser(loss: str) -> argparse.ArgumentParser:
    name = {"clip": "CLIP", "siglip": "SigLIP", "m2mix": "m^2-mix",
            "clip_m2mix": "CLIP + m^2-mix (one fused pass)",
            "robust_step": "a RobustFTLoss step: CLIP + m^2 + Lipsum-FT + DiVE"}[loss]
    epilog = (f"defaults on a GPU: --n {' '.join(map(str, GPU_DEFAULTS['n']))} "
              f"--d {' '.join(map(str, GPU_DEFAULTS['d']))} --dtype {GPU_DEFAULTS['dtype']} "
              f"--providers {' '.join(GPU_DEFAULTS['providers'])}\n"
              f"defaults on CPU:   --n {' '.join(map(str, CPU_DEFAULTS['n']))} "
              f"--d {' '.join(map(str, CPU_DEFAULTS['d']))} --dtype {CPU_DEFAULTS['dtype']} "
              f"--providers {' '.join(CPU_DEFAULTS['providers'])}\n"
              "Providers that cannot run here (triton and inf_cl on CPU, inf_cl when not "
              "installed or for SigLIP) get rows with status 'skipped' and the reason.")
    p = argparse.ArgumentParser(
        description=f"Benchmark the {name} loss providers; rows go to a new CSV under "
                    "benchmarks/results/ (or, with --append, to the tracked results.csv).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", help="batch sizes N")
    p.add_argument("--d", type=int, nargs="+", help="feature dims D")
    p.add_argument("--dtype", choices=list(DTYPES), help="feature dtype")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), help="providers to run")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="modes (default: all)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", type=Path, default=None,
                     help="CSV to append to (default: a new benchmarks/results/"
                          "<device>_<UTC time>_<loss>.csv, ignored by git)")
    out.add_argument("--append", action="store_true",
                     help="append to the tracked benchmarks/results.csv (and draw no plots: "
                          "redraw the tracked ones with plot.py --tracked)")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="draw no plots (default: a new CSV gets its plots in <csv>_plots/)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="two small sizes, D=512, few repeats")
    p.add_argument("--warmup", type=int, help="warm-up calls (forward+backward) per (provider, N, D)")
    p.add_argument("--min-reps", type=int, help="fewest timed calls")
    p.add_argument("--max-reps", type=int, help="most timed calls")
    p.add_argument("--budget", type=float, help="seconds of timed calls aimed at per mode")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="one subprocess per (provider, N, D) (default on CPU: needed for peak RSS)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(loss: str, argv: list[str] | None = None) -> list[dict]:
    args = build_parser(loss).parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kind = "cuda" if device.type == "cuda" else "cpu"
    defaults = GPU_DEFAULTS if kind == "cuda" else CPU_DEFAULTS
    ns = args.n or (QUICK[kind]["n"] if args.quick else defaults["n"])
    ds = args.d or (QUICK[kind]["d"] if args.quick else defaults["d"])
    dtype_name = args.dtype or defaults["dtype"]
    providers = args.providers or [p for p in defaults["providers"] if _default_for(loss, p)]
    timing = dict((QUICK_TIMING if args.quick else TIMING)[kind])
    for key, val in (("warmup", args.warmup), ("min_reps", args.min_reps),
                     ("max_reps", args.max_reps), ("budget_s", args.budget)):
        if val is not None:
            timing[key] = val
    isolate = (kind == "cpu") if args.isolate is None else args.isolate
    if kind == "cpu" and not isolate:
        print("note: --no-isolate on CPU: peak RSS growth is still measured but can be hidden by "
              "memory the process kept from earlier configurations", file=sys.stderr)

    env = dict(device=device_name(device), **versions())
    if args.append:
        csv_path = TRACKED_CSV
    elif args.csv is not None:
        csv_path = args.csv
    else:
        csv_path = default_csv(env["device"], loss)
    print(f"{loss}: device={env['device']} torch={env['torch']} triton={env['triton']} "
          f"robustft_ext={env['robustft_ext']} dtype={dtype_name} N={ns} D={ds} "
          f"providers={providers} modes={args.modes} isolate={isolate} timing={timing}")
    if kind == "cpu":
        why = cpu_peak_supported()
        print("CPU peak memory: " + ("VmHWM reset via /proc/self/clear_refs" if why is None else why))

    all_rows: list[dict] = []
    dtype = DTYPES[dtype_name]
    for d in ds:
        oom_at: dict[tuple[str, str], int] = {}  # (provider, mode) -> smallest N that ran out
        for n in ns:
            for provider in providers:
                base = dict(env, loss=loss, provider=provider, dtype=dtype_name, N=n, D=d)
                reason = skip_reason(loss, provider, device, dtype, d)
                modes = [m for m in args.modes if (provider, m) not in oom_at]
                rows = [dict(base, mode=m, status="skipped",
                             note=f"not run: out of memory at N={oom_at[(provider, m)]}")
                        for m in args.modes if (provider, m) in oom_at]
                if reason is not None:
                    rows += [dict(base, mode=m, status="skipped", note=reason) for m in modes]
                elif modes:
                    spec = dict(loss=loss, provider=provider, n=n, d=d, dtype=dtype_name,
                                device=str(device), modes=modes, timing=timing, seed=args.seed,
                                threads=args.threads)
                    t0 = time.perf_counter()
                    results = run_config_isolated(spec) if isolate else measure_config(spec)
                    wall = time.perf_counter() - t0
                    for r in results:
                        if r["status"] == "oom":
                            oom_at[(provider, r["mode"])] = n
                        rows.append(dict(base, **r))
                    print(f"  [{provider} N={n} D={d}: {wall:.1f} s]", file=sys.stderr, flush=True)
                order = {m: i for i, m in enumerate(args.modes)}
                rows.sort(key=lambda r: order[r["mode"]])
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                for r in rows:
                    r["timestamp"] = stamp
                append_rows(csv_path, rows)
                all_rows += rows
    print()
    print_table(all_rows)
    print_ratios(all_rows)
    print(f"\nappended {len(all_rows)} rows to {csv_path}")
    if args.append:
        print("the tracked plots are redrawn by: python benchmarks/plot.py --tracked")
    elif args.plots and all_rows:
        draw_plots(csv_path)
    return all_rows


def draw_plots(csv_path: Path) -> list[Path]:
    """plot.py's plots of one results file into its <csv>_plots/ folder (none without
    matplotlib: the CSV is the result, the plots a view of it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    import plot
    return plot.main(["--csv", str(csv_path), "--out", str(plots_dir_for(csv_path)),
                      "--modes", "forward", "backward", "full"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("run bench_clip.py or bench_siglip.py (this module is their shared harness)")
