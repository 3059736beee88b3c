"""Interleaved CPU timing of the native backend (both step designs) against reference,
reference+compile and the floor.

On a shared machine the time of one provider drifts with the load of the others, so the
loss benchmarks' one-provider-after-another medians can rank providers by the load they
happened to meet. This script times the providers of one (loss, N, D) in one process,
round-robin: every round calls each provider once per mode, in a rotating order (every
loss of one N and D in the same rounds, so that CLIP + m^2 over fused CLIP is a ratio of
times that met the same load), and the
reported figure is each provider's minimum over the rounds (the run least disturbed by
other processes), with the median beside it and the minimum over the floor's minimum (the
floor: the library GEMMs an exact evaluation needs, harness/floor.py). The load average is
printed per configuration. The losses, inputs and providers are harness/'s (make_loss_fn,
make_inputs), so the numbers compare with bench_*.py.

The providers: native (the C++ backend; CLIP + m^2 and the step under the "gram" step
design), native-products (the same under the old "products" design: m2mix, clip_m2mix and
robust_step only, its cells are empty for the other losses), reference, reference+compile,
floor. Each pins its own step design per call (harness/providers.py), so the two designs take
turns in the same process and the same rounds.

  python benchmarks/cpu_compare.py --threads 2 --n 256 1024 --d 512 --losses clip siglip
  python benchmarks/cpu_compare.py --losses clip clip_m2mix robust_step --modes full --rounds 5 \
      --targets-csv targets.csv      # the targets table (harness/targets.py) as a CSV too
  python benchmarks/cpu_compare.py --threads 1 --clock cpu     # a loaded machine

Under heavy load even the minimum wall time of a multi-threaded run is disturbed (a
parallel region waits for its slowest thread, which another process may hold off the
CPU); with --threads 1 --clock cpu the process CPU time is what one dedicated core would
take, whatever the load.

Prints one row per (loss, N, D, mode) and, with --csv, appends them to a CSV file (its
columns: the configuration, then each provider's min and median ms and its peak memory in MB;
a file whose header differs is refused). The peak is the resident-set growth during a call
(harness/memory.py), largest over the rounds, in this one process: run with the fixed glibc
mmap threshold of harness/isolation.py's WORKER_ENV (cpu_report.py does), or freed buffers
that glibc keeps hide part of it. When the run has fused CLIP and CLIP + m^2 or the step in
full mode it ends with the targets table (harness/targets.py): each design's time over fused
CLIP and over the floor beside the targets, and whether it beats reference and
reference+compile, at the N of --table-n.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import targets  # noqa: E402
from harness.environment import cpu_model  # noqa: E402
from harness.losses import DTYPES, make_inputs  # noqa: E402
from harness.memory import MemProbe  # noqa: E402
from harness.providers import has_loss, make_loss_fn  # noqa: E402

PROVIDERS = ("native", "native-products", "reference", "reference+compile", "floor")
MODES = ("forward", "full")
MAX_WARMUP = 8


def _once(fn, inputs, mode: str, clock=time.perf_counter, probe: MemProbe | None = None
          ) -> tuple[float, float]:
    """(seconds of one call by `clock`, peak bytes above the call's start or NaN): a
    grad-enabled forward, or forward + backward."""
    leaves = [t for t in inputs if t is not None]
    for t in leaves:
        t.grad = None
    if probe is not None:
        probe.begin()
        probe.mark()
    t0 = clock()
    out = fn(*inputs)
    if mode == "full":
        out.backward()
    elapsed = clock() - t0
    peak = probe.peak_bytes() if probe is not None else float("nan")
    del out
    for t in leaves:
        t.grad = None
    return elapsed, peak


def compare(losses: list[str], n: int, d: int, dtype: str, providers: list[str],
            modes: list[str], rounds: int, clock=time.perf_counter) -> list[dict]:
    """Each (loss, provider)'s min and median ms and its largest peak MB per mode over `rounds`
    interleaved rounds, every loss of one (N, D) in the same rounds (so that a ratio between
    losses, CLIP + m^2 over fused CLIP, meets the same load); None for a provider without the
    loss (has_loss). A row per (loss, mode)."""
    inputs = {loss: make_inputs(loss, n, d, DTYPES[dtype], torch.device("cpu")) for loss in losses}
    pairs = [(loss, p) for loss in losses for p in providers if has_loss(loss, p)]
    # One reset for the whole group: every compiled provider of it stays compiled for the
    # rounds (a reset per provider would drop the graphs of those made before it).
    torch._dynamo.reset()
    fns = {}
    for loss, p in pairs:
        fns[(loss, p)] = fn = make_loss_fn(loss, p, d, fresh_compile=False)
        # Warm-up of the modes measured (a full call compiles both graphs): first-touches
        # the buffers; then more calls until one is within 25% of the fastest so far (at
        # most MAX_WARMUP).
        for mode in [m for m in ("full", "forward") if m in modes]:
            seen = [_once(fn, inputs[loss], mode, clock)[0] for _ in range(2)]
            while seen[-1] > 1.25 * min(seen[:-1]) and len(seen) < MAX_WARMUP:
                seen.append(_once(fn, inputs[loss], mode, clock)[0])
    probe = MemProbe(torch.device("cpu"))
    times = {(pair, m): [] for pair in pairs for m in modes}
    peaks = {(pair, m): [] for pair in pairs for m in modes}
    for r in range(rounds):
        k = r % len(pairs) if pairs else 0
        for pair in pairs[k:] + pairs[:k]:
            for m in modes:
                elapsed, peak = _once(fns[pair], inputs[pair[0]], m, clock, probe)
                times[(pair, m)].append(elapsed * 1e3)
                peaks[(pair, m)].append(peak)
    load = os.getloadavg()[0]
    rows = []
    for loss in losses:
        for m in modes:
            row = dict(loss=loss, N=n, D=d, dtype=dtype, mode=m, threads=torch.get_num_threads(),
                       clock="wall" if clock is time.perf_counter else "cpu",
                       rounds=rounds, load1=round(load, 1), device=cpu_model())
            for p in providers:
                ts = sorted(times.get(((loss, p), m), []))
                peak = max(peaks.get(((loss, p), m), []), default=float("nan"))
                row[f"{p}_min_ms"] = round(ts[0], 3) if ts else None
                row[f"{p}_med_ms"] = round(ts[len(ts) // 2], 3) if ts else None
                row[f"{p}_peak_mb"] = round(peak / 2**20, 1) if math.isfinite(peak) else None
            rows.append(row)
    return rows


CONFIG_COLUMNS = ["loss", "N", "D", "dtype", "mode", "threads", "clock", "rounds", "load1",
                  "device"]
STATS = ("min_ms", "med_ms", "peak_mb")


def csv_columns(providers: list[str]) -> list[str]:
    return CONFIG_COLUMNS + [f"{p}_{stat}" for p in providers for stat in STATS]


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
    ap.add_argument("--targets-csv", type=Path, default=None,
                    help="write the targets table's rows to this CSV (a new file)")
    ap.add_argument("--table-n", nargs="+", type=int, default=list(targets.TARGET_NS),
                    help="the N of the targets table (default: the targets' "
                         f"{' '.join(map(str, targets.TARGET_NS))}); the other N are in the "
                         "rows and the CSV only")
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


def append_csv(path: Path, rows: list[dict], providers: list[str]) -> None:
    """Append rows (a header first when the file is new); an absent value is an empty cell."""
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_columns(providers))
        if new:
            w.writeheader()
        w.writerows(rows)


def print_header(providers: list[str]) -> None:
    head = f"{'loss':<12}{'N':>6}{'D':>5} {'mode':<8}{'load':>6}"
    for p in providers:
        head += f"{p + ' min/med ms':>30}" + (f"{'x floor':>9}" if _has_ratio(p, providers) else "")
    print(head, flush=True)


def print_row(row: dict, providers: list[str]) -> None:
    """Each provider's min / median ms, and its min over the floor's min."""
    line = f"{row['loss']:<12}{row['N']:>6}{row['D']:>5} {row['mode']:<8}{row['load1']:>6}"
    for p in providers:
        lo, med = row[p + "_min_ms"], row[p + "_med_ms"]
        line += (f"{lo:>19.2f} /{med:>9.2f}" if lo is not None else f"{'-':>30}")
        if _has_ratio(p, providers):
            ratio = targets.ratio(lo, row["floor_min_ms"])
            line += f"{ratio:>9.2f}" if ratio is not None else f"{'-':>9}"
    print(line, flush=True)


def _has_ratio(provider: str, providers: list[str]) -> bool:
    return provider != "floor" and "floor" in providers


def main(argv: list[str] | None = None) -> list[dict]:
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
    for d in args.d:
        for n in args.n:
            t0 = time.perf_counter()
            got = compare(args.losses, n, d, args.dtype, providers, args.modes, args.rounds,
                          clock)
            for row in got:
                print_row(row, providers)
            print(f"[N={n} D={d}: {time.perf_counter() - t0:.0f} s, warm-up and compilation "
                  "included]", file=sys.stderr, flush=True)
            if args.csv is not None:
                append_csv(args.csv, got, providers)
            rows += got
    trows = targets.target_rows(rows, tuple(args.table_n))
    if trows:
        print("\n" + targets.format_tables(trows), end="", flush=True)
    if args.targets_csv is not None:
        targets.write_csv(trows, args.targets_csv)
    return rows


if __name__ == "__main__":
    main()
