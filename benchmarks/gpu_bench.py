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
printed. The providers, timing, memory and the worker are benchmarks/harness/'s.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# harness.isolation imports no torch; the modules that do are imported where they are used,
# after main() starts the stage's clock, so that its deadline counts their import.
from harness.isolation import WORKER_START_S, Worker  # noqa: E402

LOSSES = ("clip", "siglip", "clip_m2mix", "robust_step")
PROVIDERS = ("native", "triton", "open_clip", "reference", "inf_cl")
MODES = ("forward", "backward", "full")
SIZES = dict(gpu=dict(ns=(4096, 16384, 65536), d=768, extra_n=16384, extra_d=(512, 1024)),
             toy=dict(ns=(64, 128), d=32, extra_n=64, extra_d=(16, 64)))
# Toy runs use one CPU thread: the sizes are too small to share, and the dry run's machine
# may be busy. Timed calls per case (see harness/timing.py): the first warm-up is forward +
# backward, then per mode `warmup_next` untimed and at least `min_reps` timed calls.
# SLOW_TIMING is used when a full call is predicted to take longer than SLOW_CALL_S.
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


def plan_cases(toy: bool) -> list[dict]:
    """Every (loss, provider, N, D) of the subset, in run order."""
    from harness.providers import has_loss

    size = SIZES["toy" if toy else "gpu"]
    cases = []
    for n in size["ns"]:
        for loss in LOSSES:
            for provider in PROVIDERS:
                if has_loss(loss, provider):
                    cases.append(dict(loss=loss, provider=provider, n=n, d=size["d"]))
    for d in size["extra_d"]:
        for provider in PROVIDERS:
            cases.append(dict(loss="clip", provider=provider, n=size["extra_n"], d=d))
    return cases


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


def skip_reason(loss: str, provider: str, device, dtype, d: int) -> str | None:
    """The harness's skip_reason, except that open_clip is only looked up here: its import
    (seconds) happens once, in the worker, whose rows say so if it fails."""
    from harness import providers

    if provider == "open_clip":
        if importlib.util.find_spec("open_clip") is None:
            return "open_clip not installed (pip install open_clip_torch)"
        return None
    return providers.skip_reason(loss, provider, device, dtype, d)


def memory_skip(loss: str, provider: str, n: int, total_bytes: float | None) -> str | None:
    mats = PEAK_MATRICES.get((loss, provider))
    if mats is None or total_bytes is None:
        return None
    need = mats * n * n * 4
    if need > total_bytes:
        return (f"predicted peak {need / 2**30:.0f} GiB ({mats:g} float32 N x N matrices) "
                f"exceeds the device's {total_bytes / 2**30:.0f} GiB")
    return None


class SubsetRun:
    """The stage's state from case to case: the predictions from the cases measured so far,
    the smallest N at which each (loss, provider, D, mode) ran out of memory, the worker (None
    after one was stopped, until the next case needs one) and the count of rows per status."""

    def __init__(self, args: argparse.Namespace, device, t_start: float):
        import torch

        from harness.environment import device_name, versions
        self.args, self.device, self.t_start = args, device, t_start
        self.kind = "toy" if args.toy else "gpu"
        self.case_cap = args.case_cap_s or CASE_CAP_S[self.kind]
        self.total_mem = (torch.cuda.get_device_properties(device).total_memory
                          if device.type == "cuda" else None)
        self.env = dict(device=device_name(device), **versions())
        self.predictor = Predictor()
        self.oom_at: dict[tuple, int] = {}
        self.worker: Worker | None = Worker()  # starts while the first cases are planned
        self.counts = {"ok": 0, "skipped": 0, "oom": 0, "timeout": 0, "error": 0, "nonfinite": 0}

    def left_s(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t_start)

    def timing_or_skip(self, loss: str, provider: str, n: int, d: int, left: float
                       ) -> tuple[dict, str | None]:
        """The case's timing policy, and why it is skipped (None: it runs)."""
        timing = dict(TIMING[self.kind])
        from harness.losses import DTYPES

        reason = skip_reason(loss, provider, self.device, DTYPES[self.args.dtype], d)
        if reason is None and self.device.type == "cuda":
            reason = memory_skip(loss, provider, n, self.total_mem)
        if reason is not None:
            return timing, reason
        pred = self.predictor.full_call_s(loss, provider, n, d)
        if pred is not None and pred[0] > SLOW_CALL_S:
            timing = dict(SLOW_TIMING)
        expect = (CASE_OVERHEAD_S + pred[0] * calls_per_case(timing)) if pred else None
        if expect is not None and expect > self.case_cap:
            reason = (f"predicted {expect:.0f} s for the case (a full call "
                      f"{pred[0] * 1e3:.3g} ms from {pred[1]}) exceeds the case cap "
                      f"of {self.case_cap:.0f} s")
        elif left < 5 or (expect is not None and expect > left):
            reason = (f"the stage's deadline: {max(left, 0):.0f} s left"
                      + (f", the case predicted to take {expect:.0f} s" if expect else ""))
        return timing, reason

    def measure(self, case: dict, modes: list[str], timing: dict, left: float) -> list[dict]:
        """The case's results from the worker; a case killed at its cap, or whose worker
        died, gets rows that say so, and so does its worker (a fresh one takes the next)."""
        spec = dict(loss=case["loss"], provider=case["provider"], n=case["n"], d=case["d"],
                    dtype=self.args.dtype, device=str(self.device), modes=modes, timing=timing,
                    seed=0, threads=1 if self.args.toy else None)
        self.worker = self.worker or Worker()
        t0 = time.monotonic()
        got = self.worker.run(spec, min(self.case_cap, max(left, 5.0)),
                              start_s=min(WORKER_START_S, max(left, 5.0)))
        if isinstance(got, str):
            why = (f"killed after {time.monotonic() - t0:.0f} s (the case cap "
                   f"{self.case_cap:.0f} s or the deadline)" if got == "timeout" else got)
            self.stop_worker()
            return [dict(mode=m, status="timeout" if got == "timeout" else "error", note=why)
                    for m in modes]
        for r in got:
            if r["status"] == "oom":
                self.oom_at[(case["loss"], case["provider"], case["d"], r["mode"])] = case["n"]
            if r["status"] == "ok" and r["mode"] == "full":
                self.predictor.add(case["loss"], case["provider"], case["n"], case["d"],
                                   r["ms_median"])
        if any(r["status"] == "error" for r in got):
            self.stop_worker()  # a CUDA error can poison the context: start afresh
        return got

    def run_case(self, case: dict) -> list[dict]:
        """The case's rows, a row per mode: measured, or skipped with why."""
        loss, provider, n, d = case["loss"], case["provider"], case["n"], case["d"]
        base = dict(self.env, loss=loss, provider=provider, dtype=self.args.dtype, N=n, D=d)
        modes = [m for m in MODES if self.oom_at.get((loss, provider, d, m), n + 1) > n]
        rows = [dict(base, mode=m, status="skipped",
                     note=f"not run: out of memory at N={self.oom_at[(loss, provider, d, m)]}")
                for m in MODES if m not in modes]
        left = self.left_s()
        timing, reason = self.timing_or_skip(loss, provider, n, d, left)
        if reason is not None:
            rows += [dict(base, mode=m, status="skipped", note=reason) for m in modes]
        elif modes:
            rows += [dict(base, **r) for r in self.measure(case, modes, timing, left)]
        from harness.environment import utc_iso

        order = {m: j for j, m in enumerate(MODES)}
        rows.sort(key=lambda r: order[r["mode"]])
        stamp = utc_iso()
        for r in rows:
            r["timestamp"] = stamp
            self.counts[r["status"]] = self.counts.get(r["status"], 0) + 1
        return rows

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()

    import torch

    from harness.results import append_rows
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = SubsetRun(args, device, t_start)
    cases = plan_cases(args.toy)
    env = run.env
    print(f"gpu_bench: {len(cases)} cases on {env['device']} ({args.dtype}), deadline "
          f"{args.deadline_s:.0f} s, case cap {run.case_cap:.0f} s; torch {env['torch']}, triton "
          f"{env['triton']}, robustft_ext {env['robustft_ext']}", flush=True)
    try:
        for i, case in enumerate(cases, 1):
            rows = run.run_case(case)
            append_rows(args.csv, rows)
            print(f"[{i}/{len(cases)} {time.monotonic() - t_start:5.0f} s] {case['loss']} "
                  f"{case['provider']} N={case['n']} D={case['d']}: " + _brief(rows), flush=True)
    finally:
        run.stop_worker()
    line = ", ".join(f"{v} {k}" for k, v in run.counts.items() if v) + " rows"
    line += f" in {time.monotonic() - t_start:.0f} s"
    print("gpu_bench: " + line)
    if args.note_file is not None:
        args.note_file.write_text(line + "\n")
    return 0 if run.counts["ok"] else 1


def _brief(rows: list[dict]) -> str:
    """One line for a case's rows: the times, or the status and why, once when shared."""
    if rows and all(r["status"] == rows[0]["status"] != "ok" and r.get("note") == rows[0].get("note")
                    for r in rows):
        return f"{rows[0]['status']}: {rows[0].get('note', '')[:160]}"
    return "; ".join(f"{r['mode']} {r['ms_median']:.3g} ms" if r["status"] == "ok"
                     else f"{r['mode']} {r['status']} ({r.get('note', '')[:80]})" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
