"""Triton kernels of a robust fine-tuning step: CLIP, m^2-mix, Lipsum-FT and DiVE
(docs/maths.md, sections 1, 3, 4, 5) from one pass over the data.

Only @triton.jit code lives here; the op bodies (slerp prologue, O(n D) diagonal and slerp
backward terms, assembling the losses) are in step_ops.py. The Triton counterpart of
csrc/step_kernels.h, whose notation this follows:

Training batch: n pairs (I_p, T_p) and, for m^2-mix, the mixed negatives
M_q = slerp(I_q, T_q; lam) (an n x D buffer the op body builds; the kernels only read it):
  A_pq = s_m <I_p, M_q>  (q != p),   A_pp = diag[p]     (the true pair, s_m <I_p, T_p>)
  B_pq = s_m <T_p, M_q>  (q != p),   B_pp = diag[p]                              (WITH_M2)
  C_pq = s_c <I_p, T_q>                                                        (WITH_CLIP)
  V_pk = s_l <I_p - P_p, G_k>, k < K  (P the pre-trained image features, G the random
                                       texts' features)                      (WITH_LIPSUM)
Reference batch (WITH_DIVE): B' rows, u_j = fi_j - pi_j, v_j = ft_j - pt_j, centre m.

I, T, M, P, G and the four reference matrices are contiguous and share one dtype (float32,
bfloat16, float16); scales, lse, diag, the centre and the upstream gradients are float32.
The four terms are compile-time switches (constexpr WITH_M2 / WITH_CLIP / WITH_LIPSUM /
WITH_DIVE, and WITH_TILES = WITH_M2 or WITH_CLIP): a launch compiles only the code of the
terms it has, so m2mix, lipsum, dive and robust_step ops are all launches of these kernels.

Conventions as kernels.py: logit tiles of BLOCK_M x BLOCK_N (and Lipsum tiles of
BLOCK_M x BLOCK_N random texts) live in registers and are recomputed in the backward (nothing
of size n x n or n x K is written); no atomics (every buffer element has one writing
program; per-program partials are merged afterwards by the host in a fixed order); DOT_PREC /
UPCAST / LOWP_DS as there. The Lipsum dots take the difference I - P in float32 and run as
float32 "ieee" dots whatever the input dtype (I - P is small: rounding it back to 16 bits
would lose its leading bits).

Kernels (the grids put the training-row programs first, the DiVE programs after them):
  step_fwd_kernel        forward: programs 0 .. NROW-1 own training row blocks: row LSE of
                         A, B, C and the column LSE partials of C, then sum V^2 over their
                         rows; programs NROW .. NROW+NDIVE-1 own reference row blocks: the
                         AVL / PVL sums and the column sums of (u + v) / 2.
  step_grad_rows_kernel  backward, owner p: grad_I (m^2, CLIP and Lipsum), grad_T, the
                         scale-gradient partials; the DiVE programs: grad_fi, grad_ft.
  step_grad_cols_kernel  backward, owner q: grad_M, grad_Tc (the CLIP gradient of T); only
                         launched with m^2 or CLIP.
The diagonal entries of A and B are excluded from both backward passes: their gradient flows
to T_p / I_p (not M_p) and is added in O(n D) by the op body.
"""
import triton
import triton.language as tl

from .kernels import _mma


@triton.jit
def _three_dots(P1, P2, Q1, Q2, rows, cols, row_ok, col_ok, D, stride,
                NEED21: tl.constexpr, NEED12: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The tiles <P1_r, Q1_c>, <P2_r, Q1_c> (NEED21) and <P1_r, Q2_c> (NEED12), each
    # BLOCK_M x BLOCK_N in float32, in one loop over D in BLOCK_D chunks that shares the loads
    # (the chunk of P1 and the transposed chunk of Q1 serve two dots each). All four matrices
    # have row stride `stride`; out-of-range rows / columns / features load as 0. Tiles that
    # are not needed stay 0.
    x11 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x21 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x12 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    r_off = rows.to(tl.int64)[:, None] * stride
    c_off = cols.to(tl.int64)[None, :] * stride
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p_mask = row_ok[:, None] & d_ok[None, :]
        q_mask = d_ok[:, None] & col_ok[None, :]
        p1 = tl.load(P1 + r_off + d[None, :], mask=p_mask, other=0.0)
        q1t = tl.load(Q1 + c_off + d[:, None], mask=q_mask, other=0.0)
        x11 = _mma(p1, q1t, x11, DOT_PREC, UPCAST)
        if NEED21:
            p2 = tl.load(P2 + r_off + d[None, :], mask=p_mask, other=0.0)
            x21 = _mma(p2, q1t, x21, DOT_PREC, UPCAST)
        if NEED12:
            q2t = tl.load(Q2 + c_off + d[:, None], mask=q_mask, other=0.0)
            x12 = _mma(p1, q2t, x12, DOT_PREC, UPCAST)
    return x11, x21, x12


@triton.jit
def _row_dots(I, T, M, rows, cols, row_ok, col_ok, D, stride,
              WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # (<I_p, M_q>, <T_p, M_q>, <I_p, T_q>) for rows p, columns q, as the terms need them
    # (the others stay 0): one loop over D.
    if WITH_M2:
        x_im, x_tm, x_it = _three_dots(I, T, M, T, rows, cols, row_ok, col_ok, D, stride,
                                       True, WITH_CLIP, BLOCK_M, BLOCK_N, BLOCK_D,
                                       DOT_PREC, UPCAST)
    else:  # CLIP only
        x_it, x_im, x_tm = _three_dots(I, I, T, T, rows, cols, row_ok, col_ok, D, stride,
                                       False, False, BLOCK_M, BLOCK_N, BLOCK_D,
                                       DOT_PREC, UPCAST)
    return x_im, x_tm, x_it


@triton.jit
def _lipsum_dots(I, P, G, rows, ks, row_ok, k_ok, D, stride, stride_g,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # <I_p - P_p, G_k> for a BLOCK_M x BLOCK_N tile (rows p, random texts k), float32
    # difference and float32 "ieee" dots, looping over D in BLOCK_D chunks.
    x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    r_off = rows.to(tl.int64)[:, None] * stride
    k_off = ks.to(tl.int64)[None, :] * stride_g
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p_mask = row_ok[:, None] & d_ok[None, :]
        i = tl.load(I + r_off + d[None, :], mask=p_mask, other=0.0).to(tl.float32)
        p = tl.load(P + r_off + d[None, :], mask=p_mask, other=0.0).to(tl.float32)
        gt = tl.load(G + k_off + d[:, None], mask=d_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        x = tl.dot(i - p, gt, x, input_precision="ieee")
    return x


@triton.jit
def _lse_update(m_i, l_i, s):
    # One tile of an online row log-sum-exp: (max, sum of exp(s - max)) over axis 1.
    # Masked entries are -inf; the "safe" max (0 where the max is -inf) keeps exp() NaN-free.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
    return m_new, l_new


@triton.jit
def _lse_final(m_i, l_i, row_ok):
    # log-sum-exp from (max, sum); rows past n (l = 0) give log(1) and are not stored.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    return m_safe + tl.log(tl.where(row_ok, l_i, 1.0))


# ----------------------------------------------------------------------------- forward
@triton.jit
def _clip_dlogits(cc, lse_row, lse_col, valid, on_diag):
    """CLIP dlogits of a tile per unit of g_clip / 2n: exp(C - r) + exp(C - c), minus 2 on the
    diagonal (the positives), 0 outside the valid entries. lse_row / lse_col broadcast."""
    u = tl.exp(cc - lse_row) + tl.exp(cc - lse_col)
    return tl.where(valid, tl.where(on_diag, u - 2.0, u), 0.0)


@triton.jit
def _ds_operand(u, dtype, LOWP_DS: tl.constexpr):
    """A dS tile as the gradient product's operand: rounded to the inputs' dtype with LOWP_DS."""
    if LOWP_DS:
        return u.to(dtype)
    return u


@triton.jit
def _fwd_rows(I, T, M, P, G, diag_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
              lse_ptr, col_max_ptr, col_sum_ptr, sums_ptr,
              pid, n, K, D, stride, stride_g, NROW,
              WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
              WITH_LIPSUM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Training-row program `pid` of step_fwd_kernel: row blocks pid, pid + NROW, ...
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr)
    s_l = tl.load(lip_scale_ptr)
    num_rb = tl.cdiv(n, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_base = pid.to(tl.int64) * n
    lip = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for rb in range(pid, num_rb, NROW):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n
        if WITH_TILES:
            if WITH_M2:
                dg = tl.load(diag_ptr + rows, mask=row_ok, other=0.0)
            ma = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            mb = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            mc = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            la = tl.zeros((BLOCK_M,), dtype=tl.float32)
            lb = tl.zeros((BLOCK_M,), dtype=tl.float32)
            lc = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for cb in range(0, n, BLOCK_N):
                cols = cb + offs_n
                col_ok = cols < n
                x_im, x_tm, x_it = _row_dots(I, T, M, rows, cols, row_ok, col_ok, D, stride,
                                             WITH_M2, WITH_CLIP, BLOCK_M, BLOCK_N, BLOCK_D,
                                             DOT_PREC, UPCAST)
                valid = row_ok[:, None] & col_ok[None, :]
                if WITH_M2:
                    on_diag = rows[:, None] == cols[None, :]
                    a = tl.where(valid, tl.where(on_diag, dg[:, None], s_m * x_im),
                                 float("-inf"))
                    b = tl.where(valid, tl.where(on_diag, dg[:, None], s_m * x_tm),
                                 float("-inf"))
                    ma, la = _lse_update(ma, la, a)
                    mb, lb = _lse_update(mb, lb, b)
                if WITH_CLIP:
                    c = tl.where(valid, s_c * x_it, float("-inf"))
                    mc, lc = _lse_update(mc, lc, c)
                    # Column statistics of C: merge this tile into the program's partial
                    # (only this program touches its row of the partials: no atomics).
                    cptr = col_base + cols
                    pm = tl.load(col_max_ptr + cptr, mask=col_ok, other=float("-inf"))
                    ps = tl.load(col_sum_ptr + cptr, mask=col_ok, other=0.0)
                    cm = tl.maximum(pm, tl.max(c, axis=0))
                    cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
                    ps = ps * tl.exp(pm - cm_safe) + tl.sum(tl.exp(c - cm_safe[None, :]), axis=0)
                    tl.store(col_max_ptr + cptr, cm, mask=col_ok)
                    tl.store(col_sum_ptr + cptr, ps, mask=col_ok)
                    # The next row block re-reads these columns, possibly from other threads
                    # of this program (load and store layouts may differ): order them.
                    tl.debug_barrier()
            if WITH_M2:
                tl.store(lse_ptr + rows, _lse_final(ma, la, row_ok), mask=row_ok)
                tl.store(lse_ptr + n + rows, _lse_final(mb, lb, row_ok), mask=row_ok)
            if WITH_CLIP:
                tl.store(lse_ptr + 2 * n + rows, _lse_final(mc, lc, row_ok), mask=row_ok)
        if WITH_LIPSUM:
            # The same rows against the K random texts: sum_k <I_p - P_p, G_k>^2.
            for kb in range(0, K, BLOCK_N):
                ks = kb + offs_n
                x = _lipsum_dots(I, P, G, rows, ks, row_ok, ks < K, D, stride, stride_g,
                                 BLOCK_M, BLOCK_N, BLOCK_D)
                lip += tl.sum(x * x, axis=1)
    if WITH_LIPSUM:
        tl.store(sums_ptr + 3 * pid, tl.sum(lip, axis=0) * s_l * s_l)
    else:
        tl.store(sums_ptr + 3 * pid, 0.0)
    tl.store(sums_ptr + 3 * pid + 1, 0.0)
    tl.store(sums_ptr + 3 * pid + 2, 0.0)


@triton.jit
def _fwd_dive(FI, FT, PI, PT, center_ptr, sums_ptr, diff_ptr, pid, jb, n_ref, D, stride_r,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # DiVE program `pid` of step_fwd_kernel, owning reference rows jb * BLOCK_M + [0, BLOCK_M):
    # sums[pid] = (0, sum_j |u_j - m|^2 + |v_j - m|^2, sum_j |u_j - v_j|^2) and
    # diff[jb, :] = sum_j (u_j + v_j) / 2 over its rows.
    rows = jb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_ref
    r_off = rows.to(tl.int64)[:, None] * stride_r
    offs_d = tl.arange(0, BLOCK_D)
    avl = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pvl = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        mask = r_ok[:, None] & d_ok[None, :]
        off = r_off + d[None, :]
        u = (tl.load(FI + off, mask=mask, other=0.0).to(tl.float32)
             - tl.load(PI + off, mask=mask, other=0.0).to(tl.float32))
        v = (tl.load(FT + off, mask=mask, other=0.0).to(tl.float32)
             - tl.load(PT + off, mask=mask, other=0.0).to(tl.float32))
        m = tl.load(center_ptr + d, mask=d_ok, other=0.0)[None, :]
        um = tl.where(mask, u - m, 0.0)
        vm = tl.where(mask, v - m, 0.0)
        avl += um * um + vm * vm
        w = u - v
        pvl += w * w
        tl.store(diff_ptr + jb.to(tl.int64) * D + d, tl.sum((u + v) * 0.5, axis=0), mask=d_ok)
    tl.store(sums_ptr + 3 * pid, 0.0)
    tl.store(sums_ptr + 3 * pid + 1, tl.sum(tl.sum(avl, axis=1), axis=0))
    tl.store(sums_ptr + 3 * pid + 2, tl.sum(tl.sum(pvl, axis=1), axis=0))


@triton.jit
def step_fwd_kernel(
    I, T, M, diag_ptr, m2_scale_ptr, clip_scale_ptr,   # training batch, m^2 / CLIP
    P, G, lip_scale_ptr,                                # Lipsum-FT
    FI, FT, PI, PT, center_ptr,                         # DiVE reference batch
    lse_ptr,              # [3, n] f32 out: LSE_q A_pq, LSE_q B_pq, LSE_q C_pq (as the terms)
    col_max_ptr,          # [NROW, n] f32 in/out (WITH_CLIP): program's column max of C
    col_sum_ptr,          # [NROW, n] f32 in/out (WITH_CLIP): its sum of exp(C - col max)
    sums_ptr,             # [NROW + NDIVE, 3] f32 out: per-program (sum V^2, AVL sum, PVL sum)
    diff_ptr,             # [NDIVE, D] f32 out: per-DiVE-program column sums of (u + v) / 2
    n, K, n_ref, D, stride, stride_g, stride_r, NROW,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, WITH_DIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Every forward statistic of a step in one launch (step_kernels.h step_fwd).

    Programs 0 .. NROW-1 own the training rows. With CLIP they are persistent (program `pid`
    owns row blocks pid, pid + NROW, ..., and folds each tile's column max / sum of C into its
    row of the [NROW, n] partials, merged by the host); otherwise NROW is the number of row
    blocks. For each row block: the column tiles (one loop over D for <I, M>, <T, M> and
    <I, T>; the diagonal of A and B replaced by diag[p]) with an online log-sum-exp per row
    and logit matrix, then the K Lipsum columns, whose squares are summed. Programs NROW ..
    NROW+NDIVE-1 each own BLOCK_M reference rows (DiVE).
    """
    pid = tl.program_id(0)
    if pid < NROW:
        _fwd_rows(I, T, M, P, G, diag_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
                  lse_ptr, col_max_ptr, col_sum_ptr, sums_ptr,
                  pid, n, K, D, stride, stride_g, NROW,
                  WITH_M2, WITH_CLIP, WITH_TILES, WITH_LIPSUM,
                  BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    else:
        if WITH_DIVE:
            _fwd_dive(FI, FT, PI, PT, center_ptr, sums_ptr, diff_ptr, pid, pid - NROW,
                      n_ref, D, stride_r, BLOCK_M, BLOCK_D)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _grad_rows_batch(
    I, T, M, P, G, g_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr, lse_ptr,
    grad_i_ptr, grad_t_ptr, stats_ptr,
    pid, n, K, D, stride, stride_g, stride_o,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, ONE_CHUNK: tl.constexpr, LOWP_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # Training-row program `pid` of step_grad_rows_kernel (one BLOCK_M row block).
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr)
    s_l = tl.load(lip_scale_ptr)
    norm = 2.0 * n
    g_c = tl.load(g_ptr) / norm          # StepTerm order: clip, m2, lipsum, avl, pvl
    g_m = tl.load(g_ptr + 1) / norm
    f_m = g_m * s_m
    f_c = g_c * s_c
    f_l = tl.load(g_ptr + 2) / (K * 1.0 * n) * s_l * s_l
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_off = rows.to(tl.int64)[:, None] * stride
    gi_rows = grad_i_ptr + rows.to(tl.int64)[:, None] * stride_o
    gt_rows = grad_t_ptr + rows.to(tl.int64)[:, None] * stride_o
    d_ok = offs_d < D
    acc_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_ic = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    st_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    st_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if WITH_TILES:
        if WITH_M2:
            r0 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            r1 = tl.load(lse_ptr + n + rows, mask=row_ok, other=0.0)
        if WITH_CLIP:
            r2 = tl.load(lse_ptr + 2 * n + rows, mask=row_ok, other=0.0)
        if ONE_CHUNK:
            tile_mask = row_ok[:, None] & d_ok[None, :]
            i_tile = tl.load(I + r_off + offs_d[None, :], mask=tile_mask, other=0.0)
            if WITH_M2:
                t_tile = tl.load(T + r_off + offs_d[None, :], mask=tile_mask, other=0.0)
        for cb in range(0, n, BLOCK_N):
            cols = cb + offs_n
            col_ok = cols < n
            c_off = cols.to(tl.int64) * stride
            if ONE_CHUNK:
                qt_mask = d_ok[:, None] & col_ok[None, :]
                zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if WITH_M2:
                    mt = tl.load(M + c_off[None, :] + offs_d[:, None], mask=qt_mask, other=0.0)
                    x_im = _mma(i_tile, mt, zero, DOT_PREC, UPCAST)
                    x_tm = _mma(t_tile, mt, zero, DOT_PREC, UPCAST)
                if WITH_CLIP:
                    tt = tl.load(T + c_off[None, :] + offs_d[:, None], mask=qt_mask, other=0.0)
                    x_it = _mma(i_tile, tt, zero, DOT_PREC, UPCAST)
            else:
                x_im, x_tm, x_it = _row_dots(I, T, M, rows, cols, row_ok, col_ok, D, stride,
                                             WITH_M2, WITH_CLIP, BLOCK_M, BLOCK_N, BLOCK_D,
                                             DOT_PREC, UPCAST)
            valid = row_ok[:, None] & col_ok[None, :]
            on_diag = rows[:, None] == cols[None, :]
            if WITH_M2:
                off = valid & (rows[:, None] != cols[None, :])
                ua = tl.where(off, tl.exp(s_m * x_im - r0[:, None]), 0.0)
                ub = tl.where(off, tl.exp(s_m * x_tm - r1[:, None]), 0.0)
                st_m += tl.sum(ua * x_im + ub * x_tm, axis=1)
                ua_op = _ds_operand(ua, I.dtype.element_ty, LOWP_DS)
                ub_op = _ds_operand(ub, I.dtype.element_ty, LOWP_DS)
            if WITH_CLIP:
                r3 = tl.load(lse_ptr + 3 * n + cols, mask=col_ok, other=0.0)
                uc = _clip_dlogits(s_c * x_it, r2[:, None], r3[None, :], valid, on_diag)
                st_c += tl.sum(uc * x_it, axis=1)
                uc_op = _ds_operand(uc, I.dtype.element_ty, LOWP_DS)
            if ONE_CHUNK:
                if WITH_M2:
                    acc_i = _mma(ua_op, tl.trans(mt), acc_i, DOT_PREC, UPCAST)
                    acc_t = _mma(ub_op, tl.trans(mt), acc_t, DOT_PREC, UPCAST)
                if WITH_CLIP:
                    acc_ic = _mma(uc_op, tl.trans(tt), acc_ic, DOT_PREC, UPCAST)
            else:
                for k in range(0, D, BLOCK_D):
                    d = k + offs_d
                    d_ok2 = d < D
                    q_mask = col_ok[:, None] & d_ok2[None, :]
                    g_mask = row_ok[:, None] & d_ok2[None, :]
                    zero_d = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                    upd_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                    if WITH_M2:
                        mq = tl.load(M + c_off[:, None] + d[None, :], mask=q_mask, other=0.0)
                        upd_i += f_m * _mma(ua_op, mq, zero_d, DOT_PREC, UPCAST)
                        old_t = tl.load(gt_rows + d[None, :], mask=g_mask, other=0.0)
                        tl.store(gt_rows + d[None, :],
                                 old_t + f_m * _mma(ub_op, mq, zero_d, DOT_PREC, UPCAST),
                                 mask=g_mask)
                    if WITH_CLIP:
                        tq = tl.load(T + c_off[:, None] + d[None, :], mask=q_mask, other=0.0)
                        upd_i += f_c * _mma(uc_op, tq, zero_d, DOT_PREC, UPCAST)
                    old_i = tl.load(gi_rows + d[None, :], mask=g_mask, other=0.0)
                    tl.store(gi_rows + d[None, :], old_i + upd_i, mask=g_mask)
                # The next column tile re-reads these gradient rows, possibly from other
                # threads of this program: make the stores visible first.
                tl.debug_barrier()
    # ONE_CHUNK: the tiles' part of grad_I. (Absent terms' scales and upstream gradients
    # are never multiplied in, even by 0: they may be anything.)
    out_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if WITH_M2:
        out_i += acc_i * f_m
    if WITH_CLIP:
        out_i += acc_ic * f_c
    if WITH_LIPSUM:
        # + f_l sum_k <I_p - P_p, G_k> G_k, f_l = g_lipsum / (K n) s_l^2, over the K texts.
        for kb in range(0, K, BLOCK_N):
            ks = kb + offs_n
            k_ok = ks < K
            x = _lipsum_dots(I, P, G, rows, ks, row_ok, k_ok, D, stride, stride_g,
                             BLOCK_M, BLOCK_N, BLOCK_D) * f_l
            k_off = ks.to(tl.int64)[:, None] * stride_g
            if ONE_CHUNK:
                gk = tl.load(G + k_off + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                out_i = tl.dot(x, gk, out_i, input_precision="ieee")
            else:
                for k in range(0, D, BLOCK_D):
                    d = k + offs_d
                    d_ok2 = d < D
                    g_mask = row_ok[:, None] & d_ok2[None, :]
                    gk = tl.load(G + k_off + d[None, :], mask=k_ok[:, None] & d_ok2[None, :],
                                 other=0.0).to(tl.float32)
                    old_i = tl.load(gi_rows + d[None, :], mask=g_mask, other=0.0)
                    tl.store(gi_rows + d[None, :],
                             tl.dot(x, gk, old_i, input_precision="ieee"), mask=g_mask)
                tl.debug_barrier()
    if ONE_CHUNK:
        g_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(gi_rows + offs_d[None, :], out_i, mask=g_mask)
        if WITH_M2:
            tl.store(gt_rows + offs_d[None, :], acc_t * f_m, mask=g_mask)
    if WITH_M2:
        tl.store(stats_ptr + 2 * pid, tl.sum(st_m, axis=0) * g_m)
    else:
        tl.store(stats_ptr + 2 * pid, 0.0)
    if WITH_CLIP:
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(st_c, axis=0) * g_c)
    else:
        tl.store(stats_ptr + 2 * pid + 1, 0.0)


@triton.jit
def _grad_rows_dive(FI, FT, PI, PT, center_ptr, g_ptr, grad_fi_ptr, grad_ft_ptr,
                    jb, n_ref, D, stride_r, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # DiVE program of step_grad_rows_kernel owning reference rows jb * BLOCK_M + [0, BLOCK_M):
    # maths::dive_grads with w_a = g_avl / B', w_p = g_pvl / B' (the centre is a constant).
    w_a = tl.load(g_ptr + 3) / n_ref
    w_p = tl.load(g_ptr + 4) / n_ref
    rows = jb * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_ref
    r_off = rows.to(tl.int64)[:, None] * stride_r
    o_off = rows.to(tl.int64)[:, None] * stride_o
    offs_d = tl.arange(0, BLOCK_D)
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        mask = r_ok[:, None] & d_ok[None, :]
        off = r_off + d[None, :]
        u = (tl.load(FI + off, mask=mask, other=0.0).to(tl.float32)
             - tl.load(PI + off, mask=mask, other=0.0).to(tl.float32))
        v = (tl.load(FT + off, mask=mask, other=0.0).to(tl.float32)
             - tl.load(PT + off, mask=mask, other=0.0).to(tl.float32))
        m = tl.load(center_ptr + d, mask=d_ok, other=0.0)[None, :]
        w = u - v
        tl.store(grad_fi_ptr + o_off + d[None, :], 2.0 * (w_a * (u - m) + w_p * w), mask=mask)
        tl.store(grad_ft_ptr + o_off + d[None, :], 2.0 * (w_a * (v - m) - w_p * w), mask=mask)


@triton.jit
def step_grad_rows_kernel(
    I, T, M, P, G, FI, FT, PI, PT, center_ptr,
    g_ptr,                # [5] f32: upstream gradients (clip, m2, lipsum, avl, pvl)
    m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    grad_i_ptr,           # [n, D] f32 out: grad_I (zero-filled by the host unless ONE_CHUNK)
    grad_t_ptr,           # [n, D] f32 out (WITH_M2): grad_T's row part (likewise)
    stats_ptr,            # [NROW, 2] f32 out: this program's partials of stats[0], stats[1]
    grad_fi_ptr,          # [B', D] f32 out (WITH_DIVE)
    grad_ft_ptr,          # [B', D] f32 out (WITH_DIVE)
    n, K, n_ref, D, stride, stride_g, stride_r, stride_o, stride_ro, NROW,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, WITH_DIVE: tl.constexpr,
    ONE_CHUNK: tl.constexpr, LOWP_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The row pass of the step backward (owner p; and the DiVE rows j), step_kernels.h
    step_grad_rows:
      grad_I[p] = s_m sum_{q != p} dA_pq M_q + s_c sum_q dC_pq T_q
                  + g_lipsum / (K n) s_l^2 sum_k <I_p - P_p, G_k> G_k
      grad_T[p] = s_m sum_{q != p} dB_pq M_q                                  (WITH_M2)
      stats     = (sum_{q != p} dA_pq <I_p, M_q> + dB_pq <T_p, M_q>,  sum_q dC_pq <I_p, T_q>)
      grad_fi[j], grad_ft[j] = maths::dive_grads(u_j, v_j, m; g_avl / B', g_pvl / B')
    with dA = (g_m / 2n) UA, dB = (g_m / 2n) UB, dC = (g_c / 2n) UC and the unit-weight
    dlogits (in [0, 1] or [-2, 2], so that they survive a cast to 16 bits):
      UA_pq = exp(A_pq - lse[0][p]), UB_pq = exp(B_pq - lse[1][p])       (0 on the diagonal)
      UC_pq = exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q]) - 2 [p == q]

    Grid: NROW = cdiv(n, BLOCK_M) training-row programs, then cdiv(B', BLOCK_M) DiVE programs.
    A row program streams the column tiles: recomputes the logit tiles, forms the U tiles and
    adds U @ (M or T)_tile to the rows' gradients; then streams the K Lipsum texts:
    X = <I - P, G> tile, gradient += f_l X @ G_tile. ONE_CHUNK (D <= BLOCK_D): the I / T row
    tiles and the accumulators stay in registers and are stored once at the end. Otherwise
    (large D) the scaled contributions are added chunk by chunk of BLOCK_D features to
    grad_i / grad_t, whose rows this program alone owns (read-modify-write; a barrier after
    each column tile orders the stores before the next tile's loads, which other threads of
    the program may issue).
    """
    pid = tl.program_id(0)
    if pid < NROW:
        _grad_rows_batch(I, T, M, P, G, g_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
                         lse_ptr, grad_i_ptr, grad_t_ptr, stats_ptr,
                         pid, n, K, D, stride, stride_g, stride_o,
                         WITH_M2, WITH_CLIP, WITH_TILES, WITH_LIPSUM, ONE_CHUNK, LOWP_DS,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    else:
        if WITH_DIVE:
            _grad_rows_dive(FI, FT, PI, PT, center_ptr, g_ptr, grad_fi_ptr, grad_ft_ptr,
                            pid - NROW, n_ref, D, stride_r, stride_ro, BLOCK_M, BLOCK_D)


@triton.jit
def step_grad_cols_kernel(
    I, T, M, g_ptr, m2_scale_ptr, clip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    grad_m_ptr,           # [n, D] f32 out (WITH_M2): grad_M (zero-filled unless ONE_CHUNK)
    grad_tc_ptr,          # [n, D] f32 out (WITH_CLIP): grad_Tc (likewise)
    n, D, stride, stride_o,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, ONE_CHUNK: tl.constexpr,
    LOWP_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The column pass of the step backward (owner q; m^2 and CLIP only), step_kernels.h
    step_grad_cols:
      grad_M[q]  = s_m sum_{p != q} (dA_pq I_p + dB_pq T_p)                    (WITH_M2)
      grad_Tc[q] = s_c sum_p dC_pq I_p                                         (WITH_CLIP)
    with the dlogits of step_grad_rows_kernel. Grid: one program per BLOCK_M block of
    columns q; it streams the BLOCK_N blocks of rows p and works on transposed tiles
    [q, p] (<M_q, I_p>, <M_q, T_p>, <T_q, I_p>), so that the gradient is U^T-tile @ (I or
    T)_tile. ONE_CHUNK / large-D handling as step_grad_rows_kernel.
    """
    pid = tl.program_id(0)
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr)
    g_c = tl.load(g_ptr) / (2.0 * n)
    g_m = tl.load(g_ptr + 1) / (2.0 * n)
    f_m = g_m * s_m
    f_c = g_c * s_c
    qs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qs < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = qs.to(tl.int64)[:, None] * stride
    gm_rows = grad_m_ptr + qs.to(tl.int64)[:, None] * stride_o
    gtc_rows = grad_tc_ptr + qs.to(tl.int64)[:, None] * stride_o
    if WITH_CLIP:
        r3 = tl.load(lse_ptr + 3 * n + qs, mask=q_ok, other=0.0)
    d_ok = offs_d < D
    if ONE_CHUNK:
        tile_mask = q_ok[:, None] & d_ok[None, :]
        if WITH_M2:
            m_tile = tl.load(M + q_off + offs_d[None, :], mask=tile_mask, other=0.0)
        if WITH_CLIP:
            t_tile = tl.load(T + q_off + offs_d[None, :], mask=tile_mask, other=0.0)
    acc_m = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_tc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for pb in range(0, n, BLOCK_N):
        ps = pb + offs_n
        p_ok = ps < n
        p_off = ps.to(tl.int64) * stride
        if ONE_CHUNK:
            pt_mask = d_ok[:, None] & p_ok[None, :]
            it = tl.load(I + p_off[None, :] + offs_d[:, None], mask=pt_mask, other=0.0)
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if WITH_M2:
                tt = tl.load(T + p_off[None, :] + offs_d[:, None], mask=pt_mask, other=0.0)
                x_mi = _mma(m_tile, it, zero, DOT_PREC, UPCAST)
                x_mt = _mma(m_tile, tt, zero, DOT_PREC, UPCAST)
            if WITH_CLIP:
                x_ti = _mma(t_tile, it, zero, DOT_PREC, UPCAST)
        else:
            if WITH_M2:
                x_mi, x_ti, x_mt = _three_dots(M, T, I, T, qs, ps, q_ok, p_ok, D, stride,
                                               WITH_CLIP, True, BLOCK_M, BLOCK_N, BLOCK_D,
                                               DOT_PREC, UPCAST)
            else:  # CLIP only
                x_ti, x_mi, x_mt = _three_dots(T, T, I, I, qs, ps, q_ok, p_ok, D, stride,
                                               False, False, BLOCK_M, BLOCK_N, BLOCK_D,
                                               DOT_PREC, UPCAST)
        valid = q_ok[:, None] & p_ok[None, :]
        on_diag = qs[:, None] == ps[None, :]
        if WITH_M2:
            # Transposed tiles: A_pq = s_m <I_p, M_q> at [q, p], its row LSE indexed by p.
            r0 = tl.load(lse_ptr + ps, mask=p_ok, other=0.0)
            r1 = tl.load(lse_ptr + n + ps, mask=p_ok, other=0.0)
            off = valid & (qs[:, None] != ps[None, :])
            ua = tl.where(off, tl.exp(s_m * x_mi - r0[None, :]), 0.0)
            ub = tl.where(off, tl.exp(s_m * x_mt - r1[None, :]), 0.0)
            ua_op = _ds_operand(ua, I.dtype.element_ty, LOWP_DS)
            ub_op = _ds_operand(ub, I.dtype.element_ty, LOWP_DS)
        if WITH_CLIP:
            r2 = tl.load(lse_ptr + 2 * n + ps, mask=p_ok, other=0.0)
            uc = _clip_dlogits(s_c * x_ti, r2[None, :], r3[:, None], valid, on_diag)
            uc_op = _ds_operand(uc, I.dtype.element_ty, LOWP_DS)
        if ONE_CHUNK:
            if WITH_M2:
                acc_m = _mma(ua_op, tl.trans(it), acc_m, DOT_PREC, UPCAST)
                acc_m = _mma(ub_op, tl.trans(tt), acc_m, DOT_PREC, UPCAST)
            if WITH_CLIP:
                acc_tc = _mma(uc_op, tl.trans(it), acc_tc, DOT_PREC, UPCAST)
        else:
            for k in range(0, D, BLOCK_D):
                d = k + offs_d
                d_ok2 = d < D
                p_mask = p_ok[:, None] & d_ok2[None, :]
                g_mask = q_ok[:, None] & d_ok2[None, :]
                ip = tl.load(I + p_off[:, None] + d[None, :], mask=p_mask, other=0.0)
                zero_d = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                if WITH_M2:
                    tp = tl.load(T + p_off[:, None] + d[None, :], mask=p_mask, other=0.0)
                    upd_m = _mma(ub_op, tp, _mma(ua_op, ip, zero_d, DOT_PREC, UPCAST),
                                 DOT_PREC, UPCAST)
                    old_m = tl.load(gm_rows + d[None, :], mask=g_mask, other=0.0)
                    tl.store(gm_rows + d[None, :], old_m + f_m * upd_m, mask=g_mask)
                if WITH_CLIP:
                    old_tc = tl.load(gtc_rows + d[None, :], mask=g_mask, other=0.0)
                    tl.store(gtc_rows + d[None, :],
                             old_tc + f_c * _mma(uc_op, ip, zero_d, DOT_PREC, UPCAST),
                             mask=g_mask)
            # The next row tile re-reads these gradient rows, possibly from other threads of
            # this program: make the stores visible first.
            tl.debug_barrier()
    if ONE_CHUNK:
        g_mask = q_ok[:, None] & d_ok[None, :]
        if WITH_M2:
            tl.store(gm_rows + offs_d[None, :], acc_m * f_m, mask=g_mask)
        if WITH_CLIP:
            tl.store(gtc_rows + offs_d[None, :], acc_tc * f_c, mask=g_mask)
