"""The sharpness analysis along the WiSE-FT path (docs/maths.md, section 7, our reading of
2410.16476): for every alpha, the overall and layer-wise sharpness (random and worst-case) of the
interpolated model on a fixed ID batch, its ID and OOD accuracy; the straggler layers; the rank
correlations (Spearman, Kendall) across alpha between accuracy and each sharpness measure; the
sparsity intervention in the straggler layers; CSV/JSONL outputs and two plots.

The loss whose sharpness is measured is the classification cross-entropy of the model as it is
evaluated, on a fixed batch of the ID validation set: ft's head on the normalised image features,
or, for the contrastive methods, logit_scale x the image features against the class embeddings of
the model's own text tower (so perturbing a text layer changes the classifier). This is the loss
whose accuracy the WiSE-FT sweep reports, needs only labels (every ID validation set has them),
and is the same for every method, unlike each method's training loss. It runs in float32.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import sharpness as sh
from .data import EvalSet, fill_template
from .models import TrainModule
from .wise_ft import interpolate


@dataclass
class SharpnessOptions:
    rho: float = 0.05
    samples: int = 16
    batch_size: int = 256
    stragglers: str = "std:2"
    measure: str = "random"          # the measure that picks the stragglers
    sparsity: list[float] = field(default_factory=lambda: [0.5])
    seed: int = 0
    alphas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    plots: bool = True
    text_batch_size: int = 256


@dataclass
class Environment:
    """What the analysis needs from a run: evaluation sets, the ID set's name, tokenizer, templates,
    device and an evaluation function (TrainModule -> the driver's metric rows)."""

    evals: list[EvalSet]
    id_set: str
    tokenizer: object
    templates: list[str]
    device: torch.device
    eval_fn: Callable[[TrainModule], list[dict]]


# ---------------------------------------------------------------------------------------------
# the CLIP classification problem


def fixed_batch(es: EvalSet, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n images of the set, evenly spaced over it (deterministic), and their labels."""
    ds = es.dataset
    m = len(ds)
    idx = list(range(m)) if m <= n else torch.linspace(0, m - 1, n).round().long().tolist()
    images = torch.stack([ds.image(i) for i in idx])
    labels = torch.tensor([ds.labels[i] for i in idx], dtype=torch.long)
    return images, labels


def _encode_chunks(encode, inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([F.normalize(encode(inputs[i:i + chunk]).float(), dim=-1)
                      for i in range(0, len(inputs), chunk)])


class ClassificationProblem:
    """sharpness.Problem for a TrainModule: cross-entropy on a fixed labelled batch. Features of the
    unperturbed model are cached and reused when a perturbation leaves an encoder untouched
    (call refresh() after changing the weights). Forward and backward run in chunks."""

    def __init__(self, module: TrainModule, images: torch.Tensor, labels: torch.Tensor,
                 tokens: torch.Tensor | None, n_classes: int, chunk: int = 256, text_chunk: int = 256):
        self.module = module.eval()
        for p in module.parameters():
            p.requires_grad_(True)
        self.params = dict(module.named_parameters())
        self.images, self.labels = images, labels
        self.uses_text = module.head is None
        self.tokens = tokens if self.uses_text else None
        self.n_classes = n_classes
        self.chunk, self.text_chunk = chunk, text_chunk
        clip = module.clip
        self.image_params = self._deps(lambda: clip.encode_image(images[:1]).float().sum())
        self.text_params = (self._deps(lambda: clip.encode_text(self.tokens[:1]).float().sum())
                            if self.uses_text else set())
        self.used = self.image_params | self.text_params | {n for n in self.params if n.startswith("head.")}
        self.refresh()

    def _deps(self, fn) -> set[str]:
        self.module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            fn().backward()
        out = {n for n, p in self.params.items() if p.grad is not None}
        self.module.zero_grad(set_to_none=True)
        return out

    def _image_features(self) -> torch.Tensor:
        return _encode_chunks(self.module.clip.encode_image, self.images, self.chunk)

    def _text_features(self) -> torch.Tensor | None:
        if not self.uses_text:
            return None
        return _encode_chunks(self.module.clip.encode_text, self.tokens, self.text_chunk)

    def _loss(self, img: torch.Tensor, txt: torch.Tensor | None) -> torch.Tensor:
        if self.module.head is not None:
            logits = self.module.head(img)
        else:
            cls = F.normalize(txt.view(self.n_classes, -1, txt.shape[-1]).mean(1), dim=-1)
            logits = self.module.clip.logit_scale.exp().float() * img @ cls.T
        return F.cross_entropy(logits.float(), self.labels)

    @torch.no_grad()
    def refresh(self) -> None:
        self._img = self._image_features()
        self._txt = self._text_features()

    @torch.no_grad()
    def loss(self, changed: list[str]) -> float:
        ch = set(changed)
        img = self._image_features() if ch & self.image_params else self._img
        txt = self._text_features() if ch & self.text_params else self._txt
        return float(self._loss(img, txt))

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Two-stage backward: the loss's gradient with respect to the (cached) features, then
        each chunk of each encoder re-run with autograd and back-propagated from it."""
        self.module.zero_grad(set_to_none=True)
        with torch.no_grad():
            img0, txt0 = self._image_features(), self._text_features()
        img = img0.clone().requires_grad_(True)
        txt = txt0.clone().requires_grad_(True) if txt0 is not None else None
        with torch.enable_grad():
            value = self._loss(img, txt)
            value.backward()
            for feats, encode, inputs, chunk in ((img, self.module.clip.encode_image, self.images, self.chunk),
                                                 (txt, self.module.clip.encode_text, self.tokens, self.text_chunk)):
                if feats is None:
                    continue
                for i in range(0, len(inputs), chunk):
                    f = F.normalize(encode(inputs[i:i + chunk]).float(), dim=-1)
                    f.backward(feats.grad[i:i + chunk])
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                 for n, p in self.params.items()}
        self.module.zero_grad(set_to_none=True)
        return float(value.detach()), grads


def build_problem(module: TrainModule, env: Environment, opts: SharpnessOptions) -> ClassificationProblem:
    es = next(e for e in env.evals if e.name == env.id_set)
    images, labels = fixed_batch(es, opts.batch_size)
    tokens = None
    if module.head is None:
        texts = [fill_template(t, c) for c in es.classnames for t in env.templates]
        tokens = env.tokenizer(texts).to(env.device)
    return ClassificationProblem(module, images.to(env.device), labels.to(env.device), tokens,
                                 len(es.classnames), chunk=opts.batch_size, text_chunk=opts.text_batch_size)


# ---------------------------------------------------------------------------------------------
# accuracy rows -> per-alpha numbers


def accuracy_summary(rows: list[dict], id_set: str) -> dict[str, float | None]:
    """{id_top1, ood_mean, zeroshot_mean, top1_<set>...} from the driver's evaluation rows."""
    out: dict[str, float | None] = {}
    ood, zs = [], []
    for r in rows:
        t = r.get("top1")
        out[f"top1_{r['eval_set']}"] = t
        if t is None:
            continue
        if r["eval_set"] == id_set:
            out["id_top1"] = t
        elif r.get("role") == "ood":
            ood.append(t)
        elif r.get("role") == "zeroshot":
            zs.append(t)
    out.setdefault("id_top1", None)
    out["ood_mean"] = sum(ood) / len(ood) if ood else None
    out["zeroshot_mean"] = sum(zs) / len(zs) if zs else None
    return out


def rank_correlations(x: list[float], y: list[float]) -> dict[str, float]:
    """Spearman and Kendall (tau-b) with their p-values; NaN when either side is constant or
    fewer than 3 points."""
    from scipy.stats import kendalltau, spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    nan = {"n": len(pairs), "spearman": math.nan, "spearman_p": math.nan, "kendall": math.nan, "kendall_p": math.nan}
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return nan
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = spearmanr(a, b)
        k = kendalltau(a, b)
    return {"n": len(pairs), "spearman": float(s.statistic), "spearman_p": float(s.pvalue),
            "kendall": float(k.statistic), "kendall_p": float(k.pvalue)}


# ---------------------------------------------------------------------------------------------
# one fine-tuned model


HEADLINE_MEASURES = ("overall_random", "straggler_random", "overall_worst", "straggler_worst")


@dataclass
class MethodAnalysis:
    method: str
    groups: dict[str, list[str]]
    stragglers: list[str]
    straggler_note: str
    scores: dict[str, float]
    layer_rows: list[dict]
    alpha_rows: list[dict]
    correlation_rows: list[dict]
    intervention_rows: list[dict]
    intervention_summary: list[dict]
    seconds: float


def _params_of(state: dict[str, torch.Tensor], module: TrainModule) -> list[str]:
    names = dict(module.named_parameters())
    return [n for n in state if n in names]


def analyze_method(env: Environment, method: str, zs_state: dict[str, torch.Tensor],
                   ft_state: dict[str, torch.Tensor], template: TrainModule, opts: SharpnessOptions,
                   sweep_rows: dict[float, list[dict]] | None = None, log=print) -> MethodAnalysis:
    """The whole analysis of one fine-tuned model against its zero-shot model. `template` is a
    TrainModule of the right architecture (its weights are replaced); `sweep_rows` are evaluation
    rows the driver's WiSE-FT sweep already computed, per alpha (re-evaluated when missing)."""
    t0 = time.perf_counter()
    zs_state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in zs_state.items()}
    ft_state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in ft_state.items()}
    work = copy.deepcopy(template).float().to(env.device)
    work.load_state_dict(ft_state)
    problem = build_problem(work, env, opts)
    groups = {g: [n for n in names if n in problem.used]
              for g, names in sh.layer_groups(n for n, _ in work.named_parameters()).items()}
    groups = {g: names for g, names in groups.items() if names}

    layer_rows, alpha_rows, tables = [], [], {"random": [], "worst": []}
    for alpha in opts.alphas:
        work.load_state_dict(interpolate(zs_state, ft_state, alpha))
        problem.refresh()
        res = sh.estimate(problem, groups, opts.rho, opts.samples, opts.seed)
        rows = sweep_rows.get(alpha) if sweep_rows else None
        if rows is None:
            rows = env.eval_fn(work)
        acc = accuracy_summary(rows, env.id_set)
        tables["random"].append({g: res.random[g] for g in groups})
        tables["worst"].append({g: res.worst[g] for g in groups})
        for g, names in groups.items():
            layer_rows.append({"method": method, "alpha": alpha, "group": g, "tower": sh.tower_of(names[0]),
                               "n_params": sum(problem.params[n].numel() for n in names),
                               "sharpness_random": res.random[g], "sharpness_random_se": res.random_se[g],
                               "sharpness_worst": res.worst[g]})
        alpha_rows.append({"method": method, "alpha": alpha, "loss": res.base_loss,
                           "overall_random": res.random[sh.OVERALL],
                           "overall_random_se": res.random_se[sh.OVERALL],
                           "overall_worst": res.worst[sh.OVERALL], **acc})
        log(f"[sharpness {method}] alpha {alpha:g}: loss {res.base_loss:.4f} overall random "
            f"{res.random[sh.OVERALL]:.4g} worst {res.worst[sh.OVERALL]:.4g}  ID {_pct(acc['id_top1'])} "
            f"OOD {_pct(acc['ood_mean'])}")

    # stragglers (from the chosen measure), per-alpha z-scores, straggler sharpness
    scores = sh.straggler_scores(tables[opts.measure], list(groups))
    stragglers, note = sh.select_stragglers(scores, opts.stragglers)
    for r in layer_rows:
        r["straggler"] = r["group"] in stragglers
        r["straggler_score"] = scores[r["group"]]
    for i, r in enumerate(alpha_rows):
        for m in ("random", "worst"):
            r[f"straggler_{m}"] = sum(tables[m][i][g] for g in stragglers) / len(stragglers)
        r["stragglers"] = "|".join(stragglers)
    log(f"[sharpness {method}] straggler layers ({opts.measure}; {note}): {', '.join(stragglers)}")

    # rank correlations across alpha
    targets = [t for t in ("ood_mean", "id_top1", "zeroshot_mean") if any(r.get(t) is not None for r in alpha_rows)]
    targets += sorted({k for r in alpha_rows for k in r if k.startswith("top1_")})
    measures = list(HEADLINE_MEASURES) + [f"layer:{g}:{m}" for g in groups for m in ("random", "worst")]
    corr_rows = []
    for target in targets:
        y = [r.get(target) for r in alpha_rows]
        for measure in measures:
            if measure.startswith("layer:"):
                _, g, m = measure.split(":")
                x = [tables[m][i][g] for i in range(len(alpha_rows))]
            else:
                x = [r[measure] for r in alpha_rows]
            corr_rows.append({"method": method, "target": target, "measure": measure, **rank_correlations(x, y)})

    # the sparsity intervention
    names = [n for g in stragglers for n in groups[g] if n in ft_state]
    inter_rows, inter_summary = [], []
    for p in opts.sparsity:
        sparse_ft, counts = sh.sparsify_task_vector(zs_state, ft_state, names, p)
        per_alpha = []
        for base in alpha_rows:
            alpha = base["alpha"]
            work.load_state_dict(interpolate(zs_state, sparse_ft, alpha))
            acc = accuracy_summary(env.eval_fn(work), env.id_set)
            row = {"method": method, "p": p, "alpha": alpha, **acc,
                   "ood_mean_without": base["ood_mean"], "id_top1_without": base["id_top1"],
                   "ood_mean_change": _diff(acc["ood_mean"], base["ood_mean"]),
                   "id_top1_change": _diff(acc["id_top1"], base["id_top1"])}
            per_alpha.append(row)
        inter_rows += per_alpha
        changes = [r["ood_mean_change"] for r in per_alpha if r["ood_mean_change"] is not None]
        best_without = _best(alpha_rows)
        best_with = _best(per_alpha)
        summary = {"method": method, "p": p, "stragglers": "|".join(stragglers), **counts,
                   "mean_ood_change": sum(changes) / len(changes) if changes else None,
                   "alphas_improved": sum(c > 0 for c in changes), "alphas_worse": sum(c < 0 for c in changes),
                   "alphas": len(changes),
                   "best_alpha_without": best_without[0], "ood_at_best_alpha_without": best_without[1],
                   "best_alpha_with": best_with[0], "ood_at_best_alpha_with": best_with[1]}
        summary["improved"] = bool(summary["mean_ood_change"] is not None and summary["mean_ood_change"] > 0)
        inter_summary.append(summary)
        log(f"[sharpness {method}] sparsity p={p:g} in the straggler layers ({counts['zeroed']} of "
            f"{counts['entries']} task-vector entries zeroed): OOD mean change along alpha "
            f"{_pp(summary['mean_ood_change'])} (better at {summary['alphas_improved']}, worse at "
            f"{summary['alphas_worse']} of {len(changes)} alphas)")
    seconds = time.perf_counter() - t0
    return MethodAnalysis(method, groups, stragglers, note, scores, layer_rows, alpha_rows, corr_rows,
                          inter_rows, inter_summary, seconds)


def _diff(a, b):
    return None if a is None or b is None else a - b


def _best(rows: list[dict]) -> tuple[float | None, float | None]:
    """The alpha with the best ID top-1 (larger alpha on ties, as the driver) and its OOD mean."""
    best = None
    for r in rows:
        if r.get("id_top1") is not None and (best is None or r["id_top1"] >= best["id_top1"]):
            best = r
    return (best["alpha"], best["ood_mean"]) if best else (None, None)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _pp(v) -> str:
    return "-" if v is None else f"{100 * v:+.2f} points"


# ---------------------------------------------------------------------------------------------
# outputs


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_table(rows: list[dict], path_stem: str) -> None:
    """<stem>.csv and <stem>.jsonl (NaN written as empty / null)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path_stem + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")
    with open(path_stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in cols})


def headline(a: MethodAnalysis, target: str = "ood_mean") -> list[dict]:
    return [r for r in a.correlation_rows if r["target"] == target and r["measure"] in HEADLINE_MEASURES]


def write_outputs(analyses: list[MethodAnalysis], out_dir: str, opts: SharpnessOptions,
                  extra: dict | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_table([r for a in analyses for r in a.layer_rows], os.path.join(out_dir, "layers"))
    write_table([r for a in analyses for r in a.alpha_rows], os.path.join(out_dir, "alphas"))
    write_table([r for a in analyses for r in a.correlation_rows], os.path.join(out_dir, "correlations"))
    write_table([r for a in analyses for r in a.intervention_rows], os.path.join(out_dir, "intervention"))
    write_table([r for a in analyses for r in a.intervention_summary], os.path.join(out_dir, "intervention_summary"))
    summary = {"options": {k: getattr(opts, k) for k in ("rho", "samples", "batch_size", "stragglers", "measure",
                                                         "sparsity", "seed", "alphas")},
               **(extra or {}), "methods": {}}
    for a in analyses:
        summary["methods"][a.method] = {
            "groups": {g: len(n) for g, n in a.groups.items()}, "stragglers": a.stragglers,
            "straggler_rule": a.straggler_note, "straggler_scores": a.scores,
            "correlations_with_ood_mean": {r["measure"]: {k: _clean(r[k]) for k in
                                                          ("spearman", "spearman_p", "kendall", "kendall_p")}
                                           for r in headline(a)},
            "intervention": a.intervention_summary, "seconds": round(a.seconds, 2)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=_clean)
    if opts.plots:
        from . import sharpness_plots

        for a in analyses:
            stem = os.path.join(out_dir, a.method)
            sharpness_plots.heatmap(a, stem + "_layer_sharpness.png")
            sharpness_plots.ood_vs_alpha(a, stem + "_ood_vs_alpha.png")


def format_report(analyses: list[MethodAnalysis]) -> str:
    lines = ["rank correlation across alpha with mean OOD top-1 (Spearman rho / Kendall tau):",
             f"{'method':<14} {'stragglers':<28} " + " ".join(f"{m:>18}" for m in HEADLINE_MEASURES)]
    for a in analyses:
        cells = {r["measure"]: r for r in headline(a)}
        vals = " ".join(f"{_fmt(cells[m]['spearman']):>8} / {_fmt(cells[m]['kendall']):>7}" for m in HEADLINE_MEASURES)
        lines.append(f"{a.method:<14} {','.join(a.stragglers)[:28]:<28} {vals}")
    lines.append("sparsity intervention in the straggler layers (mean OOD change along alpha; OOD at the best "
                 "ID alpha without -> with):")
    for a in analyses:
        for s in a.intervention_summary:
            lines.append(f"{a.method:<14} p={s['p']:<5g} {_pp(s['mean_ood_change']):>16}  better at "
                         f"{s['alphas_improved']}/{s['alphas']} alphas; {_pct(s['ood_at_best_alpha_without'])} "
                         f"(alpha {s['best_alpha_without']}) -> {_pct(s['ood_at_best_alpha_with'])} "
                         f"(alpha {s['best_alpha_with']})")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:+.2f}"


class TrainingHook:
    """--analyze-sharpness on a training run: after each method's WiSE-FT sweep, analyse it (reusing
    the sweep's evaluation rows) and rewrite <run-dir>/sharpness/."""

    def __init__(self, prepared, eval_fn):
        from .sharpness_cli import options

        cfg = prepared.cfg
        self.opts = options(cfg, cfg.alphas, not cfg.no_plots, cfg.seed)
        self.env = Environment(prepared.evals, prepared.id_set, prepared.tokenizer, prepared.templates,
                               prepared.info.device, eval_fn)
        self.out_dir = os.path.join(prepared.run_dir, "sharpness")
        self.done: list[MethodAnalysis] = []

    def add(self, method: str, zs_module: TrainModule, ft_module: TrainModule, sweep) -> None:
        rows = {alpha: rs for alpha, rs in sweep}
        self.done.append(analyze_method(self.env, method, zs_module.state_dict(), ft_module.state_dict(),
                                        ft_module, self.opts, rows))
        write_outputs(self.done, self.out_dir, self.opts,
                      {"seconds_total": round(sum(a.seconds for a in self.done), 2)})

    def report(self) -> None:
        if self.done:
            print("\nsharpness along WiSE-FT (" + self.out_dir + "):\n" + format_report(self.done), flush=True)
