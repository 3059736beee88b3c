"""robustft-train analyze-sharpness: the sharpness analysis along the WiSE-FT path as a subcommand
(docs/sharpness.md).

Three ways to run it:
- --zeroshot CKPT --finetuned [NAME=]CKPT ... : analyse these checkpoints, on --eval-data (real data,
  same flags as training) or, without --eval-data, on the embedded digits sets;
- neither, and --run-dir naming a finished robustft-train run: analyse every fine-tuned method of that
  run against its zero-shot model (checkpoints/pretrain/final.pt, or the run's --pretrained);
- neither, and no run there: train the embedded default (methods ft,flyp by default) with the
  analysis on, i.e. the runner with the subcommand's settings and analyze_sharpness.

Exit status: 0 done; 2 bad input (a message naming the flag, before any work).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time

import open_clip
import torch
from torch import nn

from .. import checkpoint, embedded, runner
from ..config import (FIELDS, Config, check_evaluation, check_sharpness, config_path, fill_profile,
                      named_paths, read_config, resolve)
from ..data import (CsvColumns, EvalSet, TrainSource, folder_classes, load_eval_set, load_zeroshot_set,
                    read_lines, read_templates)
from ..errors import ConfigError, DriverError, excerpt
from ..evaluate import class_embeddings, evaluate
from ..flags import sharpness_parser
from ..methods import parse_methods
from ..models import TrainModule, build_clip, get_tokenizer, make_head, preprocess_cfg, resolve_model_name
from .analysis import Environment, SharpnessOptions, analyze_method, format_report, write_outputs

# What the subcommand's flags override when it analyses a finished run (the rest is the run's).
RUN_OVERRIDES = ("device", "threads", "workers", "eval_batch_size", "metric_max_images", "precision", "seed",
                 "no_plots", "wise_ft_alphas", "sharpness_rho", "sharpness_samples", "sharpness_batch_size",
                 "sharpness_stragglers", "sharpness_measure", "sharpness_sparsity")


def main(argv: list[str]) -> int:
    parser = sharpness_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DriverError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _named_checkpoint(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    if sep and name and path and not os.path.exists(text):
        return name, path
    return None, text


def _settings(args) -> Config:
    """The subcommand's flags as a Config (the settings it shares with training)."""
    cfg = Config(**{k: v for k, v in vars(args).items() if k in FIELDS})
    cfg.analyze_sharpness = True
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _validate(args, cfg: Config) -> None:
    check_sharpness(cfg)
    check_evaluation(cfg)
    named_paths(cfg.eval_data, "--eval-data")
    named_paths(cfg.zeroshot_data, "--zeroshot-data")
    _check(bool(args.zeroshot) == bool(args.finetuned), "--zeroshot and --finetuned go together: give both "
           "(or neither, to analyse --run-dir or train the embedded default)")
    for flag, path in [("--zeroshot", args.zeroshot)] + [("--finetuned", _named_checkpoint(f)[1])
                                                         for f in args.finetuned]:
        _check(path is None or os.path.isfile(path), f"{flag}: no such checkpoint file: {path}")
    for v in cfg.eval_data + cfg.zeroshot_data:
        name, _, path = v.partition("=")
        _check(os.path.exists(path), f"--eval-data/--zeroshot-data {name}: no such file or folder: {path}")
    for flag, path in (("--train-data", cfg.train_data), ("--classnames", cfg.classnames),
                       ("--templates", cfg.templates)):
        _check(path is None or os.path.exists(path), f"{flag}: no such file or folder: {path}")
    _check(cfg.id_eval is None or cfg.id_eval in [v.partition("=")[0] for v in cfg.eval_data],
           f"--id-eval {cfg.id_eval!r} is not one of the --eval-data names")
    _check(bool(args.zeroshot) or not (cfg.eval_data or cfg.zeroshot_data),
           "--eval-data/--zeroshot-data need --zeroshot and --finetuned checkpoints")
    _check(0 < cfg.embedded_fraction <= 1, f"--embedded-fraction must be in (0, 1], got {cfg.embedded_fraction}")
    _check(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _check(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")


def run(args) -> int:
    cfg = _settings(args)
    _validate(args, cfg)
    run_dir = cfg.run_dir or os.path.join("runs", time.strftime("sharpness-%Y%m%d-%H%M%S"))
    if args.zeroshot:
        cfg.embedded = not cfg.eval_data
        jobs = [_named_checkpoint(f) for f in args.finetuned]
        return _analyze(cfg, run_dir, args.zeroshot, jobs, {"zeroshot": args.zeroshot, "finetuned": args.finetuned})
    if os.path.isfile(config_path(run_dir)):
        return _analyze_run(cfg, run_dir)
    print(f"no --zeroshot/--finetuned and no run in {run_dir}: training the embedded default "
          f"(methods {cfg.methods}) with the sharpness analysis", flush=True)
    cfg.run_dir = run_dir
    return runner.run(resolve(dataclasses.asdict(cfg)))


def _analyze_run(flags_cfg: Config, run_dir: str) -> int:
    cfg = read_config(run_dir)
    for key in RUN_OVERRIDES:
        setattr(cfg, key, getattr(flags_cfg, key))
    fill_profile(cfg)
    zs = os.path.join(run_dir, "checkpoints", "pretrain", "final.pt")
    if not os.path.isfile(zs):
        zs = cfg.pretrained
    _check(zs is not None and os.path.isfile(zs), f"--run-dir {run_dir}: the run's zero-shot model is not saved "
           "(no checkpoints/pretrain/final.pt and no --pretrained file); pass --zeroshot and --finetuned")
    finetuned = [(m.spec, os.path.join(run_dir, "checkpoints", m.spec, "final.pt"))
                 for m in parse_methods(cfg.methods) if m.trains]
    finetuned = [(m, p) for m, p in finetuned if os.path.isfile(p)]
    _check(bool(finetuned), f"--run-dir {run_dir}: no finished fine-tuned model (checkpoints/<method>/final.pt)")
    print(f"analysing run {run_dir}: zero-shot {zs}; {', '.join(n for n, _ in finetuned)}", flush=True)
    return _analyze(cfg, run_dir, zs, finetuned, {"run_dir": run_dir})


def _analyze(cfg: Config, run_dir: str, zs_path: str, finetuned: list[tuple[str | None, str]], extra: dict) -> int:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env, model_name, clip, classnames = _environment(cfg, run_dir, device)
    jobs = _jobs(env, model_name, clip, classnames, zs_path, finetuned)
    opts = SharpnessOptions.from_config(cfg)
    out_dir = os.path.join(run_dir, "sharpness")
    t0, done, written = time.perf_counter(), [], []
    for label, zs_state, ft_state, template in jobs:
        done.append(analyze_method(env, label, zs_state, ft_state, template, opts))
        written = write_outputs(done, out_dir, opts, {**extra, "seconds_total": round(time.perf_counter() - t0, 2)})
    print("\n" + format_report(done))
    print(f"\nsharpness analysis ({time.perf_counter() - t0:.1f} s); files written:")
    print("\n".join(f"  {p}" for p in written))
    return 0


def _real_eval_sets(cfg: Config, clip) -> tuple[list[EvalSet], str]:
    """The --eval-data / --zeroshot-data sets and the ID set's name; class names from --classnames,
    or the sub-folders of --train-data, or those of the ID folder."""
    pcfg = preprocess_cfg(clip)
    eval_tf = open_clip.image_transform(pcfg.get("size", 224), is_train=False, mean=pcfg.get("mean"),
                                        std=pcfg.get("std"), resize_mode=pcfg.get("resize_mode"),
                                        interpolation=pcfg.get("interpolation"))
    named = named_paths(cfg.eval_data, "--eval-data")
    id_set = cfg.id_eval or named[0][0]
    folder_train = cfg.train_data if cfg.train_data and os.path.isdir(cfg.train_data) else None
    if cfg.classnames:
        classnames = read_lines(cfg.classnames, "--classnames")
        folders = folder_classes(folder_train, "--train-data") if folder_train else []
    else:
        root = folder_train or dict(named)[id_set]
        _check(os.path.isdir(root), "--classnames: a CSV ID set needs the class names (a --classnames file or an "
               "image-folder --train-data)")
        folders = folder_classes(root, "--train-data" if root == folder_train else f"--eval-data {id_set}")
        classnames = [f.replace("_", " ") for f in folders]
    _check(not folders or len(folders) == len(classnames),
           f"--classnames: {len(classnames)} names for {len(folders)} class folders")
    source = TrainSource(None, classnames, folders)
    cols = CsvColumns(cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_label_key, cfg.csv_separator)
    evals = [EvalSet(n, "id" if n == id_set else "ood", load_eval_set(n, p, source, cols, eval_tf), classnames)
             for n, p in named]
    for n, p in named_paths(cfg.zeroshot_data, "--zeroshot-data"):
        ds, names = load_zeroshot_set(n, p, eval_tf)
        evals.append(EvalSet(n, "zeroshot", ds, names))
    return evals, id_set


def _environment(cfg: Config, run_dir: str, device: torch.device):
    """(Environment, model name, clip template, the ID set's class names)."""
    model_name = resolve_model_name(cfg.model, os.path.join(run_dir, "model_config"))
    torch.manual_seed(cfg.seed)
    clip = build_clip(model_name, None, device)
    tokenizer = get_tokenizer(model_name)
    templates = read_templates(cfg.templates)
    torch.set_num_threads(cfg.threads or (1 if cfg.embedded else torch.get_num_threads()))
    if cfg.embedded:
        _, _, evals, emb_templates = embedded.build(cfg.embedded_fraction,
                                                    preprocess_cfg(clip).get("size", embedded.IMAGE_SIZE))
        templates = emb_templates if cfg.templates is None else templates
        id_set = "val"
    else:
        evals, id_set = _real_eval_sets(cfg, clip)
    id_eval = next(e for e in evals if e.name == id_set)
    _check(id_eval.dataset.has_labels, f"--id-eval {id_set}: the sharpness loss and the accuracies need class "
           "labels in the ID set (--csv-label-key for a CSV)")

    def eval_fn(module):
        return evaluate(module, evals, tokenizer, templates, {}, device, cfg.eval_batch_size,
                        cfg.metric_max_images, cfg.workers, cfg.precision)

    return Environment(evals, id_set, tokenizer, templates, device, eval_fn), model_name, clip, id_eval.classnames


def load_state(path: str, flag: str) -> tuple[dict, str | None]:
    """A state dict in TrainModule form ('clip.*', optional 'head.weight') and the checkpoint's
    phase (method) when it is a robustft-train checkpoint (its checksum verified). Read with
    torch.load(weights_only=True): a file that needs more is refused."""
    advice = f"give another {flag} file"
    obj = checkpoint.load_weights_only(path, advice=advice)
    phase = None
    if checkpoint.is_checkpoint(obj):
        obj = checkpoint.verified_state(obj, path, advice=advice)
        phase = obj.get("phase") if isinstance(obj.get("phase"), str) else None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    _check(isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values()),
           f"{flag} {path}: neither a robustft-train checkpoint nor a state dict of tensors")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not any(k.startswith("clip.") for k in sd):
        sd = {(k if k.startswith("head.") else "clip." + k): v for k, v in sd.items()}
    return sd, phase


def _fit(module: nn.Module, state: dict, flag: str, path: str, model_name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DriverError(f"{flag} {path}: the weights do not fit model {model_name}: "
                          f"{excerpt(str(e), 1200)}") from None


def _jobs(env: Environment, model_name: str, clip, classnames: list[str], zs_path: str,
          finetuned: list[tuple[str | None, str]]) -> list[tuple]:
    """Load and check every checkpoint before the analysis starts: [(label, zs_state, ft_state, template)]."""
    zs_state, _ = load_state(zs_path, "--zeroshot")
    _check(not any(k.startswith("head.") for k in zs_state), f"--zeroshot {zs_path}: a zero-shot model has no "
           "classification head (this is a fine-tuned ft model)")
    zs_module = TrainModule(copy.deepcopy(clip))
    _fit(zs_module, zs_state, "--zeroshot", zs_path, model_name)
    zs_module.eval()
    out, labels = [], set()
    for label, path in finetuned:
        state, phase = load_state(path, "--finetuned")
        label = label or phase or "finetuned"
        while label in labels:
            label += "'"
        labels.add(label)
        head, zs_full = None, dict(zs_state)
        if "head.weight" in state:
            w = state["head.weight"]
            _check(w.ndim == 2 and w.shape[0] == len(classnames), f"--finetuned {path}: its head has "
                   f"{w.shape[0] if w.ndim else '?'} classes, the ID set {env.id_set} has {len(classnames)}")
            head = nn.Linear(w.shape[1], w.shape[0], bias=False).to(env.device)
            # WiSE-FT's zero-shot head: logit_scale x the zero-shot class embeddings (as the driver)
            zs_head = make_head(class_embeddings(zs_module.clip, env.tokenizer, classnames, env.templates,
                                                 env.device), float(zs_module.clip.logit_scale.detach().exp()))
            zs_full["head.weight"] = zs_head.weight.detach().cpu()
        template = TrainModule(copy.deepcopy(clip), head)
        _fit(template, state, "--finetuned", path, model_name)
        out.append((label, zs_full, state, template))
    return out
