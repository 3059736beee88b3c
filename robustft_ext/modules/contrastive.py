"""ClipLoss and SigLipLoss: drop-in nn.Modules for open_clip's losses of the same names, on the
fused backends (docs/api.md)."""
from __future__ import annotations

import torch
from torch import nn

from .._validation import Scalar, check_features, check_same_batch, check_same_dim
from ..distributed import all_gather_with_grad, check_rank, gather_features, require_distributed
from ..ops.clip import clip_loss, clip_rows_loss
from ..ops.siglip import siglip_loss

_SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_local_pair(image_features: object, text_features: object) -> None:
    a = check_features(image_features, "image_features")
    b = check_features(text_features, "text_features")
    check_same_dim(a, b, "image_features", "text_features")
    check_same_batch(a, b, "image_features", "text_features")


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss with the same constructor, forward and numbers, on fused kernels.

    world_size > 1 gathers features through torch.distributed as open_clip does: every rank
    computes the full loss (local_loss=False) or its own rows against all columns
    (local_loss=True, positives at column n*rank + i); gather_with_grad makes the gather
    differentiable. cache_labels is accepted for compatibility (no labels are built).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, backend: str | None = None) -> None:
        super().__init__()
        check_rank(rank, world_size)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: robustft_ext gathers through "
                             "torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Scalar, logit_bias: Scalar | None = None,
                output_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias,
                             backend=self.backend)
        else:
            _check_local_pair(image_features, text_features)
            all_images, all_texts = gather_features(
                image_features, text_features, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank,
                world_size=self.world_size)
            if self.local_loss:
                offset = image_features.shape[0] * self.rank
                loss = (clip_rows_loss(image_features, all_texts, logit_scale, logit_bias,
                                       diag_offset=offset, backend=self.backend)
                        + clip_rows_loss(text_features, all_images, logit_scale, logit_bias,
                                         diag_offset=offset, backend=self.backend)) / 2
            else:
                loss = clip_loss(all_images, all_texts, logit_scale, logit_bias,
                                 backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss with the same constructor, forward and numbers, on fused kernels.

    world_size > 1: the local block with positives plus, for every other rank, a negative-only
    block against that rank's text features, gathered with gradient (the sum open_clip's
    neighbour exchange computes; every dist_impl gives the same numbers here).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, backend: str | None = None) -> None:
        super().__init__()
        check_rank(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Scalar, logit_bias: Scalar | None,
                output_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           backend=self.backend)
        if self.world_size > 1:
            require_distributed(self.world_size)
            for other, texts in enumerate(all_gather_with_grad(text_features)):
                if other != self.rank:
                    loss = loss + siglip_loss(image_features, texts, logit_scale, logit_bias,
                                              negative_only=True, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
