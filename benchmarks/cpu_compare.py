"""Interleaved CPU timing of native against reference, reference+compile and the floor.

On a shared machine the time of one provider drifts with the load of the others, so the
loss benchmarks' one-provider-after-another medians can rank providers by the load they
happened to meet. This script times the providers of one (loss, N, D) in one process,
round-robin: every round calls each provider once per mode, in a rotating order, and the
reported figure is each provider's minimum over the rounds (the run least disturbed by
other processes), with the median beside it and the minimum over the floor's minimum (the
floor: the library GEMMs an exact evaluation needs, harness/floor.py). The load average is
printed per configuration. The losses, inputs and providers are harness/'s (make_loss_fn,
make_inputs), so the numbers compare with bench_*.py.

  python benchmarks/cpu_compare.py --threads 2 --n 256 1024 --d 512 --losses clip siglip
  python benchmarks/cpu_compare.py --losses clip_m2mix robust_step --modes full --rounds 5
  python benchmarks/cpu_compare.py --threads 1 --clock cpu     # a loaded machine

Under heavy load even the minimum wall time of a multi-threaded run is disturbed (a
parallel region waits for its slowest thread, which another process may hold off the
CPU); with --threads 1 --clock cpu the process CPU time is what one dedicated core would
take, whatever the load.

Prints one row per (loss, N, D, mode) and, with --csv, appends them to a CSV file (its
columns: the configuration, then each provider's min and median ms; a file whose header
differs is refused).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.losses import DTYPES, make_inputs  # noqa: E402
from harness.providers import make_loss_fn  # noqa: E402

PROVIDERS = ("native", "reference", "reference+compile", "floor")
MODES = ("forward", "full")
MAX_WARMUP = 8


def _once(fn, inputs, mode: str, clock=time.perf_counter) -> float:
    """Seconds of one call (by `clock`): a grad-enabled forward, or forward + backward."""
    leaves = [t for t in inputs if t is not None]
    for t in leaves:
        t.grad = None
    t0 = clock()
    out = fn(*inputs)
    if mode == "full":
        out.backward()
    elapsed = clock() - t0
    for t in leaves:
        t.grad = None
    return elapsed


def compare(loss: str, n: int, d: int, dtype: str, providers: list[str], modes: list[str],
            rounds: int, clock=time.perf_counter) -> list[dict]:
    """Each provider's min and median ms per mode over `rounds` interleaved rounds."""
    inputs = make_inputs(loss, n, d, DTYPES[dtype], torch.device("cpu"))
    fns = {}
    for p in providers:
        fns[p] = make_loss_fn(loss, p, d)
        # Warm-up: compiles both graphs and first-touches the buffers; then more calls
        # until one is within 25% of the fastest so far (at most MAX_WARMUP).
        for mode in ("full", "forward"):
            seen = [_once(fns[p], inputs, mode, clock) for _ in range(2)]
            while seen[-1] > 1.25 * min(seen[:-1]) and len(seen) < MAX_WARMUP:
                seen.append(_once(fns[p], inputs, mode, clock))
    times = {(p, m): [] for p in providers for m in modes}
    for r in range(rounds):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for p in order:
            for m in modes:
                times[(p, m)].append(_once(fns[p], inputs, m, clock) * 1e3)
    load = os.getloadavg()[0]
    rows = []
    for m in modes:
        row = dict(loss=loss, N=n, D=d, dtype=dtype, mode=m, threads=torch.get_num_threads(),
                   clock="wall" if clock is time.perf_counter else "cpu",
                   rounds=rounds, load1=round(load, 1))
        for p in providers:
            ts = sorted(times[(p, m)])
            row[f"{p}_min_ms"] = round(ts[0], 3)
            row[f"{p}_med_ms"] = round(ts[len(ts) // 2], 3)
        rows.append(row)
    return rows


CONFIG_COLUMNS = ["loss", "N", "D", "dtype", "mode", "threads", "clock", "rounds", "load1"]


def csv_columns(providers: list[str]) -> list[str]:
    return CONFIG_COLUMNS + [f"{p}_{stat}_ms" for p in providers for stat in ("min", "med")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", nargs="+", default=["clip", "siglip"],
                    choices=["clip", "siglip", "clip_m2mix", "robust_step", "m2mix"])
    ap.add_argument("--n", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--d", nargs="+", type=int, default=[512])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: elapsed time; cpu: the process's CPU time (all threads), "
                         "which other processes' load does not inflate; with --threads 1 "
                         "it is the time a dedicated core would take")
    ap.add_argument("--csv", type=Path, default=None,
                    help="append the rows to this CSV (refused when its header differs)")
    return ap.parse_args(argv)


def check_csv(path: Path, providers: list[str]) -> None:
    """Refuse, before measuring, a CSV whose columns are not this run's."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != csv_columns(providers):
        have = [c[:-len("_min_ms")] for c in header if c.endswith("_min_ms")]
        sys.exit(f"cpu_compare.py: {path} holds the columns of the providers {have}, this run "
                 f"measures {providers}: pass --providers {' '.join(have)}, or another --csv")


def print_header(providers: list[str]) -> None:
    head = f"{'loss':<12}{'N':>6}{'D':>5} {'mode':<8}{'load':>6}"
    for p in providers:
        head += f"{p + ' min/med ms':>30}" + (f"{'x floor':>9}" if _has_ratio(p, providers) else "")
    print(head, flush=True)


def print_row(row: dict, providers: list[str]) -> None:
    """Each provider's min / median ms, and its min over the floor's min."""
    line = f"{row['loss']:<12}{row['N']:>6}{row['D']:>5} {row['mode']:<8}{row['load1']:>6}"
    for p in providers:
        line += f"{row[p + '_min_ms']:>19.2f} /{row[p + '_med_ms']:>9.2f}"
        if _has_ratio(p, providers):
            line += f"{row[p + '_min_ms'] / row['floor_min_ms']:>9.2f}"
    print(line, flush=True)


def _has_ratio(provider: str, providers: list[str]) -> bool:
    return provider != "floor" and "floor" in providers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    providers = list(args.providers)
    if args.csv is not None:
        check_csv(args.csv, providers)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Inductor bakes the thread count into its kernels (omp num_threads) but its FX graph
    # cache can hand back a graph compiled under another count, whose kernels then
    # oversubscribe the cores: compile afresh.
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = []
    print_header(providers)
    for loss in args.losses:
        for d in args.d:
            for n in args.n:
                for row in compare(loss, n, d, args.dtype, providers, args.modes, args.rounds,
                                   clock):
                    rows.append(row)
                    print_row(row, providers)
    if args.csv is not None and rows:
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=csv_columns(providers))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
