"""The driver's configuration: every setting of a run, its profile defaults and its validation
(the sharpness settings included); the command-line flags that fill it are in `flags`.

Settings that depend on the run's profile (the embedded default or real data) are None until
`resolve` fills them from `EMBEDDED_DEFAULTS` or `REAL_DATA_DEFAULTS`, so the config.json written
to the run folder always holds the values that were actually used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, ConfigError
from .files import atomic_write_text
from .methods import parse_methods

# Optimisation defaults for real data: FLYP (Goyal et al. 2023) / WiSE-FT fine-tuning of CLIP
# (AdamW, lr 1e-5, weight decay 0.1, 500 warm-up steps, cosine schedule, 10 epochs; batch 512 in
# the papers, spread over GPUs; here per process as in open_clip). Regulariser weights: the
# papers' (m^2-mix sweeps 0.001..0.05; DiVE lambda 1000; Lipsum-FT lambda 1).
REAL_DATA_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500,
    "methods": "zeroshot,ft,flyp", "pretrain_epochs": 0,
    "m2mix_weight": 0.01, "dive_lambda": 1000.0, "lipsum_lambda": 1.0,
}
# The embedded default: a tiny model pre-trained here for a few seconds, so larger steps, and
# regulariser weights sized for it (docs/driver.md, "The embedded default's regulariser weights").
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "epochs": 10, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.1, "warmup_steps": 10,
    "methods": "zeroshot,ft,flyp,m2mix,dive,lipsum", "pretrain_epochs": 20,
    "m2mix_weight": 0.1, "dive_lambda": 1.0, "lipsum_lambda": 1.0,
}
SHARPNESS_MEASURES = ("random", "worst")
PRECISIONS = ("fp32", "bf16", "fp16")


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
    m2mix_weight: float | None = None
    m2mix_logit_scale: float = 1.0 / 0.07
    dive_lambda: float | None = None
    dive_momentum: float = 0.99
    dive_ref_batch_size: int = 32
    lipsum_lambda: float | None = None
    lipsum_num_texts: int = 80
    lipsum_text_length: int = 8
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    accum_steps: int = 1
    accum_freq: int = 1
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
    measure_memory: bool = False
    # sharpness along WiSE-FT (docs/sharpness.md)
    analyze_sharpness: bool = False
    sharpness_methods: str | None = None
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


FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
# Settings a resumed run takes from the command line rather than from the saved config.json.
RUNTIME_FIELDS = ("resume", "stop_after_steps", "workers", "threads", "device", "no_plots", "measure_memory")


def run_settings(cfg: Config) -> dict[str, Any]:
    """The settings that make a run what it is (its checkpoints record them): every setting but
    the runtime ones and the run folder's path."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS and k != "run_dir"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError as e:
        raise ConfigError(f"--wise-ft-alphas: expected comma-separated numbers, got {text!r}") from e
    _check(bool(alphas), "--wise-ft-alphas: give at least one alpha")
    bad = [a for a in alphas if not (0.0 <= a <= 1.0)]
    _check(not bad, f"--wise-ft-alphas: alphas must lie in [0, 1], got {bad}")
    return sorted(set(alphas))


def parse_sparsity(text: str) -> list[float]:
    try:
        ps = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sharpness-sparsity: expected comma-separated numbers, got {text!r}") from None
    _check(bool(ps), "--sharpness-sparsity: give at least one fraction p")
    bad = [p for p in ps if not (0 <= p < 1)]
    _check(not bad, f"--sharpness-sparsity: p must be in [0, 1), got {bad}")
    return sorted(set(ps))


def parse_straggler_rule(text: str) -> tuple[str, float]:
    """'std:T' (z-score above mean + T std) or 'topk:K'."""
    kind, _, value = text.partition(":")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind == "std" and math.isfinite(v) and v >= 0:
        return kind, v
    if kind == "topk" and math.isfinite(v) and v >= 1 and v == int(v):
        return kind, v
    raise ConfigError(f"--sharpness-stragglers: expected 'std:T' (T >= 0) or 'topk:K' (integer K >= 1), "
                      f"got {text!r}")


def named_paths(values: list[str], flag: str) -> list[tuple[str, str]]:
    """Parse repeated NAME=PATH flags."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        _check(bool(sep) and bool(name) and bool(path), f"{flag}: expected NAME=PATH, got {v!r}")
        out.append((name, path))
    names = [n for n, _ in out]
    _check(len(set(names)) == len(names), f"{flag}: duplicate names in {names}")
    return out


def resolve(values: dict[str, Any]) -> Config:
    """A validated Config from setting values (the flags' dest names; others are ignored), the
    profile's defaults filled in. Raises ConfigError naming the flag."""
    cfg = Config(**{k: v for k, v in values.items() if k in FIELDS})
    _check(not cfg.resume, "--resume needs --run-dir naming the run to continue")
    cfg.embedded = cfg.train_data is None
    if cfg.embedded:
        _check(not cfg.eval_data and not cfg.zeroshot_data,
               "--eval-data/--zeroshot-data need --train-data (the embedded default has its own sets)")
    else:
        _check(cfg.pretrain_epochs in (None, 0), "--pretrain-epochs is for the embedded default only")
    fill_profile(cfg)
    validate(cfg)
    return cfg


def fill_profile(cfg: Config) -> None:
    """Fill the settings left None with the profile's defaults."""
    defaults = EMBEDDED_DEFAULTS if cfg.embedded else REAL_DATA_DEFAULTS
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)


def validate(cfg: Config) -> None:
    """Check every setting and path before anything is built."""
    check_optimisation(cfg)
    check_methods(cfg)
    check_evaluation(cfg)
    check_sharpness(cfg)
    check_paths(cfg)


def check_optimisation(cfg: Config) -> None:
    _check(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    _check(cfg.batch_size >= 2, f"--batch-size must be >= 2 (contrastive losses need negatives), "
           f"got {cfg.batch_size}")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    _check(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
           f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _check(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    _check(cfg.accum_steps >= 1, f"--accum-steps must be >= 1, got {cfg.accum_steps}")
    _check(cfg.accum_freq >= 1, f"--accum-freq must be >= 1, got {cfg.accum_freq}")
    _check(cfg.accum_steps == 1 or cfg.accum_freq == 1,
           f"--accum-freq {cfg.accum_freq} and --accum-steps {cfg.accum_steps}: give one of them (--accum-freq: "
           "the micro-batches of a step are one contrastive batch; --accum-steps: each is its own)")
    _check(cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}")
    _check(cfg.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    _check(cfg.pretrain_epochs >= 0, f"--pretrain-epochs must be >= 0, got {cfg.pretrain_epochs}")
    _check(0 < cfg.embedded_fraction <= 1, f"--embedded-fraction must be in (0, 1], got {cfg.embedded_fraction}")
    _check(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _check(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    _check(cfg.save_every_steps >= 0, f"--save-every-steps must be >= 0, got {cfg.save_every_steps}")
    _check(cfg.stop_after_steps >= 0, f"--stop-after-steps must be >= 0, got {cfg.stop_after_steps}")
    _check(cfg.device in (None, "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
           f"--device must be cpu or cuda[:N], got {cfg.device!r}")


def check_methods(cfg: Config) -> None:
    def finite(v: float) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    _check(finite(cfg.m2mix_alpha) and cfg.m2mix_alpha > 0,
           f"--m2mix-alpha must be > 0 (Beta parameter), got {cfg.m2mix_alpha}")
    _check(finite(cfg.m2mix_weight) and cfg.m2mix_weight > 0, f"--m2mix-weight must be > 0, got {cfg.m2mix_weight}")
    _check(finite(cfg.m2mix_logit_scale) and cfg.m2mix_logit_scale > 0,
           f"--m2mix-logit-scale must be > 0, got {cfg.m2mix_logit_scale}")
    _check(finite(cfg.dive_lambda) and cfg.dive_lambda >= 0, f"--dive-lambda must be >= 0, got {cfg.dive_lambda}")
    _check(0 <= cfg.dive_momentum < 1, f"--dive-momentum must be in [0, 1), got {cfg.dive_momentum}")
    _check(cfg.dive_ref_batch_size >= 1, f"--dive-ref-batch-size must be >= 1, got {cfg.dive_ref_batch_size}")
    _check(finite(cfg.lipsum_lambda) and cfg.lipsum_lambda >= 0,
           f"--lipsum-lambda must be >= 0, got {cfg.lipsum_lambda}")
    _check(cfg.lipsum_num_texts >= 1, f"--lipsum-num-texts must be >= 1, got {cfg.lipsum_num_texts}")
    _check(cfg.lipsum_text_length >= 1, f"--lipsum-text-length must be >= 1, got {cfg.lipsum_text_length}")
    parse_methods(cfg.methods)


def check_evaluation(cfg: Config) -> None:
    _check(cfg.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    _check(cfg.metric_max_images >= 2, f"--metric-max-images must be >= 2, got {cfg.metric_max_images}")
    parse_alphas(cfg.wise_ft_alphas)


def check_sharpness(cfg: Config) -> None:
    rho = cfg.sharpness_rho
    _check(isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0,
           f"--sharpness-rho (--rho) must be a positive number, got {rho}")
    _check(cfg.sharpness_samples >= 1,
           f"--sharpness-samples (--samples) must be >= 1, got {cfg.sharpness_samples}")
    _check(cfg.sharpness_batch_size >= 1, f"--sharpness-batch-size must be >= 1, got {cfg.sharpness_batch_size}")
    parse_straggler_rule(cfg.sharpness_stragglers)
    _check(cfg.sharpness_measure in SHARPNESS_MEASURES,
           f"--sharpness-measure must be random or worst, got {cfg.sharpness_measure!r}")
    parse_sparsity(cfg.sharpness_sparsity)
    if cfg.sharpness_methods is not None:
        wanted = {m.spec for m in parse_methods(cfg.sharpness_methods)}
        known = {m.spec for m in parse_methods(cfg.methods)} if cfg.methods else wanted
        _check(wanted <= known, f"--sharpness-methods {sorted(wanted - known)} are not among --methods "
               f"{sorted(known)}")


def check_paths(cfg: Config) -> None:
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


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, "config.json")


def read_config(run_dir: str) -> Config:
    """The Config saved in <run_dir>/config.json; CheckpointError naming the file when it is
    missing, truncated or not a run's config."""
    path = config_path(run_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {path} does not exist (not a run folder, or the run never started)")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's configuration ({e}); the file is damaged. "
                              "Start the run again in a new --run-dir (or restore config.json from a copy)") from e
    if not isinstance(saved, dict) or not FIELDS & set(saved):
        raise CheckpointError(f"{path}: not a robustft-train config.json (no known setting in it); "
                              "start the run again in a new --run-dir")
    try:
        return Config(**{k: v for k, v in saved.items() if k in FIELDS})
    except TypeError as e:
        raise CheckpointError(f"{path}: unusable settings ({e}); start the run again in a new --run-dir") from e


def write_config(cfg: Config, run_dir: str) -> None:
    atomic_write_text(config_path(run_dir), cfg.to_json())


def check_resume_flags(given: dict[str, Any], saved: dict[str, Any], source: str) -> None:
    """A resumed run keeps the settings it was started with (`saved`, read from the file `source`):
    refuse flags given on the command line (`given`) that differ from them, naming each with both
    values."""
    fixed = [k for k in sorted(given) if k in saved and k not in RUNTIME_FIELDS + ("run_dir",)
             and given[k] != saved[k]]
    if fixed:
        shown = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (the run's: {saved[k]!r})" for k in fixed)
        free = ", ".join("--" + k.replace("_", "-") for k in RUNTIME_FIELDS if k != "resume")
        raise ConfigError(f"--resume continues the run with the settings of {source}; these flags differ from "
                          f"them and cannot change on resume: {shown}. Drop them to continue the run as it was, "
                          f"or start a new --run-dir to use them (only {free} may change on --resume)")


def resumed(run_dir: str, runtime: dict[str, Any]) -> Config:
    """The Config of the run in `run_dir` to continue it: its saved settings, with the runtime
    settings (RUNTIME_FIELDS) taken from `runtime`."""
    cfg = read_config(run_dir)
    for key in RUNTIME_FIELDS:
        setattr(cfg, key, runtime[key])
    cfg.run_dir = run_dir
    fill_profile(cfg)
    validate(cfg)
    return cfg
