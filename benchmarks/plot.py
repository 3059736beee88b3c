"""Draw a benchmark results CSV: time and peak memory against N (log-log), one line per provider.

One PNG per (loss, device, dtype, D, mode) (mode: full unless --modes). Where a configuration
was measured more than once, the newest row wins. Rows whose status is not "ok" are left out;
an "oom" is marked with an x at the N where the provider ran out.

It reads two kinds of CSV: the bench_*.py scripts' (harness/results.py: a row per provider,
the median time with its 20th-80th percentile bar) and cpu_compare.py's (a row per loss and
mode, each provider's minimum and median over the interleaved rounds and its peak: the line is
the minimum, as in that script's tables, and the bar reaches up to the median).

  python benchmarks/plot.py                  # the newest benchmarks/results/*.csv, into the
                                             #   folder beside it, <name>_plots/
  python benchmarks/plot.py --csv FILE       # FILE, into <FILE without .csv>_plots/
  python benchmarks/plot.py --tracked        # the tracked results.csv into the tracked plots/
  python benchmarks/plot.py --csv FILE --out DIR --modes forward backward full
  python benchmarks/plot.py --csv compare.csv --out DIR --no-device-in-name
                                             # <loss>_<dtype>_D<d>_<mode>.png (cpu_report.py)

Without --tracked nothing tracked by git is written. Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACKED_CSV = HERE / "results.csv"   # the committed results
TRACKED_PLOTS = HERE / "plots"
RESULTS_DIR = HERE / "results"   # ignored by git
PROVIDER_ORDER = ("reference", "reference+compile", "native", "native-products",
                  "native-separate", "triton", "open_clip", "inf_cl", "floor")
# The floor (the library GEMMs alone, harness/floor.py) is a bound, not a competitor: a dashed
# black line, apart from the providers' colours.
FLOOR_STYLE = dict(color="k", linestyle="--", marker="", label="floor (library GEMMs alone)")


def _float(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def slug(s: str) -> str:
    """A file-name-safe form of a device name ("NVIDIA H200" -> "NVIDIA_H200")."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_")


TIME_LABELS = {"bench": "time per call, ms (median, p20-p80)",
               "compare": "time per call, ms (minimum over rounds; bar up to the median)"}


def read_rows(csv_path: Path) -> tuple[str, list[dict]]:
    """("bench" or "compare", the rows in the bench_*.py columns): a cpu_compare.py row
    becomes one row per provider measured, ms_median its minimum, ms_p20 the minimum and ms_p80
    the median (the bar), its device with the thread count."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "provider" in rows[0]:
        return "bench", rows
    out = []
    for r in rows:
        providers = [c[:-len("_min_ms")] for c in r if c.endswith("_min_ms")]
        device = f"{r.get('device') or 'CPU'}, {r['threads']} threads"
        for p in providers:
            if r[f"{p}_min_ms"] in ("", None):
                continue
            out.append(dict(loss=r["loss"], device=device, dtype=r["dtype"], D=r["D"],
                            mode=r["mode"], N=r["N"], provider=p, status="ok", timestamp="",
                            ms_median=r[f"{p}_min_ms"], ms_p20=r[f"{p}_min_ms"],
                            ms_p80=r[f"{p}_med_ms"], peak_mb=r.get(f"{p}_peak_mb", "")))
    return "compare", out


def load(csv_path: Path, modes: set[str]) -> dict:
    """{(loss, device, dtype, D, mode): {provider: {N: row}}}, the newest row per point."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for row in read_rows(csv_path)[1]:
        if row["mode"] not in modes or row["status"] not in ("ok", "oom"):
            continue
        key = (row["loss"], row["device"], row["dtype"], int(row["D"]), row["mode"])
        n = int(row["N"])
        old = groups[key][row["provider"]].get(n)
        if old is None or row["timestamp"] >= old["timestamp"]:
            groups[key][row["provider"]][n] = row
    return groups


def plot_group(key, providers: dict, out_dir: Path, time_label: str = TIME_LABELS["bench"],
               device_in_name: bool = True) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, device, dtype, d, mode = key
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    drawn = False
    names = sorted(providers, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER
                                             else len(PROVIDER_ORDER), p))
    colours = iter(f"C{i}" for i in range(len(names)))
    for provider in names:
        pts = providers[provider]
        style = (FLOOR_STYLE if provider == "floor"
                 else dict(color=next(colours), marker="o", label=provider))
        color = style["color"]
        ok = sorted((n, r) for n, r in pts.items() if r["status"] == "ok")
        ns = [n for n, _ in ok]
        t = [_float(r["ms_median"]) for _, r in ok]
        lo = [_float(r["ms_p20"]) for _, r in ok]
        hi = [_float(r["ms_p80"]) for _, r in ok]
        if ns and all(v is not None and v > 0 for v in t):
            yerr = [[max(m - (l if l is not None else m), 0) for m, l in zip(t, lo)],
                    [max((h if h is not None else m) - m, 0) for m, h in zip(t, hi)]]
            ax_t.errorbar(ns, t, yerr=yerr, capsize=3, **style)
            drawn = True
        mem = [(n, _float(r["peak_mb"])) for n, r in ok]
        mem = [(n, m) for n, m in mem if m is not None and m > 0]  # log axis: drop <= 0 (noise)
        if mem:
            ax_m.plot([n for n, _ in mem], [m for _, m in mem], **style)
            drawn = True
        ooms = sorted(n for n, r in pts.items() if r["status"] == "oom")
        if ooms:
            for ax in (ax_t, ax_m):
                ax.axvline(ooms[0], color=color, linestyle=":", linewidth=1)
            ax_t.plot([], [], color=color, linestyle=":", label=f"{provider}: OOM at N={ooms[0]}")
    if not drawn:
        plt.close(fig)
        return None
    for ax, ylabel in ((ax_t, time_label), (ax_m, "peak memory, MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (batch size)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{loss} loss, {mode} mode, {dtype}, D={d}\n{device}", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    where = f"{slug(device)}_" if device_in_name else ""
    path = out_dir / f"{loss}_{where}{dtype}_D{d}_{mode}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def newest_results() -> Path | None:
    """The newest CSV under benchmarks/results/ (names sort by their UTC time stamp)."""
    found = sorted(RESULTS_DIR.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_paths(csv_path: Path | None, out: Path | None, tracked: bool) -> tuple[Path, Path]:
    """(CSV to read, folder to write). Only --tracked writes the tracked plots/ folder; the
    tracked CSV read without it is drawn into a new folder under benchmarks/results/."""
    if tracked:
        return TRACKED_CSV, out or TRACKED_PLOTS
    if csv_path is None:
        csv_path = newest_results()
        if csv_path is None:
            sys.exit(f"no results under {RESULTS_DIR}; run a bench_*.py script first, or "
                     "pass --csv FILE or --tracked")
    if out is None:
        if csv_path.resolve() == TRACKED_CSV:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            out = RESULTS_DIR / f"tracked_{stamp}_plots"
        else:
            out = csv_path.with_name(csv_path.stem + "_plots")
    return csv_path, out


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, default=None,
                   help="results to draw (default: the newest benchmarks/results/*.csv)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of the PNGs (default: <csv without .csv>_plots beside it)")
    p.add_argument("--tracked", action="store_true",
                   help="draw the tracked benchmarks/results.csv into the tracked benchmarks/plots/")
    p.add_argument("--modes", nargs="+", default=["full"], choices=["forward", "backward", "full"])
    p.add_argument("--no-device-in-name", dest="device_in_name", action="store_false",
                   help="name the PNGs <loss>_<dtype>_D<d>_<mode>.png (one device per CSV: "
                        "fixed paths that a page can show whatever machine ran)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib")
    csv_path, out = resolve_paths(args.csv, args.out, args.tracked)
    if not csv_path.exists():
        sys.exit(f"no results at {csv_path}; run bench_clip.py / bench_siglip.py first")
    written = []
    label = TIME_LABELS[read_rows(csv_path)[0]]
    for key, providers in sorted(load(csv_path, set(args.modes)).items()):
        path = plot_group(key, providers, out, label, args.device_in_name)
        if path is not None:
            written.append(path)
            print(path)
    if not written:
        print("nothing to plot (no rows with status ok)")
    return written


if __name__ == "__main__":
    main()
