"""The summary of a gpu_check.sh run: summary.md and plots.png in the run's folder.

Reads the folder's status.tsv (one line per stage), results.csv (the benchmark rows, the
harness's columns), ceiling.json (gpu_ceiling.py) and env.txt. summary.md holds, in order:
the stages and their outcomes; the measured ceiling; the key numbers (full mode, the largest
N measured at the main D); then, per loss and mode, a table of every measured provider and
size: time (median, p20-p80), peak memory, achieved TFLOP/s, percent of the ceiling, the time
relative to CLIP alone (same provider, size and mode), the speed-ups over open_clip and Inf-CL
(their time over this one), and the loss value against the reference's; then every row not
measured, with why. The part above the DETAILS marker is what gpu_check.sh prints at the end.
`--tests FILE` prints the tests stage's one-line outcome, then every failing test, from the
file benchmarks/gpu_pytest_log.py writes (complete, or cut off where a kill stopped it), and
exits with tests_report's status.

Work counts (the TFLOP/s columns): the matrix products of the fused CLIP loss,
forward 2 N^2 D (the logits), backward 6 N^2 D (the logits recomputed, then the two gradient
products), full 8 N^2 D. SigLIP's own work is the same (one N x N logit matrix). For CLIP + m^2
and the RobustFTLoss step the rate is CLIP-equivalent: the same counts, so it understates their
own arithmetic and their "x CLIP" column is the cost over CLIP alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

LOSS_NAMES = {"clip": "CLIP", "siglip": "SigLIP", "clip_m2mix": "CLIP + m^2 (one fused pass)",
              "robust_step": "RobustFTLoss step (CLIP + m^2 + Lipsum-FT + DiVE)",
              "m2mix": "m^2-mix alone"}
LOSS_ORDER = ("clip", "siglip", "clip_m2mix", "robust_step", "m2mix")
PROVIDER_ORDER = ("native", "triton", "open_clip", "inf_cl", "reference", "reference+compile",
                  "native-separate")
MODES = ("full", "forward", "backward")
WORK = {"forward": 2, "backward": 6, "full": 8}   # x N^2 D floating-point operations
FUSED = ("native", "triton")
# Losses whose value moves from call to call (RobustFTLoss's DiVE centre is a running
# average), so that loss values of runs with different call counts do not compare.
STATEFUL = ("robust_step",)
DETAILS = "<!-- DETAILS: gpu_check.sh prints the part above this line -->"


def work_flop(mode: str, n: int, d: int) -> float:
    return WORK[mode] * float(n) * n * d


def work_text(loss: str, mode: str) -> str:
    w = f"{WORK[mode]} N^2 D"
    if loss == "clip":
        return f"work {w}, the fused CLIP {mode} count"
    if loss == "siglip":
        return f"work {w}, the same as CLIP's (one N x N logit matrix)"
    return (f"TFLOP/s are CLIP-equivalent ({w}, CLIP alone's {mode} count); this loss does "
            "more, so read 'x CLIP' for its cost over CLIP alone")


def _f(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _loss_value(note: str) -> float | None:
    m = re.search(r"loss=([-+0-9.eEinfa]+)", note or "")
    return _f(m.group(1)) if m else None


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["N"], r["D"] = int(r["N"]), int(r["D"])
        for k in ("ms_median", "ms_p20", "ms_p80", "peak_mb"):
            r[k] = _f(r.get(k))
    return rows


def load_status(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def fmt(v: float | None, spec: str = ".3g", none: str = "-") -> str:
    return none if v is None else format(v, spec)


class Index:
    """Measured (status ok) rows by (loss, provider, N, D, mode)."""

    def __init__(self, rows: list[dict]):
        self.ok = {(r["loss"], r["provider"], r["N"], r["D"], r["mode"]): r
                   for r in rows if r["status"] == "ok" and r["ms_median"]}

    def ms(self, loss, provider, n, d, mode) -> float | None:
        r = self.ok.get((loss, provider, n, d, mode))
        return r["ms_median"] if r else None

    def loss_value(self, loss, provider, n, d) -> float | None:
        for mode in MODES:
            r = self.ok.get((loss, provider, n, d, mode))
            if r is not None:
                v = _loss_value(r.get("note", ""))
                if v is not None:
                    return v
        return None


def row_metrics(r: dict, idx: Index, ceiling: float | None) -> dict:
    loss, prov, n, d, mode, ms = r["loss"], r["provider"], r["N"], r["D"], r["mode"], r["ms_median"]
    out = {}
    out["tflops"] = work_flop(mode, n, d) / (ms * 1e-3) / 1e12 if ms else None
    out["pct"] = 100 * out["tflops"] / ceiling if out["tflops"] and ceiling else None
    clip_ms = idx.ms("clip", prov, n, d, mode) if loss != "clip" else None
    out["x_clip"] = ms / clip_ms if ms and clip_ms else None
    oc = idx.ms(loss, "open_clip", n, d, mode)
    out["vs_open_clip"] = oc / ms if oc and ms else None
    ic = idx.ms(loss, "inf_cl", n, d, mode)
    out["vs_inf_cl"] = ic / ms if ic and ms else None
    mine, ref = idx.loss_value(loss, prov, n, d), idx.loss_value(loss, "reference", n, d)
    out["vs_ref"] = (abs(mine - ref) / max(abs(ref), 1e-12) if mine is not None and
                     ref is not None and prov != "reference" and loss not in STATEFUL else None)
    return out


def _order(r: dict) -> tuple:
    p = r["provider"]
    return (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99, p, r["N"], r["D"])


def stage_table(status: list[dict]) -> list[str]:
    lines = ["| stage | status | seconds | cap (s) | detail |", "| --- | --- | --- | --- | --- |"]
    for s in status:
        detail = (s.get("detail") or "").replace("|", "/")
        lines.append(f"| {s['stage']} | {s['status'].replace('|', '/')} | {s['seconds']} | "
                     f"{s['cap_s']} | {detail} |")
    return lines


def key_numbers(rows: list[dict], idx: Index, ceiling: float | None) -> list[str]:
    """Per loss, full mode, the largest N measured by a fused provider at the main D."""
    lines = ["| loss | N | D | fused provider | ms | TFLOP/s | % ceiling | x CLIP | "
             "open_clip / fused | Inf-CL / fused | peak MB (fused / open_clip) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ds = [r["D"] for r in rows]
    main_d = max(set(ds), key=ds.count) if ds else None
    for loss in LOSS_ORDER:
        fused = [r for k, r in idx.ok.items()
                 if k[0] == loss and k[1] in FUSED and k[3] == main_d and k[4] == "full"]
        if not fused:
            continue
        n = max(r["N"] for r in fused)
        best = min((r for r in fused if r["N"] == n), key=lambda r: r["ms_median"])
        m = row_metrics(best, idx, ceiling)
        oc = idx.ok.get((loss, "open_clip", n, main_d, "full"))
        peak = f"{fmt(best['peak_mb'], '.4g')} / {fmt(oc['peak_mb'], '.4g') if oc else '-'}"
        lines.append(f"| {LOSS_NAMES.get(loss, loss)} | {n} | {main_d} | {best['provider']} | "
                     f"{fmt(best['ms_median'])} | {fmt(m['tflops'])} | {fmt(m['pct'], '.1f')} | "
                     f"{fmt(m['x_clip'], '.2f')} | {fmt(m['vs_open_clip'], '.2f')} | "
                     f"{fmt(m['vs_inf_cl'], '.2f')} | {peak} |")
    return lines if len(lines) > 2 else ["(no fused provider measured)"]


def loss_tables(rows: list[dict], idx: Index, ceiling: float | None) -> list[str]:
    out = []
    measured = [r for r in rows if r["status"] in ("ok", "oom", "nonfinite")]
    for loss in sorted({r["loss"] for r in measured},
                       key=lambda x: LOSS_ORDER.index(x) if x in LOSS_ORDER else 99):
        for mode in MODES:
            sel = sorted((r for r in measured if r["loss"] == loss and r["mode"] == mode),
                         key=_order)
            if not sel:
                continue
            out += ["", f"### {LOSS_NAMES.get(loss, loss)}: {mode} ({work_text(loss, mode)})", "",
                    "| provider | N | D | ms (p20-p80) | peak MB | TFLOP/s | % ceiling | x CLIP | "
                    "open_clip / this | Inf-CL / this | loss vs reference | status |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in sel:
                m = row_metrics(r, idx, ceiling) if r["status"] == "ok" else {}
                t = (f"{fmt(r['ms_median'])} ({fmt(r['ms_p20'])}-{fmt(r['ms_p80'])})"
                     if r["ms_median"] else "-")
                out.append(f"| {r['provider']} | {r['N']} | {r['D']} | {t} | "
                           f"{fmt(r['peak_mb'], '.4g')} | {fmt(m.get('tflops'))} | "
                           f"{fmt(m.get('pct'), '.1f')} | {fmt(m.get('x_clip'), '.2f')} | "
                           f"{fmt(m.get('vs_open_clip'), '.2f')} | "
                           f"{fmt(m.get('vs_inf_cl'), '.2f')} | {fmt(m.get('vs_ref'), '.1e')} | "
                           f"{r['status']} |")
    return out


def not_measured(rows: list[dict]) -> list[str]:
    """Rows without a measurement, one line per (loss, provider, N, D, status, note)."""
    groups: dict = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            groups[(r["loss"], r["provider"], r["N"], r["D"], r["status"], r.get("note", ""))].append(
                r["mode"])
    lines = []
    for (loss, prov, n, d, status, note), modes in sorted(groups.items(), key=lambda kv: (
            LOSS_ORDER.index(kv[0][0]) if kv[0][0] in LOSS_ORDER else 99, kv[0][2], kv[0][1])):
        lines.append(f"- {loss} {prov} N={n} D={d} ({', '.join(modes)}): **{status}**"
                     + (f": {note.replace('|', '/')}" if note else ""))
    return lines


def plot(rows: list[dict], idx: Index, ceiling: float | None, path: Path, title: str) -> bool:
    """One PNG: per loss, full mode at the main D: time, peak memory and TFLOP/s against N;
    a last row, CLIP full mode against D at the D-sweep's N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "full"]
    if not ok:
        return False
    ds = [r["D"] for r in ok]
    main_d = max(set(ds), key=ds.count)
    losses = [x for x in LOSS_ORDER if any(r["loss"] == x for r in ok)]
    sweep = [r for r in ok if r["loss"] == "clip"]
    sweep_n = [n for n in {r["N"] for r in sweep} if len({r["D"] for r in sweep if r["N"] == n}) > 1]
    nrows = len(losses) + (1 if sweep_n else 0)
    fig, axes = plt.subplots(nrows, 3, figsize=(15, 3.6 * nrows), squeeze=False)
    for i, loss in enumerate(losses):
        ax_t, ax_m, ax_f = axes[i]
        sel = [r for r in ok if r["loss"] == loss and r["D"] == main_d]
        for j, prov in enumerate(sorted({r["provider"] for r in sel}, key=lambda p: _order(
                {"provider": p, "D": 0, "N": 0}))):
            pts = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["N"])
            ns = [r["N"] for r in pts]
            kw = dict(marker="o", color=f"C{j}", label=prov)
            ax_t.plot(ns, [r["ms_median"] for r in pts], **kw)
            mem = [(r["N"], r["peak_mb"]) for r in pts if r["peak_mb"] and r["peak_mb"] > 0]
            if mem:
                ax_m.plot(*zip(*mem), **kw)
            ax_f.plot(ns, [row_metrics(r, idx, ceiling)["tflops"] for r in pts], **kw)
        if ceiling:
            ax_f.axhline(ceiling, color="k", linestyle="--", linewidth=1, label="torch.mm ceiling")
        name = LOSS_NAMES.get(loss, loss)
        for ax, ylab in ((ax_t, "ms (median)"), (ax_m, "peak MB"),
                         (ax_f, "TFLOP/s (8 N^2 D)" if loss in ("clip", "siglip")
                          else "TFLOP/s (CLIP-equiv. 8 N^2 D)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(ylab)
            ax.set_title(f"{name}, full, D={main_d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if sweep_n:
        n = max(sweep_n)
        ax_t, ax_m, ax_f = axes[-1]
        sel = [r for r in sweep if r["N"] == n]
        for j, prov in enumerate(sorted({r["provider"] for r in sel})):
            pts = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["D"])
            kw = dict(marker="s", color=f"C{j}", label=prov)
            ax_t.plot([r["D"] for r in pts], [r["ms_median"] for r in pts], **kw)
            ax_m.plot([r["D"] for r in pts], [r["peak_mb"] or float("nan") for r in pts], **kw)
            ax_f.plot([r["D"] for r in pts], [row_metrics(r, idx, ceiling)["tflops"] for r in pts],
                      **kw)
        for ax, ylab in ((ax_t, "ms (median)"), (ax_m, "peak MB"), (ax_f, "TFLOP/s (8 N^2 D)")):
            ax.set_xlabel("D")
            ax.set_ylabel(ylab)
            ax.set_title(f"CLIP, full, N={n}, against D", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / nrows))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# Of a test's rows (its call, then a failed teardown, say) the first of these counts.
OUTCOME_ORDER = ("failed", "error", "xpassed", "passed", "xfailed", "skipped")
FAILING = ("failed", "error", "xpassed")


def read_test_log(path: Path) -> tuple[int | None, dict[str, tuple[str, str]]]:
    """(the number of tests selected, None if collection never finished; nodeid -> (outcome,
    message)) from a benchmarks/gpu_pytest_log.py file, complete or cut off by a kill."""
    selected, outcomes = None, {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            outcome, nodeid = row.get("outcome"), row.get("nodeid") or ""
            if outcome == "collected":
                selected = int(row["message"])
            elif outcome in OUTCOME_ORDER:
                seen = outcomes.get(nodeid)
                if seen is None or OUTCOME_ORDER.index(outcome) < OUTCOME_ORDER.index(seen[0]):
                    outcomes[nodeid] = (outcome, row.get("message") or "")
    return selected, outcomes


def tests_report(path: Path) -> tuple[str, list[str], int]:
    """The tests stage's one line (counts, what did not run, the modules that could not be
    collected, up to 25 failing tests), one line per failing test with its message, and the
    status: 0 every selected test ran and none failed, 1 something failed, 2 not every test
    ran (and none failed), 3 no readable log or a collection that never finished."""
    try:
        selected, outcomes = read_test_log(path)
    except (OSError, ValueError, KeyError) as exc:
        return f"no test log ({exc})", [], 3
    tests = {k: v for k, v in outcomes.items() if "::" in k}
    modules = {k: v for k, v in outcomes.items() if "::" not in k}
    count = {o: sum(1 for v in tests.values() if v[0] == o) for o in OUTCOME_ORDER}
    parts = [f"{count['passed']} passed, {count['failed']} failed, {count['error']} errors, "
             f"{count['skipped']} skipped"
             + "".join(f", {count[o]} {o}" for o in ("xfailed", "xpassed") if count[o])]
    if selected is None:
        parts.append("collection did not finish")
    else:
        parts[0] += f" of {selected} selected"
        if len(tests) < selected:
            parts.append(f"{selected - len(tests)} not run")
    for outcome, what in (("error", "could not be collected"), ("skipped", "skipped whole")):
        reasons = [v[1] for v in modules.values() if v[0] == outcome]
        if reasons:
            first = max(set(reasons), key=reasons.count)
            parts.append(f"{len(reasons)} modules {what} ({reasons.count(first)} of them: "
                         f"{first[:160]})")
    failing = [(k, v) for k, v in outcomes.items() if v[0] in FAILING]
    if failing:
        names = [k for k, _ in failing]
        parts.append("failing: " + ", ".join(names[:25]) + (" ..." if len(names) > 25 else ""))
    status = 3 if selected is None else 1 if failing else 2 if len(tests) < selected else 0
    return "; ".join(parts), [f"{v[0].upper()} {k}: {v[1]}" for k, v in failing], status


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests", type=Path, default=None, metavar="TEST_LOG",
                   help="print the tests stage's line, then every failing test, from a "
                        "gpu_pytest_log.py file, instead")
    p.add_argument("--dir", type=Path, help="the run's folder")
    p.add_argument("--title", default=None, help="the run's label (default: the folder's name)")
    p.add_argument("--dry-run", action="store_true", help="say that the sizes are toy sizes")
    args = p.parse_args(argv)
    if args.tests is not None:
        line, failing, status = tests_report(args.tests)
        print("\n".join([line] + failing))
        sys.exit(status)
    if args.dir is None:
        p.error("--dir is required (or --tests)")
    title = args.title or args.dir.name
    rows = load_rows(args.dir / "results.csv")
    status = load_status(args.dir / "status.tsv")
    ceiling_info = {}
    if (args.dir / "ceiling.json").exists():
        ceiling_info = json.loads((args.dir / "ceiling.json").read_text())
    ceiling = _f(ceiling_info.get("ceiling_tflops"))
    env = (args.dir / "env.txt").read_text().splitlines() if (args.dir / "env.txt").exists() else []
    pick = [ln for ln in env if ln.split(":", 1)[0] in ("device", "gpu", "torch", "triton",
                                                       "robustft_ext", "nvcc", "ninja",
                                                       "open_clip", "inf_cl",
                                                       "compute-sanitizer")]
    idx = Index(rows)
    md = [f"# GPU check {title}", ""]
    if args.dry_run:
        md += ["**Dry run** on a CPU machine at toy sizes: it checks that every stage of "
               "benchmarks/gpu_check.sh still runs; its numbers measure nothing.", ""]
    md += [f"- {ln}" for ln in pick] + ["", "## Stages", ""] + stage_table(status)
    md += ["", "## Ceiling", "",
           (ceiling_info.get("summary", "not measured") + ". '% ceiling' divides by the first "
            "(the median bf16 torch.mm rate)." if ceiling_info else "not measured")]
    md += ["", "## Key numbers (full mode, the largest N a fused provider ran)", ""]
    md += key_numbers(rows, idx, ceiling)
    md += ["", DETAILS, "", "## Work counts", "",
           "TFLOP/s = work / median time, with the work of the fused CLIP loss: forward "
           "2 N^2 D (the logits), backward 6 N^2 D (the logits recomputed, then the two gradient "
           "products), full 8 N^2 D. SigLIP's own work is the same. For CLIP + m^2 and the "
           "RobustFTLoss step the TFLOP/s are CLIP-equivalent (the same counts): their own "
           "least work is larger (CLIP + m^2 about twice CLIP's, see benchmarks/README.md), and "
           "'x CLIP' is their time over CLIP alone's (same provider, N, D, mode). 'open_clip / "
           "this' and 'Inf-CL / this' are speed-ups (their time over this one; > 1: this is "
           "faster). 'loss vs reference': |loss - reference loss| / |reference loss| on the same "
           "inputs (not for the RobustFTLoss step, whose DiVE centre moves with every call). "
           "Peak MB: memory above the inputs (see benchmarks/harness/memory.py)."]
    md += ["", "## Results"] + loss_tables(rows, idx, ceiling)
    nm = not_measured(rows)
    md += ["", "## Not measured", ""] + (nm or ["(every row was measured)"])
    if plot(rows, idx, ceiling, args.dir / "plots.png", f"{title}: full mode"):
        md += ["", "![time, peak memory and TFLOP/s against N](plots.png)"]
    text = "\n".join(md) + "\n"
    (args.dir / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
