"""robustft-train study: the whole method comparison once per seed, summarised over the seeds.

`robustft-train study --seeds 0,1,2 [any training flag]` runs <run-dir>/seed-<s>/ as a complete
run with --seed s (the seed drives the initialisation, the embedded pre-training, the data order,
the augmentation, m^2-mix's lam, Lipsum's random texts, DiVE's reference pairs and the sharpness
noise), with the sharpness analysis of ft and flyp on (--no-sharpness: off), then writes:

  study.json               the seeds and the resolved settings of the study
  study_summary.csv        per method (fine-tuned model, alpha 1; zeroshot at 0) and metric: mean, sd,
                           95% t-interval over the seeds (ci_low, ci_high), n_seeds, unit
  study_wise_ft.csv        the same along WiSE-FT: per method, alpha and accuracy target
  study_differences.csv    each method minus its base (ft or flyp; a base minus zeroshot), paired
                           by seed: mean difference, its interval, direction (higher / lower /
                           inconclusive)
  claims.csv, claims.md    the papers' claims with their numbers, intervals and verdicts (claims.py)
  study_bars.png, study_wise_ft.png, study_differences.png   plots with error bars

Units: accuracies, ECE and recall in % (differences in % points), alignment, uniformity, RSA and
rank correlations as they are; the `unit` column says which. `--resume` continues an interrupted
study: finished seeds are kept, an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from . import claims as claims_mod
from . import distributed as dist_utils
from . import embedded, plots, runner
from .config import Config, check_resume_flags, named_paths, resolve, resumed
from .errors import ConfigError, DriverError
from .files import atomic_write_text
from .flags import given_flags, study_parser
from .methods import parse_methods
from .report import clean, r1, write_csv
from .stats import direction, paired, t_interval

STUDY_FILE = "study.json"
SUMMARY_KEYS = ["method", "metric", "unit", "mean", "sd", "ci_low", "ci_high", "n_seeds"]
CLAIM_KEYS = ["claim", "part", "method", "base", "statistic", "unit", "expected", "method_mean", "base_mean",
              "mean_diff", "ci_low", "ci_high", "n_seeds", "verdict", "claim_verdict"]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, got {text!r}")
    return seeds


def unit_of(metric: str) -> str:
    if metric.startswith(("top1_", "r1_", "ece_", "i2t_", "t2i_")) or metric.endswith("_top1"):
        return "%"
    return ""


def id_set_of(cfg: Config) -> str:
    return embedded.ID_SET if cfg.embedded else (cfg.id_eval or named_paths(cfg.eval_data, "--eval-data")[0][0])


# ---------------------------------------------------------------------------------------------
# running the seeds


def _study_config(args) -> tuple[Config, list[int]]:
    """The study's base Config and seeds: from the flags, or (--resume) from its study.json."""
    path = os.path.join(args.run_dir or "", STUDY_FILE)
    if args.resume:
        if not (args.run_dir and os.path.isfile(path)):
            raise ConfigError(f"--resume: {path} does not exist (not a study folder)")
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            cfg = Config(**saved["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DriverError(f"{path}: cannot read the study's settings ({e}); start the study again in a "
                              "new --run-dir") from None
        for key in ("workers", "threads", "device", "no_plots"):
            setattr(cfg, key, getattr(args, key))
        return cfg, [int(s) for s in saved["seeds"]]
    values = dict(vars(args), run_dir=None)
    if not args.no_sharpness and not args.analyze_sharpness:
        # the straggler claim is about the bases: analyse those the comparison has
        methods = {m.spec for m in parse_methods(resolve(dict(values)).methods)}
        bases = [m for m in ("ft", "flyp") if m in methods]
        values.update(analyze_sharpness=bool(bases), sharpness_methods=args.sharpness_methods or ",".join(bases) or None)
    cfg = resolve(values)
    cfg.run_dir = args.run_dir or os.path.join("runs", time.strftime("study-%Y%m%d-%H%M%S"))
    return cfg, parse_seeds(args.seeds)


def _seed_config(base: Config, seed: int, run_dir: str) -> Config | None:
    """The Config of one seed's run; None when that run finished before."""
    if os.path.isfile(os.path.join(run_dir, "results.jsonl")):
        return None
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        return resumed(run_dir, dict(dataclasses.asdict(base), resume=True))
    return dataclasses.replace(base, seed=seed, run_dir=run_dir, resume=False)


def run_seeds(base: Config, seeds: list[int], info: dist_utils.DistInfo) -> int:
    for seed in seeds:
        seed_dir = os.path.join(base.run_dir, f"seed-{seed}")
        cfg = _seed_config(base, seed, seed_dir)
        if cfg is None:
            if info.is_main:
                print(f"[study] seed {seed}: finished earlier ({seed_dir})", flush=True)
            continue
        if info.is_main:
            print(f"[study] seed {seed}: {seed_dir}", flush=True)
        code = runner.execute(runner.prepare(cfg, info))
        if code:
            return code
    return 0


def main(argv: list[str]) -> int:
    parser = study_parser()
    args = parser.parse_args(argv)
    try:
        base, seeds = _study_config(args)
        study_file = os.path.join(base.run_dir, STUDY_FILE)
        if args.resume:
            check_resume_flags(given_flags(parser, argv), dict(dataclasses.asdict(base), seeds=",".join(map(str, seeds))),
                               study_file)
        if not args.resume and os.path.exists(study_file):
            raise DriverError(f"--run-dir {base.run_dir} already holds a study; pass --resume to continue it "
                              "or choose another --run-dir")
        info = dist_utils.init(base.device)
        try:
            if info.is_main and not args.resume:
                atomic_write_text(study_file, json.dumps({"seeds": seeds, "config": dataclasses.asdict(base)},
                                                         indent=2, sort_keys=True))
            code = run_seeds(base, seeds, info)
            if code == 0 and info.is_main:
                summarise_study(base, seeds)
            return code
        finally:
            dist_utils.cleanup(info)
    except DriverError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


# ---------------------------------------------------------------------------------------------
# summarising the seeds


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def model_metrics(rows: list[dict], id_set: str) -> dict[str, float]:
    """The metrics of one model (its rows at one alpha), in the study's units."""
    by_set = {r["eval_set"]: r for r in rows}
    out: dict[str, float] = {}

    def mean_top1(role: str) -> float | None:
        vals = [r["top1"] for r in rows if r.get("role") == role and r.get("top1") is not None]
        return 100 * sum(vals) / len(vals) if vals else None

    for name, r in by_set.items():
        if r.get("top1") is not None:
            out[f"top1_{name}"] = 100 * r["top1"]
        if r.get("i2t_r1") is not None:
            out.update({f"r1_{name}": 100 * r1(r), f"i2t_r1_{name}": 100 * r["i2t_r1"],
                        f"t2i_r1_{name}": 100 * r["t2i_r1"]})
        if r.get("i2t_r1") is not None or name == id_set:
            out.update({f"alignment_{name}": r.get("alignment"), f"uniformity_{name}": r.get("uniformity")})
    for role in ("id", "ood", "zeroshot"):
        out[f"{role}_mean_top1"] = mean_top1(role)
    ident = by_set.get(id_set, {})
    out[f"ece_{id_set}"] = 100 * ident["ece"] if ident.get("ece") is not None else None
    out[f"rsa_{id_set}"] = ident.get("rsa")
    return {k: v for k, v in out.items() if clean(v) is not None}


def collect(base: Config, seeds: list[int]) -> claims_mod.SeedTables:
    """Every seed's fine-tuned metrics, WiSE-FT curves and sharpness correlations."""
    id_set = id_set_of(base)
    methods = [m.spec for m in parse_methods(base.methods)]
    tables = claims_mod.SeedTables(seeds, {m: [] for m in methods}, {m: [] for m in methods}, id_set=id_set)
    for seed in seeds:
        seed_dir = os.path.join(base.run_dir, f"seed-{seed}")
        rows = _read_jsonl(os.path.join(seed_dir, "results.jsonl"))
        if not rows:
            raise DriverError(f"{seed_dir}/results.jsonl: missing or empty; finish the seed's run with "
                              f"robustft-train study --resume --run-dir {base.run_dir}")
        tables.captioned = sorted({r["eval_set"] for r in rows if r.get("i2t_r1") is not None})
        for m in methods:
            mrows = [r for r in rows if r["method"] == m]
            alphas = sorted({r["alpha"] for r in mrows})
            tables.metrics[m].append(model_metrics([r for r in mrows if r["alpha"] == max(alphas)], id_set)
                                     if mrows else {})
            tables.curves[m].append({a: model_metrics([r for r in mrows if r["alpha"] == a], id_set) for a in alphas})
        corr = _read_jsonl(os.path.join(seed_dir, "sharpness", "correlations.jsonl"))
        for m in methods:
            tables.correlations.setdefault(m, []).append(
                {r["measure"]: r.get("spearman") for r in corr if r["method"] == m and r["target"] == "ood_mean"})
    return tables


def summary_rows(tables: claims_mod.SeedTables) -> list[dict]:
    out = []
    for m, per_seed in tables.metrics.items():
        for metric in dict.fromkeys(k for d in per_seed for k in d):
            out.append({"method": m, "metric": metric, "unit": unit_of(metric),
                        **t_interval([d.get(metric) for d in per_seed])})
    return out


CURVE_METRICS = ("id_mean_top1", "ood_mean_top1", "zeroshot_mean_top1")


def curve_rows(tables: claims_mod.SeedTables) -> list[dict]:
    """Along WiSE-FT, per method, alpha and accuracy target: the accuracy, and its gain over the
    same seed's zero-shot model (alpha 0; paired, so the zero-shot models' spread drops out)."""
    out = []
    for m, per_seed in tables.curves.items():
        for alpha in sorted({a for c in per_seed for a in c}):
            for metric in (f"top1_{tables.id_set}",) + CURVE_METRICS:
                values = [c.get(alpha, {}).get(metric) for c in per_seed]
                if not any(v is not None for v in values):
                    continue
                out.append({"method": m, "alpha": alpha, "metric": metric, "unit": "%", **t_interval(values)})
                zero = [c.get(0.0, {}).get(metric) for c in per_seed]
                out.append({"method": m, "alpha": alpha, "metric": f"gain_{metric}", "unit": "% points",
                            **paired(values, zero)})
    return out


def difference_rows(tables: claims_mod.SeedTables) -> list[dict]:
    """Each method minus its base (regularised methods) or minus zeroshot (the bases), paired."""
    out = []
    for spec in tables.metrics:
        method = parse_methods(spec)[0]
        base = method.base if method.regularisers else ("zeroshot" if method.trains else None)
        if base not in tables.metrics:
            continue
        a, b = tables.metrics[spec], tables.metrics[base]
        for metric in dict.fromkeys(k for d in a for k in d):
            st = paired([d.get(metric) for d in a], [d.get(metric) for d in b])
            unit = "% points" if unit_of(metric) == "%" else ""
            out.append({"method": spec, "base": base, "metric": metric, "unit": unit, "mean_diff": st["mean"],
                        "ci_low": st["ci_low"], "ci_high": st["ci_high"], "n_seeds": st["n_seeds"],
                        "direction": direction(st)})
    return out


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if unit else f"{v:+.4f}"


def claims_markdown(rows: list[dict], n_seeds: int) -> str:
    """The claims table in Markdown (the same numbers as claims.csv)."""
    lines = [f"Paired over {n_seeds} seeds; difference = method - base, mean and 95% t-interval; accuracies and "
             "recall in %, their differences in % points; alignment, uniformity, RSA and |rho| without unit.", "",
             "| claim | part | method vs base | method | base | difference [95% CI] | verdict | claim verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unit = " % points" if r["unit"] == "%" else (f" {r['unit']}" if r["unit"] else "")
        mean = lambda v: "-" if v is None else (f"{v:.2f}" if r["unit"] else f"{v:.4f}")  # noqa: E731
        ci = "" if r["ci_low"] is None else f" [{_fmt(r['ci_low'], r['unit'])}, {_fmt(r['ci_high'], r['unit'])}]"
        lines.append(f"| {r['claim'].split('.')[0]} | {r['part']} | {r['method']} vs {r['base']} | "
                     f"{mean(r['method_mean'])} | {mean(r['base_mean'])} | {_fmt(r['mean_diff'], r['unit'])}{ci}"
                     f"{unit} (n={r['n_seeds']}) | {r['verdict']} | {r['claim_verdict']} |")
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    return "\n".join(lines + ["", "Claims:"] + [f"- {c}" for c in claims]) + "\n"


def _plots(base: Config, tables: claims_mod.SeedTables, summary: list[dict], curves: list[dict],
           claim_rows: list[dict]) -> list[str]:
    path = lambda n: os.path.join(base.run_dir, n)  # noqa: E731
    rows = _read_jsonl(os.path.join(base.run_dir, f"seed-{tables.seeds[0]}", "results.jsonl"))
    set_roles = list(dict.fromkeys((r["eval_set"], r["role"]) for r in rows))
    methods = list(tables.metrics)
    stats = {(r["method"], r["metric"]): r for r in summary}
    n = len(tables.seeds)
    plots.study_bars(stats, methods, set_roles, n, path("study_bars.png"))
    curve = {(r["method"], r["metric"], r["alpha"]): r for r in curves}
    targets = [(f"gain_top1_{tables.id_set}", f"ID top-1 on {tables.id_set}"),
               ("gain_ood_mean_top1", "mean OOD top-1"), ("gain_zeroshot_mean_top1", "mean zero-shot task top-1")]
    targets = [t for t in targets if any(k[1] == t[0] for k in curve)]
    plots.study_wise_ft(curve, [m for m in methods if m != "zeroshot"], targets, n, path("study_wise_ft.png"))
    labelled = [dict(r, label=f"{r['claim'].split('.')[0]}. {r['part']} ({r['method']} vs {r['base']})")
                for r in claim_rows]
    plots.study_differences(labelled, path("study_differences.png"))
    return [path("study_bars.png"), path("study_wise_ft.png"), path("study_differences.png")]


def summarise_study(base: Config, seeds: list[int]) -> None:
    tables = collect(base, seeds)
    path = lambda n: os.path.join(base.run_dir, n)  # noqa: E731
    summary, curves, diffs = summary_rows(tables), curve_rows(tables), difference_rows(tables)
    claim_rows = claims_mod.evaluate_claims(tables, base.sharpness_measure)
    write_csv(summary, SUMMARY_KEYS, path("study_summary.csv"))
    write_csv(curves, ["method", "alpha"] + SUMMARY_KEYS[1:], path("study_wise_ft.csv"))
    write_csv(diffs, ["method", "base", "metric", "unit", "mean_diff", "ci_low", "ci_high", "n_seeds", "direction"],
              path("study_differences.csv"))
    write_csv(claim_rows, CLAIM_KEYS, path("claims.csv"))
    markdown = claims_markdown(claim_rows, len(seeds))
    atomic_write_text(path("claims.md"), markdown)
    written = [path(n) for n in (STUDY_FILE, "study_summary.csv", "study_wise_ft.csv", "study_differences.csv",
                                 "claims.csv", "claims.md")]
    if not base.no_plots:
        written += _plots(base, tables, summary, curves, claim_rows)
    print(f"\nclaims over seeds {seeds} (claims.csv):\n" + markdown)
    print(f"study folder: {base.run_dir}; files written:")
    print("\n".join(f"  {p}" for p in written), flush=True)
