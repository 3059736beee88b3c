"""Plots (PNG, matplotlib's Agg backend) of one run and of a study over seeds.

One run: the WiSE-FT sweep (ID against mean OOD, and against the zero-shot tasks), one panel per
method with every alpha labelled and coloured; per-method bars of top-1 on every evaluation set,
grouped by role (ID, OOD, zero-shot). A study: the same bars with 95% intervals over the seeds,
OOD / zero-shot accuracy against alpha with intervals, and the paired differences against each
method's base.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import cm, colors  # noqa: E402

ROLE_SHADES = {"ID": "#e8f0fb", "OOD": "#fbeee6", "zero-shot": "#eaf6ea"}
ALPHA_CMAP = cm.viridis


def _curve(rows: list[dict], method: str, id_set: str, sets: list[str]) -> list[tuple]:
    """(alpha, ID top-1 %, mean top-1 % over `sets`, is best alpha) for each alpha of a method."""
    pts = []
    for alpha in sorted({r["alpha"] for r in rows if r["method"] == method}):
        by_set = {r["eval_set"]: r for r in rows if r["method"] == method and r["alpha"] == alpha}
        vals = [by_set[s]["top1"] for s in sets if by_set.get(s, {}).get("top1") is not None]
        if by_set.get(id_set, {}).get("top1") is not None and vals:
            best = any(r.get("best_alpha") for r in by_set.values())
            pts.append((alpha, 100 * by_set[id_set]["top1"], 100 * sum(vals) / len(vals), best))
    return pts


def _merged(pts: list[tuple], tol: tuple[float, float]) -> list[tuple]:
    """Points closer than `tol` (x, y) to a group's first point join that group, so that no marker
    hides another: one marker per group at its first point, labelled with all its alphas;
    (first alpha, x, y, label, any best)."""
    groups: list[list[tuple]] = []
    for p in pts:
        home = next((g for g in groups if abs(g[0][1] - p[1]) <= tol[0] and abs(g[0][2] - p[2]) <= tol[1]), None)
        if home is None:
            groups.append([p])
        else:
            home.append(p)
    return [(g[0][0], g[0][1], g[0][2], ", ".join(f"{p[0]:g}" for p in g), any(p[3] for p in g)) for g in groups]


def _sweep_panel(ax, rows, method: str, others: list[str], id_set: str, sets: list[str], ylabel: str,
                 tol: tuple[float, float]) -> None:
    for other in others:  # the other methods in the background, for comparison
        pts = _curve(rows, other, id_set, sets)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], color="0.85", lw=1, zorder=1)
    pts = _curve(rows, method, id_set, sets)
    ax.plot([p[1] for p in pts], [p[2] for p in pts], color="0.4", lw=1, zorder=2)
    norm = colors.Normalize(0, 1)
    for i, (alpha, x, y, label, best) in enumerate(_merged(pts, tol)):
        ax.scatter([x], [y], s=46, c=[ALPHA_CMAP(norm(alpha))], edgecolors="red" if best else "k",
                   linewidths=2.2 if best else 0.6, zorder=3)
        # labels alternate sides along the curve, so that neighbouring alphas' labels do not collide
        right = i % 2 == 0
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6 if right else -6, 3), fontsize=7,
                    ha="left" if right else "right", zorder=4)
    ax.set_title(method, fontsize=10)
    ax.set_xlabel(f"ID top-1 (%) on {id_set}", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)


def wise_ft_plot(rows: list[dict], id_set: str, ood_sets: list[str], path: str,
                 zeroshot_sets: list[str] | None = None) -> None:
    """One row of panels per fine-tuned method: x ID top-1, y mean OOD top-1 (left) and mean
    zero-shot-task top-1 (right). Every alpha is a marker coloured by alpha and labelled with it
    (points at one place share a marker and a label); red ring: the best alpha on the ID set;
    grey: the other methods' curves."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "zeroshot"]
    cols = [(ood_sets, f"mean OOD top-1 (%)\n{', '.join(ood_sets)}")] if ood_sets else []
    if zeroshot_sets:
        cols.append((zeroshot_sets, f"zero-shot task top-1 (%)\n{', '.join(zeroshot_sets)}"))
    cols = cols or [([id_set], "ID top-1 (%)")]
    fig, axes = plt.subplots(max(1, len(methods)), len(cols), figsize=(5.4 * len(cols), 3.4 * max(1, len(methods))),
                             dpi=110, squeeze=False, sharex=True, sharey="col", layout="constrained")
    for j, (sets, label) in enumerate(cols):
        pts = [p for m in methods for p in _curve(rows, m, id_set, sets)]
        # markers closer than 2% of the column's range share one (a marker is about that wide)
        tol = (0.02 * (max((p[1] for p in pts), default=1) - min((p[1] for p in pts), default=0)),
               0.02 * (max((p[2] for p in pts), default=1) - min((p[2] for p in pts), default=0)))
        for i, method in enumerate(methods):
            _sweep_panel(axes[i][j], rows, method, [m for m in methods if m != method], id_set, sets, label, tol)
    fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), ALPHA_CMAP), ax=axes, shrink=0.6,
                 label="WiSE-FT alpha (0 = zero-shot, 1 = fine-tuned)")
    fig.suptitle(f"WiSE-FT sweep, one row per method: every alpha labelled (alphas within 2% of the axis range "
                 f"share a marker)\nred ring = the best alpha on {id_set}; grey = the other methods' curves",
                 fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def _ordered_sets(set_roles: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """ID sets, the OOD sets and their mean, then the zero-shot tasks."""
    out = [(n, "ID") for n, r in set_roles if r == "id"] + [(n, "OOD") for n, r in set_roles if r == "ood"]
    if any(r == "ood" for _, r in set_roles):
        out.append(("ood_mean", "OOD"))
    return out + [(n, "zero-shot") for n, r in set_roles if r == "zeroshot"]


def _role_bars(ax, labels: list[str], sets: list[tuple[str, str]], value, error=None) -> None:
    """Grouped bars (one colour per label) over the sets, with role bands and role names; the
    y axis spans 0-100 % (an interval reaching past either end is cut there)."""
    width = 0.8 / max(1, len(labels))
    for j, (_, role) in enumerate(sets):
        ax.axvspan(j - 0.5, j + 0.5, color=ROLE_SHADES[role], zorder=0)
    for i, label in enumerate(labels):
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(sets))]
        vals = [value(label, s) for s, _ in sets]
        kw = {}
        if error is not None:
            errs = [error(label, s) for s, _ in sets]
            kw = dict(yerr=[[e[0] for e in errs], [e[1] for e in errs]], capsize=2, error_kw={"lw": 0.8})
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=label, zorder=2, **kw)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([s for s, _ in sets], rotation=20, fontsize=8)
    ax.set_xlim(-0.5, len(sets) - 0.5)
    ax.set_ylim(0, 100)
    top = 100
    for role in dict.fromkeys(r for _, r in sets):
        idx = [j for j, (_, r) in enumerate(sets) if r == role]
        ax.text((idx[0] + idx[-1]) / 2, top * 1.01, role, ha="center", va="bottom", fontsize=9, weight="bold")
    ax.set_xlabel("evaluation set (shaded by role: ID, OOD, zero-shot task)")
    ax.grid(axis="y", alpha=0.3, zorder=1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="method", title_fontsize=7)


def method_bars(summary: list[dict], set_roles: list[tuple[str, str]], path: str) -> None:
    """Grouped bars: top-1 (%) of every evaluation set and the OOD mean, for each summary row."""
    labels = [r["method"] if r["which"] in ("fine-tuned", "zero-shot", "fine-tuned = best WiSE-FT")
              else f"{r['method']} (WiSE-FT alpha {r['alpha']:g})" for r in summary]
    by_label = dict(zip(labels, summary))
    sets = _ordered_sets(set_roles)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(sets) * max(1, len(labels))), 5.0), dpi=110)

    def value(label, s):
        v = by_label[label].get(s)
        return None if v is None else 100 * v

    _role_bars(ax, labels, sets, value)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 per evaluation set and method (fine-tuned models; the best WiSE-FT alpha where it differs)",
                 fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def study_bars(stats: dict[tuple[str, str], dict], methods: list[str], set_roles: list[tuple[str, str]],
               n_seeds: int, path: str) -> None:
    """Mean top-1 (%) over the seeds per set and method with 95% t-interval error bars;
    `stats[(method, metric)]` holds mean, ci_low, ci_high (metric: top1_<set> or ood_mean_top1)."""
    sets = _ordered_sets(set_roles)

    def key(s):
        return "ood_mean_top1" if s == "ood_mean" else f"top1_{s}"

    def value(m, s):
        return stats.get((m, key(s)), {}).get("mean")

    def error(m, s):
        st = stats.get((m, key(s)))
        if not st or st.get("ci_low") is None:
            return (0.0, 0.0)
        return (st["mean"] - st["ci_low"], st["ci_high"] - st["mean"])

    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(sets) * max(1, len(methods))), 5.0), dpi=110)
    _role_bars(ax, methods, sets, value, error)
    ax.set_ylabel("top-1 accuracy (%), mean over seeds")
    ax.set_title(f"fine-tuned models over {n_seeds} seeds: mean and 95% t-interval", fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def study_wise_ft(curves: dict[tuple[str, str, float], dict], methods: list[str], targets: list[tuple[str, str]],
                  n_seeds: int, path: str) -> None:
    """The gain in accuracy (% points) over each seed's zero-shot model against alpha, per method,
    mean and 95% t-interval over the seeds; one panel per target (`curves[(method, target,
    alpha)]` holds mean, ci_low, ci_high)."""
    fig, axes = plt.subplots(1, len(targets), figsize=(5.8 * len(targets), 4.4), dpi=110, squeeze=False,
                             layout="constrained")
    for ax, (target, label) in zip(axes[0], targets):
        for i, m in enumerate(methods):
            pts = sorted((a, st) for (mm, t, a), st in curves.items() if mm == m and t == target)
            if not pts:
                continue
            xs = [a + 0.006 * (i - len(methods) / 2) for a, _ in pts]  # a small offset: bars side by side
            ys = [st["mean"] for _, st in pts]
            lo = [st["mean"] - st["ci_low"] if st.get("ci_low") is not None else 0 for _, st in pts]
            hi = [st["ci_high"] - st["mean"] if st.get("ci_high") is not None else 0 for _, st in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1, label=m)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("WiSE-FT alpha (0 = zero-shot, 1 = fine-tuned)")
        ax.set_ylabel(f"{label}: gain over alpha 0 (% points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"accuracy along WiSE-FT minus the same seed's zero-shot model, over {n_seeds} seeds: mean and "
                 "95% t-interval", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


VERDICT_COLOURS = {"holds": "tab:green", "does not hold": "tab:red", "inconclusive": "tab:gray"}


def study_differences(rows: list[dict], path: str) -> None:
    """A forest plot: each row's paired difference (method - base; `label`, mean_diff, ci_low,
    ci_high, unit, verdict) with its 95% interval and a line at 0, coloured by verdict; one panel
    per unit, so that accuracy points and unitless statistics each get their own axis."""
    units = list(dict.fromkeys(r.get("unit", "") for r in rows))
    heights = [sum(r.get("unit", "") == u for r in rows) for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(9.0, 0.36 * len(rows) + 1.2 * len(units)), dpi=110,
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, unit in zip(axes[:, 0], units):
        group = [r for r in rows if r.get("unit", "") == unit]
        for i, r in enumerate(group):
            y = len(group) - 1 - i
            colour = VERDICT_COLOURS.get(r.get("verdict"), "k")
            if r.get("ci_low") is not None:
                ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colour, lw=2)
            if r.get("mean_diff") is not None:
                ax.plot([r["mean_diff"]], [y], "o", color=colour, ms=5)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels([r["label"] for r in reversed(group)], fontsize=7)
        shown = "% points" if unit == "%" else (unit or "no unit")
        ax.set_xlabel(f"method - base ({shown}): mean over seeds and 95% t-interval", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=v) for v, c in VERDICT_COLOURS.items()]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
