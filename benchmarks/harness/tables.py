"""The console tables of a run: every row with its time over the floor's, then, in full mode,
each provider's time over the floor's and the reference's and its peak memory over the
reference's."""
from __future__ import annotations

import math
import sys


def _ok_rows_of(rows: list[dict], provider: str) -> dict[tuple, dict]:
    """The measured rows of one provider by (loss, mode, dtype, N, D)."""
    return {(r["loss"], r["mode"], r["dtype"], r["N"], r["D"]): r for r in rows
            if r["provider"] == provider and r["status"] == "ok"}


def _ratio(row: dict, base: dict | None, key: str) -> float:
    if row.get("status") != "ok" or base is None or not base[key] > 0:
        return float("nan")
    return row[key] / base[key]


def print_table(rows: list[dict], file=sys.stdout) -> None:
    floors = _ok_rows_of(rows, "floor")
    hdr = f"{'provider':<18} {'mode':<8} {'dtype':<5} {'N':>6} {'D':>5} {'ms_med':>10} " \
          f"{'ms_p20':>10} {'ms_p80':>10} {'peak_MB':>9} {'x_floor':>8}  status  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        def num(v, w, p=1):
            return f"{v:>{w}.{p}f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>{w}}"
        x_floor = _ratio(r, floors.get((r["loss"], r["mode"], r["dtype"], r["N"], r["D"])),
                         "ms_median")
        print(f"{r['provider']:<18} {r['mode']:<8} {r['dtype']:<5} {r['N']:>6} {r['D']:>5} "
              f"{num(r.get('ms_median'), 10, 2)} {num(r.get('ms_p20'), 10, 2)} "
              f"{num(r.get('ms_p80'), 10, 2)} {num(r.get('peak_mb'), 9)} {num(x_floor, 8, 2)}  "
              f"{r['status']:<6}  {r.get('note', '')}", file=file)


def print_ratios(rows: list[dict], file=sys.stdout) -> None:
    """Full mode: each provider's time over the floor's and the reference's, and its peak
    memory over the reference's."""
    floors, refs = _ok_rows_of(rows, "floor"), _ok_rows_of(rows, "reference")
    lines = []
    for r in rows:
        key = (r["loss"], r["mode"], r["dtype"], r["N"], r["D"])
        if r["mode"] != "full" or r["status"] != "ok" or r["provider"] == "floor":
            continue
        floor = floors.get(key)
        ref = refs.get(key) if r["provider"] != "reference" else None
        if floor is None and ref is None:
            continue
        parts = [f"time x{_ratio(r, floor, 'ms_median'):.2f} floor" if floor else "",
                 f"time x{_ratio(r, ref, 'ms_median'):.2f} reference" if ref else "",
                 f"peak x{_ratio(r, ref, 'peak_mb'):.3f} reference" if ref else ""]
        lines.append(f"  {r['provider']:<18} N={r['N']:<6} D={r['D']:<5} {r['dtype']:<5} "
                     + "  ".join(p for p in parts if p))
    if lines:
        print("\nfull mode: time over the floor's (the library GEMMs alone) and the reference's, "
              "peak memory over the reference's:", file=file)
        print("\n".join(lines), file=file)
