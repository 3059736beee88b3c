"""The results tables: one row per (method, WiSE-FT alpha, evaluation set) in results.csv and
results.jsonl; a summary per method (the fine-tuned model and the best WiSE-FT alpha) printed and
written to summary.csv.

Units: the evaluation rows and results.jsonl hold fractions in [0, 1]; every CSV and the console
hold percentages for the fraction metrics (accuracy, ECE, recall), and CSV columns say so with a
`_pct` suffix (results.csv) or the table's units line (summary.csv, the same table as printed).
Alignment, uniformity and RSA have no unit and are written as they are.
"""
from __future__ import annotations

import csv
import io
import json
import math

from .files import atomic_write_text

PERCENT_METRICS = ("top1", "ece", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
PLAIN_METRICS = ("alignment", "uniformity", "rsa")
RESULT_KEYS = ["method", "alpha", "best_alpha", "eval_set", "role", "n"]
SUMMARY_UNITS = ("top-1 % per set; ood_mean: mean top-1 % over the OOD sets; R@1 %: mean of image-to-text "
                 "and text-to-image recall@1 on a captioned set; ece_<ID set>: % on the ID validation set; "
                 "rsa_<ID set>: correlation (1 = the zero-shot geometry kept)")


def clean(v):
    """None for NaN and infinities (empty in a CSV, null in JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def csv_columns(keys: list[str]) -> list[str]:
    """The CSV name of each row key: fraction metrics get the `_pct` suffix."""
    return [f"{k}_pct" if k in PERCENT_METRICS else k for k in keys]


def csv_row(row: dict, keys: list[str]) -> dict:
    """A row in CSV units (fraction metrics in %), empty cells for missing values."""
    out = {}
    for k, name in zip(keys, csv_columns(keys)):
        v = clean(row.get(k))
        out[name] = "" if v is None else (100 * v if k in PERCENT_METRICS else v)
    return out


def write_csv(rows: list[dict], keys: list[str], path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(keys), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(csv_row(r, keys))
    atomic_write_text(path, buf.getvalue())


def write_jsonl(rows: list[dict], path: str) -> None:
    atomic_write_text(path, "".join(json.dumps({k: clean(v) for k, v in r.items()}) + "\n" for r in rows))


def write_results(rows: list[dict], csv_path: str, jsonl_path: str) -> None:
    write_jsonl(rows, jsonl_path)
    write_csv(rows, RESULT_KEYS + list(PERCENT_METRICS) + list(PLAIN_METRICS), csv_path)


def r1(row: dict) -> float | None:
    """Mean image-to-text and text-to-image recall@1 of an evaluation row (None without captions)."""
    a, b = row.get("i2t_r1"), row.get("t2i_r1")
    return None if a is None or b is None else (a + b) / 2


def _summary_row(method: str, alpha: float, which: str, by_set: dict[str, dict],
                 set_order: list[tuple[str, str]], id_set: str) -> dict:
    s = {"method": method, "which": which, "alpha": alpha}
    for name, _ in set_order:
        s[name] = by_set.get(name, {}).get("top1")
    ood = [by_set[n]["top1"] for n, role in set_order if role == "ood" and by_set.get(n, {}).get("top1") is not None]
    s["ood_mean"] = sum(ood) / len(ood) if ood else None
    for name, _ in set_order:
        if by_set.get(name, {}).get("i2t_r1") is not None:
            s[f"{name}_R@1"] = r1(by_set[name])
    s[f"ece_{id_set}"] = by_set.get(id_set, {}).get("ece")
    s[f"rsa_{id_set}"] = by_set.get(id_set, {}).get("rsa")
    return s


def summarise(rows: list[dict], set_order: list[tuple[str, str]], id_set: str) -> list[dict]:
    """Per method: the row at its largest alpha (the fine-tuned model when the sweep includes 1;
    alpha 0 for zeroshot) and, when the sweep picked another, the row at the best alpha."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        mrows = [r for r in rows if r["method"] == m]
        alphas = sorted({r["alpha"] for r in mrows})
        best = next((r["alpha"] for r in mrows if r.get("best_alpha")), None)
        for alpha in [max(alphas)] + ([best] if best is not None and best != max(alphas) else []):
            if m == "zeroshot":
                which = "zero-shot"
            else:
                which = "fine-tuned" if alpha == 1.0 else f"WiSE-FT alpha {alpha:g}"
                if alpha == best:
                    which = f"{which} = best WiSE-FT" if alpha == max(alphas) else "best WiSE-FT"
            by_set = {r["eval_set"]: r for r in mrows if r["alpha"] == alpha}
            out.append(_summary_row(m, alpha, which, by_set, set_order, id_set))
    return out


def summary_columns(summary: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in summary for k in r))


def _in_units(col: str, v):
    """A summary value in the table's units: % except method, which, alpha and RSA."""
    if col in ("method", "which", "alpha") or col.startswith("rsa_"):
        return v
    return 100 * v


def _cell(col: str, v) -> str:
    if clean(v) is None:
        return "-"
    if col in ("method", "which"):
        return str(v)
    if col == "alpha":
        return f"{v:g}"
    if col.startswith("rsa_"):
        return f"{v:.3f}"
    return f"{_in_units(col, v):.1f}"


def write_summary(summary: list[dict], path: str) -> None:
    """summary.csv: the printed table, in its units (see SUMMARY_UNITS)."""
    cols = summary_columns(summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in summary:
        w.writerow(["" if clean(r.get(c)) is None else _in_units(c, r[c]) for c in cols])
    atomic_write_text(path, buf.getvalue())


def format_table(summary: list[dict]) -> str:
    """A plain-text table (accuracies, recall and ECE in %, RSA as is)."""
    cols = summary_columns(summary)
    lines = [cols] + [[_cell(c, r.get(c)) for c in cols] for r in summary]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                               enumerate(zip(line, widths))) for line in lines)


def term_ratios(history: list[dict]) -> dict[str, dict[str, float]]:
    """How large each regulariser is against the base term (clip, or ce for ft) in a phase's
    logged history: {term: {first_step, first_epoch, last_epoch}} ratios of the weighted terms
    (the epochs' means of each divided). DiVE's and Lipsum's terms vanish at the first step by
    construction (the fine-tuned model starts as the pre-trained one), hence the epoch means."""
    if not history:
        return {}
    base = "loss_clip" if "loss_clip" in history[0] else "loss_ce"
    terms = [k for k in history[0] if k.startswith("loss_") and k != base]
    epochs = sorted({r["epoch"] for r in history})

    def ratio(rows: list[dict], term: str) -> float | None:
        den = sum(r[base] for r in rows)
        return sum(r[term] for r in rows) / den if den else None

    return {t[len("loss_"):]: {"first_step": ratio(history[:1], t),
                               "first_epoch": ratio([r for r in history if r["epoch"] == epochs[0]], t),
                               "last_epoch": ratio([r for r in history if r["epoch"] == epochs[-1]], t)}
            for t in terms} if base in history[0] else {}
