"""The command line of the bench_*.py scripts: every provider x mode x N x D of one loss, each
(provider, N, D) measured in one go (in a fresh process on CPU), the rows appended to the CSV as
they come, then the console tables and the plots."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import results
from harness.environment import device_name, utc_iso, versions
from harness.isolation import run_config_isolated
from harness.losses import DTYPES, NAMES
from harness.measure import measure_config
from harness.memory import cpu_peak_supported
from harness.providers import PROVIDERS, has_loss, skip_reason
from harness.tables import print_ratios, print_table
from harness.timing import MODES, QUICK_TIMING, TIMING

GPU_DEFAULTS = dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536], d=[512, 768, 1024],
                    dtype="bf16", providers=list(PROVIDERS))
# triton and inf_cl in the CPU list: rows "skipped", with why.
CPU_DEFAULTS = dict(n=[1024, 2048, 4096, 8192], d=[512], dtype="fp32",
                    providers=["reference", "reference+compile", "native", "native-products",
                               "native-separate", "open_clip", "triton", "inf_cl", "floor"])
QUICK = dict(cuda=dict(n=[1024, 4096], d=[512]), cpu=dict(n=[256, 1024], d=[512]))


def _default_for(loss: str, provider: str) -> bool:
    """Whether a provider is in this loss's default list: every one that computes the loss,
    and inf_cl for SigLIP, whose skipped rows say that Inf-CL has none."""
    return has_loss(loss, provider) or (provider, loss) == ("inf_cl", "siglip")


def build_parser(loss: str) -> argparse.ArgumentParser:
    epilog = (f"defaults on a GPU: --n {' '.join(map(str, GPU_DEFAULTS['n']))} "
              f"--d {' '.join(map(str, GPU_DEFAULTS['d']))} --dtype {GPU_DEFAULTS['dtype']} "
              f"--providers {' '.join(GPU_DEFAULTS['providers'])}\n"
              f"defaults on CPU:   --n {' '.join(map(str, CPU_DEFAULTS['n']))} "
              f"--d {' '.join(map(str, CPU_DEFAULTS['d']))} --dtype {CPU_DEFAULTS['dtype']} "
              f"--providers {' '.join(CPU_DEFAULTS['providers'])}\n"
              "Providers that cannot run here (triton and inf_cl on CPU, inf_cl when not "
              "installed or for SigLIP) get rows with status 'skipped' and the reason.\n"
              "floor: the library GEMMs an exact evaluation needs and nothing else; the tables "
              "show every provider's time over it (benchmarks/README.md).")
    p = argparse.ArgumentParser(
        description=f"Benchmark the {NAMES[loss]} loss providers; rows go to a new CSV under "
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


@dataclass
class Sweep:
    """What one run measures, where, how, and where its rows go."""
    loss: str
    device: torch.device
    ns: list[int]
    ds: list[int]
    dtype_name: str
    providers: list[str]
    modes: list[str]
    timing: dict
    isolate: bool
    seed: int
    threads: int | None
    env: dict
    csv_path: Path


def sweep_from_args(loss: str, args: argparse.Namespace) -> Sweep:
    """The flags, with the device's defaults for what they leave out."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kind = "cuda" if device.type == "cuda" else "cpu"
    defaults = GPU_DEFAULTS if kind == "cuda" else CPU_DEFAULTS
    timing = dict((QUICK_TIMING if args.quick else TIMING)[kind])
    for key, val in (("warmup", args.warmup), ("min_reps", args.min_reps),
                     ("max_reps", args.max_reps), ("budget_s", args.budget)):
        if val is not None:
            timing[key] = val
    env = dict(device=device_name(device), **versions())
    return Sweep(loss=loss, device=device,
                 ns=args.n or (QUICK[kind]["n"] if args.quick else defaults["n"]),
                 ds=args.d or (QUICK[kind]["d"] if args.quick else defaults["d"]),
                 dtype_name=args.dtype or defaults["dtype"],
                 providers=args.providers or [p for p in defaults["providers"]
                                              if _default_for(loss, p)],
                 modes=args.modes, timing=timing,
                 isolate=(kind == "cpu") if args.isolate is None else args.isolate,
                 seed=args.seed, threads=args.threads, env=env,
                 csv_path=results.output_csv(args.append, args.csv, env["device"], loss))


def config_rows(sweep: Sweep, provider: str, n: int, d: int, oom_at: dict) -> list[dict]:
    """The rows of one (provider, N, D), a row per mode: measured, or skipped with why.
    oom_at[(provider, mode)] is the smallest N that ran out of memory, updated here."""
    base = dict(sweep.env, loss=sweep.loss, provider=provider, dtype=sweep.dtype_name, N=n, D=d)
    reason = skip_reason(sweep.loss, provider, sweep.device, DTYPES[sweep.dtype_name], d)
    modes = [m for m in sweep.modes if (provider, m) not in oom_at]
    rows = [dict(base, mode=m, status="skipped",
                 note=f"not run: out of memory at N={oom_at[(provider, m)]}")
            for m in sweep.modes if (provider, m) in oom_at]
    if reason is not None:
        rows += [dict(base, mode=m, status="skipped", note=reason) for m in modes]
    elif modes:
        spec = dict(loss=sweep.loss, provider=provider, n=n, d=d, dtype=sweep.dtype_name,
                    device=str(sweep.device), modes=modes, timing=sweep.timing, seed=sweep.seed,
                    threads=sweep.threads)
        t0 = time.perf_counter()
        measured = run_config_isolated(spec) if sweep.isolate else measure_config(spec)
        for r in measured:
            if r["status"] == "oom":
                oom_at[(provider, r["mode"])] = n
            rows.append(dict(base, **r))
        print(f"  [{provider} N={n} D={d}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr,
              flush=True)
    order = {m: i for i, m in enumerate(sweep.modes)}
    rows.sort(key=lambda r: order[r["mode"]])
    stamp = utc_iso()
    for r in rows:
        r["timestamp"] = stamp
    return rows


def run_sweep(sweep: Sweep) -> list[dict]:
    """Every (D, N, provider) in that order, each one's rows appended to the CSV as it ends."""
    all_rows: list[dict] = []
    for d in sweep.ds:
        oom_at: dict[tuple[str, str], int] = {}
        for n in sweep.ns:
            for provider in sweep.providers:
                rows = config_rows(sweep, provider, n, d, oom_at)
                results.append_rows(sweep.csv_path, rows)
                all_rows += rows
    return all_rows


def main(loss: str, argv: list[str] | None = None) -> list[dict]:
    args = build_parser(loss).parse_args(argv)
    sweep = sweep_from_args(loss, args)
    if sweep.device.type == "cpu" and not sweep.isolate:
        print("note: --no-isolate on CPU: peak RSS growth is still measured but can be hidden by "
              "memory the process kept from earlier configurations", file=sys.stderr)
    env = sweep.env
    print(f"{loss}: device={env['device']} torch={env['torch']} triton={env['triton']} "
          f"robustft_ext={env['robustft_ext']} dtype={sweep.dtype_name} N={sweep.ns} "
          f"D={sweep.ds} providers={sweep.providers} modes={sweep.modes} "
          f"isolate={sweep.isolate} timing={sweep.timing}")
    if sweep.device.type == "cpu":
        why = cpu_peak_supported()
        print("CPU peak memory: " + ("VmHWM reset via /proc/self/clear_refs" if why is None else why))
    all_rows = run_sweep(sweep)
    print()
    print_table(all_rows)
    print_ratios(all_rows)
    print(f"\nappended {len(all_rows)} rows to {sweep.csv_path}")
    if args.append:
        print("the tracked plots are redrawn by: python benchmarks/plot.py --tracked")
    elif args.plots and all_rows:
        results.draw_plots(sweep.csv_path)
    return all_rows
