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
robust_step_fwd / _bwd take the step's arguments as one StepArgs (robustft_ext.ops.robust_step,
the twin of csrc/step_args.h), whose fields device.triton_op lists in the registered schema;
m2mix_*, lipsum_* and dive_* build one with only their terms' fields, as csrc/step_ops.h's
m2mix_args, lipsum_args and dive_args do.

With m^2 under the Gram design (robustft_ext.step_design, docs/maths.md section 9.4), the
CLIP and m^2 tiles are the Gram kernels' (gram_kernels.py): one launch of gram_lse_kernel
over the triangle of tiles forward (_gram_lse) and, where the backward takes the dS workspace,
one launch of gram_strip_kernel per strip with its library GEMMs and the pair pass
(_gram_grads, _gram_step_bwd); Lipsum-FT and DiVE are then launches of the same step kernels
with the tile terms switched off (_Step.without_tiles). A batch with a near-opposite pair,
and a traced body, take the three products (_gram_serves).

As in contrastive_ops.py, each op body uses only torch ops with fake-able shapes plus
`wrap_triton` kernel launches, so the body is also the fake (meta) implementation and
torch.compile(fullgraph=True) traces through to the kernels. Every op body runs on its inputs'
device (device.triton_op), and the features reach the kernels padded to a multiple of 16
columns (launch.kernel_features).
What the op bodies do besides the tile kernels (as csrc/step_ops.h):
  * the slerp prologue, with the row-wise kernels of slerp_kernels.py (float64 inside):
    c_p = <I_p, T_p>, then the weights [4, n] from slerp_maths.slerp_weights on the host (the
    one Python copy of maths::slerp_weights, O(n)), then (three products) M = w_a I + w_b T,
    kept as one n x D buffer in the input dtype, read by the kernels like I and T;
  * for large D (configs.fused_backward), the backward's library GEMMs over the workspace
    row chunks of dlogits that step_dlogit_kernel writes (_step_grads_workspace);
  * the true-pair diagonal of A and B (value in the forward, its O(n) coefficient in the
    backward);
  * the backward of the slerp, dI += w_a dM + k T, dT += w_b dM + k I with
    k = <dM, I> dw_a/dc + <dM, T> dw_b/dc, and the true pair's gradient, in one row-wise
    kernel that also adds the tile kernels' gradients and writes dI, dT in the input dtype
    (the Gram formulation: the same kernel without dM, k = its pair coefficient);
  * assembling the losses from the kernels' statistics, and merging the per-program partials
    (column LSE of CLIP, the three sums, the DiVE column sums, the scale-gradient sums) with
    fixed-order torch reductions: results are bitwise deterministic.
Nothing of size n x n or n x K exists outside the kernels, except the large-D backward's
workspace chunks (the Gram formulation's strips of S), bounded by robustft_ext.workspace's
limit (ds_workspace.py). Besides the outputs, the memory is O(n D): M and the four float32
gradient buffers of the backward (the Gram backward: the rows [I; T] interleaved and their
float32 gradients; at most 12 n D float32 with everything else, tests/backends/test_memory.py),
O(B' D) for DiVE, O(P n) partial statistics of the persistent forward programs (the CLIP
column LSE; the Gram forward's four statistics, within the workspace limit), O(n) slerp
weights and O(n / BLOCK) partial sums.
"""
from __future__ import annotations

import copy

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from .. import slerp_maths as _slerp
from .. import workspace
from ..ops.robust_step import StepArgs
from ..step_design import GRAM_WEIGHT_LIMIT, step_design
from . import (SUPPORTED_DTYPES, configs, ds_workspace, gram_kernels, maths, slerp_kernels,
               step_kernels)
from .configs import interpreting
from .contrastive_ops import check_features
from .device import triton_op
from .launch import (kernel_features, kernel_input, launch_opts, persistent_programs,
                     traceable, unpad)

_STEP_FWD = traceable(step_kernels.step_fwd_kernel)
_STEP_ROWS = traceable(step_kernels.step_grad_rows_kernel)
_STEP_COLS = traceable(step_kernels.step_grad_cols_kernel)
_STEP_DLOGIT = traceable(step_kernels.step_dlogit_kernel)
_GRAM_LSE = traceable(gram_kernels.gram_lse_kernel)
_GRAM_STRIP = traceable(gram_kernels.gram_strip_kernel)
_PAIR_DOTS = traceable(slerp_kernels.pair_dots_kernel)
_SLERP_MIX = traceable(slerp_kernels.slerp_mix_kernel)
_SLERP_BWD = traceable(slerp_kernels.slerp_bwd_kernel)

# The most rows of a Gram backward strip, as csrc/step_kernels.h's kGpuGramStripRows: each
# strip recomputes its own square block whole (4 n^2 D R / n more multiply-adds in all), which
# 2048 rows hold to an eighth at n = 16384 whatever the workspace limit.
GRAM_STRIP_ROWS_MAX = 2048

# The five losses of a step, in the order of robust_step_fwd's `terms` and of `grads`
# (csrc/step_ops.h StepTerm).
K_CLIP, K_M2, K_LIPSUM, K_AVL, K_PVL = range(5)


# ----------------------------------------------------------------------------- checks
def _check_pair(a: Tensor, b: Tensor, lam: Tensor) -> None:
    # csrc/step_ops.h::check_m2_pair: check_features(a, b, lam, lam) and one shape.
    check_features(a, b, lam, lam)
    torch._check(a.size(0) == b.size(0),
                 lambda: f"robustft_triton: the mixed pair must have one shape, got "
                 f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_scalar(t: Tensor, a: Tensor, name: str) -> None:
    # csrc/step_ops.h::check_m2_scalar.
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
def _row_launch(kernel, a: Tensor, *args, **constexprs) -> None:
    """One launch of a row-wise slerp kernel over the rows of a ([n, D], as every matrix it
    takes), one program per BLOCK_M rows."""
    n, D = a.shape
    cfg = configs.select(kernel, a.device, a.dtype, D)
    launcher = {"pair_dots": _PAIR_DOTS, "slerp_mix": _SLERP_MIX, "slerp_bwd": _SLERP_BWD}
    wrap_triton(launcher[kernel])[(triton.cdiv(n, cfg.block_m),)](
        *args, n, D, a.stride(0), **constexprs, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _round_bf16(dtype: torch.dtype) -> bool:
    """Do the slerp kernels round their bfloat16 results to nearest by hand (the interpreter's
    conversion truncates; slerp_kernels._rounded)?"""
    return interpreting() and dtype == torch.bfloat16


def _pair_cosines(a: Tensor, b: Tensor) -> Tensor:
    """c_p = <a_p, b_p> [n] in float64 (slerp_kernels.pair_dots_kernel)."""
    cos = torch.empty(a.size(0), device=a.device, dtype=torch.float64)
    _row_launch("pair_dots", a, a, b, cos)
    return cos


def _mix(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """The mix w_a a + w_b b [n, D] in a's dtype, formed in float64 (w: [4, n] float64 from
    slerp_maths.slerp_weights)."""
    out = torch.empty_like(a)
    _row_launch("slerp_mix", a, a, b, w, out, ROUND_BF16=_round_bf16(a.dtype))
    return out


def _mix_backward(grad_m: Tensor, a: Tensor, b: Tensor, w: Tensor, *,
                  step: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) [n, D] in a's dtype of the mix for its float32 upstream gradient
    grad_m; with step = (pair [n], base_a, base_b [n, D]), all float32, plus
    base_a + pair b and base_b + pair a (slerp_kernels.slerp_bwd_kernel)."""
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    pair, base_a, base_b = step if step is not None else (grad_m, grad_m, grad_m)
    _row_launch("slerp_bwd", a, a, b, w, grad_m, pair, base_a, base_b, base_a.stride(0),
                grad_a, grad_b, WITH_MIX=True, WITH_STEP=step is not None,
                ROUND_BF16=_round_bf16(a.dtype))
    return grad_a, grad_b


def _pair_backward(coef: Tensor, a: Tensor, b: Tensor, base_a: Tensor,
                   base_b: Tensor) -> tuple[Tensor, Tensor]:
    """(base_a + coef b, base_b + coef a) [n, D] in a's dtype, for coef [n] and the bases
    [n, D] float32 (rows of one stride, unit column stride): the Gram formulation's pair
    pass (csrc/step_kernels.h pair_backward; slerp_kernels.slerp_bwd_kernel without a mix)."""
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    _row_launch("slerp_bwd", a, a, b, coef, coef, coef, base_a, base_b, base_a.stride(0),
                grad_a, grad_b, WITH_MIX=False, WITH_STEP=True,
                ROUND_BF16=_round_bf16(a.dtype))
    return grad_a, grad_b


@triton_op("robustft_triton::slerp")
def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """out_p = slerp(a_p, b_p; lam) (lam weights a), in the inputs' dtype; lam is a 0-d
    float32 tensor. Row-wise kernels (nothing here is n x n)."""
    _check_pair(a, b, lam)
    ak, bk = kernel_features(a), kernel_features(b)
    w = _slerp.slerp_weights(_pair_cosines(ak, bk), lam)
    return unpad(_mix(ak, bk, w), a.size(1))


@triton_op("robustft_triton::slerp_bwd")
def slerp_bwd(grad_out: Tensor, a: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of slerp(a, b; lam) for the upstream gradient grad_out."""
    _check_pair(a, b, lam)
    torch._check(grad_out.dim() == 2 and grad_out.size(0) == a.size(0)
                 and grad_out.size(1) == a.size(1),
                 lambda: f"robustft_triton: slerp_bwd grad_out has shape "
                 f"{tuple(grad_out.shape)}, expected {tuple(a.shape)}")
    ak, bk = kernel_features(a), kernel_features(b)
    grad_m = kernel_features(grad_out.to(torch.float32))
    w = _slerp.slerp_weights(_pair_cosines(ak, bk), lam)
    grad_a, grad_b = _mix_backward(grad_m, ak, bk, w)
    return unpad(grad_a, a.size(1)), unpad(grad_b, a.size(1))


# ----------------------------------------------------------------------------- the step
def _gram_serves(weights: Tensor) -> bool:
    """Whether a step with m^2 takes its tile work by the Gram formulation (docs/maths.md,
    section 9.4): csrc/step_ops.h's gram_wanted and weights_suit_gram. The design asks for it
    (step_design() == "gram") and no slerp weight of the batch exceeds GRAM_WEIGHT_LIMIT (one
    host synchronisation, on the weights' maximum): a near-opposite pair sends the batch to
    the three products, whose M is formed in float64. A traced body (fake tensors: the ops'
    fake implementation, torch.compile, export) has no weights to read, so it takes the three
    products, which serve every batch. Deterministic mode changes nothing: the Gram kernels
    merge their partial statistics in a fixed order, as every kernel here does."""
    if step_design() != "gram" or weights.numel() == 0:
        return False
    if is_fake(weights) or torch.compiler.is_compiling():
        return False
    return weights[:2].abs().max().item() <= GRAM_WEIGHT_LIMIT


class _Step:
    """The inputs of one step as the kernels read them: csrc/step_ops.h step_setup (the same
    checks in the same order, Lipsum's in _setup_lipsum and DiVE's in _setup_dive as there),
    with the slerp weights when m^2 is on, and the m^2 mix where the three products take the
    tiles (`gram` false). Absent parts are passed to the kernels as a placeholder tensor that
    the disabled (constexpr) code never reads.

    `gram`: the tile work by the Gram formulation (_gram_serves). A backward takes it where
    it takes the dS workspace (configs.fused_backward false, large D); at small D the
    register-resident three-product kernels, which move nothing of size n x n, serve it
    instead (the forward's statistics are the same whichever design made them)."""

    def __init__(self, a: StepArgs, backward: bool = False):
        self.with_m2, self.with_clip = bool(a.with_m2), bool(a.with_clip)
        self.with_tiles = self.with_m2 or self.with_clip
        self.with_lipsum = a.image_pre is not None or a.lipsum_texts is not None
        refs = (a.ref_image_ft, a.ref_text_ft, a.ref_image_pre, a.ref_text_pre, a.center)
        self.with_dive = any(t is not None for t in refs)
        self.batch = self.with_tiles or self.with_lipsum
        if not (self.batch or self.with_dive):
            raise RuntimeError("robustft_triton: a step with no term")
        self.n, self.K, self.n_ref = 0, 0, 0
        if self.batch:
            self._setup_batch(a)
        if self.with_tiles:
            # c_p = <I_p, T_p> in float64: the slerp's cosines, the true pairs' logits.
            self.pair_cos = _pair_cosines(self.I, self.T)
            self.pair_dot = self.pair_cos.to(torch.float32)
        if self.with_m2:
            _check_scalar(a.lam, a.image, "lam")
            self.weights = _slerp.slerp_weights(self.pair_cos, a.lam)
            self.diag = self.pair_dot * self.m2_scale
        if self.with_lipsum:
            self._setup_lipsum(a)
        if self.with_dive:
            self._setup_dive(a)
        # The kernels' feature dimension: feature_dim padded to a multiple of 16.
        self.D = configs.aligned_dim(self.feature_dim)
        self.f32 = dict(device=self.device, dtype=torch.float32)
        self.fused_bwd = configs.fused_backward("step", self.device, self.D)
        self.gram = (self.with_m2 and not (backward and self.fused_bwd)
                     and _gram_serves(self.weights) and self._triangle_fits())
        if self.with_m2 and not self.gram:
            self.M = _mix(self.I, self.T, self.weights)
        self._fill_absent()

    def _setup_batch(self, a: StepArgs) -> None:
        """The training batch: image and text rows and the tiles' two scales."""
        check_features(a.image, a.text, a.clip_scale, a.m2_scale)
        torch._check(a.image.size(0) == a.text.size(0),
                     lambda: f"robustft_triton: image and text must have one shape, got "
                     f"{tuple(a.image.shape)} and {tuple(a.text.shape)}")
        self.n, self.feature_dim = a.image.shape
        self.device, self.dtype = a.image.device, a.image.dtype
        self.I = kernel_features(a.image)
        self.T = kernel_features(a.text)
        self.m2_scale = kernel_input(a.m2_scale)
        self.clip_scale = kernel_input(a.clip_scale)

    def _setup_lipsum(self, a: StepArgs) -> None:
        """Lipsum-FT's inputs (csrc/step_ops.h setup_lipsum): the pre-trained image features
        P, the K random texts' features G and the scale s_0."""
        if a.image_pre is None or a.lipsum_texts is None:
            raise RuntimeError("robustft_triton: Lipsum needs both image_pre and lipsum_texts")
        _check_same_shape(a.image, a.image_pre, "image and image_pre")
        G = a.lipsum_texts
        if (G.dim() != 2 or G.dtype != a.image.dtype or G.device != a.image.device):
            raise RuntimeError(f"robustft_triton: lipsum_texts must be [K >= 1, D] like "
                               f"image, got {tuple(G.shape)} {G.dtype}")
        torch._check(G.size(0) > 0 and G.size(1) == a.image.size(1),
                     lambda: f"robustft_triton: lipsum_texts must be [K >= 1, D] like "
                     f"image, got {tuple(G.shape)}")
        _check_scalar(a.lipsum_scale, a.image, "lipsum_scale")
        self.P = kernel_features(a.image_pre)
        self.G = kernel_features(G)
        self.lip_scale = kernel_input(a.lipsum_scale)
        self.K = G.size(0)

    def _setup_dive(self, a: StepArgs) -> None:
        """DiVE's reference batch (csrc/step_ops.h setup_dive): the fine-tuned and pre-trained
        features of B' reference pairs and the centre; without a training batch it sets the
        step's D, dtype and device."""
        if any(t is None for t in (a.ref_image_ft, a.ref_text_ft, a.ref_image_pre,
                                   a.ref_text_pre, a.center)):
            raise RuntimeError("robustft_triton: DiVE needs ref_image_ft, ref_text_ft, "
                               "ref_image_pre, ref_text_pre and center")
        fi = a.ref_image_ft
        _check_same_shape(fi, a.ref_text_ft, "ref_image_ft and ref_text_ft")
        _check_same_shape(fi, a.ref_image_pre, "ref_image_ft and ref_image_pre")
        _check_same_shape(fi, a.ref_text_pre, "ref_image_ft and ref_text_pre")
        torch._check(fi.size(0) > 0 and fi.size(1) > 0,
                     lambda: "robustft_triton: empty DiVE batch")
        _check_kernel_dtype_device(fi)
        if self.batch:
            if fi.dtype != a.image.dtype or fi.device != a.image.device:
                raise RuntimeError("robustft_triton: the DiVE batch must share the "
                                   "training batch's dtype, D and device")
            torch._check(fi.size(1) == a.image.size(1),
                         lambda: "robustft_triton: the DiVE batch must share the "
                         "training batch's dtype, D and device")
        else:
            self.feature_dim = fi.size(1)
            self.device, self.dtype = fi.device, fi.dtype
        c = a.center
        if c.dim() != 1 or c.dtype != torch.float32 or c.device != fi.device:
            raise RuntimeError(f"robustft_triton: center must be a [D] torch.float32 "
                               f"tensor on {fi.device}, got {tuple(c.shape)} {c.dtype}")
        torch._check(c.size(0) == fi.size(1),
                     lambda: f"robustft_triton: center must be a [D] torch.float32 "
                     f"tensor on {fi.device}, got {tuple(c.shape)}")
        self.FI = kernel_features(fi)
        self.FT = kernel_features(a.ref_text_ft)
        self.PI = kernel_features(a.ref_image_pre)
        self.PT = kernel_features(a.ref_text_pre)
        self.center = kernel_features(c)
        self.n_ref = fi.size(0)

    def _fill_absent(self) -> None:
        """The placeholders of the absent parts' pointers (never dereferenced)."""
        none = torch.zeros(1, **self.f32)
        none_feat = self.I if self.batch else self.FI
        for name in ("I", "T", "M", "P", "G", "FI", "FT", "PI", "PT"):
            if not hasattr(self, name):
                setattr(self, name, none_feat)
        for name in ("diag", "m2_scale", "clip_scale", "lip_scale", "center"):
            if not hasattr(self, name):
                setattr(self, name, none)

    def flags(self) -> dict:
        return dict(WITH_M2=self.with_m2, WITH_CLIP=self.with_clip, WITH_TILES=self.with_tiles,
                    WITH_LIPSUM=self.with_lipsum, WITH_DIVE=self.with_dive)

    def config(self, kernel: str) -> configs.Config:
        return configs.select(kernel, self.device, self.dtype, self.D)

    def dive_programs(self, cfg: configs.Config) -> int:
        """DiVE programs of a launch with this configuration (one per BLOCK_M reference rows)."""
        return triton.cdiv(self.n_ref, cfg.block_m) if self.with_dive else 0

    def _triangle_fits(self) -> bool:
        """The Gram forward numbers its tiles with 32-bit integers: beyond 2^31 tiles (two
        million rows and more) the three products serve."""
        row_blocks = triton.cdiv(self.n, self.config("gram_lse").block_m)
        return row_blocks * (row_blocks + 1) // 2 < 2**31

    def without_tiles(self) -> "_Step":
        """This step with its tile terms (m^2, CLIP) switched off: what the step kernels
        compute beside the Gram formulation's kernels (Lipsum-FT, DiVE)."""
        small = copy.copy(self)
        small.with_m2 = small.with_clip = small.with_tiles = small.gram = False
        if not small.with_lipsum:  # no other term reads the training rows
            small.batch, small.n = False, 0
        return small


def _step_fwd(s: _Step) -> tuple[list[Tensor], Tensor, Tensor]:
    """csrc/step_ops.h step_fwd_impl: ([clip, m2, lipsum, avl, pvl] as five separate 0-d
    float32 tensors (0 when absent), diff_mean [D] (DiVE; [0] without), lse [4, n]). The
    tiles' statistics from the Gram kernel (s.gram) or from the step kernel's launch, which
    takes the other terms in either case."""
    n, f32 = s.n, s.f32
    if s.gram:
        lse = _gram_lse(s)
        small = s.without_tiles()
        if small.with_lipsum or small.with_dive:
            terms, diff_mean, _ = _step_fwd_launch(small)
        else:
            terms, diff_mean = [torch.zeros((), **f32) for _ in range(5)], torch.empty(0, **f32)
    else:
        terms, diff_mean, lse = _step_fwd_launch(s)
    if s.with_m2:
        # CE_rows(A) + CE_rows(B), both with the true pair diag on the diagonal, halved.
        terms[K_M2] = (lse[0].sum() + lse[1].sum() - 2 * s.diag.sum()) / (2 * n)
    if s.with_clip:
        terms[K_CLIP] = (lse[2].sum() + lse[3].sum()
                         - 2 * s.clip_scale * s.pair_dot.sum()) / (2 * n)
    return terms, diff_mean, lse


def _gram_programs(s: _Step, tiles: int, nstat: int) -> int:
    """Programs of the Gram forward: one per SM (launch.persistent_programs), as many as the
    workspace limit allows partial states for ([P, nstat, n] maxima and sums, float32), at
    least one, at most one per tile."""
    fit = workspace.workspace_limit() // max(1, 2 * nstat * s.n * 4)
    return max(1, min(persistent_programs(s.device), fit, tiles))


def _gram_lse(s: _Step) -> Tensor:
    """lse [4, n] (rows of CLIP's statistics 0 without CLIP) from one launch of
    gram_kernels.gram_lse_kernel over the triangle of tiles: csrc/step_kernels.h gram_lse."""
    n, f32 = s.n, s.f32
    cfg = s.config("gram_lse")
    nb = triton.cdiv(n, cfg.block_m)
    tiles = nb * (nb + 1) // 2
    nstat = 4 if s.with_clip else 2
    per_program = triton.cdiv(tiles, _gram_programs(s, tiles, nstat))
    programs = triton.cdiv(tiles, per_program)
    part_max = torch.full((programs, nstat, n), float("-inf"), **f32)
    part_sum = torch.zeros((programs, nstat, n), **f32)
    wrap_triton(_GRAM_LSE)[(programs,)](
        s.I, s.T, s.weights, s.diag, s.m2_scale, s.clip_scale, part_max, part_sum,
        n, s.D, s.D, per_program, WITH_CLIP=s.with_clip, **launch_opts(cfg, s.dtype))
    lse = maths.merge_lse_partials(part_max, part_sum)
    if not s.with_clip:
        lse = torch.cat([lse, torch.zeros((2, n), **f32)])
    return lse


def _step_fwd_launch(s: _Step) -> tuple[list[Tensor], Tensor, Tensor]:
    """One launch of step_kernels.step_fwd_kernel: (the terms without m^2 and CLIP, which
    _step_fwd adds from lse; diff_mean; lse [4, n], 0 for absent tiles)."""
    n, D, f32 = s.n, s.D, s.f32
    cfg = s.config("step_fwd")
    num_rb = triton.cdiv(n, cfg.block_m) if s.batch else 0
    # Training-row programs: persistent with CLIP (column partials per program), else one
    # per row block.
    nrow = min(persistent_programs(s.device), num_rb) if s.with_clip else num_rb
    ndive = s.dive_programs(cfg)
    lse_rows = torch.zeros((3, n), **f32)
    if s.with_clip:
        col_max = torch.full((nrow, n), float("-inf"), **f32)
        col_sum = torch.zeros((nrow, n), **f32)
    else:
        col_max = col_sum = torch.empty(0, **f32)
    sums = torch.empty((num_rb + ndive, 3), **f32)
    diff = torch.empty((ndive, D), **f32)
    wrap_triton(_STEP_FWD)[(nrow + ndive,)](
        s.I, s.T, s.M, s.diag, s.m2_scale, s.clip_scale, s.P, s.G, s.lip_scale,
        s.FI, s.FT, s.PI, s.PT, s.center,
        lse_rows, col_max, col_sum, sums, diff,
        n, max(s.K, 1), s.n_ref, D, D, D, D, nrow,
        **s.flags(), ONE_CHUNK=D <= cfg.block_d, **launch_opts(cfg, s.dtype))
    terms = [torch.zeros((), **f32) for _ in range(5)]
    if s.with_clip:
        col_lse = maths.merge_lse_partials(col_max, col_sum).unsqueeze(0)
    else:
        col_lse = torch.zeros((1, n), **f32)
    lse = torch.cat([lse_rows, col_lse])
    totals = sums.sum(0)  # fixed-order reduction of the per-row-block / DiVE partials
    if s.with_lipsum:
        terms[K_LIPSUM] = totals[0] / (2 * s.K * n)
    if s.with_dive:
        terms[K_AVL] = totals[1] / s.n_ref
        terms[K_PVL] = totals[2] / s.n_ref
        diff_mean = unpad(diff.sum(0) / s.n_ref, s.feature_dim)
    else:
        diff_mean = torch.empty(0, **f32)
    return terms, diff_mean, lse


class _StepGrads:
    """The kernels' part of a step's gradients, float32: grad_I, grad_T (rows: m^2's dB M),
    grad_M (m^2), grad_Tc (CLIP's gradient of T), stats [2] = (the m^2 and CLIP scale
    gradients without the true-pair diagonal, each already times its upstream gradient),
    grad_fi, grad_ft (DiVE)."""

    def __init__(self, s: _Step) -> None:
        n, D, f32 = s.n, s.D, s.f32
        self.grad_I = torch.zeros((n, D), **f32)
        self.grad_T = torch.zeros((n, D), **f32)
        self.grad_M = torch.zeros((n, D), **f32) if s.with_m2 else torch.empty(0, **f32)
        self.grad_Tc = torch.zeros((n, D), **f32) if s.with_clip else torch.empty(0, **f32)
        self.stats = torch.zeros(2, **f32)
        self.grad_fi = torch.empty((s.n_ref, D), **f32)
        self.grad_ft = torch.empty((s.n_ref, D), **f32)


def _step_grads_fused(s: _Step, grads: Tensor, lse: Tensor) -> _StepGrads:
    """The register-resident step backward (small D): one launch of step_grad_rows_kernel
    (training rows and DiVE rows), plus one of step_grad_cols_kernel with m^2 or CLIP."""
    n, D, f32 = s.n, s.D, s.f32
    out = _StepGrads(s)
    cfg = s.config("step_grad_rows")
    nrow = triton.cdiv(n, cfg.block_m) if s.batch else 0
    stats = torch.empty((nrow, 2), **f32)
    wrap_triton(_STEP_ROWS)[(nrow + s.dive_programs(cfg),)](
        s.I, s.T, s.M, s.P, s.G, s.FI, s.FT, s.PI, s.PT, s.center,
        grads, s.m2_scale, s.clip_scale, s.lip_scale, lse,
        out.grad_I, out.grad_T, stats, out.grad_fi, out.grad_ft,
        n, max(s.K, 1), s.n_ref, D, D, D, D, D, D, nrow,
        **s.flags(), **launch_opts(cfg, s.dtype))
    out.stats = stats.sum(0)
    if s.with_tiles:
        cfg = s.config("step_grad_cols")
        wrap_triton(_STEP_COLS)[(triton.cdiv(n, cfg.block_m),)](
            s.I, s.T, s.M, grads, s.m2_scale, s.clip_scale, lse, out.grad_M, out.grad_Tc,
            n, D, D, D, WITH_M2=s.with_m2, WITH_CLIP=s.with_clip,
            **launch_opts(cfg, s.dtype))
    return out


def _step_grads_workspace(s: _Step, grads: Tensor, lse: Tensor) -> _StepGrads:
    """The large-D step backward: for each row chunk (rows p of the training batch), one
    launch of step_dlogit_kernel writes the unit dlogits UA, UB (m^2: one [2 chunk, n]
    block, UA above UB), UC (CLIP) and the Lipsum dots X [chunk, K] into the workspace, and
    float32-output library GEMMs (ds_workspace.mm_f32) form
        [grad_I; grad_T][chunk] (m^2) = f_m [UA; UB] M      grad_M  += [UA; UB]^T [I; T][chunk]
        grad_I[chunk] += f_c UC T + f_l X G                 grad_Tc += UC^T I[chunk]
    with f_m = s_m g_m / 2n, f_c = s_c g_c / 2n, f_l = s_l^2 g_lipsum / (K n); grad_M and
    grad_Tc are scaled once at the end. The first launch also carries the DiVE programs (a
    DiVE-only step: one launch with only those)."""
    n, D, K, f32 = s.n, s.D, s.K, s.f32
    out = _StepGrads(s)
    cfg = s.config("step_dlogit")
    ws_dtype = ds_workspace.ds_dtype(s.dtype)
    # The blocks' row strides are multiples of 16, as D (configs.aligned_dim).
    width, width_x = configs.aligned_dim(n), configs.aligned_dim(max(K, 1))
    per_row = ((2 * width if s.with_m2 else 0) + (width if s.with_clip else 0)) \
        * ws_dtype.itemsize + (4 * width_x if s.with_lipsum else 0)
    rows = ds_workspace.chunk_rows(n, per_row, cfg.block_m) if s.batch else 0
    none = torch.empty(0, device=s.device, dtype=ws_dtype)
    ws = dict(device=s.device, dtype=ws_dtype)
    ds_ab = torch.empty((2 * rows, width), **ws) if s.with_m2 else none
    ds_c = torch.empty((rows, width), **ws) if s.with_clip else none
    x = torch.empty((rows, width_x), **f32) if s.with_lipsum else torch.empty(0, **f32)
    g_m = grads[K_M2] / (2 * n) if s.with_m2 else None
    g_c = grads[K_CLIP] / (2 * n) if s.with_clip else None
    if s.with_lipsum:
        f_l = grads[K_LIPSUM] / (K * n) * s.lip_scale * s.lip_scale
        G32 = s.G.to(torch.float32)
    stats = torch.zeros(2, **f32)
    starts = list(range(0, n, rows)) if s.batch else [0]
    for row0 in starts:
        chunk = min(rows, n - row0)
        row_blocks = triton.cdiv(chunk, cfg.block_m)
        ntile = row_blocks * triton.cdiv(n, cfg.block_n) if s.with_tiles else 0
        nlip = row_blocks * triton.cdiv(K, cfg.block_n) if s.with_lipsum else 0
        ndive = s.dive_programs(cfg) if row0 == 0 else 0
        partials = torch.zeros((max(ntile, 1), 2), **f32)
        dsa = ds_ab[:chunk] if s.with_m2 else none
        dsb = ds_ab[chunk:2 * chunk] if s.with_m2 else none
        wrap_triton(_STEP_DLOGIT)[(ntile + nlip + ndive,)](
            s.I, s.T, s.M, s.P, s.G, s.FI, s.FT, s.PI, s.PT, s.center,
            grads, s.m2_scale, s.clip_scale, lse, dsa, dsb, ds_c, x, partials,
            out.grad_fi, out.grad_ft,
            row0, chunk, n, max(K, 1), s.n_ref, D, D, D, D, width, width_x, D, ntile, nlip,
            **s.flags(), GROUP_M=8, **launch_opts(cfg, s.dtype))
        if not s.batch:
            break
        sl = slice(row0, row0 + chunk)
        stats = stats + partials.sum(0)
        gi = None
        if s.with_m2:
            ab = ds_ab[:2 * chunk, :n]
            mixed = ds_workspace.mm_f32(ab, s.M) * (g_m * s.m2_scale)
            gi = mixed[:chunk]
            out.grad_T[sl] = mixed[chunk:]
            ds_workspace.add_mm_f32_(out.grad_M, ab.T, torch.cat([s.I[sl], s.T[sl]]))
        if s.with_clip:
            uc = ds_c[:chunk, :n]
            part = ds_workspace.mm_f32(uc, s.T) * (g_c * s.clip_scale)
            gi = part if gi is None else gi + part
            ds_workspace.add_mm_f32_(out.grad_Tc, uc.T, s.I[sl])
        if s.with_lipsum:
            part = torch.mm(x[:chunk, :K], G32) * f_l
            gi = part if gi is None else gi + part
        out.grad_I[sl] = gi
    # Scale and upstream gradient of each present term, applied once (absent terms' values
    # are never multiplied in, even by 0: they may be anything).
    zero = torch.zeros((), **f32)
    if s.with_m2:
        out.grad_M = out.grad_M * (g_m * s.m2_scale)
    if s.with_clip:
        out.grad_Tc = out.grad_Tc * (g_c * s.clip_scale)
    out.stats = torch.stack([stats[0] * g_m if s.with_m2 else zero,
                             stats[1] * g_c if s.with_clip else zero])
    return out


def _true_pair_dlogit(s: _Step, grads: Tensor, lse: Tensor) -> Tensor:
    """d(loss)/d(diag_p) [n]: the true pair on the diagonals of A and B, summed over both
    (its logit diag_p = s_m <I_p, T_p>)."""
    return grads[K_M2] / (2 * s.n) * ((s.diag - lse[0]).exp() + (s.diag - lse[1]).exp() - 2)


def gram_strip_row_bytes(n: int, ws_dtype: torch.dtype, cfg: configs.Config) -> int:
    """The workspace bytes per batch row of a Gram backward strip of n rows: its two rows of
    S (the row stride configs.aligned_dim(2 n), the workspace dtype) and its share of the
    float32 partial sums of u (a pair per column tile; per row tile, a pair per column)."""
    return (2 * configs.aligned_dim(2 * n) * ws_dtype.itemsize
            + 8 * triton.cdiv(n, cfg.block_n) + triton.cdiv(8 * configs.aligned_dim(n),
                                                            cfg.block_m))


def _gram_grads(s: _Step, grads: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The tile terms' gradients by the Gram formulation, csrc/step_ops.h gram_backward up
    to its pair pass: (grad_X [2 n, D] float32, the gradients of the rows [I_0; T_0; I_1; ...],
    stats [2] = the m^2 and CLIP scale gradients without the true pair's share, u [2, n]).

    Strips of rows [r0, r1) against the columns [r0, n), as many rows as the workspace limit
    allows (ds_workspace.chunk_rows) and at most GRAM_STRIP_ROWS_MAX: one launch of
    gram_kernels.gram_strip_kernel forms S[r0:r1, r0:] / norm in the workspace (interleaved: S is a [2 R, 2 (n - r0)] block of
    dG + dG^T over the rows X = [I_0; T_0; I_1; T_1; ...]), norm = |a_m| + |a_c| so that
    16-bit workspaces hold entries of order one, and two float32-output library GEMMs take
    the strip's gradients from it:
        grad_X[r0:r1] += S X[r0:],   grad_X[r1:] += S[:, r1:]^T X[r0:r1]
    (the strip's own columns enter through the first only); grad_X is multiplied by norm
    once at the end."""
    n, D, f32 = s.n, s.D, s.f32
    cfg = s.config("gram_strip")
    ws_dtype = ds_workspace.ds_dtype(s.dtype)
    rows = min(ds_workspace.chunk_rows(n, gram_strip_row_bytes(n, ws_dtype, cfg), cfg.block_m),
               GRAM_STRIP_ROWS_MAX)
    width, width_r, width_n = (configs.aligned_dim(2 * n), configs.aligned_dim(rows),
                               configs.aligned_dim(n))
    zero = torch.zeros((), **f32)
    # The dlogits' true factors times the logit scales (section 9.4's a_m, a_c). Absent
    # terms' upstream gradients are never multiplied in, even by 0: they may be anything.
    a_m = s.m2_scale * (grads[K_M2] / (2 * n))
    a_c = s.clip_scale * (grads[K_CLIP] / n) if s.with_clip else zero
    norm = (a_m.abs() + a_c.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    factors = torch.stack([a_m / norm, a_c / norm])
    ws = torch.empty((2 * rows, width), device=s.device, dtype=ws_dtype)
    u_row = torch.empty((triton.cdiv(n, cfg.block_n), 2, width_r), **f32)
    u_col = torch.empty((triton.cdiv(rows, cfg.block_m), 2, width_n), **f32)
    X = torch.stack([s.I, s.T], 1).reshape(2 * n, D)
    grad_X = torch.zeros((2 * n, D), **f32)
    stats, u = torch.zeros(2, **f32), torch.zeros((2, n), **f32)
    for r0 in range(0, n, rows):
        R, W = min(rows, n - r0), n - r0
        row_tiles, col_tiles = triton.cdiv(R, cfg.block_m), triton.cdiv(W, cfg.block_n)
        partials = torch.empty((row_tiles * col_tiles, 2), **f32)
        wrap_triton(_GRAM_STRIP)[(row_tiles * col_tiles,)](
            s.I, s.T, s.weights, s.m2_scale, s.clip_scale, lse, factors, ws, partials,
            u_row, u_col, r0, R, n, D, D, width, width_r, width_n,
            WITH_CLIP=s.with_clip, GROUP_M=8, **launch_opts(cfg, s.dtype))
        S = ws[:2 * R, :2 * W]
        ds_workspace.add_mm_f32_(grad_X[2 * r0:2 * (r0 + R)], S, X[2 * r0:])
        if W > R:
            ds_workspace.add_mm_f32_(grad_X[2 * (r0 + R):], S[:, 2 * R:].T,
                                     X[2 * r0:2 * (r0 + R)])
        # Fixed-order sums of the per-tile partials.
        stats += partials.sum(0)
        u[:, r0:r0 + R] += u_row[:col_tiles, :, :R].sum(0)
        u[:, r0:] += u_col[:row_tiles, :, :W].sum(0)
    return grad_X.mul_(norm), stats, u


def _gram_step_bwd(s: _Step, grads: Tensor, lse: Tensor):
    """_step_bwd by the Gram formulation (csrc/step_ops.h step_bwd_impl's Gram branch): the
    tiles' gradients from _gram_grads, Lipsum-FT's and DiVE's from the step kernels beside
    them, then the pair pass, which adds the slerp weights' and the true pair's terms and
    writes dI, dT in the inputs' dtype:
        grad_I_p += coef_p T_p,  grad_T_p += coef_p I_p,
        coef_p = a_m (dw_a/dc[p] u_I[p] + dw_b/dc[p] u_T[p]) + s_m g_diag[p],
    g_diag the true pair's dlogit, as the three products' op body has it."""
    n, D, f32 = s.n, s.D, s.f32
    grad_X, stats, u = _gram_grads(s, grads, lse)
    grad_X = grad_X.view(n, 2, D)
    small = s.without_tiles()
    grad_fi = grad_ft = torch.empty((0, D), **f32)
    if small.with_lipsum or small.with_dive:
        k = _step_grads_workspace(small, grads, lse)
        if small.with_lipsum:
            grad_X[:, 0] += k.grad_I
        grad_fi, grad_ft = k.grad_fi, k.grad_ft
        del k
    f_m2 = grads[K_M2] / (2 * n)
    g_diag = _true_pair_dlogit(s, grads, lse)
    dw = s.weights[2:].to(torch.float32)
    coef = s.m2_scale * f_m2 * (dw[0] * u[0] + dw[1] * u[1]) + s.m2_scale * g_diag
    grad_I, grad_T = _pair_backward(coef, s.I, s.T, grad_X[:, 0], grad_X[:, 1])
    grad_m2_scale = stats[0] * f_m2 + (g_diag * s.pair_dot).sum()
    grad_clip_scale = stats[1] * (grads[K_CLIP] / n) if s.with_clip else torch.zeros((), **f32)
    D = s.feature_dim
    return (unpad(grad_I, D), unpad(grad_T, D), grad_clip_scale, grad_m2_scale,
            unpad(grad_fi.to(s.dtype), D), unpad(grad_ft.to(s.dtype), D))


def _step_bwd(s: _Step, grads: Tensor, lse: Tensor):
    """csrc/step_ops.h step_bwd_impl, with grads [5] float32 and lse [4, n]: (grad_image,
    grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft)."""
    n = s.n
    torch._check(lse.dim() == 2 and lse.size(0) == 4 and lse.size(1) == n,
                 lambda: "robustft_triton: saved log-sum-exp statistics do not match the "
                 "inputs")
    grads = kernel_input(grads)
    lse = kernel_input(lse.to(torch.float32))
    if s.gram:
        return _gram_step_bwd(s, grads, lse)
    if s.fused_bwd:
        k = _step_grads_fused(s, grads, lse)
    else:
        k = _step_grads_workspace(s, grads, lse)
    grad_m2_scale = torch.zeros((), **s.f32)
    grad_T = k.grad_T.add_(k.grad_Tc) if s.with_clip else k.grad_T
    if s.with_m2:
        # The true pair's dlogit, and its logit's scale s_m as the coefficient of T_p in
        # dI_p and of I_p in dT_p; added, with the rest of dI and dT, by the slerp
        # backward's pass over the rows.
        g_diag = _true_pair_dlogit(s, grads, lse)
        grad_I, grad_T = _mix_backward(k.grad_M, s.I, s.T, s.weights,
                                       step=(s.m2_scale * g_diag, k.grad_I, grad_T))
        grad_m2_scale = k.stats[0] + (g_diag * s.pair_dot).sum()
    else:
        grad_I, grad_T = k.grad_I.to(s.dtype), grad_T.to(s.dtype)
    grad_clip_scale = k.stats[1].clone()  # 0 without CLIP
    D = s.feature_dim
    return (unpad(grad_I, D), unpad(grad_T, D), grad_clip_scale, grad_m2_scale,
            unpad(k.grad_fi.to(s.dtype), D), unpad(k.grad_ft.to(s.dtype), D))


def _grads5(device: torch.device, values: dict[int, Tensor]) -> Tensor:
    """The [5] float32 upstream gradients, values[term] for the given terms, 0 for the others
    (csrc/step_ops.h grads_one)."""
    parts = [values[i].to(torch.float32).reshape(()) if i in values
             else torch.zeros((), device=device, dtype=torch.float32) for i in range(5)]
    return torch.stack(parts)


def _step_args(**given) -> StepArgs:
    """A StepArgs with the given fields, every other one absent (None; the terms' flags
    False), as csrc/step_ops.h's m2mix_args, lipsum_args and dive_args fill an empty one."""
    return StepArgs(**{**dict.fromkeys(StepArgs._fields), "with_m2": False, "with_clip": False,
                       **given})


# ----------------------------------------------------------------------------- m^2-mix
def _m2mix_args(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor,
                clip_scale: Tensor, with_clip: bool) -> StepArgs:
    # csrc/step_ops.h m2mix_args: the m^2-mix checks first, then the step's.
    _check_pair(image, text, lam)
    _check_scalar(m2_scale, image, "m2_scale")
    _check_scalar(clip_scale, image, "clip_scale")
    return _step_args(image=image, text=text, clip_scale=clip_scale, m2_scale=m2_scale,
                      lam=lam, with_m2=True, with_clip=with_clip)


@triton_op("robustft_triton::m2mix_fwd")
def m2mix_fwd(image: Tensor, text: Tensor, m2_scale: Tensor, lam: Tensor, clip_scale: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(m2_loss, clip_loss (0 without clip), lse [4 or 2, n]), all float32; see
    csrc/step_kernels.h for the lse layout."""
    s = _Step(_m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip))
    terms, _, lse = _step_fwd(s)
    return terms[K_M2], terms[K_CLIP], lse if with_clip else lse[:2].clone()


@triton_op("robustft_triton::m2mix_bwd")
def m2mix_bwd(grad_m2: Tensor, grad_clip: Tensor, image: Tensor, text: Tensor,
              m2_scale: Tensor, lam: Tensor, clip_scale: Tensor, lse: Tensor,
              with_clip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of grad_m2 * m2_loss + grad_clip * clip_loss: (grad_image, grad_text,
    grad_m2_scale, grad_clip_scale); the scale gradients are 0-d float32."""
    s = _Step(_m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip), backward=True)
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
def _lipsum_args(image_ft: Tensor, image_pre: Tensor, texts: Tensor, scale: Tensor) -> StepArgs:
    # csrc/step_ops.h lipsum_args: text = image_ft and every scale = scale (no tiles).
    return _step_args(image=image_ft, text=image_ft, clip_scale=scale, m2_scale=scale,
                      lam=scale, image_pre=image_pre, lipsum_texts=texts, lipsum_scale=scale)


@triton_op("robustft_triton::lipsum_fwd")
def lipsum_fwd(image_ft: Tensor, image_pre: Tensor, texts: Tensor, scale: Tensor) -> Tensor:
    """Lipsum-FT regulariser |s0 (F - F0) G^T|_F^2 / (2 K B) (0-d float32), scale = s0."""
    terms, _, _ = _step_fwd(_Step(_lipsum_args(image_ft, image_pre, texts, scale)))
    return terms[K_LIPSUM]


@triton_op("robustft_triton::lipsum_bwd")
def lipsum_bwd(grad_loss: Tensor, image_ft: Tensor, image_pre: Tensor, texts: Tensor,
               scale: Tensor) -> Tensor:
    """Gradient of grad_loss * lipsum_fwd with respect to image_ft (in its dtype)."""
    s = _Step(_lipsum_args(image_ft, image_pre, texts, scale))
    grads = _grads5(image_ft.device, {K_LIPSUM: grad_loss})
    return _step_bwd(s, grads, torch.zeros((4, s.n), **s.f32))[0]


# ----------------------------------------------------------------------------- DiVE
def _dive_args(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
               center: Tensor) -> StepArgs:
    # csrc/step_ops.h dive_args: no training batch.
    return _step_args(ref_image_ft=image_ft, ref_text_ft=text_ft, ref_image_pre=image_pre,
                      ref_text_pre=text_pre, center=center)


@triton_op("robustft_triton::dive_fwd")
def dive_fwd(image_ft: Tensor, text_ft: Tensor, image_pre: Tensor, text_pre: Tensor,
             center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DiVE on B' reference pairs: (AVL, PVL, diff_mean [D] = mean_j (u_j + v_j) / 2), all
    float32."""
    terms, diff_mean, _ = _step_fwd(_Step(_dive_args(image_ft, text_ft, image_pre, text_pre,
                                                     center)))
    return terms[K_AVL], terms[K_PVL], diff_mean


@triton_op("robustft_triton::dive_bwd")
def dive_bwd(grad_avl: Tensor, grad_pvl: Tensor, image_ft: Tensor, text_ft: Tensor,
             image_pre: Tensor, text_pre: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of grad_avl * AVL + grad_pvl * PVL: (grad_image_ft, grad_text_ft), in the
    features' dtype (the centre and the pre-trained features get none)."""
    s = _Step(_dive_args(image_ft, text_ft, image_pre, text_pre, center))
    grads = _grads5(image_ft.device, {K_AVL: grad_avl, K_PVL: grad_pvl})
    r = _step_bwd(s, grads, torch.zeros((4, 0), **s.f32))
    return r[4], r[5]


# ----------------------------------------------------------------------------- robust step
@triton_op("robustft_triton::robust_step_fwd")
def robust_step_fwd(args: StepArgs) -> tuple[Tensor, Tensor, Tensor]:
    """A robust fine-tuning step in one pass (csrc/schemas.cpp): (terms [5] = clip, m2,
    lipsum, avl, pvl (0 when absent), diff_mean [D] (DiVE; [0] without), lse [4, n]), all
    float32. Lipsum is on when image_pre / lipsum_texts are given, DiVE when the ref_* and
    center are."""
    terms, diff_mean, lse = _step_fwd(_Step(args))
    return torch.stack(terms), diff_mean, lse


@triton_op("robustft_triton::robust_step_bwd")
def robust_step_bwd(grad_terms: Tensor, args: StepArgs,
                    lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_terms[i] * terms[i]: (grad_image, grad_text, grad_clip_scale,
    grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft ([0, D] without DiVE)); the feature
    gradients in the features' dtype ([0, D] for image / text without a training batch)."""
    s = _Step(args, backward=True)
    torch._check(grad_terms.numel() == 5,
                 lambda: "robustft_triton: grad_terms must hold 5 values")
    grads = grad_terms.to(torch.float32).reshape(5).contiguous()
    return _step_bwd(s, grads, lse)
