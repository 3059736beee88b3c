"""The public loss functions: validate, choose a backend, compute."""
from __future__ import annotations

import torch

from . import reference
from ._validation import (PairInputs, acc_dtype, check_dive_inputs, check_lam, check_lipsum_inputs,
                          check_scalar, pair_inputs)
from .autograd import (ClipLossFunction, DiveFunction, LipsumFunction, M2MixFunction,
                       SigLipLossFunction, SlerpFunction, untied)
from .backends import select_backend

Scalar = float | torch.Tensor


def _clip(x: PairInputs, diag_offset: int, symmetric: bool, backend: str | None) -> torch.Tensor:
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        return reference.clip_loss(x.a, x.b, x.scale, x.bias, diag_offset, symmetric)
    return ClipLossFunction.apply(x.a, x.b, x.scale, x.bias, diag_offset, symmetric, name,
                                  torch.is_grad_enabled())


def _siglip(x: PairInputs, negative_only: bool, backend: str | None) -> torch.Tensor:
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        return reference.siglip_loss(x.a, x.b, x.scale, x.bias, negative_only)
    return SigLipLossFunction.apply(x.a, x.b, x.scale, x.bias, negative_only, name,
                                    torch.is_grad_enabled())


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


def _m2(x: PairInputs, lam: Scalar, m2_scale: torch.Tensor, clip_scale: torch.Tensor | None,
        backend: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(m2_loss, clip_loss or None) of validated inputs."""
    lam_t = check_lam(lam, x.a.device, x.scale.dtype)
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        m2 = reference.m2mix_loss(x.a, x.b, m2_scale, lam_t)
        clip = None if clip_scale is None else reference.clip_loss(x.a, x.b, clip_scale, x.bias)
        return m2, clip
    with_clip = clip_scale is not None
    m2, clip = M2MixFunction.apply(x.a, x.b, m2_scale, lam_t,
                                   untied(clip_scale, m2_scale) if with_clip else m2_scale.detach(),
                                   with_clip, name, torch.is_grad_enabled())
    return m2, (clip if with_clip else None)


def m2mix_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
               lam: Scalar, *, backend: str | None = None) -> torch.Tensor:
    """Geodesic multi-modal mixup (m^2-mix) loss of matched [N, D] unit rows (docs/maths.md, 3).

    The negatives off the diagonal are M_j = slerp(image_j, text_j; lam) (lam = 1 gives the
    image, 0 the text), the true pair stays on the diagonal; returns
    1/2 [CE_rows(s I M^T) + CE_rows(s T M^T)] as a 0-d float32 tensor (float64 for float64
    inputs). Gradients reach both features through the slerp and logit_scale; lam (a float or
    0-d tensor in [0, 1]) gets none. Stable for identical or opposite rows.
    """
    x = pair_inputs(image_features, text_features, logit_scale)
    return _m2(x, lam, x.scale, None, backend)[0]


def clip_m2mix_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    logit_scale: Scalar, lam: Scalar, *, m2_logit_scale: Scalar | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP loss, m^2-mix loss) of one batch from one fused pass over the similarity tiles.

    The CLIP term uses logit_scale, the m^2 term m2_logit_scale (default: logit_scale; the
    paper's code uses 100 and 1/0.07). Each value and gradient equals that of clip_loss and
    m2mix_loss called separately; weight and add them as the objective needs.
    """
    x = pair_inputs(image_features, text_features, logit_scale)
    m2_scale = x.scale if m2_logit_scale is None else check_scalar(
        m2_logit_scale, "m2_logit_scale", x.a.device, x.scale.dtype)
    m2, clip = _m2(x, lam, m2_scale, x.scale, backend)
    return clip, m2


def slerp(a: torch.Tensor, b: torch.Tensor, lam: Scalar, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise spherical interpolation slerp(a_i, b_i; lam) of matched [N, D] unit rows.

    lam weights a (lam = 1 gives a, 0 gives b); computed in float32 (float64) and returned in
    the inputs' dtype, with gradients to a and b. Stable where the paper's formula divides by
    zero: identical rows use the small-angle limit, opposite rows are clamped
    (docs/maths.md, section 3.2).
    """
    x = pair_inputs(a, b, 1.0, names=("a", "b"))
    lam_t = check_lam(lam, x.a.device, acc_dtype(x.a.dtype))
    name = select_backend(backend, x.a.device, x.a.dtype)
    if name == "reference":
        return reference.slerp(x.a, x.b, lam_t)
    return SlerpFunction.apply(x.a, x.b, lam_t, name)


def dive_terms(image_ft: torch.Tensor, text_ft: torch.Tensor, image_pre: torch.Tensor,
               text_pre: torch.Tensor, center: torch.Tensor, *, backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(AVL, PVL, diff_mean) of DiVE (docs/maths.md, section 4) from one pass; diff_mean [D] =
    mean_j (u_j + v_j) / 2 is detached (the batch mean of the centre update)."""
    fi, ft, pi, pt, c = check_dive_inputs(image_ft, text_ft, image_pre, text_pre, center)
    name = select_backend(backend, fi.device, fi.dtype)
    if name == "reference":
        return reference.dive_terms(fi, ft, pi, pt, c)
    return DiveFunction.apply(fi, ft, pi, pt, c, name)


def dive_loss(image_ft: torch.Tensor, text_ft: torch.Tensor, image_pre: torch.Tensor,
              text_pre: torch.Tensor, center: torch.Tensor, *, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiVE's (AVL, PVL) (docs/maths.md, section 4) on B' reference pairs.

    u = image_ft - image_pre, v = text_ft - text_pre; AVL = mean_j |u_j - m|^2 + |v_j - m|^2,
    PVL = mean_j |u_j - v_j|^2, m = center [D]. Gradients reach image_ft and text_ft only
    (the pre-trained features and the centre are constants). 0-d float32 (float64) results.
    """
    avl, pvl, _ = dive_terms(image_ft, text_ft, image_pre, text_pre, center, backend=backend)
    return avl, pvl


def lipsum_loss(image_ft: torch.Tensor, image_pre: torch.Tensor,
                random_text_features: torch.Tensor, logit_scale: Scalar, *,
                backend: str | None = None) -> torch.Tensor:
    """The Lipsum-FT regulariser (docs/maths.md, section 5): R = |V|_F^2 / (2 K B) with
    V = s0 (F - F0) G^T, F = image_ft, F0 = image_pre [B, D], G = random_text_features [K, D],
    s0 = logit_scale (the pre-trained model's multiplier). Gradient to image_ft only."""
    f, f0, g = check_lipsum_inputs(image_ft, image_pre, random_text_features)
    scale = check_scalar(logit_scale, "logit_scale", f.device, acc_dtype(f.dtype)).detach()
    name = select_backend(backend, f.device, f.dtype)
    if name == "reference":
        return reference.lipsum_loss(f, f0, g, scale)
    return LipsumFunction.apply(f, f0, g, scale, name)
