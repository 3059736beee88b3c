"""The driver's configuration: every command-line flag, its default, and its validation.

Flags that depend on the run's profile (the embedded default or real data) default to None on the
command line and are filled in by `resolve` from `EMBEDDED_DEFAULTS` or `REAL_DATA_DEFAULTS`, so the
resolved config written to the run folder always holds the values that were actually used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

METHOD_HELP = ("comma-separated methods; each is one method or a '+' combination: zeroshot, ft, flyp, "
               "m2mix, dive, lipsum, e.g. 'zeroshot,ft,flyp,flyp+m2mix+dive'")

# Optimisation defaults for real data: FLYP (Goyal et al. 2023) / WiSE-FT fine-tuning of CLIP
# (AdamW, lr 1e-5, weight decay 0.1, 500 warm-up steps, cosine schedule, 10 epochs; batch 512 in
# the papers, spread over GPUs; here per process as in open_clip).
REAL_DATA_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500,
    "methods": "zeroshot,ft,flyp", "pretrain_epochs": 0,
}
# The embedded default: a tiny model pre-trained here for a few seconds, so larger steps.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.1, "warmup_steps": 10,
    "methods": "zeroshot,ft,flyp,m2mix,dive,lipsum", "pretrain_epochs": 10,
}


@dataclass
class Config:
    """The resolved configuration of one run (written to <run-dir>/config.json)."""

    # what to train
    model: str | None = None
    pretrained: str | None = None
    train_data: str | None = None
    eval_data: list[str] = field(default_factory=list)
    zeroshot_data: list[str] = field(default_factory=list)
    id_eval: str | None = None
    classnames: str | None = None
    templates: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str | None = None
    csv_separator: str = "\t"
    # methods
    methods: str | None = None
    m2mix_alpha: float = 0.5
    m2mix_weight: float = 0.01
    m2mix_logit_scale: float = 1.0 / 0.07
    dive_lambda: float = 1000.0
    dive_momentum: float = 0.99
    dive_ref_batch_size: int = 32
    lipsum_lambda: float = 1.0
    lipsum_num_texts: int = 80
    lipsum_text_length: int = 8
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    accum_steps: int = 1
    precision: str = "fp32"
    grad_clip: float = 0.0
    seed: int = 0
    # embedded default
    pretrain_epochs: int | None = None
    embedded_fraction: float = 1.0
    # evaluation
    wise_ft_alphas: str = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
    eval_batch_size: int = 256
    metric_max_images: int = 1000
    # running
    run_dir: str | None = None
    resume: bool = False
    device: str | None = None
    workers: int = 0
    threads: int | None = None
    save_every_steps: int = 0
    stop_after_steps: int = 0
    no_plots: bool = False
    # sharpness along WiSE-FT (sharpness_cli, docs/sharpness.md)
    analyze_sharpness: bool = False
    sharpness_rho: float = 0.05
    sharpness_samples: int = 16
    sharpness_batch_size: int = 256
    sharpness_stragglers: str = "std:2"
    sharpness_measure: str = "random"
    sharpness_sparsity: str = "0.5"
    # derived
    embedded: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @property
    def alphas(self) -> list[float]:
        return parse_alphas(self.wise_ft_alphas)


class ConfigError(ValueError):
    """A bad flag value; the message names the flag."""


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError as e:
        raise ConfigError(f"--wise-ft-alphas: expected comma-separated numbers, got {text!r}") from e
    if not alphas:
        raise ConfigError("--wise-ft-alphas: give at least one alpha")
    bad = [a for a in alphas if not (0.0 <= a <= 1.0)]
    if bad:
        raise ConfigError(f"--wise-ft-alphas: alphas must lie in [0, 1], got {bad}")
    return sorted(set(alphas))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="robustft-train",
        description="Fine-tune an open_clip model robustly (FT, FLYP, m^2-mix, DiVE, Lipsum-FT), evaluate "
                    "in-distribution, under distribution shift and zero-shot, sweep WiSE-FT, and write a "
                    "run folder with tables, checkpoints and plots. With no arguments it runs the "
                    "embedded default: handwritten digits (scikit-learn) and a tiny open_clip model "
                    "pre-trained on the spot, offline, in a few minutes on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Config()
    g = p.add_argument_group("model and data (omit --train-data for the embedded default)")
    g.add_argument("--model", help="an open_clip model name (open_clip.list_models()) or the path of an "
                   "open_clip model config JSON; default: the driver's tiny embedded ViT")
    g.add_argument("--pretrained", help="a local weights file (open_clip checkpoint or state dict) for "
                   "--model; the zero-shot model. Without it the model starts from random weights")
    g.add_argument("--train-data", help="fine-tuning data: an image folder (one sub-folder per class) or a "
                   "CSV/TSV of image paths and captions as open_clip's training reads")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="an evaluation set sharing the training class names (image folder, or CSV with "
                   "--csv-label-key and/or captions); repeat for the ID set and each shifted set")
    g.add_argument("--zeroshot-data", action="append", default=[], metavar="NAME=PATH",
                   help="a zero-shot task the fine-tuning never sees: an image folder whose sub-folder "
                   "names are its class names; repeatable")
    g.add_argument("--id-eval", help="the --eval-data NAME that is the ID validation set (selects the "
                   "best WiSE-FT alpha); default: the first --eval-data")
    g.add_argument("--classnames", help="a text file with one class name per line, in the sorted order of "
                   "the training sub-folders (or of the CSV labels); default: the folder names")
    g.add_argument("--templates", help="a text file with one prompt template per line containing '{}' "
                   "(or '{c}'); default: a built-in set")
    g.add_argument("--csv-img-key", default=d.csv_img_key, help="CSV column of image paths")
    g.add_argument("--csv-caption-key", default=d.csv_caption_key, help="CSV column of captions")
    g.add_argument("--csv-label-key", default=None, help="CSV column of class labels (name or index); "
                   "needed for classification (ft, lipsum, accuracy) on CSV data")
    g.add_argument("--csv-separator", default=d.csv_separator, help="CSV field separator")

    g = p.add_argument_group("methods (hyper-parameter defaults from the papers: docs/maths.md)")
    g.add_argument("--methods", help=METHOD_HELP + f"; default: {REAL_DATA_DEFAULTS['methods']!r} on "
                   f"real data, {EMBEDDED_DEFAULTS['methods']!r} embedded")
    g.add_argument("--m2mix-alpha", type=float, default=d.m2mix_alpha,
                   help="m^2-mix: lam ~ Beta(alpha, alpha), one draw per step")
    g.add_argument("--m2mix-weight", type=float, default=d.m2mix_weight,
                   help="m^2-mix: weight w of the m^2 term (paper sweeps 0.001..0.05)")
    g.add_argument("--m2mix-logit-scale", type=float, default=d.m2mix_logit_scale,
                   help="m^2-mix: logit scale of the m^2 term (paper: 1/0.07)")
    g.add_argument("--dive-lambda", type=float, default=d.dive_lambda, help="DiVE: weight of AVL + PVL")
    g.add_argument("--dive-momentum", type=float, default=d.dive_momentum,
                   help="DiVE: EMA momentum of the difference-vector centre")
    g.add_argument("--dive-ref-batch-size", type=int, default=d.dive_ref_batch_size,
                   help="DiVE: reference pairs per step (drawn from the training data)")
    g.add_argument("--lipsum-lambda", type=float, default=d.lipsum_lambda, help="Lipsum-FT: regulariser weight")
    g.add_argument("--lipsum-num-texts", type=int, default=d.lipsum_num_texts,
                   help="Lipsum-FT: random texts per step (K)")
    g.add_argument("--lipsum-text-length", type=int, default=d.lipsum_text_length,
                   help="Lipsum-FT: random token ids per text (L)")

    g = p.add_argument_group("optimisation (AdamW, linear warm-up then cosine decay)")
    g.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {REAL_DATA_DEFAULTS['epochs']}, "
                   f"embedded {EMBEDDED_DEFAULTS['epochs']})")
    g.add_argument("--batch-size", type=int, help="batch size per process (default "
                   f"{REAL_DATA_DEFAULTS['batch_size']}, embedded {EMBEDDED_DEFAULTS['batch_size']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {REAL_DATA_DEFAULTS['lr']}, "
                   f"embedded {EMBEDDED_DEFAULTS['lr']})")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default "
                   f"{REAL_DATA_DEFAULTS['warmup_steps']}, embedded {EMBEDDED_DEFAULTS['warmup_steps']})")
    g.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="gradient accumulation: micro-batches per optimiser step")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision,
                   help="autocast precision of the forward pass (fp16 uses a gradient scaler)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of data order, prompts and initialisation")

    g = p.add_argument_group("embedded default")
    g.add_argument("--pretrain-epochs", type=int, help="epochs of the contrastive pre-training that makes "
                   f"the embedded zero-shot model (default {EMBEDDED_DEFAULTS['pretrain_epochs']})")
    g.add_argument("--embedded-fraction", type=float, default=d.embedded_fraction,
                   help="use this fraction of the digits (smaller, faster runs; tests use it)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--wise-ft-alphas", default=d.wise_ft_alphas,
                   help="WiSE-FT: comma-separated mixing weights of the fine-tuned model (0 = zero-shot)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch size")
    g.add_argument("--metric-max-images", type=int, default=d.metric_max_images,
                   help="images per set used for uniformity and RSA (pairwise, quadratic cost)")

    g = p.add_argument_group("running")
    g.add_argument("--run-dir", help="the run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoints (its config.json is used)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when visible, else cpu)")
    g.add_argument("--workers", type=int, default=d.workers, help="data loader worker processes")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded default, whose "
                   "tiny matrices run fastest on one thread; torch's default otherwise)")
    g.add_argument("--save-every-steps", type=int, default=d.save_every_steps,
                   help="also checkpoint every N optimiser steps (0: only at the end of an epoch, at most once a "
                   "minute)")
    g.add_argument("--stop-after-steps", type=int, default=d.stop_after_steps,
                   help="for testing: checkpoint and stop after N optimiser steps of a training phase, "
                   "as if the run was interrupted (0: off)")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")

    from . import sharpness_cli

    g = p.add_argument_group("sharpness along WiSE-FT (also: robustft-train analyze-sharpness --help)")
    g.add_argument("--analyze-sharpness", action="store_true",
                   help="after each method's WiSE-FT sweep, measure overall and layer-wise sharpness at every "
                   "alpha, find the straggler layers, correlate with OOD accuracy and run the sparsity "
                   "intervention (<run-dir>/sharpness/)")
    sharpness_cli.add_arguments(g)
    return p


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _split_named(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        _check(bool(sep) and bool(name) and bool(path), f"{flag}: expected NAME=PATH, got {v!r}")
        out.append((name, path))
    names = [n for n, _ in out]
    _check(len(set(names)) == len(names), f"{flag}: duplicate names in {names}")
    return out


def named_paths(values: list[str], flag: str) -> list[tuple[str, str]]:
    """Parse repeated NAME=PATH flags."""
    return _split_named(values, flag)


def resolve(args: argparse.Namespace) -> Config:
    """Turn parsed flags into a validated Config (raises ConfigError naming the flag)."""
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(Config)}}
    cfg = Config(**values)
    cfg.embedded = cfg.train_data is None
    if cfg.embedded:
        _check(not cfg.eval_data and not cfg.zeroshot_data,
               "--eval-data/--zeroshot-data need --train-data (the embedded default has its own sets)")
    else:
        _check(cfg.pretrain_epochs in (None, 0), "--pretrain-epochs is for the embedded default only")
    defaults = EMBEDDED_DEFAULTS if cfg.embedded else REAL_DATA_DEFAULTS
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every hyper-parameter and path flag before anything is built."""
    _check(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    _check(cfg.batch_size >= 2, f"--batch-size must be >= 2 (contrastive losses need negatives), "
           f"got {cfg.batch_size}")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    _check(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
           f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _check(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    _check(cfg.accum_steps >= 1, f"--accum-steps must be >= 1, got {cfg.accum_steps}")
    _check(cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}")
    _check(cfg.pretrain_epochs >= 0, f"--pretrain-epochs must be >= 0, got {cfg.pretrain_epochs}")
    _check(0 < cfg.embedded_fraction <= 1, f"--embedded-fraction must be in (0, 1], got {cfg.embedded_fraction}")
    _check(cfg.m2mix_alpha > 0, f"--m2mix-alpha must be > 0 (Beta parameter), got {cfg.m2mix_alpha}")
    _check(cfg.m2mix_weight > 0, f"--m2mix-weight must be > 0, got {cfg.m2mix_weight}")
    _check(cfg.m2mix_logit_scale > 0, f"--m2mix-logit-scale must be > 0, got {cfg.m2mix_logit_scale}")
    _check(cfg.dive_lambda >= 0, f"--dive-lambda must be >= 0, got {cfg.dive_lambda}")
    _check(0 <= cfg.dive_momentum < 1, f"--dive-momentum must be in [0, 1), got {cfg.dive_momentum}")
    _check(cfg.dive_ref_batch_size >= 1, f"--dive-ref-batch-size must be >= 1, got {cfg.dive_ref_batch_size}")
    _check(cfg.lipsum_lambda >= 0, f"--lipsum-lambda must be >= 0, got {cfg.lipsum_lambda}")
    _check(cfg.lipsum_num_texts >= 1, f"--lipsum-num-texts must be >= 1, got {cfg.lipsum_num_texts}")
    _check(cfg.lipsum_text_length >= 1, f"--lipsum-text-length must be >= 1, got {cfg.lipsum_text_length}")
    _check(cfg.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    _check(cfg.metric_max_images >= 2, f"--metric-max-images must be >= 2, got {cfg.metric_max_images}")
    _check(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _check(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    _check(cfg.save_every_steps >= 0, f"--save-every-steps must be >= 0, got {cfg.save_every_steps}")
    _check(cfg.stop_after_steps >= 0, f"--stop-after-steps must be >= 0, got {cfg.stop_after_steps}")
    _check(cfg.device in (None, "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
           f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    parse_alphas(cfg.wise_ft_alphas)
    from . import sharpness_cli

    try:
        sharpness_cli.check(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from .methods import parse_methods  # the method grammar lives with the registry
    parse_methods(cfg.methods)
    for flag, path in (("--pretrained", cfg.pretrained), ("--train-data", cfg.train_data),
                       ("--classnames", cfg.classnames), ("--templates", cfg.templates)):
        _check(path is None or os.path.exists(path), f"{flag}: no such file or folder: {path}")
    if cfg.model is not None and cfg.model.endswith(".json"):
        _check(os.path.isfile(cfg.model), f"--model: no such model config file: {cfg.model}")
    evals = named_paths(cfg.eval_data, "--eval-data")
    for name, path in evals + named_paths(cfg.zeroshot_data, "--zeroshot-data"):
        _check(os.path.exists(path), f"--eval-data/--zeroshot-data {name}: no such file or folder: {path}")
    if cfg.id_eval is not None:
        _check(cfg.id_eval in [n for n, _ in evals],
               f"--id-eval {cfg.id_eval!r} is not one of the --eval-data names {[n for n, _ in evals]}")
    if cfg.resume:
        _check(cfg.run_dir is not None and os.path.isdir(cfg.run_dir),
               f"--resume needs --run-dir naming an existing run folder, got {cfg.run_dir!r}")
