"""One run end to end: prepare everything that can fail on bad input (paths, data, model, weights,
methods) before any training, then make the zero-shot model, fine-tune with each method, evaluate,
sweep WiSE-FT, and write the run folder."""
from __future__ import annotations

import copy
import glob
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import open_clip
import robustft_ext
import torch

from . import checkpoint, embedded, plots, report, wise_ft
from . import distributed as dist_utils
from .config import Config, named_paths, run_settings, write_config
from .data import (CsvColumns, EvalSet, TrainSource, TrainView, load_eval_set, load_train_source,
                   load_zeroshot_set, read_templates)
from .errors import DriverError
from .evaluate import class_embeddings, encode_images, evaluate
from .files import atomic_write_text
from .losses import MethodLoss
from .methods import Method, parse_method, parse_methods
from .models import (FrozenEncoders, TrainModule, build_clip, get_tokenizer, make_head, preprocess_cfg,
                     resolve_model_name)
from .sharpness.analysis import Environment, TrainingHook
from .train import LoopOptions, Phase, remove_superseded, run_phase

EXIT_STOPPED = 3  # --stop-after-steps ended the run early (a checkpoint was written)
FINAL_ADVICE = ("delete it to train this phase again (the phases before it are kept), then run again "
                "with --resume")


@dataclass
class Prepared:
    cfg: Config
    info: dist_utils.DistInfo
    run_dir: str
    model_name: str
    clip: torch.nn.Module
    tokenizer: object
    train: TrainSource
    evals: list[EvalSet]
    templates: list[str]
    methods: list[Method]
    id_set: str
    pretrain: TrainSource | None = None
    notes: list[str] = field(default_factory=list)


def _log(info: dist_utils.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


def run(cfg: Config) -> int:
    """Join the process group (under torchrun), run, leave it; the exit status."""
    info = dist_utils.init(cfg.device)
    try:
        return execute(prepare(cfg, info))
    finally:
        dist_utils.cleanup(info)


def _embedded_data(cfg: Config, clip, notes: list[str]):
    pretrain, train, evals, templates = embedded.build(
        cfg.embedded_fraction, preprocess_cfg(clip).get("size", embedded.IMAGE_SIZE))
    if cfg.pretrained is None and cfg.pretrain_epochs == 0:
        notes.append("the embedded model is not pre-trained (--pretrain-epochs 0): zero-shot is random")
    templates = templates if cfg.templates is None else read_templates(cfg.templates)
    return pretrain, train, evals, templates, embedded.ID_SET


def _real_data(cfg: Config, clip, info: dist_utils.DistInfo, notes: list[str]):
    if cfg.pretrained is None:
        notes.append("no --pretrained weights: the zero-shot model is randomly initialised")
    pcfg = preprocess_cfg(clip)
    size = pcfg.get("size", 224)
    train_tf = open_clip.image_transform(size, is_train=True, mean=pcfg.get("mean"), std=pcfg.get("std"))
    eval_tf = open_clip.image_transform(size, is_train=False, mean=pcfg.get("mean"), std=pcfg.get("std"),
                                        resize_mode=pcfg.get("resize_mode"), interpolation=pcfg.get("interpolation"))
    cols = CsvColumns(cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_label_key, cfg.csv_separator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_train_source(cfg.train_data, cols, cfg.classnames, train_tf)
        named = named_paths(cfg.eval_data, "--eval-data")
        if not named:
            raise DriverError("--eval-data: give at least one evaluation set (NAME=PATH); the first "
                              "(or --id-eval) is the ID validation set")
        id_set = cfg.id_eval or named[0][0]
        evals = [EvalSet(n, "id" if n == id_set else "ood", load_eval_set(n, p, train, cols, eval_tf),
                         train.classnames) for n, p in named]
        for n, p in named_paths(cfg.zeroshot_data, "--zeroshot-data"):
            ds, names = load_zeroshot_set(n, p, eval_tf)
            evals.append(EvalSet(n, "zeroshot", ds, names))
    for w in caught:
        _log(info, f"warning: {w.message}")
        notes.append(str(w.message))
    return train, evals, read_templates(cfg.templates), id_set


def _check_fits(cfg: Config, info, methods: list[Method], train: TrainSource, pretrain: TrainSource | None,
                tokenizer, model_name: str) -> None:
    """The methods against the data: labels, captions, at least one optimiser step, Lipsum's texts."""
    for m in methods:
        if m.base == "ft" and not train.dataset.has_labels:
            raise DriverError(f"--methods {m.spec}: cross-entropy fine-tuning needs class labels; the CSV "
                              "--train-data has none (give --csv-label-key)")
        if m.base == "flyp" and not (train.dataset.has_captions or train.dataset.has_labels):
            raise DriverError(f"--methods {m.spec}: needs captions or class labels in --train-data")
    phases = [_phase(cfg, "fine-tuning")]
    if pretrain is not None and cfg.pretrain_epochs > 0 and cfg.pretrained is None:
        phases.insert(0, _phase(cfg, "pretrain", pretrain=True))
    world = info.world_size
    for phase in phases:
        n = len((pretrain if phase.name == "pretrain" else train).dataset)
        if (n // (phase.batch_size * world)) // phase.micro_batches == 0 and any(m.trains for m in methods):
            raise DriverError(f"{phase.name}: the training set has {n} images, fewer than one optimiser step "
                              f"(--batch-size {phase.batch_size} x {world} processes x {phase.accumulation})")
    if any("lipsum" in m.regularisers for m in methods):
        try:  # the random texts must fit the tokenizer (type, context length)
            robustft_ext.LipsumLoss(num_texts=1, text_length=cfg.lipsum_text_length).random_tokens(
                tokenizer, torch.Generator())
        except (TypeError, ValueError) as e:
            raise DriverError(f"--methods lipsum with model {model_name}: {e} (--lipsum-text-length)") from e
    if any(m.base == "ft" for m in methods) and not train.classnames:
        raise DriverError("--classnames: class names are needed for the ft head")


def prepare(cfg: Config, info: dist_utils.DistInfo) -> Prepared:
    """Validate and build everything; raises DriverError on bad input, before any training."""
    torch.set_num_threads(cfg.threads or (1 if cfg.embedded else torch.get_num_threads()))
    run_dir = dist_utils.broadcast_object(cfg.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), info)
    if not cfg.resume and os.path.exists(os.path.join(run_dir, "config.json")):
        raise DriverError(f"--run-dir {run_dir} already holds a run; pass --resume to continue it "
                          "or choose another --run-dir")
    cfg.run_dir = run_dir
    methods = parse_methods(cfg.methods)
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
    dist_utils.barrier(info)
    torch.manual_seed(cfg.seed)
    model_name = resolve_model_name(cfg.model, os.path.join(run_dir, "model_config"))
    clip = build_clip(model_name, cfg.pretrained, info.device)
    tokenizer = get_tokenizer(model_name)
    notes: list[str] = []
    pretrain = None
    if cfg.embedded:
        pretrain, train, evals, templates, id_set = _embedded_data(cfg, clip, notes)
    else:
        train, evals, templates, id_set = _real_data(cfg, clip, info, notes)
    _check_fits(cfg, info, methods, train, pretrain, tokenizer, model_name)
    id_eval = next(e for e in evals if e.name == id_set)
    if not id_eval.dataset.has_labels:
        raise DriverError(f"--id-eval {id_set}: the ID validation set needs class labels (WiSE-FT picks "
                          "the alpha by its accuracy)")
    return Prepared(cfg, info, run_dir, model_name, clip, tokenizer, train, evals, templates, methods,
                    id_set, pretrain, notes)


def _trainable_module(clip: torch.nn.Module, method: Method, head: torch.nn.Linear | None) -> TrainModule:
    """A copy of the zero-shot model set up for `method`: ft trains the image tower and the head,
    flyp trains everything."""
    clip = copy.deepcopy(clip)
    for name, p in clip.named_parameters():
        if method.base == "ft":
            p.requires_grad_(name.startswith("visual."))
        elif name == "logit_bias":  # SigLIP-style models: the CLIP loss does not use the bias
            p.requires_grad_(False)
    return TrainModule(clip, copy.deepcopy(head) if method.base == "ft" else None)


def _phase(cfg: Config, name: str, *, pretrain: bool = False) -> Phase:
    """A training phase: fine-tuning with a method, under the batch and accumulation flags, or the
    embedded pre-training, a fixed recipe (its own batch per process and lr, no accumulation) that
    makes the same zero-shot model whatever the fine-tuning's batch."""
    if pretrain:
        return Phase(name, cfg.pretrain_epochs, embedded.PRETRAIN_LR, cfg.weight_decay, cfg.warmup_steps,
                     embedded.PRETRAIN_BATCH_SIZE)
    return Phase(name, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.batch_size, cfg.accum_steps,
                 cfg.accum_freq)


def _identity(p: Prepared, phase: Phase, method: Method) -> dict:
    """What a phase's checkpoints record and must match: this run's settings, the phase, the
    method, the model and the process count."""
    return {"phase": phase.name, "method": method.spec, "model": p.model_name, "processes": p.info.world_size,
            "settings": run_settings(p.cfg)}


def _train(p: Prepared, module: TrainModule, method: Method, phase: Phase, source: TrainSource,
           frozen: FrozenEncoders | None) -> tuple[str, dict]:
    """Train one phase (or load its final.pt when it finished earlier); (status, its stats)."""
    cfg, info = p.cfg, p.info
    phase.identity = _identity(p, phase, method)
    view = TrainView(source.dataset, source.classnames, p.templates, cfg.seed)
    loss_fn = MethodLoss(method, cfg, info.rank, info.world_size, frozen, p.tokenizer, view, info.device)
    ckpt_dir = os.path.join(p.run_dir, "checkpoints", phase.name)
    log_path = os.path.join(p.run_dir, "logs", f"{phase.name}.jsonl")
    final = os.path.join(ckpt_dir, "final.pt")
    if os.path.exists(final):  # finished before an interruption: reuse
        state = checkpoint.load(final, info.device, advice=FINAL_ADVICE)
        checkpoint.check_identity(state, phase.identity, final, advice=FINAL_ADVICE)
        module.load_state_dict(state["model"])
        _log(info, f"[{phase.name}] finished earlier: loaded {final}")
        last = os.path.join(ckpt_dir, "last.pt")
        if info.is_main and remove_superseded(last):  # interrupted between writing final.pt and this
            _log(info, f"[{phase.name}] removed {last}, left behind by an interruption (final.pt supersedes it)")
        return "done", {"steps": state["steps"], "seconds": 0.0, "history": state["history"],
                        "skipped_images": state.get("skipped_images", [])}
    opts = LoopOptions(precision=cfg.precision, grad_clip=cfg.grad_clip, seed=cfg.seed, workers=cfg.workers,
                       save_every_steps=cfg.save_every_steps, stop_after_steps=cfg.stop_after_steps,
                       needs_texts=method.base == "flyp", measure_memory=cfg.measure_memory)
    result = run_phase(module, phase, view, loss_fn, p.tokenizer, info, ckpt_dir, log_path, opts)
    return result.status, {"steps": result.steps, "seconds": result.seconds, "history": result.history,
                           "skipped_images": result.skipped_images, "peak_memory_bytes": result.peak_memory_bytes}


def _stats(stats: dict) -> dict:
    hist = stats["history"]
    return {"steps": stats["steps"], "seconds": round(stats["seconds"], 2),
            "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
            "term_ratios": report.term_ratios(hist), "skipped_images": len(stats["skipped_images"]),
            "peak_memory_mb": None if stats.get("peak_memory_bytes") is None
            else round(stats["peak_memory_bytes"] / 2**20, 2)}


def _stopped(info: dist_utils.DistInfo, phase: str, stats: dict) -> int:
    _log(info, f"[{phase}] stopped after {stats['steps']} steps (--stop-after-steps); "
               "continue with --resume --run-dir <this run>")
    return EXIT_STOPPED


def _start(p: Prepared) -> None:
    """Rank 0, before anything else: remove what an interrupted run left half-written, and write
    config.json (atomically; a resumed run keeps the one it was started with)."""
    dist_utils.barrier(p.info)  # every process is past its own writes of prepare()
    if not p.info.is_main:
        return
    removed = 0
    folders = [p.run_dir] + [os.path.join(p.run_dir, sub) for sub in ("logs", "sharpness", "model_config")]
    for folder in folders + glob.glob(os.path.join(p.run_dir, "checkpoints", "*", "")):
        removed += checkpoint.remove_orphans(folder)
    if removed:
        print(f"removed {removed} temporary file(s) an interrupted run left behind", flush=True)
    if not p.cfg.resume:
        write_config(p.cfg, p.run_dir)


def _zero_shot_model(p: Prepared, training: dict) -> tuple[torch.nn.Module | None, int]:
    """The zero-shot model (the embedded default pre-trains it here); (model, 0) or (None, exit)."""
    cfg, clip = p.cfg, p.clip
    if p.pretrain is not None and cfg.pretrained is None and cfg.pretrain_epochs > 0:
        _log(p.info, f"pre-training the embedded zero-shot model on {len(p.pretrain.dataset)} captioned digits")
        module = TrainModule(clip)
        method = parse_method("flyp")
        status, stats = _train(p, module, method, _phase(cfg, "pretrain", pretrain=True), p.pretrain, None)
        training["pretrain"] = _stats(stats)
        if status == "stopped":
            return None, _stopped(p.info, "pretrain", stats)
        clip = module.clip
    return clip.eval(), 0


@dataclass
class _Session:
    """What every method of a run shares once the zero-shot model exists."""

    clip: torch.nn.Module
    frozen: FrozenEncoders
    zs_head: torch.nn.Linear | None
    eval_fn: object
    sharp: TrainingHook | None


def _session(p: Prepared, clip: torch.nn.Module) -> _Session:
    cfg, info, device = p.cfg, p.info, p.info.device
    frozen = FrozenEncoders(clip)
    zs_head = None
    if any(m.base == "ft" for m in p.methods) and p.train.classnames:
        zs_head = make_head(class_embeddings(clip, p.tokenizer, p.train.classnames, p.templates, device),
                            frozen.logit_scale)
    pre_features = {}
    if info.is_main:
        pre_features = {e.name: encode_images(frozen.clip, e.dataset, cfg.eval_batch_size, device, cfg.workers,
                                              cfg.precision) for e in p.evals}

    def eval_fn(module: TrainModule) -> list[dict]:
        return evaluate(module, p.evals, p.tokenizer, p.templates, pre_features, device,
                        cfg.eval_batch_size, cfg.metric_max_images, cfg.workers, cfg.precision)

    sharp = None
    if cfg.analyze_sharpness and info.is_main:  # docs/sharpness.md
        env = Environment(p.evals, p.id_set, p.tokenizer, p.templates, device, eval_fn)
        sharp = TrainingHook(cfg, env, p.run_dir)
    return _Session(clip, frozen, zs_head, eval_fn, sharp)


def _run_method(p: Prepared, s: _Session, method: Method, rows: list[dict], training: dict) -> int:
    """Fine-tune one method from the zero-shot model, sweep WiSE-FT and add its rows; 0 or the exit
    status of a stopped run."""
    info = p.info
    if not method.trains:
        if info.is_main:
            rows += [{"method": "zeroshot", "alpha": 0.0, "best_alpha": True, **r}
                     for r in s.eval_fn(TrainModule(s.frozen.clip))]
        return 0
    _log(info, f"fine-tuning: {method.spec}")
    module = _trainable_module(s.clip, method, s.zs_head)
    status, stats = _train(p, module, method, _phase(p.cfg, method.spec), p.train,
                           s.frozen if method.needs_frozen else None)
    training[method.spec] = _stats(stats)
    if status == "stopped":
        return _stopped(info, method.spec, stats)
    if info.is_main:
        zs_module = _trainable_module(s.clip, method, s.zs_head)  # s.clip is still the zero-shot model
        sweep = wise_ft.sweep(zs_module, module, p.cfg.alphas, s.eval_fn)
        if s.sharp is not None and s.sharp.wants(method.spec):
            s.sharp.add(method.spec, zs_module, module, sweep)
        best = wise_ft.best_alpha(sweep, p.id_set)
        rows += [{"method": method.spec, "alpha": alpha, "best_alpha": alpha == best, **r}
                 for alpha, rs in sweep for r in rs]
    dist_utils.barrier(info)
    return 0


def execute(p: Prepared) -> int:
    """Run everything; returns the exit status (0, or EXIT_STOPPED after --stop-after-steps)."""
    t_start = time.perf_counter()
    _start(p)
    for note in p.notes:
        _log(p.info, f"note: {note}")
    training: dict[str, dict] = {}
    clip, code = _zero_shot_model(p, training)
    if clip is None:
        return code
    session = _session(p, clip)
    rows: list[dict] = []
    for method in p.methods:
        code = _run_method(p, session, method, rows, training)
        if code:
            return code
    if p.info.is_main:
        _write_outputs(p, rows, training, time.perf_counter() - t_start, session.sharp)
    dist_utils.barrier(p.info)
    return 0


def _write_outputs(p: Prepared, rows: list[dict], training: dict, seconds: float, sharp: TrainingHook | None) -> None:
    set_roles = [(e.name, e.role) for e in p.evals]
    path = lambda name: os.path.join(p.run_dir, name)  # noqa: E731
    report.write_results(rows, path("results.csv"), path("results.jsonl"))
    summary = report.summarise(rows, set_roles, p.id_set)
    report.write_summary(summary, path("summary.csv"))
    atomic_write_text(path("training.json"), json.dumps({"phases": training, "seconds_total": round(seconds, 2)},
                                                        indent=2))
    written = [path(n) for n in ("config.json", "results.csv", "results.jsonl", "summary.csv", "training.json")]
    if not p.cfg.no_plots:
        ood = [n for n, role in set_roles if role == "ood"]
        zs = [n for n, role in set_roles if role == "zeroshot"]
        plots.wise_ft_plot(rows, p.id_set, ood, path("wise_ft_id_vs_ood.png"), zs)
        plots.method_bars(summary, set_roles, path("method_bars.png"))
        written += [path("wise_ft_id_vs_ood.png"), path("method_bars.png")]
    written += [path(os.path.join("logs", f"{phase}.jsonl")) for phase in training]
    written += [path(os.path.join("checkpoints", phase, "final.pt")) for phase in training]
    if sharp is not None:
        written += sharp.written
        print("\n" + sharp.report(), flush=True)
    print(f"\nresults (ID validation set: {p.id_set}; {report.SUMMARY_UNITS}):")
    print(report.format_table(summary))
    print(f"\nrun folder: {p.run_dir}  ({seconds:.1f} s); files written:")
    print("\n".join(f"  {f}" for f in written if os.path.exists(f)), flush=True)
