"""Feature-cached accumulation (GradCache, Gao et al. 2021; open_clip's --accum-freq): the K
micro-batches of one optimiser step form one contrastive batch.

1. Every micro-batch runs through the model without gradient; its output rows (image and text
   features, ft's logits) are kept, and so are the frozen model's features a term reads.
2. The loss of the whole accumulated batch (one MethodLoss call, so one RobustFTLoss pass) runs on
   the kept rows, made leaves, and its backward gives each kept row its gradient.
3. Every micro-batch runs through the model again, with gradient, under the RNG state of its first
   run (the same dropout draws), and back-propagates its rows' gradients into the weights; under
   DDP all but the last of these runs are in `no_sync`, so the gradients are averaged once.

The loss and the step are those of one batch of K micro-batches (to floating-point rounding, the
encoders being row-wise), at the memory of one micro-batch's activations plus the rows of the
whole batch. The cost is a second forward pass of every micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as dist_utils
from .losses import MethodLoss, StepInputs

# The model's outputs with one row per sample of the batch, concatenated over micro-batches.
ROW_KEYS = ("image_features", "text_features", "logits")
# The features of the step's reference pairs (DiVE), which micro-batch 0 carries.
REFERENCE_KEYS = ("extra_image_features", "extra_text_features")
# The logit scale: every micro-batch's is the same; its gradient goes back once, with the last.
SCALE_KEY = "logit_scale"


@dataclass
class MicroBatch:
    """One micro-batch, on the CPU until it runs: images, labels, tokenised captions (or None)."""

    images: torch.Tensor
    labels: torch.Tensor
    texts: torch.Tensor | None


@dataclass
class StepContext:
    """What one optimiser step runs with."""

    model: torch.nn.Module          # the DDP wrapper (or the module itself in one process)
    module: torch.nn.Module         # the module inside it
    loss_fn: MethodLoss
    info: dist_utils.DistInfo
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    step: int


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _forward(model, batch: MicroBatch, inputs: StepInputs | None, ctx: StepContext) -> dict[str, torch.Tensor]:
    device = ctx.info.device
    images = batch.images.to(device, non_blocking=True)
    texts = batch.texts.to(device) if batch.texts is not None else None
    extra_images, extra_texts = (inputs.extra_images, inputs.extra_texts) if inputs is not None else (None, None)
    with torch.autocast(device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
        return model(images, texts, extra_images, extra_texts)


def cached_step(batches: list[MicroBatch], inputs: StepInputs, ctx: StepContext,
                check: Callable[[dict[str, float]], None]) -> dict[str, float]:
    """Accumulate the gradient of one optimiser step over `batches` as one contrastive batch; the
    step's loss terms (averaged over processes). `check(terms)` runs before any backward pass
    (the non-finite check); `inputs` are the step's extra inputs (DiVE's reference pairs)."""
    device = ctx.info.device
    kept, states, pre = [], [], []
    with torch.no_grad():  # 1. every micro-batch without gradient: its rows
        for k, batch in enumerate(batches):
            states.append(_rng_state(device))
            kept.append(_forward(ctx.module, batch, inputs if k == 0 else None, ctx))
            pre.append(ctx.loss_fn.pre_image_features(batch.images.to(device, non_blocking=True)))
    # 2. the loss of the whole batch on the kept rows, and their gradients
    leaves = {key: torch.cat([out[key] for out in kept]) for key in ROW_KEYS if key in kept[0]}
    leaves.update({key: kept[0][key] for key in REFERENCE_KEYS + (SCALE_KEY,) if key in kept[0]})
    leaves = {key: value.detach().requires_grad_() for key, value in leaves.items()}
    image_pre = torch.cat(pre) if pre[0] is not None else None
    labels = torch.cat([batch.labels for batch in batches]).to(device)
    terms = ctx.loss_fn(leaves, labels, image_pre, inputs, ctx.step)
    averaged = {name: float(dist_utils.mean(v, ctx.info)) for name, v in terms.items()}
    check(averaged)
    ctx.scaler.scale(sum(terms.values())).backward()
    del terms, kept
    # 3. every micro-batch again, with gradient, back-propagating its rows' gradients
    start = 0
    for k, batch in enumerate(batches):
        rows = slice(start, start + batch.images.shape[0])
        start = rows.stop
        last = k == len(batches) - 1
        _set_rng_state(states[k], device)
        sync = contextlib.nullcontext() if last or not ctx.info.distributed else ctx.model.no_sync()
        with sync:
            out = _forward(ctx.model, batch, inputs if k == 0 else None, ctx)
            pairs = [(out[key], leaves[key].grad[rows]) for key in ROW_KEYS if key in out]
            pairs += [(out[key], leaves[key].grad) for key in REFERENCE_KEYS if key in out]
            if last:
                pairs.append((out[SCALE_KEY], leaves[SCALE_KEY].grad))
            pairs = [(output, grad) for output, grad in pairs if grad is not None and output.requires_grad]
            torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
    return averaged
