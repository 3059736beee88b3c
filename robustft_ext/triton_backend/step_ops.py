"""Triton-backed ops of a robust fine-tuning step, registered with torch.library.triton_op as
`robustft_triton::{slerp, slerp_bwd, m2mix_fwd, m2mix_bwd, lipsum_fwd, lipsum_bwd, dive_fwd,
dive_bwd, robust_step_fwd, robust_step_bwd}`.

Same arguments, outputs, dtypes and checks as the C++ ops `robustft_ext::*` (csrc/schemas.cpp,
csrc/step_ops.h), except that float64 inputs are not supported: fused_ops("triton") and
fused_ops("native") are interchangeable. As csrc/step_ops.h, every loss op is a *step* (the
problem of csrc/step_kernels.h) with only its terms switched on: m2mix_* = m^2 (+ CLIP),
lipsum_* = Lipsum, dive_* = DiVE, robust_step_* = any combination, all launching the same three
kernels of step_kernels.py with the terms as constexpr flags, so each loss's maths lives once.
The terms that share inputs share one launch: robust_step_fwd is one launch of
step_fwd_kernel (the CLIP / m^2 tiles and the Lipsum columns of every training row block, and
the DiVE reference rows in extra programs of the same grid); robust_step_bwd is one launch of
step_grad_rows_kernel (likewise) plus, with m^2 or CLIP, one of step_grad_cols_kernel.

As in ops.py, each op body uses only torch ops with fake-able shapes plus `wrap_triton` kernel
launches, so the body is also the fake (meta) implementation and torch.compile(fullgraph=True)
traces through to the kernels. What the op bodies do with torch ops (all O(n D), as
csrc/step_ops.h):
  * the slerp prologue, in float64: c_p = <I_p, T_p>, the weights [4, n] from
    slerp_maths.slerp_weights (the one Python copy of maths::slerp_weights), M = w_a I + w_b T
    kept as one n x D buffer
    in the input dtype, read by the kernels like I and T;
  * the true-pair diagonal of A and B (value in the forward, gradient in the backward);
  * the backward of the slerp: dI += w_a dM + k T, dT += w_b dM + k I,
    k = <dM, I> dw_a/dc + <dM, T> dw_b/dc;
  * assembling the losses from the kernels' statistics, and merging the per-program partials
    (column LSE of CLIP, the three sums, the DiVE column sums, the scale-gradient sums) with
    fixed-order torch reductions: results are bitwise deterministic.
Everything of size n x n or n x K stays inside the kernels. Besides the outputs, the memory is
O(n D) (M and the float32 gradient buffers), O(B' D) for DiVE, O(P n) column partials of the
CLIP forward (P persistent programs) and O(n / BLOCK) partial sums.
"""
from __future__ import annotations

import importlib
import pathlib
import sys
import types
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import SUPPORTED_DTYPES, step_kernels
from .ops import (Config, _check_features, _dot_flags, _kernel_input, _traceable, choose_config,
                  interpreting)


def _load_slerp_maths():
    """robustft_ext.slerp_maths; when this backend was loaded on its own by path (the tests'
    fallback when robustft_ext does not import), slerp_maths.py is loaded from the package
    directory without running robustft_ext/__init__.py."""
    try:
        from .. import slerp_maths

        return slerp_maths
    except ImportError:
        pass
    name = "_robustft_ext_standalone"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(pathlib.Path(__file__).resolve().parents[1])]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.slerp_maths")


_slerp = _load_slerp_maths()

_STEP_FWD = _traceable(step_kernels.step_fwd_kernel)
_STEP_ROWS = _traceable(step_kernels.step_grad_rows_kernel)
_STEP_COLS = _traceable(step_kernels.step_grad_cols_kernel)

# The five losses of a step, in the order of robust_step_fwd's `terms` and of `grads`
# (csrc/step_kernels.h StepTerm).
K_CLIP, K_M2, K_LIPSUM, K_AVL, K_PVL = range(5)


def _m2_config(device: torch.device, dtype: torch.dtype, D: int) -> Config:
    """choose_config, adapted to the heavier step tiles on GPU: they carry three logit
    tiles and (register-resident backward) up to three [BLOCK_M, BLOCK_D] accumulators,
    against one of each in the contrastive kernels. So one_chunk only for D <= 64, and 8 warps
    for the 64 x 64 (16-bit) tiles. A guess, neither tuned nor checked for register spills:
    no GPU was available when this was written. The interpreter configuration is unchanged."""
    cfg = choose_config(device, dtype, D)
    if device.type != "cuda" or interpreting():
        return cfg
    if cfg.one_chunk and D > 64:
        cfg = cfg._replace(block_d=cfg.block_m, one_chunk=False)
    return cfg._replace(num_warps=8 if cfg.block_m >= 64 else 4)


# ----------------------------------------------------------------------------- checks
def _check_pair(a: Tensor, b: Tensor, lam: Tensor) -> None:
    # csrc/m2mix_ops.h::check_m2_pair: check_features(a, b, lam, lam) and one shape.
    _check_features(a, b, lam, lam)
    torch._check(a.size(0) == b.size(0),
                 lambda: f"robustft_triton: the mixed pair must have one shape, got "
                 f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_scalar(t: Tensor, a: Tensor, name: str) -> None:
    # csrc/m2mix_ops.h::check_m2_scalar.
    if t.dim() != 0 or t.dtype != torch.float32 or t.device != a.device:
        raise RuntimeError(f"robustft_triton: {name} must be a 0-d torch.float32 tensor on "
                           f"{a.device}")


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    # csrc/step_ops.h::check_same_shape.
    if a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype or a.device != b.device:
        raise RuntimeError(f"robustft_triton: {what} must be [B, D] tensors of one shape, "
                           f"dtype and device, got {tuple(a.shape)} {a.dtype} and "
                           f"{tuple(b.shape)} {b.dtype}")
    torch._check(a.size(0) == b.size(0) and a.size(1) == b.size(1),
                 lambda: f"robustft_triton: {what} must be [B, D] tensors of one shape, got "
                 f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_kernel_dtype_device(t: Tensor) -> None:
    # What check_features says about a feature matrix's dtype and device (DiVE alone has no
    # training batch to check).
    if t.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"robustft_triton: unsupported dtype {t.dtype} "
                           f"(the Triton backend supports {SUPPORTED_DTYPES})")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"robustft_triton: tensors on {t.device} need a GPU, or TRITON_INTERPRET=1 set "
            "before triton is imported")


# ----------------------------------------------------------------------------- slerp
def _weights(af: Tensor, bf: Tensor, lam: Tensor) -> Tensor:
    """[4, n] float64 = (w_a, w_b, dw_a/dc, dw_b/dc) of the matched rows (slerp_maths: the
    prologue runs in float64)."""
    return _slerp.slerp_weights((af.double() * bf.double()).sum(1), lam)


def _mix(af: Tensor, bf: Tensor, w: Tensor) -> Tensor:
    """The mix in float64."""
    return w[0].unsqueeze(1) * af.double() + w[1].unsqueeze(1) * bf.double()


def _mix_backward(dM: Tensor, af: Tensor, bf: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """slerp_maths.mix_rows_backward, returned in float32."""
    ga, gb = _slerp.mix_rows_backward(dM, af, bf, w)
    return ga.float(), gb.float()


@triton_op("robustft_triton::slerp", mutates_args=())
def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """out_p = slerp(a_p, b_p; lam) (lam weights a), in the inputs' dtype; lam is a 0-d
    float32 tensor. O(n D) torch ops (no kernel: nothing here is n x n)."""
    _check_pair(a, b, lam)
    af, bf = a.to(torch.float32), b.to(torch.float32)
    return _mix(af, bf, _weights(af, bf, lam)).to(a.dtype)


@triton_op("robustft_triton::slerp_bwd", mutates_args=())
def slerp_bwd(grad_out: Tensor, a: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of slerp(a, b; lam) for the upstream gradient grad_out."""
    _check_pair(a, b, lam)
    torch._check(grad_out.dim() == 2 and grad_out.size(0) == a.size(0)
                 and grad_out.size(1) == a.size(1),
                 lambda: f"robustft_triton: slerp_bwd grad_out has shape "
                 f"{tuple(grad_out.shape)}, expected {tuple(a.shape)}")
    af, bf = a.to(torch.float32), b.to(torch.float32)
    ga, gb = _mix_backward(grad_out.to(torch.float32), af, bf, _weights(af, bf, lam))
    return ga.to(a.dtype), gb.to(b.dtype)


# ----------------------------------------------------------------------------- the step
class _Step:
    """The inputs of one step as the kernels read them: csrc/step_ops.h step_setup (the same
    checks in the same order), with the m^2 mix when m^2 is on (its weights kept for the
    backward). Absent parts are passed to the kernels as a placeholder tensor that the
    disabled (constexpr) code never reads."""

    def __init__(self, image: Tensor, text: Tensor, clip_scale: Tensor, m2_scale: Tensor,
                 lam: Tensor, with_m2: bool, with_clip: bool,
                 image_pre: Optional[Tensor] = None, lipsum_texts: Optional[Tensor] = None,
                 lipsum_scale: Optional[Tensor] = None, ref_image_ft: Optional[Tensor] = None,
                 ref_text_ft: Optional[Tensor] = None, ref_image_pre: Optional[Tensor] = None,
                 ref_text_pre: Optional[Tensor] = None, center: Optional[Tensor] = None):
        self.with_m2, self.with_clip = bool(with_m2), bool(with_clip)
        self.with_tiles = self.with_m2 or self.with_clip
        self.with_lipsum = image_pre is not None or lipsum_texts is not None
        refs = (ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center)
        self.with_dive = any(t is not None for t in refs)
        self.batch = self.with_tiles or self.with_lipsum
        if not (self.batch or self.with_dive):
            raise RuntimeError("robustft_triton: a step with no term")
        self.n, self.K, self.n_ref = 0, 0, 0
        if self.batch:
            _check_features(image, text, clip_scale, m2_scale)
            torch._check(image.size(0) == text.size(0),
                         lambda: f"robustft_triton: image and text must have one shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
            self.n, self.D = image.shape
            self.device, self.dtype = image.device, image.dtype
            self.I = _kernel_input(image)
            self.T = _kernel_input(text)
            self.m2_scale = _kernel_input(m2_scale)
            self.clip_scale = _kernel_input(clip_scale)
        if self.with_tiles:
            self.If = self.I.to(torch.float32)
            self.Tf = self.T.to(torch.float32)
            self.pair_dot = (self.If * self.Tf).sum(1)
        if self.with_m2:
            _check_scalar(lam, image, "lam")
            self.weights = _weights(self.If, self.Tf, lam)
            self.M = _mix(self.If, self.Tf, self.weights).to(image.dtype).contiguous()
            self.diag = self.pair_dot * self.m2_scale
        if self.with_lipsum:
            if image_pre is None or lipsum_texts is None:
                raise RuntimeError("robustft_triton: Lipsum needs both image_pre and "
                                   "lipsum_texts")
            _check_same_shape(image, image_pre, "image and image_pre")
            G = lipsum_texts
            if (G.dim() != 2 or G.dtype != image.dtype or G.device != image.device):
                raise RuntimeError(f"robustft_triton: lipsum_texts must be [K >= 1, D] like "
                                   f"image, got {tuple(G.shape)} {G.dtype}")
            torch._check(G.size(0) > 0 and G.size(1) == image.size(1),
                         lambda: f"robustft_triton: lipsum_texts must be [K >= 1, D] like "
                         f"image, got {tuple(G.shape)}")
            _check_scalar(lipsum_scale, image, "lipsum_scale")
            self.P = _kernel_input(image_pre)
            self.G = _kernel_input(G)
            self.lip_scale = _kernel_input(lipsum_scale)
            self.K = G.size(0)
        if self.with_dive:
            if any(t is None for t in refs):
                raise RuntimeError("robustft_triton: DiVE needs ref_image_ft, ref_text_ft, "
                                   "ref_image_pre, ref_text_pre and center")
            fi = ref_image_ft
            _check_same_shape(fi, ref_text_ft, "ref_image_ft and ref_text_ft")
            _check_same_shape(fi, ref_image_pre, "ref_image_ft and ref_image_pre")
            _check_same_shape(fi, ref_text_pre, "ref_image_ft and ref_text_pre")
            torch._check(fi.size(0) > 0 and fi.size(1) > 0,
                         lambda: "robustft_triton: empty DiVE batch")
            _check_kernel_dtype_device(fi)
            if self.batch:
                if fi.dtype != image.dtype or fi.device != image.device:
                    raise RuntimeError("robustft_triton: the DiVE batch must share the "
                                       "training batch's dtype, D and device")
                torch._check(fi.size(1) == image.size(1),
                             lambda: "robustft_triton: the DiVE batch must share the "
                             "training batch's dtype, D and device")
            else:
                self.D = fi.size(1)
                self.device, self.dtype = fi.device, fi.dtype
            c = center
            if c.dim() != 1 or c.dtype != torch.float32 or c.device != fi.device:
                raise RuntimeError(f"robustft_triton: center must be a [D] torch.float32 "
                                   f"tensor on {fi.device}, got {tuple(c.shape)} {c.dtype}")
            torch._check(c.size(0) == fi.size(1),
                         lambda: f"robustft_triton: center must be a [D] torch.float32 "
                         f"tensor on {fi.device}, got {tuple(c.shape)}")
            self.FI = _kernel_input(fi)
            self.FT = _kernel_input(ref_text_ft)
            self.PI = _kernel_input(ref_image_pre)
            self.PT = _kernel_input(ref_text_pre)
            self.center = _kernel_input(center)
            self.n_ref = fi.size(0)
        self.f32 = dict(device=self.device, dtype=torch.float32)
        # Placeholder for the pointers of absent parts (never dereferenced).
        none = torch.zeros(1, **self.f32)
        none_feat = self.I if self.batch else self.FI
        for name in ("I", "T", "M", "P", "G", "FI", "FT", "PI", "PT"):
            if not hasattr(self, name):
                setattr(self, name, none_feat)
        for name in ("diag", "m2_scale", "clip_scale", "lip_scale", "center"):
            if not hasattr(self, name):
                setattr(self, name, none)
        self.cfg = _m2_config(self.device, self.dtype, self.D)
        self.prec, self.upcast = _dot_flags(self.dtype)
        self.n_dive_prog = triton.cdiv(self.n_ref, self.cfg.block_m) if self.with_dive else 0

    def flags(self) -> dict:
        return dict(WITH_M2=self.with_m2, WITH_CLIP=self.with_clip, WITH_TILES=self.with_tiles,
                    WITH_LIPSUM=self.with_lipsum, WITH_DIVE=self.with_dive)

    def launch_opts(self) -> dict:
        cfg = self.cfg
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                    DOT_PREC=self.prec, UPCAST=self.upcast, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)


def _step_fwd(s: _Step) -> tuple[list[Tensor], Tensor, Tensor]:
    """csrc/step_ops.h step_fwd_impl: ([clip, m2, lipsum, avl, pvl] as five separate 0-d
    float32 tensors (0 when absent), diff_mean [D] (DiVE; [0] without), lse [4, n])."""
    n, D, cfg, f32 = s.n, s.D, s.cfg, s.f32
    num_rb = triton.cdiv(n, cfg.block_m) if s.batch else 0
    # Training-row programs: persistent with CLIP (column partials per program), else one
    # per row block.
    nrow = min(cfg.nprog, num_rb) if s.with_clip else num_rb
    ndive = s.n_dive_prog
    lse_rows = torch.zeros((3, n), **f32)
    if s.with_clip:
        col_max = torch.full((nrow, n), float("-inf"), **f32)
        col_sum = torch.zeros((nrow, n), **f32)
    else:
        col_max = col_sum = torch.empty(0, **f32)
    sums = torch.empty((nrow + ndive, 3), **f32)
    diff = torch.empty((ndive, D), **f32)
    wrap_triton(_STEP_FWD)[(nrow + ndive,)](
        s.I, s.T, s.M, s.diag, s.m2_scale, s.clip_scale, s.P, s.G, s.lip_scale,
        s.FI, s.FT, s.PI, s.PT, s.center,
        lse_rows, col_max, col_sum, sums, diff,
        n, max(s.K, 1), s.n_ref, D, D, D, D, nrow,
        **s.flags(), **s.launch_opts())
    terms = [torch.zeros((), **f32) for _ in range(5)]
    if s.with_clip:
        # Merge the per-program column partials in a fixed order: O(nrow * n).
        cmax = col_max.amax(0)
        cmax = torch.where(torch.isinf(cmax), torch.zeros_like(cmax), cmax)
        col_lse = (cmax + torch.log((col_sum * torch.exp(col_max - cmax)).sum(0))).unsqueeze(0)
    else:
        col_lse = torch.zeros((1, n), **f32)
    lse = torch.cat([lse_rows, col_lse])
    if s.with_m2:
        # CE_rows(A) + CE_rows(B), both with the true pair diag on the diagonal, halved.
        terms[K_M2] = (lse[0].sum() + lse[1].sum() - 2 * s.diag.sum()) / (2 * n)
    if s.with_clip:
        terms[K_CLIP] = (lse[2].sum() + lse[3].sum()
                         - 2 * s.clip_scale * s.pair_dot.sum()) / (2 * n)
    totals = sums.sum(0)  # fixed-order reduction of the per-program partials
    if s.with_lipsum:
        terms[K_LIPSUM] = totals[0] / (2 * s.K * n)
    if s.with_dive:
        terms[K_AVL] = totals[1] / s.n_ref
        terms[K_PVL] = totals[2] / s.n_ref
        diff_mean = diff.sum(0) / s.n_ref
    else:
        diff_mean = torch.empty(0, **f32)
    return terms, diff_mean, lse


def _step_bwd(s: _Step, grads: Tensor, lse: Tensor):
    """csrc/step_ops.h step_bwd_impl, with grads [5] float32 and lse [4, n]: (grad_image,
    grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft)."""
    n, D, cfg, f32 = s.n, s.D, s.cfg, s.f32
    torch._check(lse.dim() == 2 and lse.size(0) == 4 and lse.size(1) == n,
                 lambda: "robustft_triton: saved log-sum-exp statistics do not match the "
                 "inputs")
    grads = _kernel_input(grads)
    lse = _kernel_input(lse.to(torch.float32))
    alloc = torch.empty if cfg.one_chunk else torch.zeros
    grad_I = alloc((n, D), **f32)
    grad_T = alloc((n, D), **f32) if s.with_m2 else torch.zeros((n, D), **f32)
    nrow = triton.cdiv(n, cfg.block_m) if s.batch else 0
    stats = torch.empty((nrow, 2), **f32)
    grad_fi = torch.empty((s.n_ref, D), **f32)
    grad_ft = torch.empty((s.n_ref, D), **f32)
    common = dict(ONE_CHUNK=cfg.one_chunk, LOWP_DS=s.dtype != torch.float32,
                  **s.launch_opts())
    wrap_triton(_STEP_ROWS)[(nrow + s.n_dive_prog,)](
        s.I, s.T, s.M, s.P, s.G, s.FI, s.FT, s.PI, s.PT, s.center,
        grads, s.m2_scale, s.clip_scale, s.lip_scale, lse,
        grad_I, grad_T, stats, grad_fi, grad_ft,
        n, max(s.K, 1), s.n_ref, D, D, D, D, D, D, nrow,
        **s.flags(), **common)
    grad_m2_scale = torch.zeros((), **f32)
    if s.with_tiles:
        grad_M = alloc((n, D), **f32) if s.with_m2 else torch.empty(0, **f32)
        grad_Tc = alloc((n, D), **f32) if s.with_clip else torch.empty(0, **f32)
        wrap_triton(_STEP_COLS)[(nrow,)](
            s.I, s.T, s.M, grads, s.m2_scale, s.clip_scale, lse, grad_M, grad_Tc,
            n, D, D, D, WITH_M2=s.with_m2, WITH_CLIP=s.with_clip, **common)
        if s.with_clip:
            grad_T = grad_T + grad_Tc
        if s.with_m2:
            # The true pair on the diagonals of A and B: d(loss)/d(diag_p) summed over both.
            g_diag = grads[K_M2] / (2 * n) * ((s.diag - lse[0]).exp()
                                              + (s.diag - lse[1]).exp() - 2)
            grad_I = grad_I + (s.m2_scale * g_diag).unsqueeze(1) * s.Tf
            grad_T = grad_T + (s.m2_scale * g_diag).unsqueeze(1) * s.If
            # Through the mix M = slerp(I, T; lam).
            mix_I, mix_T = _mix_backward(grad_M, s.If, s.Tf, s.weights)
            grad_I = grad_I + mix_I
            grad_T = grad_T + mix_T
            grad_m2_scale = stats[:, 0].sum() + (g_diag * s.pair_dot).sum()
    grad_clip_scale = stats[:, 1].sum()  # 0 without CLIP (the kernel writes 0 partials)
    return (grad_I.to(s.dtype), grad_T.to(s.dtype), grad_clip_scale, grad_m2_scale,
            grad_fi.to(s.dtype), grad_ft.to(s.dtype))


def _grads5(device: torch.device, values: dict[int, Tensor]) -> Tensor:
    """The [5] float32 upstream gradients, values[term] for the given terms, 0 for the others
    (csrc/step_ops.h grads_one)."""
    parts = [values[i].to(torch.float32).reshape(()) if i in values
             else torch.zeros((), device=device, dtype=torch.float32) for i in range(5)]
    return torch.stack(parts)


# ----------------------------------------------------------------------------- m^2-mix
def _m2mix_step(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor,
                clip_scale: Tensor, with_clip: bool) -> _Step:
    # csrc/step_ops.h m2mix_args: the m^2-mix checks first, then the step's.
    _check_pair(image, text, lam)
    _check_scalar(m2_scale, image, "m2_scale")
    _check_scalar(clip_scale, image, "clip_scale")
    return _Step(image, text, clip_scale, m2_scale, lam, True, with_clip)


@triton_op("robustft_triton::m2mix_fwd", mutates_args=())
def m2mix_fwd(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor, clip_scale: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(m2_loss, clip_loss (0 without clip), lse [4 or 2, n]), all float32; see
    csrc/step_kernels.h for the lse layout."""
    s = _m2mix_step(image, text, m2_scale, lam, clip_scale, with_clip)
    terms, _, lse = _step_fwd(s)
    return terms[K_M2], terms[K_CLIP], lse if with_clip else lse[:2].clone()


@triton_op("robustft_triton::m2mix_bwd", mutates_args=())
def m2mix_bwd(grad_m2: Tensor, grad_clip: Tensor, image: Tensor, text: Tensor,
              m2_scale: Tensor, lam: Tensor, clip_scale: Tensor, lse: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of grad_m2 * m2_loss + grad_clip * clip_loss: (grad_image, grad_text,
    grad_m2_scale, grad_clip_scale); the scale gradients are 0-d float32."""
    s = _m2mix_step(image, text, m2_scale, lam, clip_scale, with_clip)
    torch._check(lse.dim() == 2 and lse.size(0) == (4 if with_clip else 2)
                 and lse.size(1) == image.size(0),
                 lambda: "robustft_triton: saved m2mix log-sum-exp statistics do not match "
                 "the inputs")
    lse4 = lse.to(torch.float32)
    if not with_clip:
        lse4 = torch.cat([lse4, torch.zeros_like(lse4)])
    grads = _grads5(image.device, {K_CLIP: grad_clip, K_M2: grad_m2})
    gi, gt, g_clip, g_m2, _, _ = _step_bwd(s, grads, lse4)
    return gi, gt, g_m2, g_clip


# ----------------------------------------------------------------------------- Lipsum-FT
def _lipsum_step(image_ft: Tensor, image_pre: Tensor, texts: Tensor, scale: Tensor) -> _Step:
    # csrc/step_ops.h lipsum_args: text = image_ft and every scale = scale (no tiles).
    return _Step(image_ft, image_ft, scale, scale, scale, False, False, image_pre, texts, scale)


@triton_op("robustft_triton::lipsum_fwd", mutates_args=())
def lipsum_fwd(image_ft: Tensor, image_pre: Tensor, texts: Tensor, scale: Tensor) -> Tensor:
    """Lipsum-FT regulariser |s0 (F - F0) G^T|_F^2 / (2 K B) (0-d float32), scale = s0."""
    terms, _, _ = _step_fwd(_lipsum_step(image_ft, image_pre, texts, scale))
    return terms[K_LIPSUM]


@triton_op("robustft_triton::lipsum_bwd", mutates_args=())
def lipsum_bwd(grad_loss: Tensor, image_ft: Tensor, image_pre: Tensor, texts: Tensor,
               scale: Tensor) -> Tensor:
    """Gradient of grad_loss * lipsum_fwd with respect to image_ft (in its dtype)."""
    s = _lipsum_step(image_ft, image_pre, texts, scale)
    grads = _grads5(image_ft.device, {K_LIPSUM: grad_loss})
    return _step_bwd(s, grads, torch.zeros((4, s.n), **s.f32))[0]


# ----------------------------------------------------------------------------- DiVE
def _dive_step(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
               center: Tensor) -> _Step:
    # csrc/step_ops.h dive_args: no training batch.
    return _Step(image_ft, image_ft, center, center, center, False, False,
                 ref_image_ft=image_ft, ref_text_ft=text_ft, ref_image_pre=image_pre,
                 ref_text_pre=text_pre, center=center)


@triton_op("robustft_triton::dive_fwd", mutates_args=())
def dive_fwd(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
             center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DiVE on B' reference pairs: (AVL, PVL, diff_mean [D] = mean_j (u_j + v_j) / 2), all
    float32."""
    terms, diff_mean, _ = _step_fwd(_dive_step(image_ft, text_ft, image_pre, text_pre, center))
    return terms[K_AVL], terms[K_PVL], diff_mean


@triton_op("robustft_triton::dive_bwd", mutates_args=())
def dive_bwd(grad_avl: Tensor, grad_pvl: Tensor, image_ft: Tensor, text_ft: Tensor,
             image_pre: Tensor, text_pre: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of grad_avl * AVL + grad_pvl * PVL: (grad_image_ft, grad_text_ft), in the
    features' dtype (the centre and the pre-trained features get none)."""
    s = _dive_step(image_ft, text_ft, image_pre, text_pre, center)
    grads = _grads5(image_ft.device, {K_AVL: grad_avl, K_PVL: grad_pvl})
    r = _step_bwd(s, grads, torch.zeros((4, 0), **s.f32))
    return r[4], r[5]


# ----------------------------------------------------------------------------- robust step
@triton_op("robustft_triton::robust_step_fwd", mutates_args=())
def robust_step_fwd(image: Tensor, text: Tensor, clip_scale: Tensor, m2_scale: Tensor,
                    lam: Tensor, with_m2: bool, with_clip: bool, image_pre: Optional[Tensor],
                    lipsum_texts: Optional[Tensor], lipsum_scale: Tensor,
                    ref_image_ft: Optional[Tensor], ref_text_ft: Optional[Tensor],
                    ref_image_pre: Optional[Tensor], ref_text_pre: Optional[Tensor],
                    center: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """A robust fine-tuning step in one pass (csrc/schemas.cpp): (terms [5] = clip, m2,
    lipsum, avl, pvl (0 when absent), diff_mean [D] (DiVE; [0] without), lse [4, n]), all
    float32. Lipsum is on when image_pre / lipsum_texts are given, DiVE when the ref_* and
    center are."""
    s = _Step(image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
              lipsum_texts, lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre,
              ref_text_pre, center)
    terms, diff_mean, lse = _step_fwd(s)
    return torch.stack(terms), diff_mean, lse


@triton_op("robustft_triton::robust_step_bwd", mutates_args=())
def robust_step_bwd(grad_terms: Tensor, image: Tensor, text: Tensor, clip_scale: Tensor,
                    m2_scale: Tensor, lam: Tensor, with_m2: bool, with_clip: bool,
                    image_pre: Optional[Tensor], lipsum_texts: Optional[Tensor],
                    lipsum_scale: Tensor, ref_image_ft: Optional[Tensor],
                    ref_text_ft: Optional[Tensor], ref_image_pre: Optional[Tensor],
                    ref_text_pre: Optional[Tensor], center: Optional[Tensor],
                    lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_terms[i] * terms[i]: (grad_image, grad_text, grad_clip_scale,
    grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft ([0, D] without DiVE)); the feature
    gradients in the features' dtype ([0, D] for image / text without a training batch)."""
    s = _Step(image, text, clip_scale, m2_scale, lam, with_m2, with_clip, image_pre,
              lipsum_texts, lipsum_scale, ref_image_ft, ref_text_ft, ref_image_pre,
              ref_text_pre, center)
    torch._check(grad_terms.numel() == 5,
                 lambda: "robustft_triton: grad_terms must hold 5 values")
    grads = grad_terms.to(torch.float32).reshape(5).contiguous()
    return _step_bwd(s, grads, lse)
