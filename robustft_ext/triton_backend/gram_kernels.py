"""Triton kernels of the symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md, section
9.4): every logit of both terms from the Gram entries of the 2n rows [I; T] and the slerp
weights, with no mixed-negative buffer M. The Triton counterpart of csrc/cuda/gram_device.cuh
(and csrc/cpu/gram_cpu.cpp); step_ops.py launches them, maths.py holds their per-entry maths.

Notation as csrc/step_kernels.h: a tile of rows p against columns q holds the four Gram blocks
  G_II = <I_p, I_q>,  G_IT = <I_p, T_q>,  G_TI = <T_p, I_q>,  G_TT = <T_p, T_q>,
four tensor-core products (16-bit inputs stay 16-bit into tl.dot, float32 accumulation; float32
inputs as the other kernels: maths.mma), and gives the logits of both orientations, with the
slerp weights w_a, w_b (maths.gram_mixed_dot):
  direct (row p, column q):      A_pq = s_m (w_a[q] G_II + w_b[q] G_IT),
                                 B_pq = s_m (w_a[q] G_TI + w_b[q] G_TT),  C_pq = s_c G_IT
  transposed (row q, column p):  A_qp = s_m (w_a[p] G_II + w_b[p] G_TI),
                                 B_qp = s_m (w_a[p] G_IT + w_b[p] G_TT),  C_qp = s_c G_TI
and the true pair diag[p] = s_m <I_p, T_p> replaces A_pp and B_pp.

Counting each ordered pair once, entry by entry: in the forward an entry with p < q serves both
orientations, p == q the direct one, p > q none; in a backward strip of rows [r0, r1) against
the columns [r0, n) every entry forms its S entries, and the sums take both orientations of the
entries with q >= r1 and the direct one of the others.

Kernels:
  gram_lse_kernel     forward: the tiles on and above the diagonal (square BLOCK_M tiles,
                      numbered row block by row block, maths.triangle_tile), dealt out to
                      NPROG persistent programs as equal runs of consecutive tiles, so the
                      triangle is balanced. Each tile folds its direct orientation into its
                      rows' states and its transposed one into its columns' states: the
                      program's partial log-sum-exp states [NPROG, NSTAT, n]
                      (maths.lse_partials_update along either axis of the tile), merged by
                      the host in a fixed order (maths.merge_lse_partials), as the CLIP
                      forward's column partials are. No atomics: bitwise deterministic.
  gram_strip_kernel   backward, one strip of rows [r0, r0 + R): per tile the four blocks of
                      S = dG + dG^T (maths.gram_s_blocks) into the workspace, interleaved as
                      the 2n rows [I_0; T_0; I_1; T_1; ...] (row 2p + k, column 2q + l for the
                      block (k, l)), so that the library GEMMs of step_ops.py take the strip's
                      gradient as one product dX = S X and its transposed part as another;
                      per tile the two scale sums, and the column sums u of the weight path
                      as per-tile partials (rows: one slot per column tile; columns past the
                      strip's rows: one slot per row tile), added up by the host in a fixed
                      order.
"""
import triton
import triton.language as tl

from . import maths


@triton.jit
def _gram_blocks(I, T, rows, cols, row_ok, col_ok, D, stride,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # (G_II, G_IT, G_TI, G_TT) [BLOCK_M, BLOCK_N] float32 of rows p against columns q, in one
    # loop over D in BLOCK_D chunks: each loaded chunk serves two products. Out-of-range rows,
    # columns and features load as 0.
    gii = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    git = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gti = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gtt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    r_off = rows.to(tl.int64)[:, None] * stride
    c_off = cols.to(tl.int64)[None, :] * stride
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p_mask = row_ok[:, None] & d_ok[None, :]
        q_mask = d_ok[:, None] & col_ok[None, :]
        ip = tl.load(I + r_off + d[None, :], mask=p_mask, other=0.0)
        tp = tl.load(T + r_off + d[None, :], mask=p_mask, other=0.0)
        iq = tl.load(I + c_off + d[:, None], mask=q_mask, other=0.0)
        tq = tl.load(T + c_off + d[:, None], mask=q_mask, other=0.0)
        gii = maths.mma(ip, iq, gii, DOT_PREC, UPCAST)
        git = maths.mma(ip, tq, git, DOT_PREC, UPCAST)
        gti = maths.mma(tp, iq, gti, DOT_PREC, UPCAST)
        gtt = maths.mma(tp, tq, gtt, DOT_PREC, UPCAST)
    return gii, git, gti, gtt


@triton.jit
def _weights(weights_f64, idx, ok, n):
    # The slerp weights (w_a, w_b) of rows idx in float32 (0 past the end).
    w_a = tl.load(weights_f64 + idx, mask=ok, other=0.0).to(tl.float32)
    w_b = tl.load(weights_f64 + n + idx, mask=ok, other=0.0).to(tl.float32)
    return w_a, w_b


# ----------------------------------------------------------------------------- forward
@triton.jit
def gram_lse_kernel(
    I, T,
    weights_f64,          # [4, n] f64: w_a, w_b, dw_a/dc, dw_b/dc (the first two read)
    diag_ptr,             # [n] f32: the true pairs s_m <I_p, T_p>
    m2_scale_ptr, clip_scale_ptr,
    part_max_ptr,         # [NPROG, NSTAT, n] f32 in/out (-inf): each program's partial maxima
    part_sum_ptr,         # [NPROG, NSTAT, n] f32 in/out (0): its sums of exp(x - maximum)
    n, D, stride, tiles_per_program,
    WITH_CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The log-sum-exps of A, B (and C, WITH_CLIP) from the triangle of tiles, as the partial
    states of statistic s (NSTAT = 4 with CLIP, else 2) of index x:
      s = 0: LSE_y A_xy,  1: LSE_y B_xy,  2: LSE_y C_xy,  3: LSE_y C_yx
    (step_kernels.h's lse layout). A tile's entries fold, as the orientations they serve,
      into the states of its rows p:    A_pq (0), B_pq (1), C_pq (2), C_qp (3),
      into the states of its columns q: A_qp (0), B_qp (1), C_qp (2), C_pq (3).
    Program pid takes the tiles [pid tiles_per_program, (pid + 1) tiles_per_program) of
    maths.triangle_tile's order (square tiles: BLOCK_M == BLOCK_N)."""
    tl.static_assert(BLOCK_M == BLOCK_N, "the triangle's tiles are square")
    NSTAT: tl.constexpr = 4 if WITH_CLIP else 2
    pid = tl.program_id(0)
    nb = tl.cdiv(n, BLOCK_M)
    t_begin = pid * tiles_per_program
    t_end = tl.minimum(nb * (nb + 1) // 2, t_begin + tiles_per_program)
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr) if WITH_CLIP else 0.0
    base = pid.to(tl.int64) * NSTAT * n
    offs = tl.arange(0, BLOCK_M)
    i, j = maths.triangle_tile(t_begin, nb)
    for _ in range(t_begin, t_end):
        rows = i * BLOCK_M + offs
        cols = j * BLOCK_N + offs
        row_ok = rows < n
        col_ok = cols < n
        gii, git, gti, gtt = _gram_blocks(I, T, rows, cols, row_ok, col_ok, D, stride,
                                          BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
        wa_p, wb_p = _weights(weights_f64, rows, row_ok, n)
        wa_q, wb_q = _weights(weights_f64, cols, col_ok, n)
        dg = tl.load(diag_ptr + rows, mask=row_ok, other=0.0)
        direct = col_ok[None, :] & (rows[:, None] <= cols[None, :])
        both = col_ok[None, :] & (rows[:, None] < cols[None, :])
        pair = rows[:, None] == cols[None, :]
        # A, then B: the direct orientation into the rows' states, the transposed one into
        # the columns'.
        a = s_m * maths.gram_mixed_dot(wa_q[None, :], wb_q[None, :], gii, git)
        a = tl.where(direct, tl.where(pair, dg[:, None], a), float("-inf"))
        maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + rows, row_ok, a, 1)
        a = s_m * maths.gram_mixed_dot(wa_p[:, None], wb_p[:, None], gii, gti)
        a = tl.where(both, a, float("-inf"))
        maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + cols, col_ok, a, 0)
        b = s_m * maths.gram_mixed_dot(wa_q[None, :], wb_q[None, :], gti, gtt)
        b = tl.where(direct, tl.where(pair, dg[:, None], b), float("-inf"))
        maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + n + rows, row_ok, b, 1)
        b = s_m * maths.gram_mixed_dot(wa_p[:, None], wb_p[:, None], git, gtt)
        b = tl.where(both, b, float("-inf"))
        maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + n + cols, col_ok, b, 0)
        if WITH_CLIP:
            # C_pq: row state 2 of p, column state 3 of q; C_qp: row state 2 of q, column
            # state 3 of p.
            c = tl.where(direct, s_c * git, float("-inf"))
            maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + 2 * n + rows,
                                      row_ok, c, 1)
            maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + 3 * n + cols,
                                      col_ok, c, 0)
            c = tl.where(both, s_c * gti, float("-inf"))
            maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + 2 * n + cols,
                                      col_ok, c, 0)
            maths.lse_partials_update(part_max_ptr, part_sum_ptr, base + 3 * n + rows,
                                      row_ok, c, 1)
        i, j = maths.triangle_next(i, j, nb)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _lse_rows(lse_ptr, idx, ok, n, WITH_CLIP: tl.constexpr):
    # The four statistics of rows idx (the CLIP ones 0 without CLIP).
    la = tl.load(lse_ptr + idx, mask=ok, other=0.0)
    lb = tl.load(lse_ptr + n + idx, mask=ok, other=0.0)
    lr = la * 0.0
    lc = la * 0.0
    if WITH_CLIP:
        lr = tl.load(lse_ptr + 2 * n + idx, mask=ok, other=0.0)
        lc = tl.load(lse_ptr + 3 * n + idx, mask=ok, other=0.0)
    return la, lb, lr, lc


@triton.jit
def gram_strip_kernel(
    I, T,
    weights_f64,          # [4, n] f64: w_a, w_b, dw_a/dc, dw_b/dc (the first two read)
    m2_scale_ptr, clip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    factor_ptr,           # [2] f32: f_m, f_c, the strip's factors (a_m, a_c over their norm)
    DS,                   # [2 R, stride_ds] out: S of the strip, interleaved (docstring)
    stats_ptr,            # [NTILE, 2] f32 out: per tile, sum dA' A / s_m + dB' B / s_m and
                          #   sum dC' C / s_c over the ordered pairs the tile serves
    u_row_ptr,            # [cdiv(n - r0, BLOCK_N), 2, stride_ur] f32 out: per column tile,
                          #   u_I, u_T of the strip's rows p (their transposed pairs)
    u_col_ptr,            # [cdiv(R, BLOCK_M), 2, stride_uc] f32 out: per row tile, u_I, u_T
                          #   of the columns q >= r0 + R (their direct pairs; 0 below)
    r0, R, n, D, stride, stride_ds, stride_ur, stride_uc,
    WITH_CLIP: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of the strip of rows p in [r0, r1), r1 = r0 + R, against
    the columns q in [r0, n) (csrc/step_kernels.h, gram_strip), in grouped order. With the
    unit dlogits dA'_pq = exp(A_pq - lse[0][p]) (0 for q == p), dB' likewise,
    dC'_pq = (exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])) / 2 - [p == q] (maths.clip_dlogit
    halved) of both orientations, it stores the four blocks of S (maths.gram_s_blocks) at
    DS[2 (p - r0) + k, 2 (q - r0) + l], rounded to the workspace dtype, and the partial sums
    of the stats and of the weight path's column sums
      u_I[y] = sum_x dA'_xy <I_y, I_x> + dB'_xy <I_y, T_x>,  u_T[y] likewise with T_y:
    the transposed pairs (q, p) of every entry go to u[p] (a row sum), the direct pairs (p, q)
    of the entries with q >= r1 to u[q] (a column sum)."""
    pid = tl.program_id(0)
    W = n - r0
    r1 = r0 + R
    pm, pn = maths.grouped_tile(pid, tl.cdiv(R, BLOCK_M), tl.cdiv(W, BLOCK_N), GROUP_M)
    local_r = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    local_c = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = r0 + local_r
    cols = r0 + local_c
    row_ok = (local_r < R) & (rows < n)
    col_ok = cols < n
    gii, git, gti, gtt = _gram_blocks(I, T, rows, cols, row_ok, col_ok, D, stride,
                                      BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr) if WITH_CLIP else 0.0
    f_m = tl.load(factor_ptr)
    f_c = tl.load(factor_ptr + 1) if WITH_CLIP else 0.0
    wa_p, wb_p = _weights(weights_f64, rows, row_ok, n)
    wa_q, wb_q = _weights(weights_f64, cols, col_ok, n)
    la_p, lb_p, lr_p, lc_p = _lse_rows(lse_ptr, rows, row_ok, n, WITH_CLIP)
    la_q, lb_q, lr_q, lc_q = _lse_rows(lse_ptr, cols, col_ok, n, WITH_CLIP)
    valid = row_ok[:, None] & col_ok[None, :]
    pair = rows[:, None] == cols[None, :]
    both = valid & (cols >= r1)[None, :]
    off = valid & ~pair
    # The m^2 dlogits of both orientations (0 on the true pair, handled apart).
    dot_a = maths.gram_mixed_dot(wa_q[None, :], wb_q[None, :], gii, git)
    dot_at = maths.gram_mixed_dot(wa_p[:, None], wb_p[:, None], gii, gti)
    dot_b = maths.gram_mixed_dot(wa_q[None, :], wb_q[None, :], gti, gtt)
    dot_bt = maths.gram_mixed_dot(wa_p[:, None], wb_p[:, None], git, gtt)
    da = maths.clip_dlogit(s_m * dot_a, la_p[:, None], la_p[:, None], pair, off, True, False, 0)
    da_t = maths.clip_dlogit(s_m * dot_at, la_q[None, :], la_q[None, :], pair, off, True, False,
                             0)
    db = maths.clip_dlogit(s_m * dot_b, lb_p[:, None], lb_p[:, None], pair, off, True, False, 0)
    db_t = maths.clip_dlogit(s_m * dot_bt, lb_q[None, :], lb_q[None, :], pair, off, True, False,
                             0)
    stat_m = tl.sum(tl.sum(da * dot_a + db * dot_b
                           + tl.where(both, da_t * dot_at + db_t * dot_bt, 0.0), axis=1), axis=0)
    dc = da
    dc_t = da
    stat_c = 0.0
    if WITH_CLIP:
        dc = 0.5 * maths.clip_dlogit(s_c * git, lr_p[:, None], lc_q[None, :], pair, valid,
                                     True, True, 2)
        dc_t = 0.5 * maths.clip_dlogit(s_c * gti, lr_q[None, :], lc_p[:, None], pair, valid,
                                       True, True, 2)
        stat_c = tl.sum(tl.sum(dc * git + tl.where(both, dc_t * gti, 0.0), axis=1), axis=0)
    tl.store(stats_ptr + 2 * pid, stat_m)
    tl.store(stats_ptr + 2 * pid + 1, stat_c)
    # The weight path's column sums: the transposed pairs of every entry by row, the direct
    # pairs of the entries past the strip's rows by column.
    u_off = pn.to(tl.int64) * 2 * stride_ur + local_r
    tl.store(u_row_ptr + u_off, tl.sum(da_t * gii + db_t * git, axis=1), mask=row_ok)
    tl.store(u_row_ptr + u_off + stride_ur, tl.sum(da_t * gti + db_t * gtt, axis=1),
             mask=row_ok)
    u_off = pm.to(tl.int64) * 2 * stride_uc + local_c
    tl.store(u_col_ptr + u_off, tl.sum(tl.where(both, da * gii + db * gti, 0.0), axis=0),
             mask=col_ok)
    tl.store(u_col_ptr + u_off + stride_uc,
             tl.sum(tl.where(both, da * git + db * gtt, 0.0), axis=0), mask=col_ok)
    # S, interleaved: row 2 (p - r0) holds (S_II, S_IT) of p, column by column, row
    # 2 (p - r0) + 1 (S_TI, S_TT).
    s_ii, s_it, s_ti, s_tt = maths.gram_s_blocks(da, da_t, db, db_t, dc, dc_t,
                                                 wa_p[:, None], wb_p[:, None],
                                                 wa_q[None, :], wb_q[None, :], f_m, f_c,
                                                 WITH_CLIP)
    c2 = 2 * pn * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    mask = row_ok[:, None] & (c2 < 2 * W)[None, :]
    ds_off = (2 * local_r).to(tl.int64)[:, None] * stride_ds + c2[None, :]
    ws = DS.dtype.element_ty
    tl.store(DS + ds_off, maths.ds_operand(tl.interleave(s_ii, s_it), ws), mask=mask)
    tl.store(DS + ds_off + stride_ds, maths.ds_operand(tl.interleave(s_ti, s_tt), ws), mask=mask)
