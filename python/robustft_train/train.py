"""The training loop of one phase (the embedded pre-training, or fine-tuning with one method):
AdamW with linear warm-up and cosine decay, autocast, gradient accumulation (plain, or
feature-cached: `feature_cache`), DDP, a progress bar with loss and throughput, atomic
checkpoints with checksums and the identity of their run, resume that reaches the same weights as
an uninterrupted run, and a clear stop when the loss diverges."""
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
from .errors import DivergedError, DriverError
from .feature_cache import MicroBatch, StepContext, cached_step
from .files import atomic_write_text, fsync_folder
from .losses import MethodLoss
from .memory import PeakMemory
from .models import TrainModule

# Epoch-end checkpoints are skipped while the last one is younger than this (short epochs would
# otherwise spend their time writing); --save-every-steps checkpoints are never skipped.
EPOCH_CHECKPOINT_MIN_S = 60.0
LAST_ADVICE = ("delete it to restart this phase from its first step (the phases before it are kept), "
               "then run again with --resume")


@dataclass
class Phase:
    """One training phase and its optimisation settings."""

    name: str
    epochs: int
    lr: float
    weight_decay: float
    warmup_steps: int
    batch_size: int                 # per process and micro-batch
    accum_steps: int = 1            # micro-batches per step, each its own contrastive batch (plain accumulation)
    accum_freq: int = 1             # micro-batches per step, together one contrastive batch (feature cache)
    identity: dict = field(default_factory=dict)   # what its checkpoints must match (checkpoint.check_identity)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimiser step (at most one of accum_steps and accum_freq exceeds 1)."""
        return self.accum_steps * self.accum_freq

    @property
    def accumulation(self) -> str:
        """The flag that sets micro_batches, as a user wrote it."""
        return f"--accum-freq {self.accum_freq}" if self.accum_freq > 1 else f"--accum-steps {self.accum_steps}"


@dataclass
class LoopOptions:
    """How a phase runs (from the run's Config)."""

    precision: str = "fp32"
    grad_clip: float = 0.0
    seed: int = 0
    workers: int = 0
    save_every_steps: int = 0
    stop_after_steps: int = 0
    needs_texts: bool = True
    measure_memory: bool = False    # count the peak tensor memory on the CPU too (memory.PeakMemory)


@dataclass
class PhaseResult:
    status: str                      # "done" or "stopped"
    steps: int
    total_steps: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    skipped_images: list[str] = field(default_factory=list)   # training images that did not decode
    peak_memory_bytes: int | None = None   # above the phase's start (memory.PeakMemory); None: not measured


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
    return (n // (phase.batch_size * world_size)) // phase.micro_batches


def _collate(items):
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    skipped = [p for it in items for p in it[3]]
    return images, labels, [it[2] for it in items], skipped


def write_log(history: list[dict], path: str) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


class PhaseRun:
    """The state of one phase's loop: model, optimiser, scaler, step, history."""

    def __init__(self, module: TrainModule, phase: Phase, view: TrainView, loss_fn: MethodLoss, tokenizer,
                 info: dist_utils.DistInfo, ckpt_dir: str, log_path: str, opts: LoopOptions):
        self.module, self.phase, self.view, self.loss_fn = module, phase, view, loss_fn
        self.tokenizer, self.info, self.opts, self.log_path = tokenizer, info, opts, log_path
        self.per_epoch = steps_per_epoch(len(view), phase, info.world_size)
        if self.per_epoch == 0:
            raise DriverError(f"{phase.name}: the training set has {len(view)} images, fewer than one "
                              f"optimiser step (--batch-size {phase.batch_size} x {info.world_size} processes "
                              f"x {phase.accumulation})")
        self.total = self.per_epoch * phase.epochs
        self.model = DistributedDataParallel(module) if info.distributed else module
        self.optimizer = torch.optim.AdamW(_param_groups(module, phase.weight_decay), lr=phase.lr)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=opts.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.precision)
        self.step, self.history, self.skipped = 0, [], set()
        self.saved_step: int | None = None   # the step of this phase's last.pt
        self.last_path, self.final_path = os.path.join(ckpt_dir, "last.pt"), os.path.join(ckpt_dir, "final.pt")
        self.interactive = sys.stderr.isatty()
        self.last_save = time.perf_counter()

    def log(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def resume(self) -> None:
        """Continue from <ckpt_dir>/last.pt when it exists."""
        if not os.path.exists(self.last_path):
            return
        state = checkpoint.load(self.last_path, self.info.device, advice=LAST_ADVICE)
        checkpoint.check_identity(state, self.phase.identity, self.last_path, advice=LAST_ADVICE)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["method_state"])
        checkpoint.set_rng_states(state["rng"])
        self.step, self.history = state["scheduler"]["step"], state["history"]
        self.skipped = set(state.get("skipped_images", []))
        self.saved_step = self.step
        self.log(f"[{self.phase.name}] resumed from {self.last_path} at step {self.step}/{self.total}")

    def save(self) -> None:
        if self.info.is_main:
            checkpoint.atomic_save({
                "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, "total": self.total, "warmup": self.phase.warmup_steps,
                              "lr": self.phase.lr},
                "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_states(),
                "method_state": self.loss_fn.state_dict(), "history": self.history, "phase": self.phase.name,
                "identity": self.phase.identity, "skipped_images": sorted(self.skipped)}, self.last_path)
            write_log(self.history, self.log_path)
        self.saved_step = self.step
        dist_utils.barrier(self.info)

    def finish(self) -> None:
        if self.info.is_main:
            checkpoint.atomic_save({"model": self.module.state_dict(), "method_state": self.loss_fn.state_dict(),
                                    "history": self.history, "phase": self.phase.name, "steps": self.step,
                                    "identity": self.phase.identity, "skipped_images": sorted(self.skipped)},
                                   self.final_path)
            write_log(self.history, self.log_path)
            remove_superseded(self.last_path)
        dist_utils.barrier(self.info)

    def micro_step(self, images, labels, captions, micro: int, sync: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch as its own contrastive batch (plain accumulation
        over `micro` of them); its loss terms (averaged over processes)."""
        device = self.info.device
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        texts = self.tokenizer(captions).to(device) if self.opts.needs_texts else None
        inputs = self.loss_fn.step_inputs(self.step, device)
        no_sync = contextlib.nullcontext() if (sync or not self.info.distributed) else self.model.no_sync()
        with no_sync:
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.model(images, texts, inputs.extra_images, inputs.extra_texts)
            terms = self.loss_fn(out, labels, self.loss_fn.pre_image_features(images), inputs, self.step)
            averaged = {name: float(dist_utils.mean(v, self.info)) for name, v in terms.items()}
            self.check_finite(averaged)
            self.scaler.scale(sum(terms.values()) / micro).backward()
        return {name: v / micro for name, v in averaged.items()}

    def cached_step(self, batches: list[MicroBatch]) -> dict[str, float]:
        """The gradient of one step whose micro-batches are one contrastive batch (feature_cache)."""
        ctx = StepContext(self.model, self.module, self.loss_fn, self.info, self.amp_dtype, self.scaler, self.step)
        return cached_step(batches, self.loss_fn.step_inputs(self.step, self.info.device), ctx, self.check_finite)

    def gradients(self, epoch: int):
        """For each optimiser step of the rest of `epoch`: accumulate its gradient; yield its loss
        terms and its images (all processes)."""
        micro, cached = self.phase.micro_batches, self.phase.accum_freq > 1
        count, pending, terms, images = 0, [], {}, 0
        for images_k, labels, captions, skipped in self.loader(epoch):
            self.skipped.update(skipped)
            images += images_k.shape[0] * self.info.world_size
            count += 1
            if cached:
                texts = self.tokenizer(captions) if self.opts.needs_texts else None
                pending.append(MicroBatch(images_k, labels, texts))
                if count < micro:
                    continue
                terms, pending = self.cached_step(pending), []  # the micro-batches freed before the step
            else:
                for name, v in self.micro_step(images_k, labels, captions, micro, count == micro).items():
                    terms[name] = terms.get(name, 0.0) + v
                if count < micro:
                    continue
            yield terms, images
            count, pending, terms, images = 0, [], {}, 0

    def check_finite(self, terms: dict[str, float]) -> None:
        """Stop with DivergedError when a loss term (averaged over processes, so that every process
        stops together) is not finite; the log keeps the steps before, last.pt the last checkpoint."""
        if all(math.isfinite(v) for v in terms.values()):
            return
        if self.info.is_main:
            write_log(self.history, self.log_path)
        raise DivergedError(divergence_report(self, terms))

    def optimizer_step(self) -> float:
        lr = lr_at(self.step, self.total, self.phase.warmup_steps, self.phase.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.opts.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # as open_clip's training loop: the logit scale stays <= 100
            self.module.clip.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return lr

    def loader(self, epoch: int) -> DataLoader:
        micro = self.phase.micro_batches
        batches = epoch_batches(len(self.view), self.phase.batch_size, epoch, self.opts.seed, self.info.rank,
                                self.info.world_size)
        batches = batches[: self.per_epoch * micro][(self.step - epoch * self.per_epoch) * micro:]
        return DataLoader(self.view, batch_sampler=batches, num_workers=self.opts.workers, collate_fn=_collate,
                          generator=torch.Generator())  # leaves the global RNG alone

    def epoch(self, epoch: int) -> bool:
        """Train the rest of `epoch`; False when --stop-after-steps stopped the phase."""
        opts = self.opts
        bar = tqdm(total=self.per_epoch, initial=self.step - epoch * self.per_epoch,
                   disable=not (self.info.is_main and self.interactive), leave=False, dynamic_ncols=True,
                   desc=f"{self.phase.name} epoch {epoch + 1}/{self.phase.epochs}")
        seen, t0 = 0, time.perf_counter()
        for terms, images in self.gradients(epoch):
            seen += images
            lr = self.optimizer_step()
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            self.history.append({"step": self.step, "epoch": epoch, "lr": lr, "loss": sum(terms.values()),
                                 **{f"loss_{n}": v for n, v in terms.items()}, "images_per_s": rate})
            bar.update(1)
            bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}", img_s=f"{rate:.3g}")
            due = time.perf_counter() - self.last_save >= EPOCH_CHECKPOINT_MIN_S and self.step % self.per_epoch == 0
            if self.step < self.total and (due or (opts.save_every_steps and self.step % opts.save_every_steps == 0)):
                self.save()
                self.last_save = time.perf_counter()
            if opts.stop_after_steps and self.step == opts.stop_after_steps and self.step < self.total:
                bar.close()
                self.save()
                return False
        bar.close()
        if not self.interactive and self.history:  # logs: one line per epoch instead of a bar
            self.log(f"[{self.phase.name}] epoch {epoch + 1}/{self.phase.epochs} step {self.step}/{self.total} "
                     f"loss {self.history[-1]['loss']:.4f} {self.history[-1]['images_per_s']:.3g} img/s")
        return True


def remove_superseded(last_path: str) -> bool:
    """Delete a phase's last.pt once its final.pt exists (the final weights supersede the training
    state); whether there was one."""
    if not os.path.exists(last_path):
        return False
    os.unlink(last_path)
    fsync_folder(os.path.dirname(os.path.abspath(last_path)))
    return True


def divergence_report(run: PhaseRun, terms: dict[str, float]) -> str:
    """What a user needs when a loss term is not finite: where, which term, the likely cause, what
    to change, and what the run folder still holds."""
    phase, step, opts = run.phase, run.step, run.opts
    bad = ", ".join(f"{name} = {value}" for name, value in terms.items() if not math.isfinite(value))
    good = ", ".join(f"{name} = {value:.4g}" for name, value in terms.items() if math.isfinite(value))
    weights_finite = all(bool(torch.isfinite(p).all()) for p in run.module.parameters())
    lr = lr_at(step, run.total, phase.warmup_steps, phase.lr)
    if step > 0:
        cause = (f"the optimiser steps were too large for this model: the learning rate of this step is {lr:.3g} "
                 f"(peak --lr {phase.lr:g}, warm-up {phase.warmup_steps} steps)"
                 + ("" if weights_finite else ", and the weights are no longer finite"))
        change = ("a smaller --lr (10x smaller is a start), a longer --warmup-steps, or --grad-clip 1.0"
                  + ("; or --precision bf16 (fp16 overflows easily)" if opts.precision == "fp16" else ""))
    elif opts.precision == "fp16":
        cause = "the forward pass overflows in fp16 before any optimiser step"
        change = "--precision bf16 or fp32"
    else:
        cause = ("the model gives a non-finite loss before any optimiser step: its weights "
                 + ("are not finite" if not weights_finite else "or the data give non-finite features"))
        change = "check --pretrained and --train-data"
    kept = (f"this phase's last checkpoint ({run.last_path}, after step {run.saved_step})"
            if run.saved_step is not None else "no checkpoint of this phase yet (it would restart from its first step)")
    return (f"[{phase.name}] training diverged at step {step + 1} of {run.total} (epoch {step // run.per_epoch + 1}): "
            f"the loss term {bad} is not finite" + (f" (the other terms: {good})" if good else "")
            + f". Likely cause: {cause}. What to change: {change}; --resume keeps a run's settings, so start a "
            f"new --run-dir with them. The run folder is kept as it was before this step: the phases before "
            f"this one, {kept}, and {run.log_path} with the steps so far; --resume continues from there.")


def run_phase(module: TrainModule, phase: Phase, view: TrainView, loss_fn: MethodLoss, tokenizer,
              info: dist_utils.DistInfo, ckpt_dir: str, log_path: str, opts: LoopOptions) -> PhaseResult:
    """Train `module` in place. Resumes from <ckpt_dir>/last.pt when it exists; returns 'stopped'
    after `opts.stop_after_steps` optimiser steps (checkpointed), else 'done' with <ckpt_dir>/final.pt."""
    run = PhaseRun(module, phase, view, loss_fn, tokenizer, info, ckpt_dir, log_path, opts)
    run.resume()
    start = time.perf_counter()
    module.train()
    status = "done"
    with PeakMemory(info.device, opts.measure_memory) as memory:
        while run.step < run.total and status == "done":
            if not run.epoch(run.step // run.per_epoch):
                status = "stopped"
    if status == "done":
        run.finish()
        module.eval()
    skipped = sorted(run.skipped)
    if skipped:
        run.log(f"warning: [{phase.name}] skipped {len(skipped)} training image(s) that failed to decode "
                f"(e.g. {skipped[:3]})")
    return PhaseResult(status, run.step, run.total, run.history, time.perf_counter() - start, skipped,
                       memory.peak_bytes)
