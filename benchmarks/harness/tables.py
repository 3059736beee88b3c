"""The console tables of a run: every row, then, in full mode, each provider's time and peak
memory over the reference's."""
from __future__ import annotations

import math
import sys


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
