"""The results table: one row per (method, WiSE-FT alpha, evaluation set) in results.csv and
results.jsonl; a summary per method (the fine-tuned model and the best WiSE-FT alpha) printed and
written to summary.csv."""
from __future__ import annotations

import csv
import json
import math

METRIC_COLUMNS = ["top1", "ece", "alignment", "uniformity", "rsa",
                  "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
RESULT_COLUMNS = ["method", "status", "alpha", "best_alpha", "eval_set", "role", "n"] + METRIC_COLUMNS


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(rows: list[dict], csv_path: str, jsonl_path: str) -> None:
    with open(jsonl_path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_COLUMNS})


def summarise(rows: list[dict], set_order: list[tuple[str, str]], id_set: str) -> list[dict]:
    """Per method: the row at alpha 1 (the fine-tuned model; alpha 0 for zeroshot) and, when a
    sweep ran, the row at the best alpha. Columns: top-1 of each set, OOD mean, ECE and RSA on ID."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ood = [n for n, role in set_order if role == "ood"]
    out = []
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        if mrows[0]["status"] != "ok":
            out.append({"method": m, "status": mrows[0]["status"]})
            continue
        alphas = sorted({r["alpha"] for r in mrows})
        best = next((r["alpha"] for r in mrows if r.get("best_alpha")), None)
        picks = [max(alphas)] + ([best] if best is not None and best != max(alphas) else [])
        for alpha in picks:
            by_set = {r["eval_set"]: r for r in mrows if r["alpha"] == alpha}
            if m == "zeroshot":
                which = "zero-shot"
            else:  # the largest alpha is the fine-tuned model itself when the sweep includes 1
                which = "fine-tuned" if alpha == 1.0 else f"WiSE-FT alpha {alpha:g}"
                if alpha == best:
                    which = f"{which} = best WiSE-FT" if alpha == max(alphas) else "best WiSE-FT"
            s = {"method": m, "status": "ok", "alpha": alpha, "which": which}
            for name, _ in set_order:
                s[f"{name}"] = by_set.get(name, {}).get("top1")
            accs = [by_set[n]["top1"] for n in ood if n in by_set and by_set[n].get("top1") is not None]
            s["ood_mean"] = sum(accs) / len(accs) if accs else None
            s["ece_id"] = by_set.get(id_set, {}).get("ece")
            s["rsa_id"] = by_set.get(id_set, {}).get("rsa")
            out.append(s)
    return out


def summary_columns(set_order: list[tuple[str, str]]) -> list[str]:
    return (["method", "which", "alpha"] + [n for n, _ in set_order] + ["ood_mean", "ece_id", "rsa_id", "status"])


def write_summary(summary: list[dict], columns: list[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in summary:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def format_table(summary: list[dict], columns: list[str]) -> str:
    """A plain-text table (accuracies in %, ECE in %, RSA as is)."""
    def cell(col: str, v) -> str:
        if v is None or v == "":
            return "-"
        if col in ("method", "which", "status"):
            return str(v)
        if col == "alpha":
            return f"{v:.2g}"
        if col == "rsa_id":
            return f"{v:.3f}"
        return f"{100 * v:.1f}"

    cols = [c for c in columns if c != "status"]
    lines = [[c for c in cols]]
    notes = []
    for r in summary:
        if r.get("status", "ok") != "ok":
            notes.append(f"{r['method']}: {r['status']}")
            continue
        lines.append([cell(c, r.get(c)) for c in cols])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                               enumerate(zip(line, widths))) for line in lines)
    if notes:
        text += "\n" + "\n".join(notes)
    return text
