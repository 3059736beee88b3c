"""Triton kernels of a robust fine-tuning step: CLIP, m^2-mix, Lipsum-FT and DiVE
(docs/maths.md, sections 1, 3, 4, 5) from one pass over the data.

Only @triton.jit code lives here; the op bodies (slerp prologue, O(n D) diagonal and slerp
backward terms, the large-D GEMMs, assembling the losses) are in step_ops.py, the per-entry
maths in maths.py. The Triton counterpart of csrc/step_kernels.h, whose notation this
follows:

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

Conventions as contrastive_kernels.py: logit tiles of BLOCK_M x BLOCK_N (and Lipsum tiles of
BLOCK_M x BLOCK_N random texts) live in registers and are recomputed in the backward (the
forward and the register-resident backward write nothing of size n x n or n x K; the
large-D backward writes bounded row chunks of the dlogits); no atomics (every buffer element
has one writing program; per-program partials are merged afterwards by the host in a fixed
order); ONE_CHUNK / DOT_PREC / UPCAST as there.

The Lipsum dots need <I_p - P_p, G_k> with I - P small (P is near I): for float32 inputs the
difference is taken in float32 and dotted with DOT_PREC; for 16-bit inputs the kernels run
<I_p, G_k> - <P_p, G_k> as two tensor-core dots into one float32 accumulator. Both are
exact in float32 up to the accumulation's rounding (16-bit products are exact in fp32), while
rounding I - P back to 16 bits would lose its leading bits.

Kernels (the grids put the training-row programs first, the DiVE programs after them):
  step_fwd_kernel        forward: programs 0 .. NROW-1 own training row blocks: row LSE of
                         A, B, C and the column LSE partials of C, then sum V^2 over their
                         rows; programs NROW .. NROW+NDIVE-1 own reference row blocks: the
                         AVL / PVL sums and the column sums of (u + v) / 2.
  step_grad_rows_kernel  register-resident backward (D <= BLOCK_D), owner p: grad_I (m^2,
                         CLIP and Lipsum), grad_T, the scale-gradient partials; the DiVE
                         programs: grad_fi, grad_ft.
  step_grad_cols_kernel  register-resident backward, owner q: grad_M, grad_Tc (the CLIP
                         gradient of T); only launched with m^2 or CLIP.
  step_dlogit_kernel     large-D backward, one row chunk: the unit dlogits of A, B, C and
                         the Lipsum dots into the workspace (the GEMMs in step_ops.py form
                         every gradient from them), the scale-gradient partials, and (first
                         chunk) the DiVE programs.
The diagonal entries of A and B are excluded from every backward pass: their gradient flows
to T_p / I_p (not M_p) and is added in O(n D) by the op body.
"""
import triton
import triton.language as tl

from . import maths


# ----------------------------------------------------------------------------- tile products
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
        x11 = maths.mma(p1, q1t, x11, DOT_PREC, UPCAST)
        if NEED21:
            p2 = tl.load(P2 + r_off + d[None, :], mask=p_mask, other=0.0)
            x21 = maths.mma(p2, q1t, x21, DOT_PREC, UPCAST)
        if NEED12:
            q2t = tl.load(Q2 + c_off + d[:, None], mask=q_mask, other=0.0)
            x12 = maths.mma(p1, q2t, x12, DOT_PREC, UPCAST)
    return x11, x21, x12


@triton.jit
def _resident_tiles(X1, X2, rows, row_ok, D, stride, NEED2: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # The [BLOCK_M, BLOCK_D] row tiles of X1 and (NEED2) X2 for the one-chunk kernels.
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    off = rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    x1 = tl.load(X1 + off, mask=mask, other=0.0)
    x2 = tl.load(X2 + off, mask=mask, other=0.0) if NEED2 else x1
    return x1, x2


@triton.jit
def _transposed_tile(Q, cols, col_ok, D, stride, BLOCK_D: tl.constexpr):
    # The [BLOCK_D, BLOCK_N] transposed tile of rows `cols` of Q (one chunk).
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(Q + cols.to(tl.int64)[None, :] * stride + offs_d[:, None],
                   mask=(offs_d < D)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _col_tiles(M, T, cols, col_ok, D, stride,
               WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, BLOCK_D: tl.constexpr):
    # The transposed column tiles (M^T with m^2, T^T with CLIP; the absent one repeats the
    # other) of the one-chunk kernels.
    if WITH_M2:
        mt = _transposed_tile(M, cols, col_ok, D, stride, BLOCK_D)
        tt = _transposed_tile(T, cols, col_ok, D, stride, BLOCK_D) if WITH_CLIP else mt
    else:
        tt = _transposed_tile(T, cols, col_ok, D, stride, BLOCK_D)
        mt = tt
    return mt, tt


@triton.jit
def _row_dots(I, T, M, i_tile, t_tile, mt, tt, rows, cols, row_ok, col_ok, D, stride,
              WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, ONE_CHUNK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # (<I_p, M_q>, <T_p, M_q>, <I_p, T_q>) for rows p, columns q, as the terms need them
    # (the others stay 0). ONE_CHUNK: one dot each of the resident row tiles i_tile / t_tile
    # with the column tiles mt / tt (_col_tiles); otherwise one loop over D (_three_dots).
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_im = zero
    x_tm = zero
    x_it = zero
    if ONE_CHUNK:
        if WITH_M2:
            x_im = maths.mma(i_tile, mt, zero, DOT_PREC, UPCAST)
            x_tm = maths.mma(t_tile, mt, zero, DOT_PREC, UPCAST)
        if WITH_CLIP:
            x_it = maths.mma(i_tile, tt, zero, DOT_PREC, UPCAST)
    else:
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
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # <I_p - P_p, G_k> for a BLOCK_M x BLOCK_N tile (rows p, random texts k) in float32,
    # looping over D in BLOCK_D chunks: the float32 difference for float32 inputs, the two
    # tensor-core dots <I, G> - <P, G> (one accumulator) for 16-bit inputs (module docstring).
    x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    r_off = rows.to(tl.int64)[:, None] * stride
    k_off = ks.to(tl.int64)[None, :] * stride_g
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p_mask = row_ok[:, None] & d_ok[None, :]
        i = tl.load(I + r_off + d[None, :], mask=p_mask, other=0.0)
        p = tl.load(P + r_off + d[None, :], mask=p_mask, other=0.0)
        gt = tl.load(G + k_off + d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        if I.dtype.element_ty == tl.float32:
            x = maths.mma(i - p, gt, x, DOT_PREC, UPCAST)
        else:
            # x + <i, g> - <p, g>, negating only float32 values (exact).
            x = -maths.mma(p, gt, -maths.mma(i, gt, x, DOT_PREC, UPCAST), DOT_PREC, UPCAST)
    return x


@triton.jit
def _tile_dlogits(x_im, x_tm, x_it, s_m, s_c, r0, r1, r2, r3, valid, on_diag,
                  WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr):
    # The unit-weight dlogits of one tile (r0..r2 broadcast along the tile's rows, r3 along
    # its columns; both may be transposed by the caller):
    #   UA = exp(A - lse[0]), UB = exp(B - lse[1])     (0 on the diagonal: the true pair)
    #   UC = exp(C - lse[2]) + exp(C - lse[3]) - 2 [p == q]
    # so that dA = (g_m / 2n) UA, dB = (g_m / 2n) UB, dC = (g_c / 2n) UC. Absent terms: 0.
    ua = tl.zeros(x_im.shape, dtype=tl.float32)
    ub = ua
    uc = ua
    if WITH_M2:
        off = valid & ~on_diag
        ua = maths.clip_dlogit(s_m * x_im, r0, r0, on_diag, off, True, False, 0)
        ub = maths.clip_dlogit(s_m * x_tm, r1, r1, on_diag, off, True, False, 0)
    if WITH_CLIP:
        uc = maths.clip_dlogit(s_c * x_it, r2, r3, on_diag, valid, True, True, 2)
    return ua, ub, uc


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_rows(I, T, M, P, G, diag_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
              lse_ptr, col_max_ptr, col_sum_ptr, sums_ptr,
              pid, n, K, D, stride, stride_g, NROW,
              WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
              WITH_LIPSUM: tl.constexpr, ONE_CHUNK: tl.constexpr,
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
    for rb in range(pid, num_rb, NROW):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n
        lip = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if WITH_TILES:
            if WITH_M2:
                dg = tl.load(diag_ptr + rows, mask=row_ok, other=0.0)
            if ONE_CHUNK:
                i_tile, t_tile = _resident_tiles(I, T, rows, row_ok, D, stride, WITH_M2,
                                                 BLOCK_D)
            else:
                i_tile = None
                t_tile = None
            ma = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            mb = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            mc = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            la = tl.zeros((BLOCK_M,), dtype=tl.float32)
            lb = tl.zeros((BLOCK_M,), dtype=tl.float32)
            lc = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for cb in range(0, n, BLOCK_N):
                cols = cb + offs_n
                col_ok = cols < n
                if ONE_CHUNK:
                    mt, tt = _col_tiles(M, T, cols, col_ok, D, stride, WITH_M2, WITH_CLIP,
                                        BLOCK_D)
                else:
                    mt = None
                    tt = None
                x_im, x_tm, x_it = _row_dots(
                    I, T, M, i_tile, t_tile, mt, tt, rows, cols, row_ok, col_ok, D, stride,
                    WITH_M2, WITH_CLIP, ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
                valid = row_ok[:, None] & col_ok[None, :]
                if WITH_M2:
                    on_diag = rows[:, None] == cols[None, :]
                    a = tl.where(valid, tl.where(on_diag, dg[:, None], s_m * x_im),
                                 float("-inf"))
                    b = tl.where(valid, tl.where(on_diag, dg[:, None], s_m * x_tm),
                                 float("-inf"))
                    ma, la = maths.lse_update(ma, la, a)
                    mb, lb = maths.lse_update(mb, lb, b)
                if WITH_CLIP:
                    c = tl.where(valid, s_c * x_it, float("-inf"))
                    mc, lc = maths.lse_update(mc, lc, c)
                    maths.lse_partials_update(col_max_ptr, col_sum_ptr, col_base + cols,
                                              col_ok, c, 0)
            if WITH_M2:
                tl.store(lse_ptr + rows, maths.lse_final(ma, la, row_ok), mask=row_ok)
                tl.store(lse_ptr + n + rows, maths.lse_final(mb, lb, row_ok), mask=row_ok)
            if WITH_CLIP:
                tl.store(lse_ptr + 2 * n + rows, maths.lse_final(mc, lc, row_ok), mask=row_ok)
        if WITH_LIPSUM:
            # The same rows against the K random texts: sum_k <I_p - P_p, G_k>^2.
            for kb in range(0, K, BLOCK_N):
                ks = kb + offs_n
                x = _lipsum_dots(I, P, G, rows, ks, row_ok, ks < K, D, stride, stride_g,
                                 BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
                lip += tl.sum(x * x, axis=1)
        # Per row block (not per program: nothing stays live across row blocks).
        if WITH_LIPSUM:
            tl.store(sums_ptr + 3 * rb, tl.sum(lip, axis=0) * s_l * s_l)
        else:
            tl.store(sums_ptr + 3 * rb, 0.0)
        tl.store(sums_ptr + 3 * rb + 1, 0.0)
        tl.store(sums_ptr + 3 * rb + 2, 0.0)


@triton.jit
def _dive_diffs(FI, FT, PI, PT, center_ptr, off, mask, d, d_ok):
    # u = fi - pi, v = ft - pt in float32 and the centre m of one [rows, BLOCK_D] chunk.
    u = (tl.load(FI + off, mask=mask, other=0.0).to(tl.float32)
         - tl.load(PI + off, mask=mask, other=0.0).to(tl.float32))
    v = (tl.load(FT + off, mask=mask, other=0.0).to(tl.float32)
         - tl.load(PT + off, mask=mask, other=0.0).to(tl.float32))
    m = tl.load(center_ptr + d, mask=d_ok, other=0.0)[None, :]
    return u, v, m


@triton.jit
def _fwd_dive(FI, FT, PI, PT, center_ptr, sums_ptr, diff_ptr, slot, jb, n_ref, D, stride_r,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # DiVE program of step_fwd_kernel owning reference rows jb * BLOCK_M + [0, BLOCK_M):
    # sums[slot] = (0, sum_j |u_j - m|^2 + |v_j - m|^2, sum_j |u_j - v_j|^2) and
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
        u, v, m = _dive_diffs(FI, FT, PI, PT, center_ptr, r_off + d[None, :], mask, d, d_ok)
        avl += tl.where(mask, maths.dive_avl_term(u, v, m), 0.0)
        pvl += maths.dive_pvl_term(u, v)
        tl.store(diff_ptr + jb.to(tl.int64) * D + d, tl.sum((u + v) * 0.5, axis=0), mask=d_ok)
    tl.store(sums_ptr + 3 * slot, 0.0)
    tl.store(sums_ptr + 3 * slot + 1, tl.sum(tl.sum(avl, axis=1), axis=0))
    tl.store(sums_ptr + 3 * slot + 2, tl.sum(tl.sum(pvl, axis=1), axis=0))


@triton.jit
def step_fwd_kernel(
    I, T, M, diag_ptr, m2_scale_ptr, clip_scale_ptr,   # training batch, m^2 / CLIP
    P, G, lip_scale_ptr,                                # Lipsum-FT
    FI, FT, PI, PT, center_ptr,                         # DiVE reference batch
    lse_ptr,              # [3, n] f32 out: LSE_q A_pq, LSE_q B_pq, LSE_q C_pq (as the terms)
    col_max_ptr,          # [NROW, n] f32 in/out (WITH_CLIP): program's column max of C
    col_sum_ptr,          # [NROW, n] f32 in/out (WITH_CLIP): its sum of exp(C - col max)
    sums_ptr,             # [cdiv(n, BLOCK_M) + NDIVE, 3] f32 out: per row block (s_l^2
                          # sum V^2, 0, 0), then per DiVE program (0, AVL sum, PVL sum)
    diff_ptr,             # [NDIVE, D] f32 out: per-DiVE-program column sums of (u + v) / 2
    n, K, n_ref, D, stride, stride_g, stride_r, NROW,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, WITH_DIVE: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Every forward statistic of a step in one launch (step_kernels.h step_fwd).

    Programs 0 .. NROW-1 own the training rows. With CLIP they are persistent (program `pid`
    owns row blocks pid, pid + NROW, ..., and folds each tile's columns of C into its row of
    the [NROW, n] partials, merged by the host); otherwise NROW is the number of row blocks.
    For each row block: the column tiles (one pass over D for <I, M>, <T, M> and <I, T>; the
    diagonal of A and B replaced by diag[p]) with an online log-sum-exp per row and logit
    matrix, then the K Lipsum columns, whose squares are summed. Programs NROW ..
    NROW+NDIVE-1 each own BLOCK_M reference rows (DiVE).
    """
    pid = tl.program_id(0)
    if pid < NROW:
        _fwd_rows(I, T, M, P, G, diag_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
                  lse_ptr, col_max_ptr, col_sum_ptr, sums_ptr,
                  pid, n, K, D, stride, stride_g, NROW,
                  WITH_M2, WITH_CLIP, WITH_TILES, WITH_LIPSUM, ONE_CHUNK,
                  BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    else:
        if WITH_DIVE:
            _fwd_dive(FI, FT, PI, PT, center_ptr, sums_ptr, diff_ptr,
                      tl.cdiv(n, BLOCK_M) + pid - NROW, pid - NROW, n_ref, D, stride_r,
                      BLOCK_M, BLOCK_D)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _grad_dive(FI, FT, PI, PT, center_ptr, g_ptr, grad_fi_ptr, grad_ft_ptr,
               jb, n_ref, D, stride_r, stride_o,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # DiVE program owning reference rows jb * BLOCK_M + [0, BLOCK_M): maths.dive_grads with
    # w_a = g_avl / B', w_p = g_pvl / B' (the centre is a constant). Element-wise: every
    # gradient element is written once.
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
        u, v, m = _dive_diffs(FI, FT, PI, PT, center_ptr, r_off + d[None, :], mask, d, d_ok)
        du, dv = maths.dive_grads(u, v, m, w_a, w_p)
        tl.store(grad_fi_ptr + o_off + d[None, :], du, mask=mask)
        tl.store(grad_ft_ptr + o_off + d[None, :], dv, mask=mask)


@triton.jit
def _grad_rows_batch(
    I, T, M, P, G, g_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr, lse_ptr,
    grad_i_ptr, grad_t_ptr, stats_ptr,
    pid, n, K, D, stride, stride_g, stride_o,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # Training-row program `pid` of step_grad_rows_kernel (one BLOCK_M row block, D <= BLOCK_D).
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr)
    s_l = tl.load(lip_scale_ptr)
    norm = 2.0 * n
    g_c = tl.load(g_ptr) / norm          # StepTerm order: clip, m2, lipsum, avl, pvl
    g_m = tl.load(g_ptr + 1) / norm
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g_mask = row_ok[:, None] & d_ok[None, :]
    g_off = rows.to(tl.int64)[:, None] * stride_o + offs_d[None, :]
    acc_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_ic = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    st_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    st_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if WITH_TILES:
        r0 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        r1 = tl.load(lse_ptr + n + rows, mask=row_ok, other=0.0)
        r2 = tl.load(lse_ptr + 2 * n + rows, mask=row_ok, other=0.0)
        i_tile, t_tile = _resident_tiles(I, T, rows, row_ok, D, stride, WITH_M2, BLOCK_D)
        for cb in range(0, n, BLOCK_N):
            cols = cb + offs_n
            col_ok = cols < n
            mt, tt = _col_tiles(M, T, cols, col_ok, D, stride, WITH_M2, WITH_CLIP, BLOCK_D)
            x_im, x_tm, x_it = _row_dots(
                I, T, M, i_tile, t_tile, mt, tt, rows, cols, row_ok, col_ok, D, stride,
                WITH_M2, WITH_CLIP, True, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            r3 = tl.load(lse_ptr + 3 * n + cols, mask=col_ok, other=0.0)
            ua, ub, uc = _tile_dlogits(x_im, x_tm, x_it, s_m, s_c, r0[:, None], r1[:, None],
                                       r2[:, None], r3[None, :],
                                       row_ok[:, None] & col_ok[None, :],
                                       rows[:, None] == cols[None, :], WITH_M2, WITH_CLIP)
            if WITH_M2:
                st_m += tl.sum(ua * x_im + ub * x_tm, axis=1)
                acc_i = maths.mma(maths.ds_operand(ua, I.dtype.element_ty), tl.trans(mt),
                                  acc_i, DOT_PREC, UPCAST)
                acc_t = maths.mma(maths.ds_operand(ub, I.dtype.element_ty), tl.trans(mt),
                                  acc_t, DOT_PREC, UPCAST)
            if WITH_CLIP:
                st_c += tl.sum(uc * x_it, axis=1)
                acc_ic = maths.mma(maths.ds_operand(uc, I.dtype.element_ty), tl.trans(tt),
                                   acc_ic, DOT_PREC, UPCAST)
    # The tiles' part of grad_I. (Absent terms' scales and upstream gradients are never
    # multiplied in, even by 0: they may be anything.)
    out_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if WITH_M2:
        out_i += acc_i * (g_m * s_m)
    if WITH_CLIP:
        out_i += acc_ic * (g_c * s_c)
    if WITH_LIPSUM:
        # + f_l sum_k X_pk G_k with X = <I - P, G> and f_l = g_lipsum / (K n) s_l^2: X is
        # rounded to the input dtype for the tensor cores (unscaled, so that it stays O(1)
        # like the dlogits), f_l applied to the float32 product.
        f_l = tl.load(g_ptr + 2) / (K * 1.0 * n) * s_l * s_l
        acc_l = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for kb in range(0, K, BLOCK_N):
            ks = kb + offs_n
            k_ok = ks < K
            x = _lipsum_dots(I, P, G, rows, ks, row_ok, k_ok, D, stride, stride_g,
                             BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            gk = tl.load(G + ks.to(tl.int64)[:, None] * stride_g + offs_d[None, :],
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc_l = maths.mma(maths.ds_operand(x, G.dtype.element_ty), gk, acc_l,
                              DOT_PREC, UPCAST)
        out_i += acc_l * f_l
    tl.store(grad_i_ptr + g_off, out_i, mask=g_mask)
    if WITH_M2:
        tl.store(grad_t_ptr + g_off, acc_t * (g_m * s_m), mask=g_mask)
        tl.store(stats_ptr + 2 * pid, tl.sum(st_m, axis=0) * g_m)
    else:
        tl.store(stats_ptr + 2 * pid, 0.0)
    if WITH_CLIP:
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(st_c, axis=0) * g_c)
    else:
        tl.store(stats_ptr + 2 * pid + 1, 0.0)


@triton.jit
def step_grad_rows_kernel(
    I, T, M, P, G, FI, FT, PI, PT, center_ptr,
    g_ptr,                # [5] f32: upstream gradients (clip, m2, lipsum, avl, pvl)
    m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    grad_i_ptr,           # [n, D] f32 out: grad_I
    grad_t_ptr,           # [n, D] f32 out (WITH_M2): grad_T's row part
    stats_ptr,            # [NROW, 2] f32 out: this program's partials of stats[0], stats[1]
    grad_fi_ptr,          # [B', D] f32 out (WITH_DIVE)
    grad_ft_ptr,          # [B', D] f32 out (WITH_DIVE)
    n, K, n_ref, D, stride, stride_g, stride_r, stride_o, stride_ro, NROW,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, WITH_DIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The row pass of the register-resident step backward (D <= BLOCK_D; owner p, and the
    DiVE rows j), step_kernels.h step_grad_rows:
      grad_I[p] = s_m sum_{q != p} dA_pq M_q + s_c sum_q dC_pq T_q
                  + g_lipsum / (K n) s_l^2 sum_k <I_p - P_p, G_k> G_k
      grad_T[p] = s_m sum_{q != p} dB_pq M_q                                  (WITH_M2)
      stats     = (sum_{q != p} dA_pq <I_p, M_q> + dB_pq <T_p, M_q>,  sum_q dC_pq <I_p, T_q>)
      grad_fi[j], grad_ft[j] = maths.dive_grads(u_j, v_j, m; g_avl / B', g_pvl / B')
    with dA = (g_m / 2n) UA, dB = (g_m / 2n) UB, dC = (g_c / 2n) UC, the unit-weight
    dlogits of _tile_dlogits.

    Grid: NROW = cdiv(n, BLOCK_M) training-row programs, then cdiv(B', BLOCK_M) DiVE programs.
    A row program keeps its I / T row tiles and its [BLOCK_M, BLOCK_D] accumulators in
    registers while it streams the column tiles: recompute the logit tiles, form the U
    tiles and add U @ (M or T)_tile; then it streams the K Lipsum texts (X = <I - P, G>
    tile, gradient += f_l X @ G_tile). Each gradient row is stored once, at the end.
    """
    pid = tl.program_id(0)
    if pid < NROW:
        _grad_rows_batch(I, T, M, P, G, g_ptr, m2_scale_ptr, clip_scale_ptr, lip_scale_ptr,
                         lse_ptr, grad_i_ptr, grad_t_ptr, stats_ptr,
                         pid, n, K, D, stride, stride_g, stride_o,
                         WITH_M2, WITH_CLIP, WITH_TILES, WITH_LIPSUM,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    else:
        if WITH_DIVE:
            _grad_dive(FI, FT, PI, PT, center_ptr, g_ptr, grad_fi_ptr, grad_ft_ptr,
                       pid - NROW, n_ref, D, stride_r, stride_ro, BLOCK_M, BLOCK_D)


@triton.jit
def step_grad_cols_kernel(
    I, T, M, g_ptr, m2_scale_ptr, clip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    grad_m_ptr,           # [n, D] f32 out (WITH_M2): grad_M
    grad_tc_ptr,          # [n, D] f32 out (WITH_CLIP): grad_Tc
    n, D, stride, stride_o,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The column pass of the register-resident step backward (D <= BLOCK_D; owner q; m^2
    and CLIP only), step_kernels.h step_grad_cols:
      grad_M[q]  = s_m sum_{p != q} (dA_pq I_p + dB_pq T_p)                    (WITH_M2)
      grad_Tc[q] = s_c sum_p dC_pq I_p                                         (WITH_CLIP)
    with the dlogits of step_grad_rows_kernel. Grid: one program per BLOCK_M block of
    columns q; it streams the BLOCK_N blocks of rows p and works on transposed tiles
    [q, p] (<M_q, I_p>, <M_q, T_p>, <T_q, I_p>), so that the gradient is U^T-tile @ (I or
    T)_tile, accumulated in registers.
    """
    pid = tl.program_id(0)
    s_m = tl.load(m2_scale_ptr)
    s_c = tl.load(clip_scale_ptr)
    g_c = tl.load(g_ptr) / (2.0 * n)
    g_m = tl.load(g_ptr + 1) / (2.0 * n)
    qs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qs < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r3 = tl.load(lse_ptr + 3 * n + qs, mask=q_ok, other=0.0)
    # Column tiles of M (m^2) and T (CLIP), resident in registers.
    if WITH_M2:
        m_tile, t_tile = _resident_tiles(M, T, qs, q_ok, D, stride, WITH_CLIP, BLOCK_D)
    else:
        t_tile, m_tile = _resident_tiles(T, T, qs, q_ok, D, stride, False, BLOCK_D)
    acc_m = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_tc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for pb in range(0, n, BLOCK_N):
        ps = pb + offs_n
        p_ok = ps < n
        it = _transposed_tile(I, ps, p_ok, D, stride, BLOCK_D)
        x_mi = zero
        x_mt = zero
        x_ti = zero
        if WITH_M2:
            tt = _transposed_tile(T, ps, p_ok, D, stride, BLOCK_D)
            x_mi = maths.mma(m_tile, it, zero, DOT_PREC, UPCAST)
            x_mt = maths.mma(m_tile, tt, zero, DOT_PREC, UPCAST)
        if WITH_CLIP:
            x_ti = maths.mma(t_tile, it, zero, DOT_PREC, UPCAST)
        # Transposed tiles: the row LSE of A, B, C are indexed by p (the tile's columns),
        # the column LSE of C by q (its rows).
        r0 = tl.load(lse_ptr + ps, mask=p_ok, other=0.0)
        r1 = tl.load(lse_ptr + n + ps, mask=p_ok, other=0.0)
        r2 = tl.load(lse_ptr + 2 * n + ps, mask=p_ok, other=0.0)
        ua, ub, uc = _tile_dlogits(x_mi, x_mt, x_ti, s_m, s_c, r0[None, :], r1[None, :],
                                   r2[None, :], r3[:, None], q_ok[:, None] & p_ok[None, :],
                                   qs[:, None] == ps[None, :], WITH_M2, WITH_CLIP)
        if WITH_M2:
            acc_m = maths.mma(maths.ds_operand(ua, I.dtype.element_ty), tl.trans(it), acc_m,
                              DOT_PREC, UPCAST)
            acc_m = maths.mma(maths.ds_operand(ub, I.dtype.element_ty), tl.trans(tt), acc_m,
                              DOT_PREC, UPCAST)
        if WITH_CLIP:
            acc_tc = maths.mma(maths.ds_operand(uc, I.dtype.element_ty), tl.trans(it), acc_tc,
                               DOT_PREC, UPCAST)
    g_mask = q_ok[:, None] & d_ok[None, :]
    g_off = qs.to(tl.int64)[:, None] * stride_o + offs_d[None, :]
    if WITH_M2:
        tl.store(grad_m_ptr + g_off, acc_m * (g_m * s_m), mask=g_mask)
    if WITH_CLIP:
        tl.store(grad_tc_ptr + g_off, acc_tc * (g_c * s_c), mask=g_mask)


@triton.jit
def step_dlogit_kernel(
    I, T, M, P, G, FI, FT, PI, PT, center_ptr,
    g_ptr,                # [5] f32: upstream gradients (DiVE reads g_avl, g_pvl)
    m2_scale_ptr, clip_scale_ptr,
    lse_ptr,              # [4, n] f32: the forward's statistics
    DSA, DSB, DSC,        # [>= chunk, n] out: UA, UB (WITH_M2), UC (WITH_CLIP) of the chunk
    x_ptr,                # [>= chunk, K] f32 out (WITH_LIPSUM): <I_p - P_p, G_k> of the chunk
    stats_ptr,            # [max(NTILE, 1), 2] f32 out: per-tile sums U <.,.> for m^2, CLIP
    grad_fi_ptr,          # [B', D] f32 out (WITH_DIVE)
    grad_ft_ptr,          # [B', D] f32 out (WITH_DIVE)
    row0, chunk, n, K, n_ref, D, stride, stride_g, stride_r, stride_ds, stride_x, stride_ro,
    NTILE, NLIP,
    WITH_M2: tl.constexpr, WITH_CLIP: tl.constexpr, WITH_TILES: tl.constexpr,
    WITH_LIPSUM: tl.constexpr, WITH_DIVE: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The dS pass of the large-D step backward: rows row0 .. row0 + chunk - 1 of the unit
    dlogits into the workspace, for the library GEMMs of step_ops.py.

    Grid: NTILE tile programs (BLOCK_M x BLOCK_N tiles of the chunk's [chunk, n] block, in
    grouped order as kernels.contrastive_dlogit_kernel), then NLIP Lipsum programs
    (BLOCK_M x BLOCK_N tiles of the chunk's [chunk, K] Lipsum dots), then the DiVE programs
    (the launch of the first chunk carries them; maths.dive_grads, element-wise).
    A tile program recomputes <I, M>, <T, M>, <I, T> on the tensor cores (one pipelined
    loop over D), forms UA, UB, UC in float32 (_tile_dlogits: O(1), weights folded out),
    adds the tile's sums of UA <I, M> + UB <T, M> and UC <I, T> to the scale-gradient
    partials, and stores the U tiles rounded to the workspace dtype (the 16-bit input dtype,
    or float32). A Lipsum program stores its float32 <I - P, G> tile. Nothing is read back.
    """
    pid = tl.program_id(0)
    if pid < NTILE:
        if WITH_TILES:
            pm, pn = maths.grouped_tile(pid, tl.cdiv(chunk, BLOCK_M), tl.cdiv(n, BLOCK_N),
                                        GROUP_M)
            s_m = tl.load(m2_scale_ptr)
            s_c = tl.load(clip_scale_ptr)
            local = pm * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = row0 + local
            row_ok = (local < chunk) & (rows < n)
            cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            x_im, x_tm, x_it = _row_dots(
                I, T, M, None, None, None, None, rows, cols, row_ok, col_ok, D, stride,
                WITH_M2, WITH_CLIP, False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            r0 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            r1 = tl.load(lse_ptr + n + rows, mask=row_ok, other=0.0)
            r2 = tl.load(lse_ptr + 2 * n + rows, mask=row_ok, other=0.0)
            r3 = tl.load(lse_ptr + 3 * n + cols, mask=col_ok, other=0.0)
            valid = row_ok[:, None] & col_ok[None, :]
            ua, ub, uc = _tile_dlogits(x_im, x_tm, x_it, s_m, s_c, r0[:, None], r1[:, None],
                                       r2[:, None], r3[None, :], valid,
                                       rows[:, None] == cols[None, :], WITH_M2, WITH_CLIP)
            off = local.to(tl.int64)[:, None] * stride_ds + cols[None, :]
            if WITH_M2:
                st_m = tl.sum(tl.sum(ua * x_im + ub * x_tm, axis=1), axis=0)
                tl.store(stats_ptr + 2 * pid, st_m)
                tl.store(DSA + off, maths.ds_operand(ua, DSA.dtype.element_ty), mask=valid)
                tl.store(DSB + off, maths.ds_operand(ub, DSB.dtype.element_ty), mask=valid)
            else:
                tl.store(stats_ptr + 2 * pid, 0.0)
            if WITH_CLIP:
                tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.sum(uc * x_it, axis=1), axis=0))
                tl.store(DSC + off, maths.ds_operand(uc, DSC.dtype.element_ty), mask=valid)
            else:
                tl.store(stats_ptr + 2 * pid + 1, 0.0)
    elif pid < NTILE + NLIP:
        if WITH_LIPSUM:
            t = pid - NTILE
            num_kb = tl.cdiv(K, BLOCK_N)
            local = (t // num_kb) * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = row0 + local
            row_ok = (local < chunk) & (rows < n)
            ks = (t % num_kb) * BLOCK_N + tl.arange(0, BLOCK_N)
            k_ok = ks < K
            x = _lipsum_dots(I, P, G, rows, ks, row_ok, k_ok, D, stride, stride_g,
                             BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            tl.store(x_ptr + local.to(tl.int64)[:, None] * stride_x + ks[None, :], x,
                     mask=row_ok[:, None] & k_ok[None, :])
    else:
        if WITH_DIVE:
            _grad_dive(FI, FT, PI, PT, center_ptr, g_ptr, grad_fi_ptr, grad_ft_ptr,
                       pid - NTILE - NLIP, n_ref, D, stride_r, stride_ro, BLOCK_M, BLOCK_D)
