"""The reference backend: eager PyTorch written straight from docs/maths.md (sections 1-5).

It materialises the full logit matrix and is the oracle of the tests and the fallback for any
device. Logits are computed in the accumulation dtype (float32, float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import acc_dtype
from .slerp_maths import mix_rows, mix_rows_backward


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


# ---- m^2-mix (docs/maths.md, section 3) ---------------------------------------------------
class _Slerp(torch.autograd.Function):
    """slerp of matched rows, computed in float64 (slerp_maths) and returned in the dtype of
    a, with the explicit backward (autograd through arccos would give inf * 0 at identical
    rows)."""

    @staticmethod
    def forward(ctx, a, b, lam):
        out, w = mix_rows(a, b, lam)
        ctx.save_for_backward(a, b, w)
        return out.to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b, w = ctx.saved_tensors
        ga, gb = mix_rows_backward(grad, a, b, w)
        return ga.to(a.dtype), gb.to(b.dtype), None


def slerp(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Row-wise slerp(a_p, b_p; lam) (lam weights a), computed in float64 and returned in the
    inputs' dtype."""
    acc = acc_dtype(a.dtype)
    return _Slerp.apply(a.to(acc), b.to(acc), lam).to(a.dtype)


def _m2_logits(I: torch.Tensor, T: torch.Tensor, scale: torch.Tensor, lam: torch.Tensor):
    acc = acc_dtype(I.dtype)
    If, Tf = I.to(acc), T.to(acc)
    M = _Slerp.apply(If, Tf, lam)
    eye = torch.eye(I.shape[0], dtype=torch.bool, device=I.device)
    diag = scale * (If * Tf).sum(1)
    A = torch.where(eye, diag[:, None], scale * (If @ M.T))
    B = torch.where(eye, diag[:, None], scale * (Tf @ M.T))
    return A, B


def m2mix_loss(I: torch.Tensor, T: torch.Tensor, scale: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """m^2-mix: 1/2 [CE_rows(A) + CE_rows(B)], mixed negatives off the diagonal, the true pair on it."""
    A, B = _m2_logits(I, T, scale, lam)
    labels = torch.arange(I.shape[0], device=I.device)
    return (F.cross_entropy(A, labels) + F.cross_entropy(B, labels)) / 2


def clip_m2mix_loss(I: torch.Tensor, T: torch.Tensor, clip_scale: torch.Tensor, m2_scale: torch.Tensor,
                    lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP loss with clip_scale, m^2-mix loss with m2_scale) of one batch."""
    zero = torch.zeros((), dtype=clip_scale.dtype, device=I.device)
    return clip_loss(I, T, clip_scale, zero), m2mix_loss(I, T, m2_scale, lam)


# ---- DiVE and Lipsum-FT (docs/maths.md, sections 4-5) -------------------------------------
def dive_terms(fi: torch.Tensor, ft: torch.Tensor, pi: torch.Tensor, pt: torch.Tensor,
               center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(AVL, PVL, diff_mean): u = fi - pi, v = ft - pt, AVL = mean_j |u_j - m|^2 + |v_j - m|^2,
    PVL = mean_j |u_j - v_j|^2, diff_mean = mean_j (u_j + v_j) / 2 (detached). The
    pre-trained features and the centre are constants."""
    acc = acc_dtype(fi.dtype)
    u = fi.to(acc) - pi.detach().to(acc)
    v = ft.to(acc) - pt.detach().to(acc)
    m = center.detach().to(acc)
    avl = ((u - m) ** 2).sum(1).mean() + ((v - m) ** 2).sum(1).mean()
    pvl = ((u - v) ** 2).sum(1).mean()
    return avl, pvl, ((u + v) / 2).mean(0).detach()


def lipsum_loss(F_ft: torch.Tensor, F_pre: torch.Tensor, G: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """R = |s0 (F - F0) G^T|_F^2 / (2 K B); F0, G and s0 are constants."""
    acc = acc_dtype(F_ft.dtype)
    V = scale.detach() * (F_ft.to(acc) - F_pre.detach().to(acc)) @ G.detach().to(acc).T
    return (V ** 2).sum() / (2 * G.shape[0] * F_ft.shape[0])
