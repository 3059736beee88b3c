"""The training loop of one phase (the embedded pre-training, or fine-tuning with one method):
AdamW with linear warm-up and cosine decay, autocast, gradient accumulation, DDP, a progress bar
with loss and throughput, atomic checkpoints, and resume that reaches the same weights as an
uninterrupted run."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from . import distributed as dist_utils
from .data import TrainView, epoch_batches
from .errors import DriverError
from .methods import MethodLoss
from .models import TrainModule


# Epoch-end checkpoints are skipped while the last one is younger than this (short epochs would
# otherwise spend their time writing); --save-every-steps checkpoints are never skipped.
EPOCH_CHECKPOINT_MIN_S = 60.0


@dataclass
class Phase:
    """One training phase and its optimisation settings."""

    name: str
    epochs: int
    lr: float
    weight_decay: float
    warmup_steps: int
    batch_size: int
    accum_steps: int = 1


@dataclass
class PhaseResult:
    status: str                      # "done" or "stopped"
    steps: int
    total_steps: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (open_clip's cosine_lr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * lr


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and logit_scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def steps_per_epoch(n: int, phase: Phase, world_size: int) -> int:
    return (n // (phase.batch_size * world_size)) // phase.accum_steps


def _collate(items):
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    return images, labels, [it[2] for it in items]


def _write_log(history: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def run_phase(module: TrainModule, phase: Phase, view: TrainView, loss_fn: MethodLoss, tokenizer,
              info: dist_utils.DistInfo, ckpt_dir: str, log_path: str, *, precision: str = "fp32",
              grad_clip: float = 0.0, seed: int = 0, workers: int = 0, save_every_steps: int = 0,
              stop_after_steps: int = 0, needs_texts: bool = True) -> PhaseResult:
    """Train `module` in place. Resumes from <ckpt_dir>/last.pt when it exists; returns 'stopped'
    after `stop_after_steps` optimiser steps (checkpointed), else 'done' with <ckpt_dir>/final.pt."""
    device = info.device
    per_epoch = steps_per_epoch(len(view), phase, info.world_size)
    if per_epoch == 0:
        raise DriverError(f"{phase.name}: the training set has {len(view)} images, fewer than one "
                          f"optimiser step (--batch-size {phase.batch_size} x {info.world_size} processes "
                          f"x --accum-steps {phase.accum_steps})")
    total = per_epoch * phase.epochs
    model = DistributedDataParallel(module) if info.distributed else module
    optimizer = torch.optim.AdamW(_param_groups(module, phase.weight_decay), lr=phase.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    step, history = 0, []
    last_path, final_path = os.path.join(ckpt_dir, "last.pt"), os.path.join(ckpt_dir, "final.pt")

    if os.path.exists(last_path):
        state = checkpoint.load(last_path, device)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["method_state"], device)
        checkpoint.set_rng_states(state["rng"])
        step, history = state["scheduler"]["step"], state["history"]
        if info.is_main:
            print(f"[{phase.name}] resumed from {last_path} at step {step}/{total}", flush=True)

    def save_state() -> None:
        if info.is_main:
            checkpoint.atomic_save({
                "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {"step": step, "total": total, "warmup": phase.warmup_steps, "lr": phase.lr},
                "scaler": scaler.state_dict(), "rng": checkpoint.rng_states(),
                "method_state": loss_fn.state_dict(), "history": history, "phase": phase.name,
            }, last_path)
            _write_log(history, log_path)
        dist_utils.barrier(info)

    start = last_save = time.perf_counter()
    module.train()
    micro = phase.accum_steps
    while step < total:
        epoch = step // per_epoch
        batches = epoch_batches(len(view), phase.batch_size, epoch, seed, info.rank, info.world_size)
        batches = batches[: per_epoch * micro][(step - epoch * per_epoch) * micro:]
        loader = DataLoader(view, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                            generator=torch.Generator())  # leaves the global RNG alone
        interactive = sys.stderr.isatty()
        bar = tqdm(total=per_epoch, initial=step - epoch * per_epoch, disable=not (info.is_main and interactive),
                   desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}", leave=False, dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        terms_acc: dict[str, float] = {}
        for k, (images, labels, captions) in enumerate(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            texts = tokenizer(captions).to(device) if needs_texts else None
            inputs = loss_fn.step_inputs(step, device)
            last_micro = (k + 1) % micro == 0
            sync = contextlib.nullcontext() if (last_micro or not info.distributed) else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(images, texts, inputs.extra_images, inputs.extra_texts)
                terms = loss_fn(out, labels, images, inputs, step)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{phase.name}: non-finite loss at step {step}: "
                                             f"{ {k: float(v) for k, v in terms.items()} }")
                scaler.scale(loss / micro).backward()
            for name, v in terms.items():
                terms_acc[name] = terms_acc.get(name, 0.0) + float(dist_utils.mean(v, info)) / micro
            seen += images.shape[0] * info.world_size
            if not last_micro:
                continue
            lr = lr_at(step, total, phase.warmup_steps, phase.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # as open_clip's training loop: the logit scale stays <= 100
                module.clip.logit_scale.clamp_(0, math.log(100))
            loss_fn.after_step()
            step += 1
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            row = {"step": step, "epoch": epoch, "lr": lr, "loss": sum(terms_acc.values()),
                   **{f"loss_{n}": v for n, v in terms_acc.items()}, "images_per_s": rate}
            history.append(row)
            terms_acc = {}
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.3g}")
            at_epoch_end = step % per_epoch == 0
            due = time.perf_counter() - last_save >= EPOCH_CHECKPOINT_MIN_S
            if step < total and ((at_epoch_end and due) or (save_every_steps and step % save_every_steps == 0)):
                save_state()
                last_save = time.perf_counter()
            if stop_after_steps and step == stop_after_steps and step < total:
                bar.close()
                save_state()
                return PhaseResult("stopped", step, total, history, time.perf_counter() - start)
        bar.close()
        if info.is_main and not interactive and history:  # logs: one line per epoch instead of a bar
            print(f"[{phase.name}] epoch {epoch + 1}/{phase.epochs} step {step}/{total} "
                  f"loss {history[-1]['loss']:.4f} {history[-1]['images_per_s']:.3g} img/s", flush=True)
    if info.is_main:
        checkpoint.atomic_save({"model": module.state_dict(), "method_state": loss_fn.state_dict(),
                                "history": history, "phase": phase.name, "steps": step}, final_path)
        _write_log(history, log_path)
        if os.path.exists(last_path):
            os.unlink(last_path)  # the final weights supersede the training state
    dist_utils.barrier(info)
    module.eval()
    return PhaseResult("done", step, total, history, time.perf_counter() - start)
