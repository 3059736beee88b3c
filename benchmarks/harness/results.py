"""The results of a run: the CSV columns, which file a run's rows go to, appending them, and the
plots drawn from the file.

The checkout stays clean unless asked: by default each run writes a new CSV,
benchmarks/results/<device>_<UTC time>_<loss>.csv (the folder is ignored by git), and draws its
plots into the folder beside it, <same name>_plots/. --append adds the rows to the tracked
benchmarks/results.csv instead (then redraw the tracked plots with `plot.py --tracked`);
--csv PATH appends to any other file. Rows are appended (a header only when the file is new).
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

# plot.py needs only the standard library at import. TRACKED_CSV: the committed results
# (written only with --append); RESULTS_DIR: ignored by git, the default home of each run's CSV.
from plot import RESULTS_DIR, TRACKED_CSV, slug

from harness.environment import utc_stamp

CSV_COLUMNS = ["timestamp", "device", "torch", "triton", "robustft_ext", "loss", "provider",
               "mode", "dtype", "N", "D", "ms_median", "ms_p20", "ms_p80", "peak_mb",
               "status", "note"]


def output_csv(append: bool, csv_path: Path | None, device: str, loss: str) -> Path:
    """The tracked results.csv (--append), the file asked for (--csv), or a new one."""
    if append:
        return TRACKED_CSV
    if csv_path is not None:
        return csv_path
    return RESULTS_DIR / f"{slug(device)}_{utc_stamp()}_{loss}.csv"


def plots_dir_for(csv_path: Path) -> Path:
    """The plot folder of a results file: <its folder>/<its name without .csv>_plots."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + "_plots")


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
