"""DiVELoss: DiVE, difference vector equalisation (docs/maths.md, section 4), as a module over
dive_terms / dive_loss, with the centre of the difference vectors the functions leave to the
caller (a buffer, kept as an EMA or the batch mean, averaged over torch.distributed ranks)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import (acc_dtype, check_features, check_positive_int, check_same_batch,
                           check_same_device, check_same_dim, check_weight)
from ..distributed import mean_across_ranks
from ..ops.dive import dive_loss, dive_terms

_DIVE_NAMES = ("image_ft", "text_ft", "image_pre", "text_pre")
CENTER_MODES = ("ema", "batch")


class DiVELoss(nn.Module):
    """DiVE, difference vector equalisation (docs/maths.md, section 4), as a training objective.

    forward(image_ft, text_ft, image_pre, text_pre, output_dict=False) takes [B', D] features of
    the reference pairs from the encoders being fine-tuned and from the frozen pre-trained ones
    and returns weight * (AVL + PVL), or with output_dict=True {"dive_avl_loss": weight * AVL,
    "dive_pvl_loss": weight * PVL}. Gradients reach image_ft and text_ft only.

    The centre m of the difference vectors u_j = image_ft_j - image_pre_j, v_j = text_ft_j -
    text_pre_j is the buffer `center` (saved in state_dict; zero at the start):
    - center_mode="ema": the loss uses the current m; after the forward, in training mode only,
      m <- momentum * m + (1 - momentum) * mean_j (u_j + v_j) / 2.
    - center_mode="batch": the loss uses m = mean_j (u_j + v_j) / 2 of this batch (detached),
      which the buffer then holds (in training mode).
    Under torch.distributed (initialised, world size > 1) the batch mean is averaged over the
    ranks first (every rank must call forward), so all ranks hold the same m: that of the
    concatenated batch when the ranks' batches have equal sizes.
    dim=None sizes the centre at the first forward (float64 for float64 features, else float32,
    on the features' device); load_state_dict into such a fresh module adopts a saved centre's
    size and dtype. With dim given, the centre is a float32 zero buffer that follows .to() /
    .double() as any buffer does; the loss uses m in float32 (float64 for float64 features).
    """

    def __init__(self, weight: float = 1000.0, momentum: float = 0.99, center_mode: str = "ema",
                 dim: int | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.weight = check_weight(weight, "weight")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not math.isfinite(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        if center_mode not in CENTER_MODES:
            raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
        self.center_mode = center_mode
        if dim is not None:
            check_positive_int(dim, "dim")
        self.dim = dim
        self.backend = backend
        # An empty centre means "not sized yet" (dim=None before the first forward or load).
        self.register_buffer("center", torch.zeros(0 if dim is None else dim))

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, momentum={self.momentum}, "
                f"center_mode={self.center_mode!r}, dim={self.dim}")

    @property
    def initialized(self) -> bool:
        """Whether the centre has its size (dim given, a forward done, or a centre loaded)."""
        return self.center.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "center"
        saved = state_dict.get(key)
        if (isinstance(saved, torch.Tensor) and not self.initialized and saved.dim() == 1
                and saved.numel() > 0):
            if self.dim is not None and saved.numel() != self.dim:
                error_msgs.append(f"size mismatch for {key}: DiVELoss(dim={self.dim}) cannot "
                                  f"load a centre of size {saved.numel()}")
                return
            # A fresh lazy module: adopt the saved centre's size and dtype, keep our device.
            self.center = torch.empty(saved.shape, dtype=saved.dtype, device=self.center.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_inputs(self, tensors: tuple[object, ...]) -> tuple[torch.Tensor, ...]:
        xs = tuple(check_features(t, n) for t, n in zip(tensors, _DIVE_NAMES))
        for x, name in zip(xs[1:], _DIVE_NAMES[1:]):
            check_same_dim(xs[0], x, _DIVE_NAMES[0], name)
            check_same_batch(xs[0], x, _DIVE_NAMES[0], name)
        device = check_same_device(dict(zip(_DIVE_NAMES, xs)))
        d = xs[0].shape[1]
        if self.dim is not None and d != self.dim:
            raise ValueError(f"DiVELoss(dim={self.dim}) got features of dim {d}")
        if self.initialized:
            if self.center.numel() != d:
                raise ValueError(f"DiVELoss.center has size {self.center.numel()} (from dim, an "
                                 f"earlier forward or a loaded state_dict) but the features "
                                 f"have dim {d}")
            if self.center.device != device:
                raise ValueError(f"DiVELoss.center is on {self.center.device} but the features "
                                 f"are on {device}: move the module with .to({str(device)!r})")
        return xs

    def center_for_loss(self, image_ft: torch.Tensor, text_ft: torch.Tensor,
                        image_pre: torch.Tensor, text_pre: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m for this step's loss, the batch centre or None) for checked inputs.

        "ema": a copy of the buffer (it is updated in place after the step, and a backend may
        keep its input for the backward), sizing it at the first call. "batch": the detached
        batch mean of (u + v) / 2, averaged across ranks, returned twice.
        """
        xs = (image_ft, text_ft, image_pre, text_pre)
        dtype = xs[0].dtype
        for x in xs[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        acc = acc_dtype(dtype)
        if not self.initialized:
            self.center = torch.zeros(xs[0].shape[1], dtype=acc, device=xs[0].device)
        if self.center_mode == "batch":
            with torch.no_grad():
                u = xs[0].detach().to(acc) - xs[2].detach().to(acc)
                v = xs[1].detach().to(acc) - xs[3].detach().to(acc)
                center = mean_across_ranks(((u + v) / 2).mean(0))
            return center, center
        return self.center.detach().clone(), None

    def update_center(self, diff_mean: torch.Tensor | None, batch_center: torch.Tensor | None) -> None:
        """After a training step: m <- momentum m + (1 - momentum) mean_ranks(diff_mean) ("ema"),
        or m <- the batch centre ("batch"). Nothing in eval mode."""
        if not self.training:
            return
        with torch.no_grad():
            if self.center_mode == "batch":
                self.center.copy_(batch_center)
                return
            diff_mean = mean_across_ranks(diff_mean.detach().to(self.center.dtype))
            self.center.copy_(self.momentum * self.center + (1.0 - self.momentum) * diff_mean)

    def forward(self, image_ft: torch.Tensor, text_ft: torch.Tensor, image_pre: torch.Tensor,
                text_pre: torch.Tensor, output_dict: bool = False
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        xs = self._check_inputs((image_ft, text_ft, image_pre, text_pre))
        center, batch_center = self.center_for_loss(*xs)
        if self.training and self.center_mode == "ema":
            avl, pvl, diff_mean = dive_terms(*xs, center, backend=self.backend)
        else:
            avl, pvl = dive_loss(*xs, center, backend=self.backend)
            diff_mean = None
        self.update_center(diff_mean, batch_center)
        if output_dict:
            return {"dive_avl_loss": self.weight * avl, "dive_pvl_loss": self.weight * pvl}
        return self.weight * (avl + pvl)
