"""Plots (PNG, matplotlib's Agg backend): ID vs OOD (and vs zero-shot task) accuracy across the
WiSE-FT sweep per method, and per-method bars of top-1 on every evaluation set."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _curve(rows: list[dict], method: str, id_set: str, other: list[str]) -> list[tuple]:
    """(alpha, ID top-1 %, mean top-1 % over `other`, is best alpha) for each alpha of a method."""
    pts = []
    for alpha in sorted({r["alpha"] for r in rows if r["method"] == method}):
        by_set = {r["eval_set"]: r for r in rows if r["method"] == method and r["alpha"] == alpha}
        vals = [by_set[s]["top1"] for s in other if s in by_set and by_set[s].get("top1") is not None]
        if id_set in by_set and by_set[id_set].get("top1") is not None and vals:
            best = any(r.get("best_alpha") for r in by_set.values())
            pts.append((alpha, 100 * by_set[id_set]["top1"], 100 * sum(vals) / len(vals), best))
    return pts


def _panel(ax, rows: list[dict], id_set: str, other: list[str], ylabel: str) -> None:
    for m in dict.fromkeys(r["method"] for r in rows if r["status"] == "ok"):
        pts = _curve(rows, m, id_set, other)
        if not pts:
            continue
        if m == "zeroshot":
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker="s", s=60, c="k",
                       label="zero-shot", zorder=3)
            continue
        line, = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=4, label=m)
        for a, x, y, best in pts:
            if best:
                ax.scatter([x], [y], marker="*", s=180, color=line.get_color(), edgecolor="k", zorder=4)
            if a in (0.0, 1.0) or best:
                ax.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"ID top-1 (%) on {id_set}")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def wise_ft_plot(rows: list[dict], id_set: str, ood_sets: list[str], path: str,
                 zeroshot_sets: list[str] | None = None) -> None:
    """Left: x ID top-1, y mean OOD top-1; right (when there are zero-shot tasks): y mean zero-shot
    task top-1. One curve per method over alpha (0 = zero-shot model, 1 = fine-tuned); * best alpha."""
    panels = [(ood_sets, f"mean OOD top-1 (%): {', '.join(ood_sets)}")] if ood_sets else []
    if zeroshot_sets:
        panels.append((zeroshot_sets, f"zero-shot task top-1 (%): {', '.join(zeroshot_sets)}"))
    if not panels:
        panels = [([id_set], "ID top-1 (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.8), dpi=120, squeeze=False)
    for ax, (sets, label) in zip(axes[0], panels):
        _panel(ax, rows, id_set, sets, label)
    fig.suptitle("WiSE-FT sweep: alpha 0 (zero-shot) to 1 (fine-tuned); * best alpha on the ID set")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def method_bars(summary: list[dict], sets: list[str], path: str) -> None:
    """Grouped bars: top-1 of each evaluation set (and OOD mean) for each method's summary rows."""
    rows = [r for r in summary if r.get("status", "ok") == "ok"]
    labels = [r["method"] if r["which"] in ("fine-tuned", "zero-shot", "fine-tuned = best WiSE-FT")
              else f"{r['method']} (WiSE-FT alpha {r['alpha']:g})" for r in rows]
    cols = sets + ["ood_mean"]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(cols) * max(1, len(rows))), 4.8), dpi=120)
    width = 0.8 / max(1, len(rows))
    for i, (r, label) in enumerate(zip(rows, labels)):
        vals = [100 * r[c] if r.get(c) is not None else 0.0 for c in cols]
        ax.bar([j + i * width for j in range(len(cols))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, rotation=20, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("top-1 per evaluation set and method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
