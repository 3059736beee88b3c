"""The public loss functions: validate, choose a backend, compute."""
from __future__ import annotations

import torch

from . import reference
from ._validation import PairInputs, pair_inputs
from .autograd import ClipLossFunction, SigLipLossFunction
from .backends import select_backend

Scalar = float | torch.Tensor


def _clip(x: PairInputs, diag_offset: int, symmetric: bool, backend: str | None) -> torch.Tensor:
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        return reference.clip_loss(x.a, x.b, x.scale, x.bias, diag_offset, symmetric)
    return ClipLossFunction.apply(x.a, x.b, x.scale, x.bias, diag_offset, symmetric, name)


def _siglip(x: PairInputs, negative_only: bool, backend: str | None) -> torch.Tensor:
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        return reference.siglip_loss(x.a, x.b, x.scale, x.bias, negative_only)
    return SigLipLossFunction.apply(x.a, x.b, x.scale, x.bias, negative_only, name)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
              logit_bias: Scalar | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric CLIP (InfoNCE) loss of matched [N, D] feature rows, as open_clip's ClipLoss.

    logits = logit_scale * image_features @ text_features.T (+ logit_bias); returns the mean of
    the image->text and text->image cross-entropies with positives on the diagonal, as a 0-d
    float32 tensor (float64 for float64 inputs). backend: "reference", "native", "triton" or
    None (automatic, see robustft_ext.backends).
    """
    x = pair_inputs(image_features, text_features, logit_scale, logit_bias)
    return _clip(x, 0, True, backend)


def clip_rows_loss(row_features: torch.Tensor, column_features: torch.Tensor, logit_scale: Scalar,
                   logit_bias: Scalar | None = None, *, diag_offset: int = 0,
                   backend: str | None = None) -> torch.Tensor:
    """One-directional cross-entropy: row i of `row_features` against all [M, D] columns, with
    its positive at column i + diag_offset (open_clip's local_loss uses this per direction)."""
    x = pair_inputs(row_features, column_features, logit_scale, logit_bias,
                    names=("row_features", "column_features"), same_batch=False)
    if not isinstance(diag_offset, int) or diag_offset < 0 or diag_offset + x.a.shape[0] > x.b.shape[0]:
        raise ValueError(f"diag_offset must be an int with 0 <= diag_offset <= "
                         f"{x.b.shape[0] - x.a.shape[0]}, got {diag_offset!r}")
    return _clip(x, diag_offset, False, backend)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
                logit_bias: Scalar | None, *, negative_only: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """SigLIP sigmoid loss, as open_clip's SigLipLoss: -(1/N) sum_ij log sigmoid(z_ij S_ij).

    z = +1 on the diagonal and -1 elsewhere; with negative_only=True every pair is a negative
    and text_features may have another batch size (the remote blocks of distributed SigLIP).
    """
    x = pair_inputs(image_features, text_features, logit_scale, logit_bias,
                    same_batch=not negative_only)
    return _siglip(x, negative_only, backend)
