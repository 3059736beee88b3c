"""The CPU targets table: fused CLIP, CLIP + m^2 and the robust step, each step design's time as
a ratio over fused CLIP and over its floor, beside the targets, and whether it is faster than the
reference and than reference + torch.compile.

The targets (docs/benchmarks.md, "The CPU targets"; fp32, forward + backward, D = 512, 2 threads,
N = 1024 ... 8192, one run): CLIP + m^2 (m2 weight 0.01) at most 2.2x fused CLIP, the whole
step at most 2.4x, fused CLIP within 1.15x of its floor; each faster than the reference and
than reference + torch.compile at every N. They are printed beside the measured ratios, never
asserted: the timings belong to the machine and its load.

Input: cpu_compare.py's rows (one per loss, N, D, mode; each provider's `<p>_min_ms`,
`<p>_med_ms`, `<p>_peak_mb`), as dicts of numbers or as read back from its CSV (strings; an
empty cell: not measured). Every ratio is minimum over minimum, within one run.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

# loss: (what its time is divided by for its target, the largest ratio allowed)
TARGETS = {"clip": ("floor", 1.15), "clip_m2mix": ("clip", 2.2), "robust_step": ("clip", 2.4)}
TARGET_NS = (1024, 2048, 4096, 8192)
# The native backend's providers per step design: the new one first.
DESIGNS = {"native": "gram", "native-products": "products"}
BASELINES = ("reference", "reference+compile")
LOSS_NAMES = {"clip": "fused CLIP", "clip_m2mix": "CLIP + 0.01 m^2",
              "robust_step": "RobustFTLoss step"}

COLUMNS = ["loss", "N", "D", "dtype", "threads", "provider", "design", "ms_min", "ms_med",
           "clip_ms", "x_clip", "floor_ms", "x_floor", "target", "target_met", "reference_ms",
           "compile_ms", "faster_than_reference", "faster_than_compile", "load1"]


def num(row: dict | None, key: str) -> float | None:
    """A measured value of a row (a number or a CSV cell), None when absent or not finite."""
    if row is None:
        return None
    value = row.get(key)
    if value is None or value == "":
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _faster(ms: float | None, other: float | None) -> str:
    return "" if ms is None or other is None else ("yes" if ms < other else "no")


def target_rows(rows: list[dict], ns: tuple[int, ...] | None = TARGET_NS) -> list[dict]:
    """One row per (loss of TARGETS, N, D, dtype, threads, native provider) measured in full mode,
    N restricted to `ns` (None: every N), ordered by loss, then N, then design."""
    full = {}
    for r in rows:
        if r["mode"] == "full":
            full[(r["loss"], int(r["N"]), int(r["D"]), r["dtype"], int(r["threads"]))] = r
    out = []
    order = list(TARGETS)
    for key in sorted(full, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1:])):
        loss, n, d, dtype, threads = key
        if loss not in TARGETS or (ns is not None and n not in ns):
            continue
        r = full[key]
        clip_ms = num(full.get(("clip", n, d, dtype, threads)), "native_min_ms")
        floor_ms = num(r, "floor_min_ms")
        ref_ms, compile_ms = num(r, "reference_min_ms"), num(r, "reference+compile_min_ms")
        base, limit = TARGETS[loss]
        for provider, design in DESIGNS.items():
            ms = num(r, f"{provider}_min_ms")
            if ms is None:
                continue
            x_clip, x_floor = ratio(ms, clip_ms), ratio(ms, floor_ms)
            measured = x_floor if base == "floor" else x_clip
            out.append(dict(
                loss=loss, N=n, D=d, dtype=dtype, threads=threads, provider=provider,
                design=design if loss != "clip" else "", ms_min=ms,
                ms_med=num(r, f"{provider}_med_ms"), clip_ms=clip_ms, x_clip=x_clip,
                floor_ms=floor_ms, x_floor=x_floor, target=f"x_{base} <= {limit}",
                target_met="" if measured is None else ("yes" if measured <= limit else "no"),
                reference_ms=ref_ms, compile_ms=compile_ms,
                faster_than_reference=_faster(ms, ref_ms),
                faster_than_compile=_faster(ms, compile_ms), load1=num(r, "load1")))
    return out


def write_csv(trows: list[dict], path: Path) -> None:
    """The table's rows, numbers to 4 significant figures (a new file each time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for t in trows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v))
                        for k, v in t.items()})


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pair(a: str, b: str) -> str:
    return f"{a or '-'} / {b or '-'}"


def format_tables(trows: list[dict]) -> str:
    """The tables in Markdown: fused CLIP against its floor, then CLIP + m^2 and the step with
    the two designs side by side, then whether each held at every N."""
    lines = []
    clip = [t for t in trows if t["loss"] == "clip"]
    if clip:
        lines += ["Fused CLIP (native) against its floor (target: x floor <= 1.15):", "",
                  "| N | native ms | floor ms | x floor | target met | reference ms | "
                  "ref + compile ms | faster than reference / ref + compile |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t in clip:
            lines.append(f"| {t['N']} | {fmt_ms(t['ms_min'])} | {fmt_ms(t['floor_ms'])} | "
                         f"{fmt_x(t['x_floor'])} | {t['target_met'] or '-'} | "
                         f"{fmt_ms(t['reference_ms'])} | {fmt_ms(t['compile_ms'])} | "
                         f"{_pair(t['faster_than_reference'], t['faster_than_compile'])} |")
        lines.append("")
    steps = {}
    for t in trows:
        if t["loss"] != "clip":
            steps.setdefault((t["loss"], t["N"], t["D"], t["dtype"], t["threads"]), {})[
                t["provider"]] = t
    if steps:
        lines += ["CLIP + m^2 and the whole step, new (gram) and old (products) design side by "
                  "side (targets: x CLIP <= 2.2 and <= 2.4):", "",
                  "| loss | N | gram ms | products ms | gram x CLIP | products x CLIP | target "
                  "| met: gram / products | gram x floor | products x floor | reference ms | "
                  "ref + compile ms | gram faster than ref / compile | products faster than "
                  "ref / compile |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                  "| --- |"]
        for (loss, n, _d, _dt, _th), by in steps.items():
            g, p = by.get("native", {}), by.get("native-products", {})
            any_row = g or p
            limit = TARGETS[loss][1]
            lines.append(
                f"| {LOSS_NAMES[loss]} | {n} | {fmt_ms(g.get('ms_min'))} | "
                f"{fmt_ms(p.get('ms_min'))} | "
                f"{fmt_x(g.get('x_clip'))} | {fmt_x(p.get('x_clip'))} | <= {limit} | "
                f"{_pair(g.get('target_met', ''), p.get('target_met', ''))} | "
                f"{fmt_x(g.get('x_floor'))} | {fmt_x(p.get('x_floor'))} | "
                f"{fmt_ms(any_row.get('reference_ms'))} | {fmt_ms(any_row.get('compile_ms'))} | "
                f"{_pair(g.get('faster_than_reference', ''), g.get('faster_than_compile', ''))} | "
                f"{_pair(p.get('faster_than_reference', ''), p.get('faster_than_compile', ''))} |")
        lines.append("")
    summary = summarise(trows)
    if summary:
        lines += ["At every N of the tables:", ""] + [f"- {s}" for s in summary]
    return "\n".join(lines).rstrip() + "\n"


def summarise(trows: list[dict]) -> list[str]:
    """Per (loss, provider): at how many of its N the target held and it was faster than each
    baseline."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for t in trows:
        groups.setdefault((t["loss"], t["provider"]), []).append(t)
    out = []
    for (loss, provider), ts in groups.items():
        ns = ", ".join(str(t["N"]) for t in ts)
        label = (f"{LOSS_NAMES[loss]}, {provider}"
                 + (f" ({DESIGNS[provider]})" if loss != "clip" else ""))
        parts = []
        for key, what in (("target_met", f"target ({ts[0]['target']})"),
                          ("faster_than_reference", "faster than reference"),
                          ("faster_than_compile", "faster than reference + compile")):
            known = [t[key] for t in ts if t[key]]
            if known:
                yes = sum(v == "yes" for v in known)
                parts.append(f"{what}: {'yes' if yes == len(known) else 'no'} "
                             f"({yes} of {len(known)})")
        if parts:
            out.append(f"{label}, N = {ns}: " + "; ".join(parts))
    return out
