"""robustft-train analyze-sharpness: the sharpness analysis along the WiSE-FT path as a subcommand
(docs/sharpness.md), and the sharpness flags that training runs share (--analyze-sharpness).

Three ways to run it:
- --zeroshot CKPT --finetuned [NAME=]CKPT ... : analyse these checkpoints, on --eval-data (real data,
  same flags as training) or, without --eval-data, on the embedded digits sets;
- neither, and --run-dir naming a finished robustft-train run: analyse every fine-tuned method of that
  run against its zero-shot model (checkpoints/pretrain/final.pt, or the run's --pretrained);
- neither, and no run there: train the embedded default (methods ft,flyp by default) with
  --analyze-sharpness, i.e. `robustft-train --analyze-sharpness ...`.

Exit status: 0 done; 2 bad input (a message naming the flag, before any work).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

SUBCOMMAND = "analyze-sharpness"
DEFAULTS = {"sharpness_rho": 0.05, "sharpness_samples": 16, "sharpness_batch_size": 256,
            "sharpness_stragglers": "std:2", "sharpness_measure": "random", "sharpness_sparsity": "0.5"}
EMBEDDED_METHODS = "ft,flyp"


def add_arguments(g, aliases: bool = False) -> None:
    """The sharpness flags (training parser: --sharpness-*; the subcommand adds --rho, --samples,
    --sparsity as aliases)."""
    def names(main: str, alias: str) -> list[str]:
        return [main, alias] if aliases else [main]

    g.add_argument(*names("--sharpness-rho", "--rho"), dest="sharpness_rho", type=float,
                   default=DEFAULTS["sharpness_rho"],
                   help="adaptive perturbation radius rho: random eps ~ N(0, (rho |theta|)^2) elementwise; the "
                   "worst-case step is one ASAM ascent step of adaptive radius rho, ||eps / |theta| || = rho")
    g.add_argument(*names("--sharpness-samples", "--samples"), dest="sharpness_samples", type=int,
                   default=DEFAULTS["sharpness_samples"],
                   help="noise draws per layer group and alpha for the random sharpness (each used as +eps "
                   "and -eps: 2 x this many loss evaluations)")
    g.add_argument("--sharpness-batch-size", type=int, default=DEFAULTS["sharpness_batch_size"],
                   help="images of the ID validation set (evenly spaced, fixed) in the batch whose "
                   "cross-entropy is perturbed")
    g.add_argument("--sharpness-stragglers", default=DEFAULTS["sharpness_stragglers"],
                   help="straggler rule: 'std:T' (mean z-score over alpha above mean + T std of the "
                   "groups; the top group if none) or 'topk:K'")
    g.add_argument("--sharpness-measure", choices=["random", "worst"], default=DEFAULTS["sharpness_measure"],
                   help="the sharpness measure that picks the straggler layers")
    g.add_argument(*names("--sharpness-sparsity", "--sparsity"), dest="sharpness_sparsity",
                   default=DEFAULTS["sharpness_sparsity"],
                   help="intervention: comma-separated fractions p in [0, 1) of the task vector zeroed "
                   "(smallest |.|) inside the straggler layers")


def parse_sparsity(text: str) -> list[float]:
    try:
        ps = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sharpness-sparsity: expected comma-separated numbers, got {text!r}") from None
    if not ps:
        raise ValueError("--sharpness-sparsity: give at least one fraction p")
    bad = [p for p in ps if not (0 <= p < 1)]
    if bad:
        raise ValueError(f"--sharpness-sparsity: p must be in [0, 1), got {bad}")
    return sorted(set(ps))


def check(values) -> None:
    """Validate the sharpness flags of a Config or Namespace; ValueError names the flag."""
    from .sharpness import parse_straggler_rule

    rho = values.sharpness_rho
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"--sharpness-rho (--rho) must be a positive number, got {rho}")
    if values.sharpness_samples < 1:
        raise ValueError(f"--sharpness-samples (--samples) must be >= 1, got {values.sharpness_samples}")
    if values.sharpness_batch_size < 1:
        raise ValueError(f"--sharpness-batch-size must be >= 1, got {values.sharpness_batch_size}")
    try:
        parse_straggler_rule(values.sharpness_stragglers)
    except ValueError as e:
        raise ValueError(f"--sharpness-stragglers: {e}") from None
    if values.sharpness_measure not in ("random", "worst"):
        raise ValueError(f"--sharpness-measure must be random or worst, got {values.sharpness_measure!r}")
    parse_sparsity(values.sharpness_sparsity)


def options(values, alphas: list[float], plots: bool, seed: int):
    from .sharpness_analysis import SharpnessOptions

    return SharpnessOptions(rho=float(values.sharpness_rho), samples=int(values.sharpness_samples),
                            batch_size=int(values.sharpness_batch_size), stragglers=values.sharpness_stragglers,
                            measure=values.sharpness_measure, sparsity=parse_sparsity(values.sharpness_sparsity),
                            seed=seed, alphas=list(alphas), plots=plots)


def build_parser() -> argparse.ArgumentParser:
    from .config import Config

    d = Config()
    p = argparse.ArgumentParser(
        prog=f"robustft-train {SUBCOMMAND}",
        description="Layer-wise sharpness along the WiSE-FT path (docs/maths.md, section 7, our "
                    "reading of arXiv 2410.16476): for every alpha the overall and layer-wise "
                    "sharpness (random and worst-case adaptive perturbations), ID and OOD accuracy, "
                    "the straggler layers, rank correlations with OOD accuracy, and the sparsity "
                    "intervention. Without --zeroshot/--finetuned it analyses the run in --run-dir, "
                    "or trains the embedded default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--zeroshot", metavar="CKPT", help="the zero-shot model: a robustft-train checkpoint "
                   "(checkpoints/pretrain/final.pt) or a state dict / open_clip checkpoint")
    g.add_argument("--finetuned", action="append", default=[], metavar="[NAME=]CKPT",
                   help="a fine-tuned model (checkpoints/<method>/final.pt, or a state dict); repeatable; "
                   "NAME labels it (default: the checkpoint's method, else 'finetuned')")
    g.add_argument("--model", help="open_clip model name or config JSON (default: the tiny embedded ViT)")
    g = p.add_argument_group("data (as for training; omit --eval-data for the embedded digits)")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="evaluation sets; the first (or --id-eval) is the ID set whose batch the sharpness uses")
    g.add_argument("--zeroshot-data", action="append", default=[], metavar="NAME=PATH",
                   help="zero-shot tasks (image folders named by class)")
    g.add_argument("--id-eval", help="the --eval-data NAME of the ID set (default: the first)")
    g.add_argument("--train-data", help="only for the class names: an image folder (its sub-folders)")
    g.add_argument("--classnames", help="a text file of class names, one a line")
    g.add_argument("--templates", help="a text file of prompt templates with '{}'")
    g.add_argument("--csv-img-key", default=d.csv_img_key)
    g.add_argument("--csv-caption-key", default=d.csv_caption_key)
    g.add_argument("--csv-label-key", default=None)
    g.add_argument("--csv-separator", default=d.csv_separator)
    g = p.add_argument_group("sharpness")
    add_arguments(g, aliases=True)
    g.add_argument("--wise-ft-alphas", default=d.wise_ft_alphas, help="the interpolation path")
    g = p.add_argument_group("embedded default (when it trains: no checkpoints and no run in --run-dir)")
    g.add_argument("--methods", default=EMBEDDED_METHODS, help="methods to fine-tune and analyse")
    g.add_argument("--embedded-fraction", type=float, default=d.embedded_fraction,
                   help="fraction of the digits (also the digits sets used with --zeroshot/--finetuned)")
    g.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default 10)")
    g.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10)")
    g = p.add_argument_group("running")
    g.add_argument("--run-dir", help="output folder (results under <run-dir>/sharpness/); a finished "
                   "robustft-train run there is analysed (default: runs/sharpness-<timestamp>)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on the embedded model)")
    g.add_argument("--workers", type=int, default=0, help="data loader workers")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--metric-max-images", type=int, default=d.metric_max_images)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast of the accuracy evaluation (the sharpness loss always runs in fp32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise draws (and of training)")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    return p


class _Bad(Exception):
    pass


def _fail(msg: str):
    raise _Bad(msg)


def _named_checkpoint(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    if sep and name and path and not os.path.exists(text):
        return name, path
    return None, text


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except _Bad as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _validate(args) -> None:
    from .config import parse_alphas, ConfigError, named_paths

    try:
        check(args)
        args.alphas = parse_alphas(args.wise_ft_alphas)
        named_paths(args.eval_data, "--eval-data")
        named_paths(args.zeroshot_data, "--zeroshot-data")
    except (ValueError, ConfigError) as e:
        _fail(str(e))
    if bool(args.zeroshot) != bool(args.finetuned):
        _fail("--zeroshot and --finetuned go together: give both (or neither, to analyse --run-dir or train "
              "the embedded default)")
    for flag, path in [("--zeroshot", args.zeroshot)] + [("--finetuned", _named_checkpoint(f)[1])
                                                         for f in args.finetuned]:
        if path is not None and not os.path.isfile(path):
            _fail(f"{flag}: no such checkpoint file: {path}")
    for v in args.eval_data + args.zeroshot_data:
        path = v.partition("=")[2]
        if not os.path.exists(path):
            _fail(f"--eval-data/--zeroshot-data {v.partition('=')[0]}: no such file or folder: {path}")
    for flag, path in (("--train-data", args.train_data), ("--classnames", args.classnames),
                       ("--templates", args.templates)):
        if path is not None and not os.path.exists(path):
            _fail(f"{flag}: no such file or folder: {path}")
    if args.id_eval is not None and args.id_eval not in [v.partition("=")[0] for v in args.eval_data]:
        _fail(f"--id-eval {args.id_eval!r} is not one of the --eval-data names")
    if not args.zeroshot and (args.eval_data or args.zeroshot_data):
        _fail("--eval-data/--zeroshot-data need --zeroshot and --finetuned checkpoints")
    if not 0 < args.embedded_fraction <= 1:
        _fail(f"--embedded-fraction must be in (0, 1], got {args.embedded_fraction}")
    for flag, v, lo in (("--eval-batch-size", args.eval_batch_size, 1), ("--metric-max-images",
                        args.metric_max_images, 2), ("--workers", args.workers, 0)):
        if v < lo:
            _fail(f"{flag} must be >= {lo}, got {v}")
    if args.threads is not None and args.threads < 1:
        _fail(f"--threads must be >= 1, got {args.threads}")


def _run(args, parser) -> int:
    _validate(args)
    run_dir = args.run_dir or os.path.join("runs", time.strftime("sharpness-%Y%m%d-%H%M%S"))
    if args.zeroshot:
        return _analyze_checkpoints(args, run_dir)
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        return _analyze_run(args, run_dir)
    return _train_embedded(args, run_dir)


def _train_embedded(args, run_dir: str) -> int:
    from .cli import main as train_main

    argv = ["--analyze-sharpness", "--run-dir", run_dir, "--methods", args.methods,
            "--sharpness-rho", repr(args.sharpness_rho), "--sharpness-samples", str(args.sharpness_samples),
            "--sharpness-batch-size", str(args.sharpness_batch_size),
            "--sharpness-stragglers", args.sharpness_stragglers, "--sharpness-measure", args.sharpness_measure,
            "--sharpness-sparsity", str(args.sharpness_sparsity), "--wise-ft-alphas", args.wise_ft_alphas,
            "--embedded-fraction", repr(args.embedded_fraction), "--seed", str(args.seed),
            "--eval-batch-size", str(args.eval_batch_size), "--metric-max-images", str(args.metric_max_images),
            "--workers", str(args.workers), "--precision", args.precision]
    for flag, v in (("--pretrain-epochs", args.pretrain_epochs), ("--epochs", args.epochs),
                    ("--device", args.device), ("--threads", args.threads), ("--model", args.model),
                    ("--templates", args.templates)):
        if v is not None:
            argv += [flag, str(v)]
    if args.no_plots:
        argv.append("--no-plots")
    print(f"no --zeroshot/--finetuned and no run in {run_dir}: training the embedded default "
          f"(methods {args.methods}) with --analyze-sharpness", flush=True)
    return train_main(argv)


# ---------------------------------------------------------------------------------------------
# analysing saved models


def load_state(path: str, flag: str) -> tuple[dict, str | None]:
    """A state dict in TrainModule form ('clip.*', optional 'head.weight') and the checkpoint's
    phase (method) when it is a robustft-train checkpoint."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        _fail(f"{flag} {path}: cannot read it as a torch checkpoint: {str(e).splitlines()[0][:300]}")
    phase = obj.get("phase") if isinstance(obj, dict) and isinstance(obj.get("phase"), str) else None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        _fail(f"{flag} {path}: neither a robustft-train checkpoint nor a state dict of tensors")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not any(k.startswith("clip.") for k in sd):
        sd = {(k if k.startswith("head.") else "clip." + k): v for k, v in sd.items()}
    return sd, phase


def _fit(module, state: dict, flag: str, path: str, model_name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        summary = " ".join(str(e).strip().splitlines()[:6])[:1200]
        _fail(f"{flag} {path}: the weights do not fit model {model_name}: {summary}")


def _environment(args, run_dir: str, cfg=None):
    """(Environment, model name, clip template, class names) from the flags (or a run's Config)."""
    import open_clip
    import torch

    from . import embedded
    from .data import (CsvColumns, EvalSet, TrainSource, folder_classes, load_eval_set, load_zeroshot_set,
                       read_lines, read_templates)
    from .errors import DriverError
    from .evaluate import evaluate
    from .models import build_clip, get_tokenizer, preprocess_cfg, resolve_model_name
    from .sharpness_analysis import Environment

    src = cfg if cfg is not None else args
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model_name = resolve_model_name(src.model, os.path.join(run_dir, "model_config"))
        torch.manual_seed(getattr(src, "seed", 0))
        clip = build_clip(model_name, None, device)
        tokenizer = get_tokenizer(model_name)
        templates = read_templates(src.templates)
        is_embedded = (cfg.embedded if cfg is not None else not args.eval_data)
        torch.set_num_threads(args.threads or (1 if is_embedded else torch.get_num_threads()))
        if is_embedded:
            _, _, evals, emb_templates = embedded.build(
                getattr(src, "embedded_fraction", 1.0), preprocess_cfg(clip).get("size", embedded.IMAGE_SIZE))
            if src.templates is None:
                templates = emb_templates
            id_set = "val"
        else:
            pcfg = preprocess_cfg(clip)
            eval_tf = open_clip.image_transform(pcfg.get("size", 224), is_train=False, mean=pcfg.get("mean"),
                                                std=pcfg.get("std"), resize_mode=pcfg.get("resize_mode"),
                                                interpolation=pcfg.get("interpolation"))
            named = [(v.partition("=")[0], v.partition("=")[2]) for v in src.eval_data]
            id_set = src.id_eval or named[0][0]
            id_path = dict(named)[id_set]
            if src.classnames:
                classnames, folders = read_lines(src.classnames, "--classnames"), []
                if src.train_data and os.path.isdir(src.train_data):
                    folders = folder_classes(src.train_data, "--train-data")
            else:
                root = src.train_data if src.train_data and os.path.isdir(src.train_data) else id_path
                if not os.path.isdir(root):
                    _fail("--classnames: a CSV ID set needs the class names (a --classnames file or an "
                          "image-folder --train-data)")
                folders = folder_classes(root, "--train-data" if root == src.train_data else f"--eval-data {id_set}")
                classnames = [f.replace("_", " ") for f in folders]
            if folders and len(folders) != len(classnames):
                _fail(f"--classnames: {len(classnames)} names for {len(folders)} class folders")
            source = TrainSource(None, classnames, folders)
            cols = CsvColumns(src.csv_img_key, src.csv_caption_key, src.csv_label_key, src.csv_separator)
            evals = [EvalSet(n, "id" if n == id_set else "ood", load_eval_set(n, pth, source, cols, eval_tf),
                             classnames) for n, pth in named]
            for n, pth in [(v.partition("=")[0], v.partition("=")[2]) for v in src.zeroshot_data]:
                ds, names = load_zeroshot_set(n, pth, eval_tf)
                evals.append(EvalSet(n, "zeroshot", ds, names))
    except DriverError as e:
        _fail(str(e))
    id_eval = next(e for e in evals if e.name == id_set)
    if not id_eval.dataset.has_labels:
        _fail(f"--id-eval {id_set}: the sharpness loss and the accuracies need class labels in the ID set "
              "(--csv-label-key for a CSV)")

    def eval_fn(module):
        return evaluate(module, evals, tokenizer, templates, {}, device, args.eval_batch_size,
                        args.metric_max_images, args.workers, args.precision)

    env = Environment(evals, id_set, tokenizer, templates, device, eval_fn)
    return env, model_name, clip, id_eval.classnames


def _modules(env, model_name, clip, classnames, zs_path, zs_flag, finetuned):
    """Load and check every checkpoint before the analysis starts: [(label, zs_state, ft_state, template)]."""
    import copy

    from torch import nn

    from .evaluate import class_embeddings
    from .models import TrainModule, make_head

    zs_state, _ = load_state(zs_path, zs_flag)
    if any(k.startswith("head.") for k in zs_state):
        _fail(f"{zs_flag} {zs_path}: a zero-shot model has no classification head (this is a fine-tuned ft model)")
    zs_module = TrainModule(copy.deepcopy(clip))
    _fit(zs_module, zs_state, zs_flag, zs_path, model_name)
    zs_module.eval()
    out, labels = [], set()
    for label, path in finetuned:
        state, phase = load_state(path, "--finetuned")
        label = label or phase or "finetuned"
        while label in labels:
            label += "'"
        labels.add(label)
        head = None
        zs_full = dict(zs_state)
        if "head.weight" in state:
            w = state["head.weight"]
            if w.ndim != 2 or w.shape[0] != len(classnames):
                _fail(f"--finetuned {path}: its head has {w.shape[0] if w.ndim else '?'} classes, the ID set "
                      f"{env.id_set} has {len(classnames)}")
            head = nn.Linear(w.shape[1], w.shape[0], bias=False).to(env.device)
            # WiSE-FT's zero-shot head: logit_scale x the zero-shot class embeddings (as the driver)
            zs_head = make_head(class_embeddings(zs_module.clip, env.tokenizer, classnames, env.templates,
                                                 env.device), float(zs_module.clip.logit_scale.detach().exp()))
            zs_full["head.weight"] = zs_head.weight.detach().cpu()
        template = TrainModule(copy.deepcopy(clip), head)
        _fit(template, state, "--finetuned", path, model_name)
        out.append((label, zs_full, state, template))
    return out


def _analyze(env, jobs, opts, out_dir: str, extra: dict) -> int:
    from .sharpness_analysis import analyze_method, format_report, write_outputs

    t0 = time.perf_counter()
    done = []
    for label, zs_state, ft_state, template in jobs:
        done.append(analyze_method(env, label, zs_state, ft_state, template, opts))
        write_outputs(done, out_dir, opts, {**extra, "seconds_total": round(time.perf_counter() - t0, 2)})
    print("\n" + format_report(done))
    print(f"\nsharpness analysis: {out_dir}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def _analyze_checkpoints(args, run_dir: str) -> int:
    env, model_name, clip, classnames = _environment(args, run_dir)
    jobs = _modules(env, model_name, clip, classnames, args.zeroshot, "--zeroshot",
                    [_named_checkpoint(f) for f in args.finetuned])
    opts = options(args, args.alphas, not args.no_plots, args.seed)
    return _analyze(env, jobs, opts, os.path.join(run_dir, "sharpness"),
                    {"zeroshot": args.zeroshot, "finetuned": args.finetuned})


def _analyze_run(args, run_dir: str) -> int:
    import dataclasses
    import json

    from .config import Config
    from .methods import parse_methods

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in known})
    zs = os.path.join(run_dir, "checkpoints", "pretrain", "final.pt")
    if not os.path.isfile(zs):
        zs = cfg.pretrained
    if zs is None or not os.path.isfile(zs):
        _fail(f"--run-dir {run_dir}: the run's zero-shot model is not saved (no checkpoints/pretrain/final.pt "
              "and no --pretrained file); pass --zeroshot and --finetuned")
    finetuned = []
    for m in parse_methods(cfg.methods):
        path = os.path.join(run_dir, "checkpoints", m.spec, "final.pt")
        if m.trains and os.path.isfile(path):
            finetuned.append((m.spec, path))
    if not finetuned:
        _fail(f"--run-dir {run_dir}: no finished fine-tuned model (checkpoints/<method>/final.pt)")
    print(f"analysing run {run_dir}: zero-shot {zs}; {', '.join(n for n, _ in finetuned)}", flush=True)
    env, model_name, clip, classnames = _environment(args, run_dir, cfg)
    jobs = _modules(env, model_name, clip, classnames, zs, "--zeroshot", finetuned)
    opts = options(args, args.alphas, not args.no_plots, args.seed)
    return _analyze(env, jobs, opts, os.path.join(run_dir, "sharpness"), {"run_dir": run_dir})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
