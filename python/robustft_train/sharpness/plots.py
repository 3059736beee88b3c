"""Plots of the sharpness analysis (PNG, matplotlib's Agg backend): a heat map of layer-wise
sharpness over layer groups x alpha with the straggler layers marked, and OOD (and ID) accuracy
against alpha with and without the sparsity intervention, beside the sharpness curves."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(a, path: str) -> None:
    groups = list(a.groups)
    alphas = [r["alpha"] for r in a.alpha_rows]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.55 * len(alphas) * 2, 1.6 + 0.32 * len(groups)), dpi=120,
                             squeeze=False)
    for ax, measure in zip(axes[0], ("random", "worst")):
        grid = np.full((len(groups), len(alphas)), np.nan)
        for r in a.layer_rows:
            grid[groups.index(r["group"]), alphas.index(r["alpha"])] = r[f"sharpness_{measure}"]
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(alphas)))
        ax.set_xticklabels([f"{x:g}" for x in alphas], fontsize=7)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([("* " + g) if g in a.stragglers else g for g in groups], fontsize=7)
        for tick, g in zip(ax.get_yticklabels(), groups):
            if g in a.stragglers:
                tick.set_color("tab:red")
                tick.set_fontweight("bold")
        for i, g in enumerate(groups):
            if g in a.stragglers:
                ax.add_patch(plt.Rectangle((-0.5, i - 0.5), len(alphas), 1, fill=False, ec="tab:cyan", lw=1.8))
        if len(groups) * len(alphas) <= 200:
            finite = grid[np.isfinite(grid)]
            mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
            for i in range(len(groups)):
                for j in range(len(alphas)):
                    v = grid[i, j]
                    if math.isfinite(v):
                        ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=5,
                                color="k" if v > mid else "w")
        ax.set_xlabel("WiSE-FT alpha (0 = zero-shot, 1 = fine-tuned)")
        ax.set_title(f"{measure} adaptive perturbation", fontsize=9)
    fig.suptitle(f"{a.method}: layer-wise sharpness S_l (loss increase); * straggler layers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _norm(vals: list[float]) -> list[float]:
    m = max((abs(v) for v in vals if v is not None and math.isfinite(v)), default=0.0)
    return [v / m if m > 0 and v is not None else float("nan") for v in vals]


def ood_vs_alpha(a, path: str) -> None:
    alphas = [r["alpha"] for r in a.alpha_rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=120)
    for ax, key, label in ((axes[0], "ood_mean", "mean OOD top-1 (%)"), (axes[1], "id_top1", "ID top-1 (%)")):
        y = [100 * r[key] if r.get(key) is not None else np.nan for r in a.alpha_rows]
        ax.plot(alphas, y, "o-", color="k", label="WiSE-FT")
        for s in a.intervention_summary:
            rows = [r for r in a.intervention_rows if r["p"] == s["p"]]
            ax.plot([r["alpha"] for r in rows], [100 * r[key] if r.get(key) is not None else np.nan for r in rows],
                    "s--", ms=4, label=f"sparse task vector in stragglers, p={s['p']:g}")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for key, style in (("overall_random", "o-"), ("straggler_random", "s-"), ("overall_worst", "o:"),
                       ("straggler_worst", "s:")):
        ax.plot(alphas, _norm([r[key] for r in a.alpha_rows]), style, ms=4, label=key.replace("_", " "))
    ax.set_xlabel("alpha")
    ax.set_ylabel("sharpness / its max |.| over alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{a.method}: accuracy along the WiSE-FT path, with and without sparsifying the task vector "
                 f"in the straggler layers ({', '.join(a.stragglers)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
