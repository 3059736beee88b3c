"""The reference backend: eager PyTorch written straight from METHODS.md (sections 1-2).

It materialises the full logit matrix and is the oracle of the tests and the fallback for any
device. Logits are computed in the accumulation dtype (float32, float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import acc_dtype


def _logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(a.dtype)
    return scale * (a.to(acc) @ b.to(acc).T) + bias


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
              diag_offset: int = 0, symmetric: bool = True) -> torch.Tensor:
    """CLIP loss: (CE_rows(S) + CE_rows(S^T)) / 2, or CE_rows(S) with positives at i + diag_offset."""
    logits = _logits(a, b, scale, bias)
    labels = torch.arange(a.shape[0], device=a.device) + diag_offset
    if symmetric:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return F.cross_entropy(logits, labels)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                negative_only: bool = False) -> torch.Tensor:
    """SigLIP loss: -(1/n) sum_ij log sigmoid(z_ij S_ij), z = +1 on the diagonal unless negative_only."""
    logits = _logits(a, b, scale, bias)
    z = -torch.ones_like(logits)
    if not negative_only:
        z = z + 2 * torch.eye(a.shape[0], b.shape[0], dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(z * logits).sum() / a.shape[0]
