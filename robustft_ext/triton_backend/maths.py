"""Per-entry maths of the Triton kernels: the twin of csrc/robustft_maths.h.

Every formula that the Triton kernels evaluate per logit (or per row / column of a logit
tile) lives here once, and every kernel of contrastive_kernels.py and step_kernels.py calls
it from here:

  online log-sum-exp   lse_update (one tile into a row state), lse_final (the value);
  partial statistics   lse_partials_update (one tile's columns, or rows, into a
                       program's partial log-sum-exp states) and, on the host,
                       merge_lse_partials (the fixed-order merge of the per-program
                       partials);
  dlogits (dS)         clip_dlogit, siglip_dlogit: per unit of the loss weight, so that they
                       lie in [-2, 2] and survive a cast to 16 bits (ds_operand);
  SigLIP loss          siglip_term (softplus without cancellation);
  tile products        mma (tl.dot with float32 accumulation, and the interpreter's bfloat16
                       workaround);
  tile orders          grouped_tile (L2-friendly order of a rectangle of tiles),
                       triangle_tile / triangle_next (the upper triangle of tiles of the
                       Gram formulation, row block by row block);
  Gram formulation     gram_mixed_dot (a mixed logit from two Gram entries), gram_s_blocks
                       (the four blocks of S = dG + dG^T at one entry): docs/maths.md,
                       section 9.4.

Notation (docs/maths.md, sections 1-2): S = scale <p, q> + bias is one logit, r / c the row /
column log-sum-exp, E the positive pairs (q - p == offset). Masked (invalid) entries of a
logit tile are -inf in the statistics and 0 in the dlogits.

The functions follow csrc/robustft_maths.h except where Triton needs a different form:
log1p (no portable tl.log1p) and the "safe" maximum of the online log-sum-exp (0 where the
maximum is -inf, so that exp() of a fully masked row or column stays NaN-free, where the C++
state tests l == 0 instead).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


# ----------------------------------------------------------------------------- elementary
@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x >= 0 (Goldberg's trick): Triton has no portable log1p
    (libdevice's is CUDA-only). Where 1 + x rounds to 1, log1p(x) = x to fp32 precision."""
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def softplus(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)), as maths::softplus."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow, as maths::sigmoid."""
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def siglip_term(s, positive):
    """-log sigmoid(z s), z = +1 on positives and -1 elsewhere: softplus(-s) on positives,
    softplus(s) on negatives (maths::siglip_term), without the cancellation of
    softplus(s) - s."""
    return softplus(tl.where(positive, -s, s))


# ----------------------------------------------------------------------------- tile products
@triton.jit
def mma(x, y, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y with float32 accumulation (tensor cores for 16-bit x, y).

    DOT_PREC: "ieee" (true fp32 products, FMA units) or "tf32" for float32 operands; 16-bit
    operands ignore it (their products are exact in fp32). UPCAST converts 16-bit operands to
    float32 first: set only under TRITON_INTERPRET=1 for bfloat16, whose tl.dot the interpreter
    does not support (it multiplies the raw uint16 bit patterns, triton-lang/triton#11584);
    the result equals the tensor-core dot, bf16 x bf16 products being exact in fp32.
    """
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=DOT_PREC)


@triton.jit
def grouped_tile(pid, num_pm, num_pn, GROUP_M: tl.constexpr):
    """The (row tile, column tile) of program pid over a num_pm x num_pn grid, visited in
    groups of GROUP_M row tiles, column by column, so that the programs running together
    share their operand tiles in L2."""
    group = GROUP_M * num_pn
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_pm - first_m, GROUP_M)
    pm = first_m + (pid % group) % group_rows
    pn = (pid % group) // group_rows
    return pm, pn


@triton.jit
def triangle_tile(t, nb):
    """Row block i and column block j (i <= j < nb) of tile number t < nb (nb + 1) / 2 of the
    upper triangle of an nb x nb grid of square tiles, numbered row block by row block (row
    block i holds the nb - i tiles j = i .. nb - 1): the Gram formulation's forward schedule
    (docs/maths.md, section 9.4). A scalar loop over the row blocks before t, once per
    program."""
    i = t * 0
    first = t * 0  # the tiles of the row blocks before i
    while (i < nb) & (first + (nb - i) <= t):
        first += nb - i
        i += 1
    return i, i + (t - first)


@triton.jit
def triangle_next(i, j, nb):
    """The tile after (i, j) in triangle_tile's order."""
    last = j + 1 == nb
    return tl.where(last, i + 1, i), tl.where(last, i + 1, j + 1)


# ----------------------------------------------------------------------------- log-sum-exp
@triton.jit
def lse_update(m_i, l_i, s):
    """One tile s [rows, cols] merged into the online row log-sum-exp state (m_i, l_i)
    [rows]: the running maximum and the sum of exp(s - maximum) (maths::lse_push_block)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
    return m_new, l_new


@triton.jit
def lse_final(m_i, l_i, row_ok):
    """The log-sum-exp of a state (maths::lse_value); rows past the end (row_ok false,
    l = 0) give log(1) instead of -inf and must not be stored."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    return m_safe + tl.log(tl.where(row_ok, l_i, 1.0))


@triton.jit
def lse_partials_update(max_ptr, sum_ptr, offs, ok, s, AXIS: tl.constexpr):
    """Merge tile s [rows, cols] into this program's partial log-sum-exp states (max and sum
    of exp(s - max)) at max_ptr / sum_ptr + offs: AXIS = 0 folds each column of s (offs
    along the columns), AXIS = 1 each row (offs along the rows). Load, merge, store.

    Only the calling program touches those entries (so no atomics); the barrier orders the
    stores before the next tile's loads, which other threads of the program may issue (the
    load and store layouts may differ). The host merges the programs' partials with
    merge_lse_partials."""
    pm = tl.load(max_ptr + offs, mask=ok, other=float("-inf"))
    ps = tl.load(sum_ptr + offs, mask=ok, other=0.0)
    cm = tl.maximum(pm, tl.max(s, axis=AXIS))
    cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
    ps = ps * tl.exp(pm - cm_safe) + tl.sum(tl.exp(s - tl.expand_dims(cm_safe, AXIS)),
                                            axis=AXIS)
    tl.store(max_ptr + offs, cm, mask=ok)
    tl.store(sum_ptr + offs, ps, mask=ok)
    tl.debug_barrier()


def merge_lse_partials(part_max: Tensor, part_sum: Tensor) -> Tensor:
    """Host side: the log-sum-exp [...] from P programs' partials [P, ...] (max, sum of
    exp(x - max)), merged in a fixed order (bitwise deterministic). O(P m) torch ops."""
    cmax = part_max.amax(0)
    cmax = torch.where(torch.isinf(cmax), torch.zeros_like(cmax), cmax)
    return cmax + torch.log((part_sum * torch.exp(part_max - cmax)).sum(0))


# ----------------------------------------------------------------------------- dlogits
@triton.jit
def clip_dlogit(s, row_lse, col_lse, positive, valid,
                HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, POS_COEF: tl.constexpr):
    """The CLIP dlogit of a tile per unit of the loss weight (maths::clip_dlogit with the
    weights folded out):
        U = [HAS_ROW] exp(s - r) + [HAS_COL] exp(s - c) - POS_COEF [positive],
    0 outside `valid`. row_lse / col_lse broadcast against s (an absent one is not read).
    Symmetric CLIP: both terms and POS_COEF = 2 (dS = U / 2n); one-sided CLIP: the row term
    and POS_COEF = 1 (dS = U / n); m^2-mix: the row term of A or B, POS_COEF = 0 (the true
    pair's diagonal is handled apart)."""
    u = tl.zeros_like(s)
    if HAS_ROW:
        u += tl.exp(s - row_lse)
    if HAS_COL:
        u += tl.exp(s - col_lse)
    if POS_COEF != 0:
        u = tl.where(positive, u - POS_COEF, u)
    return tl.where(valid, u, 0.0)


@triton.jit
def siglip_dlogit(s, positive, valid, POS_COEF: tl.constexpr):
    """The SigLIP dlogit per unit of the loss weight (maths::siglip_dlogit, w folded out):
    U = sigmoid(s) - POS_COEF [positive], 0 outside `valid` (POS_COEF = 0: negatives only)."""
    u = sigmoid(s)
    if POS_COEF != 0:
        u = tl.where(positive, u - POS_COEF, u)
    return tl.where(valid, u, 0.0)


@triton.jit
def ds_operand(u, dtype):
    """A dlogit tile as the operand of the gradient product: rounded to the 16-bit input
    dtype for the tensor cores (as flash-attention does; U is O(1), so nothing underflows),
    kept in float32 for float32 inputs."""
    return u.to(dtype)


# ----------------------------------------------------------------------------- Gram formulation
@triton.jit
def gram_mixed_dot(w_a, w_b, g_i, g_t):
    """<X_x, M_y> = w_a[y] <X_x, I_y> + w_b[y] <X_x, T_y>: a row's dot product with the mixed
    negative M_y = w_a I_y + w_b T_y from two Gram entries, without M (docs/maths.md, section
    9.4). s_m times it is A_xy (X = I) or B_xy (X = T), for y != x."""
    return w_a * g_i + w_b * g_t


@triton.jit
def gram_s_blocks(da, da_t, db, db_t, dc, dc_t, wa_p, wb_p, wa_q, wb_q, f_m, f_c,
                  WITH_CLIP: tl.constexpr):
    """The four blocks of S = dG + dG^T at the Gram entry [p, q] (docs/maths.md, section 9.4)
    from the unit dlogits of both orientations (da = dA'_pq, da_t = dA'_qp, db = dB'_pq,
    db_t = dB'_qp, dc = dC'_pq, dc_t = dC'_qp), the slerp weights of p and q, and the factors
    f_m, f_c of the m^2 and CLIP terms:
        S_II = f_m (da w_a[q] + da_t w_a[p])
        S_IT = f_m (da w_b[q] + db_t w_a[p]) + f_c dc
        S_TI = f_m (db w_a[q] + da_t w_b[p]) + f_c dc_t
        S_TT = f_m (db w_b[q] + db_t w_b[p])
    (without CLIP, dc and dc_t are not read)."""
    s_ii = f_m * (da * wa_q + da_t * wa_p)
    s_it = f_m * (da * wb_q + db_t * wa_p)
    s_ti = f_m * (db * wa_q + da_t * wb_p)
    s_tt = f_m * (db * wb_q + db_t * wb_p)
    if WITH_CLIP:
        s_it += f_c * dc
        s_ti += f_c * dc_t
    return s_ii, s_it, s_ti, s_tt


# ----------------------------------------------------------------------------- DiVE
@triton.jit
def dive_avl_term(u, v, m):
    """AVL term of one coordinate: (u - m)^2 + (v - m)^2 (docs/maths.md, section 4)."""
    return (u - m) * (u - m) + (v - m) * (v - m)


@triton.jit
def dive_pvl_term(u, v):
    """PVL term of one coordinate: (u - v)^2 (docs/maths.md, section 4)."""
    return (u - v) * (u - v)


@triton.jit
def dive_grads(u, v, m, w_a, w_p):
    """(du, dv) of w_a AVL + w_p PVL for one coordinate (docs/maths.md, section 4; m constant)."""
    w = u - v
    return 2.0 * (w_a * (u - m) + w_p * w), 2.0 * (w_a * (v - m) - w_p * w)
