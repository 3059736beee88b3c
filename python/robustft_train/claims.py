"""The papers' claims, each tested over seeds with a paired 95% t-interval and a verdict.

Every row compares a method with its base on per-seed values (run with the same seeds, so the
difference is paired) and says:
- holds: the interval lies on the claimed side of zero;
- does not hold: it lies on the other side;
- inconclusive: it straddles zero (or fewer than two seeds measured it).
"Comparable ID accuracy" is an equivalence claim: holds when the interval of the ID difference lies
within +-ID_MARGIN points, does not hold when it lies entirely outside, else inconclusive.
A claim with several parts holds when every part holds, does not hold when one part does not,
and is inconclusive otherwise (`claim_verdict`). Our operational readings are in
docs/driver.md ("The claims").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .stats import paired, t_interval

ID_MARGIN = 2.0          # points of top-1: "comparable ID accuracy"
WISE_FT_ALPHA = 0.5      # the interior alpha tested against both endpoints (prespecified, not searched)
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


@dataclass
class SeedTables:
    """What the claims read from the seeds' runs (one entry per seed, in the same seed order)."""

    seeds: list[int]
    metrics: dict[str, list[dict[str, float]]]          # method -> fine-tuned model's metrics
    curves: dict[str, list[dict[float, dict[str, float]]]]  # method -> {alpha: metrics} (WiSE-FT)
    correlations: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # method -> {measure: rho}
    captioned: list[str] = field(default_factory=list)  # evaluation sets with captions
    id_set: str = "val"


def _metric(tables: SeedTables, method: str, key: str) -> list[float | None]:
    return [m.get(key) for m in tables.metrics.get(method, [])]


def _verdict(st: dict, higher_is_better: bool) -> str:
    if st.get("ci_low") is None:
        return UNSURE
    good, bad = (st["ci_low"] > 0, st["ci_high"] < 0) if higher_is_better else (st["ci_high"] < 0, st["ci_low"] > 0)
    return HOLDS if good else FAILS if bad else UNSURE


def _equivalence(st: dict) -> str:
    if st.get("ci_low") is None:
        return UNSURE
    if -ID_MARGIN <= st["ci_low"] and st["ci_high"] <= ID_MARGIN:
        return HOLDS
    if st["ci_high"] < -ID_MARGIN or st["ci_low"] > ID_MARGIN:
        return FAILS
    return UNSURE


def _row(claim: str, part: str, method: str, base: str, what: str, unit: str, a: list, b: list,
         kind: str) -> dict:
    """One part of a claim: method vs base on per-seed values a, b; kind 'higher', 'lower' or 'comparable'."""
    st = paired(a, b)
    verdict = _equivalence(st) if kind == "comparable" else _verdict(st, kind == "higher")
    return {"claim": claim, "part": part, "method": method, "base": base, "statistic": what, "unit": unit,
            "expected": {"higher": "> 0", "lower": "< 0", "comparable": f"within +-{ID_MARGIN:g}"}[kind],
            "method_mean": t_interval(a)["mean"], "base_mean": t_interval(b)["mean"],
            "mean_diff": st["mean"], "ci_low": st["ci_low"], "ci_high": st["ci_high"], "n_seeds": st["n_seeds"],
            "verdict": verdict}


def _versus(tables: SeedTables, claim: str, part: str, method: str, base: str, key: str, what: str, unit: str,
            kind: str) -> dict:
    return _row(claim, part, method, base, what, unit, _metric(tables, method, key), _metric(tables, base, key), kind)


def _m2mix(t: SeedTables) -> list[dict]:
    claim = "1. m^2-mix improves alignment and uniformity, and image-text retrieval R@1, over flyp"
    s = t.captioned[0] if t.captioned else t.id_set
    where = f"on {s}" + ("" if t.captioned else " (no captioned set: images paired with class prompts)")
    rows = [_versus(t, claim, "alignment (lower is better)", "flyp+m2mix", "flyp", f"alignment_{s}",
                    f"alignment {where}", "", "lower"),
            _versus(t, claim, "uniformity (lower is better)", "flyp+m2mix", "flyp", f"uniformity_{s}",
                    f"uniformity {where}", "", "lower")]
    rows.append(_versus(t, claim, "retrieval R@1", "flyp+m2mix", "flyp", f"r1_{s}",
                        f"mean of image-to-text and text-to-image R@1 on {s}", "%", "higher"))
    return rows


def _regulariser(t: SeedTables, claim: str, method: str, base: str, with_rsa: bool) -> list[dict]:
    rows = []
    if with_rsa:
        rows.append(_versus(t, claim, "keeps the geometry (RSA)", method, base, f"rsa_{t.id_set}",
                            f"RSA with the zero-shot image embeddings on {t.id_set}", "", "higher"))
    rows += [_versus(t, claim, "zero-shot accuracy", method, base, "zeroshot_mean_top1",
                     "mean top-1 on the zero-shot tasks", "%", "higher"),
             _versus(t, claim, "OOD accuracy", method, base, "ood_mean_top1", "mean top-1 on the OOD sets", "%",
                     "higher"),
             _versus(t, claim, "comparable ID accuracy", method, base, "id_mean_top1", "mean top-1 on the ID sets",
                     "%", "comparable")]
    return rows


def _wise_ft(t: SeedTables) -> list[dict]:
    claim = "4. some WiSE-FT alpha beats both endpoints on OOD"
    rows = []
    for method in ("ft", "flyp"):
        a, b = [], []
        for curve in t.curves.get(method, []):
            alphas = sorted(curve)
            inner = [x for x in alphas if 0 < x < 1]
            if not inner or 0.0 not in curve or 1.0 not in curve:
                continue
            mid = min(inner, key=lambda x: abs(x - WISE_FT_ALPHA))
            a.append(curve[mid].get("ood_mean_top1"))
            b.append(max(curve[0.0].get("ood_mean_top1"), curve[1.0].get("ood_mean_top1")))
        rows.append(_row(claim, f"{method}: alpha {WISE_FT_ALPHA:g} vs the better endpoint", f"{method} alpha "
                         f"{WISE_FT_ALPHA:g}", f"{method} max(alpha 0, alpha 1)",
                         "mean OOD top-1 at the interior alpha minus the better of alpha 0 and alpha 1",
                         "%", a, b, "higher"))
    return rows


def _stragglers(t: SeedTables, measure: str) -> list[dict]:
    claim = "5. straggler-layer sharpness tracks OOD where overall sharpness does not"
    rows = []
    for method in ("ft", "flyp"):
        per_seed = t.correlations.get(method, [])
        strag = [abs(c[f"straggler_{measure}"]) if c.get(f"straggler_{measure}") is not None else None
                 for c in per_seed]
        overall = [abs(c[f"overall_{measure}"]) if c.get(f"overall_{measure}") is not None else None
                   for c in per_seed]
        rows.append(_row(claim, f"{method}: abs(rho) of straggler vs overall sharpness", f"{method} straggler",
                         f"{method} overall", f"|Spearman rho| across alpha with mean OOD top-1, {measure} "
                         "sharpness: straggler layers minus overall", "", strag, overall, "higher"))
    return rows


def evaluate_claims(tables: SeedTables, measure: str = "random") -> list[dict]:
    """Every part of every claim, with claim_verdict added to each row."""
    rows = (_m2mix(tables)
            + _regulariser(tables, "2. DiVE keeps the geometry (RSA) and improves zero-shot and OOD accuracy over "
                                   "flyp at comparable ID accuracy", "flyp+dive", "flyp", with_rsa=True)
            + _regulariser(tables, "3. Lipsum-FT improves OOD and zero-shot accuracy over ft at comparable ID "
                                   "accuracy", "ft+lipsum", "ft", with_rsa=False)
            + _wise_ft(tables) + _stragglers(tables, measure))
    for claim in dict.fromkeys(r["claim"] for r in rows):
        verdicts = [r["verdict"] for r in rows if r["claim"] == claim]
        overall = HOLDS if all(v == HOLDS for v in verdicts) else FAILS if FAILS in verdicts else UNSURE
        for r in rows:
            if r["claim"] == claim:
                r["claim_verdict"] = overall
    return rows
