"""One run end to end: prepare everything that can fail on bad input (paths, data, model, weights,
methods) before any training, then make the zero-shot model, fine-tune with each method, evaluate,
sweep WiSE-FT, and write the run folder."""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import open_clip
import torch

from . import checkpoint, embedded, plots, report, wise_ft
from . import distributed as dist_utils
from .config import Config, named_paths
from .data import (CsvColumns, EvalSet, TrainSource, TrainView, load_eval_set, load_train_source,
                   load_zeroshot_set, read_templates)
from .errors import DriverError
from .evaluate import class_embeddings, encode_images, evaluate
from .methods import Method, MethodLoss, parse_methods
from .models import (FrozenEncoders, TrainModule, build_clip, get_tokenizer, make_head,
                     preprocess_cfg, resolve_model_name)
from .train import Phase, run_phase

EXIT_STOPPED = 3  # --stop-after-steps ended the run early (a checkpoint was written)


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
    unavailable: dict[str, str]
    id_set: str
    pretrain: TrainSource | None = None
    notes: list[str] = field(default_factory=list)


def _log(info: dist_utils.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


def prepare(cfg: Config, info: dist_utils.DistInfo) -> Prepared:
    """Validate and build everything; raises DriverError on bad input, before any training."""
    torch.set_num_threads(cfg.threads or (1 if cfg.embedded else torch.get_num_threads()))
    run_dir = cfg.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    run_dir = dist_utils.broadcast_object(run_dir, info)
    if not cfg.resume and os.path.exists(os.path.join(run_dir, "config.json")):
        raise DriverError(f"--run-dir {run_dir} already holds a run; pass --resume to continue it "
                          "or choose another --run-dir")
    cfg.run_dir = run_dir
    methods = parse_methods(cfg.methods)
    unavailable = {m.spec: r for m in methods if (r := m.unavailable_reason()) is not None}
    if len(unavailable) == len(methods):
        raise DriverError("none of the requested methods can run: "
                          + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
    dist_utils.barrier(info)

    torch.manual_seed(cfg.seed)
    model_name = resolve_model_name(cfg.model, os.path.join(run_dir, "model_config"))
    clip = build_clip(model_name, cfg.pretrained, info.device)
    tokenizer = get_tokenizer(model_name)
    templates = read_templates(cfg.templates)
    notes: list[str] = []
    pretrain = None
    if cfg.embedded:
        pretrain, train, evals, emb_templates = embedded.build(
            cfg.embedded_fraction, preprocess_cfg(clip).get("size", embedded.IMAGE_SIZE))
        if cfg.templates is None:
            templates = emb_templates
        if cfg.pretrained is None and cfg.pretrain_epochs == 0:
            notes.append("the embedded model is not pre-trained (--pretrain-epochs 0): zero-shot is random")
        id_set = "val"
    else:
        if cfg.pretrained is None:
            notes.append("no --pretrained weights: the zero-shot model is randomly initialised")
        pcfg = preprocess_cfg(clip)
        size = pcfg.get("size", 224)
        train_tf = open_clip.image_transform(size, is_train=True, mean=pcfg.get("mean"), std=pcfg.get("std"))
        eval_tf = open_clip.image_transform(size, is_train=False, mean=pcfg.get("mean"), std=pcfg.get("std"),
                                            resize_mode=pcfg.get("resize_mode"),
                                            interpolation=pcfg.get("interpolation"))
        cols = CsvColumns(cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_label_key, cfg.csv_separator)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train = load_train_source(cfg.train_data, cols, cfg.classnames, train_tf)
            named = named_paths(cfg.eval_data, "--eval-data")
            if not named:
                raise DriverError("--eval-data: give at least one evaluation set (NAME=PATH); the first "
                                  "(or --id-eval) is the ID validation set")
            id_set = cfg.id_eval or named[0][0]
            evals = [EvalSet(n, "id" if n == id_set else "ood",
                             load_eval_set(n, p, train, cols, eval_tf), train.classnames) for n, p in named]
            for n, p in named_paths(cfg.zeroshot_data, "--zeroshot-data"):
                ds, names = load_zeroshot_set(n, p, eval_tf)
                evals.append(EvalSet(n, "zeroshot", ds, names))
        for w in caught:
            if info.is_main:
                print(f"warning: {w.message}", flush=True)
            notes.append(str(w.message))
    for m in methods:
        if m.spec in unavailable:
            continue
        if m.base == "ft" and not train.dataset.has_labels:
            raise DriverError(f"--methods {m.spec}: cross-entropy fine-tuning needs class labels; the CSV "
                              "--train-data has none (give --csv-label-key)")
        if m.base == "flyp" and not (train.dataset.has_captions or train.dataset.has_labels):
            raise DriverError(f"--methods {m.spec}: needs captions or class labels in --train-data")
    world = info.world_size
    for phase_name, n, batch in ([("pretrain", len(pretrain.dataset), embedded.PRETRAIN_BATCH_SIZE)]
                                 if pretrain is not None and cfg.pretrain_epochs > 0 and cfg.pretrained is None
                                 else []) + [("fine-tuning", len(train.dataset), cfg.batch_size)]:
        if (n // (batch * world)) // cfg.accum_steps == 0 and any(
                m.trains for m in methods if m.spec not in unavailable):
            raise DriverError(f"{phase_name}: the training set has {n} images, fewer than one optimiser step "
                              f"(--batch-size {batch} x {world} processes x --accum-steps {cfg.accum_steps})")
    if any("lipsum" in m.regularisers for m in methods if m.spec not in unavailable):
        import robustft_ext

        try:  # the random texts must fit the tokenizer (type, context length)
            robustft_ext.LipsumLoss(num_texts=1, text_length=cfg.lipsum_text_length).random_tokens(
                tokenizer, torch.Generator())
        except (TypeError, ValueError) as e:
            raise DriverError(f"--methods lipsum with model {model_name}: {e} (--lipsum-text-length)") from e
    if any(m.base == "ft" for m in methods) and not train.classnames:
        raise DriverError("--classnames: class names are needed for the ft head")
    id_eval = next(e for e in evals if e.name == id_set)
    if not id_eval.dataset.has_labels:
        raise DriverError(f"--id-eval {id_set}: the ID validation set needs class labels (WiSE-FT picks "
                          "the alpha by its accuracy)")
    return Prepared(cfg, info, run_dir, model_name, clip, tokenizer, train, evals, templates, methods,
                    unavailable, id_set, pretrain, notes)


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


def _phase(cfg: Config, name: str, *, epochs: int, lr: float, batch_size: int | None = None) -> Phase:
    return Phase(name, epochs, lr, cfg.weight_decay, cfg.warmup_steps, batch_size or cfg.batch_size,
                 cfg.accum_steps)


def _train(p: Prepared, module: TrainModule, method: Method, phase: Phase, source: TrainSource,
           frozen: FrozenEncoders | None):
    cfg, info = p.cfg, p.info
    view = TrainView(source.dataset, source.classnames, p.templates, cfg.seed)
    loss_fn = MethodLoss(method, cfg, info.rank, info.world_size, frozen, p.tokenizer, view, info.device)
    ckpt_dir = os.path.join(p.run_dir, "checkpoints", phase.name)
    log_path = os.path.join(p.run_dir, "logs", f"{phase.name}.jsonl")
    if info.is_main:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
    final = os.path.join(ckpt_dir, "final.pt")
    if os.path.exists(final):  # finished before an interruption: reuse
        state = checkpoint.load(final, info.device)
        module.load_state_dict(state["model"])
        _log(info, f"[{phase.name}] finished earlier: loaded {final}")
        return "done", {"steps": state["steps"], "seconds": 0.0, "history": state["history"]}
    result = run_phase(module, phase, view, loss_fn, p.tokenizer, info, ckpt_dir, log_path,
                       precision=cfg.precision, grad_clip=cfg.grad_clip, seed=cfg.seed, workers=cfg.workers,
                       save_every_steps=cfg.save_every_steps, stop_after_steps=cfg.stop_after_steps,
                       needs_texts=method.base == "flyp")
    return result.status, {"steps": result.steps, "seconds": result.seconds, "history": result.history}


def execute(p: Prepared) -> int:
    """Run everything; returns the exit status (0, or EXIT_STOPPED after --stop-after-steps)."""
    cfg, info, device = p.cfg, p.info, p.info.device
    t_start = time.perf_counter()
    if info.is_main:
        with open(os.path.join(p.run_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    for note in p.notes:
        _log(info, f"note: {note}")
    for spec, reason in p.unavailable.items():
        _log(info, f"{spec}: {reason}")
    training: dict[str, dict] = {}

    # 1. the zero-shot model (the embedded default pre-trains one here)
    clip = p.clip
    if p.pretrain is not None and cfg.pretrained is None and cfg.pretrain_epochs > 0:
        _log(info, f"pre-training the embedded zero-shot model on {len(p.pretrain.dataset)} captioned digits")
        module = TrainModule(clip)
        status, stats = _train(p, module, parse_methods("flyp")[0],
                               _phase(cfg, "pretrain", epochs=cfg.pretrain_epochs, lr=embedded.PRETRAIN_LR,
                                      batch_size=embedded.PRETRAIN_BATCH_SIZE),
                               p.pretrain, None)
        training["pretrain"] = _stats(stats)
        if status == "stopped":
            return _stopped(info, "pretrain", stats)
        clip = module.clip
    clip.eval()
    frozen = FrozenEncoders(clip)
    zs_head = None
    if any(m.base == "ft" for m in p.methods) and p.train.classnames:
        zs_head = make_head(class_embeddings(clip, p.tokenizer, p.train.classnames, p.templates, device),
                            frozen.logit_scale)

    def eval_fn(module: TrainModule) -> list[dict]:
        return evaluate(module, p.evals, p.tokenizer, p.templates, pre_features, device,
                        cfg.eval_batch_size, cfg.metric_max_images, cfg.workers, cfg.precision)

    pre_features = {}
    if info.is_main:
        pre_features = {e.name: encode_images(frozen.clip, e.dataset, cfg.eval_batch_size, device, cfg.workers,
                                              cfg.precision) for e in p.evals}
    rows: list[dict] = []
    sharp = None
    if cfg.analyze_sharpness and info.is_main:  # docs/sharpness.md
        from .sharpness_analysis import TrainingHook

        sharp = TrainingHook(p, eval_fn)

    # 2. each method from the same zero-shot model
    for method in p.methods:
        if method.spec in p.unavailable:
            rows.append({"method": method.spec, "status": p.unavailable[method.spec]})
            continue
        if not method.trains:
            if info.is_main:
                for r in eval_fn(TrainModule(frozen.clip)):
                    rows.append({"method": "zeroshot", "status": "ok", "alpha": 0.0, "best_alpha": True, **r})
            continue
        _log(info, f"fine-tuning: {method.spec}")
        module = _trainable_module(clip, method, zs_head)
        status, stats = _train(p, module, method, _phase(cfg, method.spec, epochs=cfg.epochs, lr=cfg.lr),
                               p.train, frozen if method.needs_frozen else None)
        training[method.spec] = _stats(stats)
        if status == "stopped":
            return _stopped(info, method.spec, stats)
        if info.is_main:
            zs_module = _trainable_module(clip, method, zs_head)  # clip is still the zero-shot model
            sweep = wise_ft.sweep(zs_module, module, cfg.alphas, eval_fn)
            if sharp is not None:
                sharp.add(method.spec, zs_module, module, sweep)
            del zs_module
            best = wise_ft.best_alpha(sweep, p.id_set)
            for alpha, rs in sweep:
                for r in rs:
                    rows.append({"method": method.spec, "status": "ok", "alpha": alpha,
                                 "best_alpha": alpha == best, **r})
        dist_utils.barrier(info)
        del module

    # 3. the run folder
    if info.is_main:
        _write_outputs(p, rows, training, time.perf_counter() - t_start)
        if sharp is not None:
            sharp.report()
    dist_utils.barrier(info)
    return 0


def _stats(stats: dict) -> dict:
    hist = stats["history"]
    return {"steps": stats["steps"], "seconds": round(stats["seconds"], 2),
            "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None}


def _stopped(info: dist_utils.DistInfo, phase: str, stats: dict) -> int:
    _log(info, f"[{phase}] stopped after {stats['steps']} steps (--stop-after-steps); "
               "continue with --resume --run-dir <this run>")
    return EXIT_STOPPED


def _write_outputs(p: Prepared, rows: list[dict], training: dict, seconds: float) -> None:
    set_order = [(e.name, e.role) for e in p.evals]
    report.write_results(rows, os.path.join(p.run_dir, "results.csv"), os.path.join(p.run_dir, "results.jsonl"))
    summary = report.summarise(rows, set_order, p.id_set)
    columns = report.summary_columns(set_order)
    report.write_summary(summary, columns, os.path.join(p.run_dir, "summary.csv"))
    with open(os.path.join(p.run_dir, "training.json"), "w") as f:
        json.dump({"phases": training, "seconds_total": round(seconds, 2)}, f, indent=2)
    if not p.cfg.no_plots:
        ood = [n for n, role in set_order if role == "ood"]
        zs = [n for n, role in set_order if role == "zeroshot"]
        plots.wise_ft_plot(rows, p.id_set, ood, os.path.join(p.run_dir, "wise_ft_id_vs_ood.png"), zs)
        plots.method_bars(summary, [n for n, _ in set_order], os.path.join(p.run_dir, "method_bars.png"))
    print("\nresults (top-1 %; ID validation set: " + p.id_set + "; ECE % and RSA on it):")
    print(report.format_table(summary, columns))
    print(f"\nrun folder: {p.run_dir}  ({seconds:.1f} s)")
