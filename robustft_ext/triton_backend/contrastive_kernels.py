"""Triton kernels of the fused contrastive losses (docs/maths.md, sections 1-2).

Only @triton.jit code lives here; the op bodies that launch these kernels are in
contrastive_ops.py, the per-entry maths in maths.py. Conventions (the Triton counterpart of
csrc/contrastive_kernels.h):

* One "view" of a loss has rows P [n, D] and columns Q [m, D], both contiguous in the
  feature dimension with row strides stride_p / stride_q and one dtype (float32, bfloat16 or
  float16). Its logits are S_pq = scale * <P_p, Q_q> + bias, accumulated in float32.
* scale, bias and grad_loss are read from 0-d float32 tensors (no host synchronisation).
* Nothing of size n x m is ever written by the forward or the register-resident backward:
  logit tiles of BLOCK_M x BLOCK_N live in registers and are recomputed in the backward. The
  large-D backward writes dS row chunks into the bounded workspace (contrastive_dlogit_kernel).
* No atomics: every buffer element has exactly one writing program, and partial results are
  merged afterwards in a fixed order, so every result is bitwise deterministic.

Compile-time switches shared by the kernels:
  ONE_CHUNK  D <= BLOCK_D: the row tile P is loaded once per row block and every logit tile
             is one tl.dot, so the software pipeline runs over the column tiles (as in
             flash-attention). Otherwise each logit tile loops over D in BLOCK_D chunks and
             the pipeline runs over those chunks (as in a GEMM).
  DOT_PREC / UPCAST  see maths.mma.
"""
import triton
import triton.language as tl

from . import maths


@triton.jit
def dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """<P_p, Q_q> for a BLOCK_M x BLOCK_N tile in float32, looping over D in BLOCK_D chunks
    (P chunk [BLOCK_M, BLOCK_D] @ Q chunk loaded transposed [BLOCK_D, BLOCK_N]).
    Out-of-range rows / columns / features load as 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    p_base = P + rows.to(tl.int64)[:, None] * stride_p
    q_base = Q + cols.to(tl.int64)[None, :] * stride_q
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p = tl.load(p_base + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qt = tl.load(q_base + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = maths.mma(p, qt, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _row_tile(P, rows, row_ok, D, stride_p, BLOCK_D: tl.constexpr):
    # The [BLOCK_M, BLOCK_D] tile of rows `rows` of P (one chunk: D <= BLOCK_D).
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(P + rows.to(tl.int64)[:, None] * stride_p + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _logit_dots(P, Q, p_tile, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                ONE_CHUNK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # <P_p, Q_q> of one tile: one dot with the resident row tile (ONE_CHUNK), or dot_tile.
    if ONE_CHUNK:
        offs_d = tl.arange(0, BLOCK_D)
        qt = tl.load(Q + cols.to(tl.int64)[None, :] * stride_q + offs_d[:, None],
                     mask=(offs_d < D)[:, None] & col_ok[None, :], other=0.0)
        return maths.mma(p_tile, qt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                         DOT_PREC, UPCAST)
    else:
        return dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)


@triton.jit
def clip_lse_kernel(
    P, Q, scale_ptr, bias_ptr,
    row_lse_ptr,          # [n] f32 out: LSE_q S_pq
    col_max_ptr,          # [NPROG, m] f32 in/out (WITH_COL): this program's running column max
    col_sum_ptr,          # [NPROG, m] f32 in/out (WITH_COL): its sum of exp(S - col max)
    pos_ptr,              # [cdiv(n, BLOCK_M)] f32 out: each row block's sum of its positive logits
    n, m, D, stride_p, stride_q, pos_offset, NPROG,
    WITH_COL: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """CLIP forward statistics in one pass over the logit tiles.

    Grid: NPROG persistent programs; program `pid` owns the row blocks pid, pid + NPROG, ...
    For each of its row blocks it streams the column tiles (BLOCK_N wide) of S and keeps an
    online log-sum-exp per row (maths.lse_update); at the end of the row block it writes
    row_lse. With WITH_COL it also folds each tile into its own row of the [NPROG, m] column
    partials (maths.lse_partials_update); the host merges them (maths.merge_lse_partials).
    It also sums each row block's positive logits S_{p, p + pos_offset} into pos_ptr[rb]
    (per row block rather than per program: nothing stays live across row blocks).
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    num_rb = tl.cdiv(n, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_base = pid.to(tl.int64) * m
    for rb in range(pid, num_rb, NPROG):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n
        p_tile = _row_tile(P, rows, row_ok, D, stride_p, BLOCK_D) if ONE_CHUNK else None
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pos_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for cb in range(0, m, BLOCK_N):
            cols = cb + offs_n
            col_ok = cols < m
            dot = _logit_dots(P, Q, p_tile, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                              ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            valid = row_ok[:, None] & col_ok[None, :]
            s = tl.where(valid, scale * dot + bias, float("-inf"))
            is_pos = valid & ((cols[None, :] - rows[:, None]) == pos_offset)
            pos_acc += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
            m_i, l_i = maths.lse_update(m_i, l_i, s)
            if WITH_COL:
                maths.lse_partials_update(col_max_ptr, col_sum_ptr, col_base + cols, col_ok, s, 0)
        tl.store(row_lse_ptr + rows, maths.lse_final(m_i, l_i, row_ok), mask=row_ok)
        tl.store(pos_ptr + rb, tl.sum(pos_acc, axis=0))


@triton.jit
def siglip_softplus_sum_kernel(
    P, Q, scale_ptr, bias_ptr,
    partial_ptr,          # [NPROG] f32 out: this program's sum of the per-entry losses
    n, m, D, stride_p, stride_q, NPROG,
    HAS_POS: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """SigLIP forward: sum_pq -log sigmoid(z_pq S_pq) (maths.siglip_term), positives on the
    diagonal (HAS_POS).

    Grid: NPROG persistent programs, program `pid` owning the row blocks pid, pid + NPROG, ...
    and streaming their column tiles; each writes one partial sum.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    num_rb = tl.cdiv(n, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for rb in range(pid, num_rb, NPROG):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n
        p_tile = _row_tile(P, rows, row_ok, D, stride_p, BLOCK_D) if ONE_CHUNK else None
        for cb in range(0, m, BLOCK_N):
            cols = cb + offs_n
            col_ok = cols < m
            dot = _logit_dots(P, Q, p_tile, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                              ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            s = scale * dot + bias
            if HAS_POS:
                term = maths.siglip_term(s, rows[:, None] == cols[None, :])
            else:
                term = maths.softplus(s)
            acc += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], term, 0.0), axis=1)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _unit_dlogits(dot, scale, bias, rows, cols, row_ok, col_ok, r, c, pos_offset,
                  SIGLIP: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                  POS_COEF: tl.constexpr):
    # The unit-weight dlogits U of one tile (maths.clip_dlogit / maths.siglip_dlogit),
    # positives at q - p == pos_offset; r [BLOCK_M] and c [BLOCK_N] are the row / column LSE.
    valid = row_ok[:, None] & col_ok[None, :]
    s = scale * dot + bias
    positive = (cols[None, :] - rows[:, None]) == pos_offset
    if SIGLIP:
        return maths.siglip_dlogit(s, positive, valid, POS_COEF)
    else:
        r_rows = r[:, None] if HAS_ROW else None
        c_cols = c[None, :] if HAS_COL else None
        return maths.clip_dlogit(s, r_rows, c_cols, positive, valid, HAS_ROW, HAS_COL, POS_COEF)


@triton.jit
def contrastive_grad_rows_kernel(
    P, Q, scale_ptr, bias_ptr, g_ptr,
    row_lse_ptr,          # [n] f32 (HAS_ROW)
    col_lse_ptr,          # [m] f32 (HAS_COL)
    grad_ptr,             # [n, D] f32 out: grad_P
    stats_ptr,            # [grid, 2] f32 out (WANT_STATS): partial sum dS*<P,Q>, sum dS
    n, m, D, stride_p, stride_q, stride_g, pos_offset, norm,
    SIGLIP: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    POS_COEF: tl.constexpr, WANT_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The register-resident backward of one view (D <= BLOCK_D): grad_P = scale * dS @ Q,
    plus the scalar-gradient partials.

    dS = (g / norm) * U with the unit-weight dlogit U of _unit_dlogits. (Symmetric CLIP:
    norm = 2n, POS_COEF = 2; one-sided CLIP: norm = n, POS_COEF = 1; SigLIP: norm = n,
    POS_COEF = 1, or 0 if negative_only.)

    Grid: one program per BLOCK_M row block of P. Its row tile and its [BLOCK_M, BLOCK_D]
    float32 gradient accumulator stay in registers while it streams the column tiles of Q:
    recompute the logit tile (one dot), form U, round it to the input dtype
    (maths.ds_operand) and add U @ Q_tile (a second dot on the same Q tile). Each gradient
    row is stored once, at the end.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    gw = tl.load(g_ptr) / norm
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) if HAS_ROW else None
    p_tile = _row_tile(P, rows, row_ok, D, stride_p, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    st_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    st_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for cb in range(0, m, BLOCK_N):
        cols = cb + offs_n
        col_ok = cols < m
        qt = tl.load(Q + cols.to(tl.int64)[None, :] * stride_q + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        dot = maths.mma(p_tile, qt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                        DOT_PREC, UPCAST)
        c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) if HAS_COL else None
        u = _unit_dlogits(dot, scale, bias, rows, cols, row_ok, col_ok, r, c, pos_offset,
                          SIGLIP, HAS_ROW, HAS_COL, POS_COEF)
        if WANT_STATS:
            st_dot += tl.sum(u * dot, axis=1)
            st_sum += tl.sum(u, axis=1)
        acc = maths.mma(maths.ds_operand(u, P.dtype.element_ty), tl.trans(qt), acc,
                        DOT_PREC, UPCAST)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * stride_g + offs_d[None, :],
             acc * (gw * scale), mask=row_ok[:, None] & d_ok[None, :])
    if WANT_STATS:
        tl.store(stats_ptr + 2 * pid, tl.sum(st_dot, axis=0) * gw)
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(st_sum, axis=0) * gw)


@triton.jit
def contrastive_dlogit_kernel(
    P, Q, scale_ptr, bias_ptr,
    row_lse_ptr,          # [n] f32 (HAS_ROW)
    col_lse_ptr,          # [m] f32 (HAS_COL)
    DS,                   # [>= chunk rows, m] out: U of rows row0 .. row0 + chunk - 1
    stats_ptr,            # [grid, 2] f32 out: partial sums of U * <P, Q> and of U
    row0, chunk, n, m, D, stride_p, stride_q, stride_ds, pos_offset,
    SIGLIP: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    POS_COEF: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The dS pass of the large-D backward: one row chunk of the unit dlogits into the
    workspace, for library GEMMs (contrastive_ops.py: dP = s (g / norm) U Q,
    dQ += s (g / norm) U^T P).

    Grid: one program per BLOCK_M x BLOCK_N tile of the chunk's [chunk, m] block, in grouped
    order (GROUP_M row blocks share their column tiles in L2, as in Triton's matmul tutorial).
    Each program recomputes its logit tile on the tensor cores (dot_tile, a pipelined loop
    over D), forms U in float32 (_unit_dlogits: O(1), the loss weight g / norm and the scale
    folded out, so 16 bits neither underflow nor lose the small entries' relative
    precision), adds its tile's sums of U <P, Q> and U to the scalar-gradient partials (from
    the float32 U), and stores U rounded to DS's dtype (the input dtype for 16-bit inputs, as
    flash-attention rounds P; float32 otherwise). Nothing is read back: no read-modify-write.
    """
    pid = tl.program_id(0)
    pm, pn = maths.grouped_tile(pid, tl.cdiv(chunk, BLOCK_M), tl.cdiv(m, BLOCK_N), GROUP_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    local = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_ok = (local < chunk) & (rows < n)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < m
    dot = dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                   BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) if HAS_ROW else None
    c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) if HAS_COL else None
    u = _unit_dlogits(dot, scale, bias, rows, cols, row_ok, col_ok, r, c, pos_offset,
                      SIGLIP, HAS_ROW, HAS_COL, POS_COEF)
    tl.store(stats_ptr + 2 * pid, tl.sum(tl.sum(u * dot, axis=1), axis=0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(u, axis=1), axis=0))
    tl.store(DS + local.to(tl.int64)[:, None] * stride_ds + cols[None, :],
             maths.ds_operand(u, DS.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
