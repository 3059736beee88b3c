"""The benchmark stage of gpu_check.sh: a bf16 subset of the loss benchmarks, inside a deadline.

Cases: CLIP, SigLIP, CLIP + m^2 (one fused pass) and a whole RobustFTLoss step at
N in {4096, 16384, 65536}, D = 768, then CLIP at N = 16384 with D = 512 and 1024; providers
native, triton, open_clip, reference and inf_cl (those that have the loss); modes forward,
backward and full. --toy: the same at N in {64, 128}, D = 32 (CLIP also D = 16, 64 at N = 64),
for the CPU dry run. The order is by N, all losses at one N before the next, so
that a deadline cuts the largest sizes first.

Each case (loss, provider, N, D: its three modes) runs in a long-lived worker process that
this one watches: a case past its cap is killed (rows with status "timeout") and a fresh
worker takes the next case; so does any case that ends in an error, since a CUDA error can
leave the worker's context unusable. Before a case starts it is skipped, with the reason in
its rows, when
  - a provider that materialises N x N matrices (reference, open_clip) is predicted to need
    more than the device's memory: PEAK_MATRICES[loss, provider] float32 N x N matrices, the
    ratios measured by the CPU benchmark (benchmarks/results.csv, N = 8192);
  - the time of one full call, predicted from the same provider at the nearest smaller size
    (x (N / N0)^2 x D / D0), times the calls the case makes, exceeds the case cap or the time
    left before the deadline;
  - that provider and mode ran out of memory at a smaller N.
Rows (the harness's CSV columns) are appended to --csv as each case ends; a line per case is
printed. Timing, memory and the providers themselves are benchmarks/_harness.py's.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LOSSES = ("clip", "siglip", "clip_m2mix", "robust_step")
PROVIDERS = ("native", "triton", "open_clip", "reference", "inf_cl")
MODES = ("forward", "backward", "full")
SIZES = dict(gpu=dict(ns=(4096, 16384, 65536), d=768, extra_n=16384, extra_d=(512, 1024)),
             toy=dict(ns=(64, 128), d=32, extra_n=64, extra_d=(16, 64)))
# Toy runs use one CPU thread: the sizes are too small to share, and the dry run's machine
# may be busy. Timed calls per case (see _harness.run_mode): the first warm-up is forward + backward, then
# per mode `warmup_next` untimed and at least `min_reps` timed calls. SLOW_TIMING is used when
# a full call is predicted to take longer than SLOW_CALL_S.
TIMING = dict(gpu=dict(warmup=2, warmup_next=1, min_reps=3, max_reps=20, budget_s=0.3),
              toy=dict(warmup=1, warmup_next=0, min_reps=1, max_reps=1, budget_s=0.0))
SLOW_TIMING = dict(warmup=1, warmup_next=0, min_reps=2, max_reps=2, budget_s=0.0)
SLOW_CALL_S = 0.25
CASE_CAP_S = dict(gpu=60.0, toy=20.0)
CASE_OVERHEAD_S = 2.0      # inputs, first-call set-up, one worker's share of its start
# Peak memory of the providers that materialise N x N matrices, in float32 N x N matrices
# (peak MB over N^2 x 4 bytes of the CPU rows at N = 8192 in benchmarks/results.csv; the
# reference computes its logits in float32 whatever the input dtype).
PEAK_MATRICES = {("clip", "reference"): 5.0, ("clip", "open_clip"): 4.3,
                 ("siglip", "reference"): 6.0, ("siglip", "open_clip"): 5.1,
                 ("clip_m2mix", "reference"): 7.4, ("robust_step", "reference"): 7.4}
RESULT_TAG = "RFT_GPU_BENCH "
READY_TAG = "RFT_GPU_BENCH_READY"
WORKER_START_S = 120.0     # importing torch and the providers, creating the CUDA context


def plan_cases(toy: bool) -> list[dict]:
    """Every (loss, provider, N, D) of the subset, in run order."""
    size = SIZES["toy" if toy else "gpu"]
    cases = []
    for n in size["ns"]:
        for loss in LOSSES:
            for provider in PROVIDERS:
                if _has_loss(loss, provider):
                    cases.append(dict(loss=loss, provider=provider, n=n, d=size["d"]))
    for d in size["extra_d"]:
        for provider in PROVIDERS:
            cases.append(dict(loss="clip", provider=provider, n=size["extra_n"], d=d))
    return cases


def _has_loss(loss: str, provider: str) -> bool:
    if provider == "open_clip":
        return loss in ("clip", "siglip")
    if provider == "inf_cl":
        return loss == "clip"
    return True


def calls_per_case(timing: dict) -> float:
    """Full-call equivalents of one case: the warm-up, then per mode its untimed and timed
    calls (forward about a quarter of a full call, backward a full one with its forward)."""
    per_mode = timing["warmup_next"] + timing["min_reps"]
    return timing["warmup"] + per_mode * (0.25 + 1.0 + 1.0)


class Predictor:
    """Predicted seconds of one full call from measured full-mode times of the same
    (loss, provider): the nearest measured size with N0 <= N, scaled by (N/N0)^2 (D/D0)."""

    def __init__(self):
        self.points: dict[tuple[str, str], list[tuple[int, int, float]]] = {}

    def add(self, loss: str, provider: str, n: int, d: int, full_ms: float) -> None:
        self.points.setdefault((loss, provider), []).append((n, d, full_ms / 1e3))

    def full_call_s(self, loss: str, provider: str, n: int, d: int) -> tuple[float, str] | None:
        pts = [p for p in self.points.get((loss, provider), []) if p[0] <= n]
        if not pts:
            return None
        n0, d0, t0 = max(pts, key=lambda p: (p[0], -abs(p[1] - d)))
        t = t0 * (n / n0) ** 2 * (d / d0)
        return t, f"{t0 * 1e3:.3g} ms at N={n0}, D={d0}, x (N/N0)^2 x D/D0"


def skip_reason(h, loss: str, provider: str, device, dtype, d: int) -> str | None:
    """The harness's skip_reason, except that open_clip is only looked up here: its import
    (seconds) happens once, in the worker, whose rows say so if it fails."""
    if provider == "open_clip":
        if importlib.util.find_spec("open_clip") is None:
            return "open_clip not installed (pip install open_clip_torch)"
        return None
    return h.skip_reason(loss, provider, device, dtype, d)


def memory_skip(loss: str, provider: str, n: int, total_bytes: float | None) -> str | None:
    mats = PEAK_MATRICES.get((loss, provider))
    if mats is None or total_bytes is None:
        return None
    need = mats * n * n * 4
    if need > total_bytes:
        return (f"predicted peak {need / 2**30:.0f} GiB ({mats:g} float32 N x N matrices) "
                f"exceeds the device's {total_bytes / 2**30:.0f} GiB")
    return None


# --------------------------------------------------------------------------- the worker

def worker_main() -> None:
    """Read one case spec (JSON) per line from stdin; print its result rows, tagged."""
    import torch

    from _harness import measure_config
    # Start-up, not any case's time: the CUDA context, and open_clip's long import.
    if torch.cuda.is_available():
        torch.cuda.init()
    try:
        import open_clip.loss  # noqa: F401
    except Exception:  # noqa: BLE001 - its rows say why when a case needs it
        pass
    print(READY_TAG, flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        rows = measure_config(spec)
        print(RESULT_TAG + json.dumps(rows), flush=True)


class Worker:
    """A worker process with a reader thread, so that a case can be waited on with a timeout.
    The worker's start-up (imports, CUDA context) is waited for apart from any case."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                self.lines.put(json.loads(line[len(RESULT_TAG):]))
            elif line.strip() == READY_TAG:
                self.ready.set()
            else:
                sys.stdout.write(line)
        self.ready.set()
        self.lines.put(None)  # the worker exited

    def run(self, spec: dict, timeout_s: float, start_s: float = WORKER_START_S
            ) -> list[dict] | str:
        """The case's rows, or why there are none ("timeout" or the worker's exit); a worker
        not started within start_s seconds counts as a time-out too."""
        if not self.ready.wait(start_s):
            return "timeout"
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return f"worker exited {self.proc.poll()} before the case"
        try:
            got = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout"
        if got is None:
            code = self.proc.wait()
            return f"worker exited {code}" + (" (killed: likely out of host memory)"
                                               if code in (-9, 137) else "")
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------- the parent

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, required=True, help="CSV to append the rows to")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--toy", action="store_true", help="toy sizes (the CPU dry run)")
    p.add_argument("--deadline-s", type=float, default=200.0,
                   help="start no case after this many seconds (default 200)")
    p.add_argument("--case-cap-s", type=float, default=None,
                   help="seconds one case may run (default 60, toy 20)")
    p.add_argument("--note-file", type=Path, default=None,
                   help="write a one-line outcome here (gpu_check.sh's status detail)")
    args = p.parse_args(argv)
    t_start = time.monotonic()

    import torch

    import _harness as h
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = "toy" if args.toy else "gpu"
    case_cap = args.case_cap_s or CASE_CAP_S[kind]
    total_mem = (torch.cuda.get_device_properties(device).total_memory
                 if device.type == "cuda" else None)
    env = dict(device=h.device_name(device), **h.versions())
    dtype = h.DTYPES[args.dtype]
    cases = plan_cases(args.toy)
    print(f"gpu_bench: {len(cases)} cases on {env['device']} ({args.dtype}), deadline "
          f"{args.deadline_s:.0f} s, case cap {case_cap:.0f} s; torch {env['torch']}, triton "
          f"{env['triton']}, robustft_ext {env['robustft_ext']}", flush=True)

    predictor = Predictor()
    oom_at: dict[tuple, int] = {}
    worker: Worker | None = Worker()  # starts while the first cases are planned
    counts = {"ok": 0, "skipped": 0, "oom": 0, "timeout": 0, "error": 0, "nonfinite": 0}
    try:
        for i, case in enumerate(cases, 1):
            loss, provider, n, d = case["loss"], case["provider"], case["n"], case["d"]
            base = dict(env, loss=loss, provider=provider, dtype=args.dtype, N=n, D=d)
            modes = [m for m in MODES if oom_at.get((loss, provider, d, m), n + 1) > n]
            rows = [dict(base, mode=m, status="skipped",
                         note=f"not run: out of memory at N={oom_at[(loss, provider, d, m)]}")
                    for m in MODES if m not in modes]
            left = args.deadline_s - (time.monotonic() - t_start)
            timing = dict(TIMING[kind])
            reason = skip_reason(h, loss, provider, device, dtype, d)
            if reason is None and device.type == "cuda":
                reason = memory_skip(loss, provider, n, total_mem)
            if reason is None:
                pred = predictor.full_call_s(loss, provider, n, d)
                if pred is not None and pred[0] > SLOW_CALL_S:
                    timing = dict(SLOW_TIMING)
                expect = (CASE_OVERHEAD_S + pred[0] * calls_per_case(timing)) if pred else None
                if expect is not None and expect > case_cap:
                    reason = (f"predicted {expect:.0f} s for the case (a full call "
                              f"{pred[0] * 1e3:.3g} ms from {pred[1]}) exceeds the case cap "
                              f"of {case_cap:.0f} s")
                elif left < 5 or (expect is not None and expect > left):
                    reason = (f"the stage's deadline: {max(left, 0):.0f} s left"
                              + (f", the case predicted to take {expect:.0f} s" if expect else ""))
            if reason is not None:
                rows += [dict(base, mode=m, status="skipped", note=reason) for m in modes]
            elif modes:
                spec = dict(loss=loss, provider=provider, n=n, d=d, dtype=args.dtype,
                            device=str(device), modes=modes, timing=timing, seed=0,
                            threads=1 if args.toy else None)
                worker = worker or Worker()
                t0 = time.monotonic()
                got = worker.run(spec, min(case_cap, max(left, 5.0)),
                                 start_s=min(WORKER_START_S, max(left, 5.0)))
                wall = time.monotonic() - t0
                if isinstance(got, str):
                    status = "timeout" if got == "timeout" else "error"
                    why = (f"killed after {wall:.0f} s (the case cap {case_cap:.0f} s or the "
                           "deadline)" if got == "timeout" else got)
                    rows += [dict(base, mode=m, status=status, note=why) for m in modes]
                    worker.stop()
                    worker = None
                else:
                    for r in got:
                        rows.append(dict(base, **r))
                        if r["status"] == "oom":
                            oom_at[(loss, provider, d, r["mode"])] = n
                        if r["status"] == "ok" and r["mode"] == "full":
                            predictor.add(loss, provider, n, d, r["ms_median"])
                    if any(r["status"] == "error" for r in got):
                        worker.stop()  # a CUDA error can poison the context: start afresh
                        worker = None
            order = {m: j for j, m in enumerate(MODES)}
            rows.sort(key=lambda r: order[r["mode"]])
            stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for r in rows:
                r["timestamp"] = stamp
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            h.append_rows(args.csv, rows)
            print(f"[{i}/{len(cases)} {time.monotonic() - t_start:5.0f} s] {loss} {provider} "
                  f"N={n} D={d}: " + _brief(rows), flush=True)
    finally:
        if worker is not None:
            worker.stop()
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) + " rows"
    line += f" in {time.monotonic() - t_start:.0f} s"
    print("gpu_bench: " + line)
    if args.note_file is not None:
        args.note_file.write_text(line + "\n")
    return 0 if counts["ok"] else 1


def _brief(rows: list[dict]) -> str:
    """One line for a case's rows: the times, or the status and why, once when shared."""
    if rows and all(r["status"] == rows[0]["status"] != "ok" and r.get("note") == rows[0].get("note")
                    for r in rows):
        return f"{rows[0]['status']}: {rows[0].get('note', '')[:160]}"
    return "; ".join(f"{r['mode']} {r['ms_median']:.3g} ms" if r["status"] == "ok"
                     else f"{r['mode']} {r['status']} ({r.get('note', '')[:80]})" for r in rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        sys.exit(main())
