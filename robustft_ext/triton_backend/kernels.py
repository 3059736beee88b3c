"""Triton kernels of the fused contrastive losses (docs/maths.md, sections 1-2).

Only @triton.jit code lives here; the launch code and the op registrations are in ops.py.
Conventions (the Triton counterpart of csrc/contrastive_kernels.h):

* One "view" of a loss has rows P [n, D] and columns Q [m, D], both contiguous in the
  feature dimension with row strides stride_p / stride_q and one dtype (float32, bfloat16 or
  float16). Its logits are S_pq = scale * <P_p, Q_q> + bias, accumulated in float32.
* scale, bias and grad_loss are read from 0-d float32 tensors (no host synchronisation).
* Nothing of size n x m is ever written: logit tiles of BLOCK_M x BLOCK_N live in registers
  and are recomputed in the backward pass.
* No atomics: every buffer element has exactly one writing program, and partial results are
  merged afterwards in a fixed order, so every result is bitwise deterministic.

Compile-time switches shared by the kernels:
  DOT_PREC  "ieee" for float32 inputs (true fp32 products, no TF32), "tf32" otherwise (the
            setting is ignored by 16-bit dots, whose products are exact in fp32 anyway).
  UPCAST    convert 16-bit tiles to float32 right before tl.dot. Only set under
            TRITON_INTERPRET=1 for bfloat16, whose tl.dot the interpreter does not support
            (it multiplies the raw uint16 bit patterns, triton-lang/triton#11584). The result
            equals the bfloat16 tensor-core dot: bf16 x bf16 products are exact in fp32.
"""
import triton
import triton.language as tl


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x >= 0 (Goldberg's trick): Triton has no portable log1p
    # (libdevice's is CUDA-only). Where 1 + x rounds to 1, log1p(x) = x to fp32 precision.
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)), as maths::softplus.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflow, as maths::sigmoid.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _mma(x, y, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # acc += x @ y with float32 accumulation.
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=DOT_PREC)


@triton.jit
def _dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # <P_p, Q_q> for a BLOCK_M x BLOCK_N tile, looping over D in BLOCK_D chunks
    # (P chunk [BLOCK_M, BLOCK_D] @ Q chunk loaded transposed [BLOCK_D, BLOCK_N]).
    # Out-of-range rows / columns / features load as 0.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    p_base = P + rows.to(tl.int64)[:, None] * stride_p
    q_base = Q + cols.to(tl.int64)[None, :] * stride_q
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        d_ok = d < D
        p = tl.load(p_base + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qt = tl.load(q_base + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(p, qt, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def clip_lse_kernel(
    P, Q, scale_ptr, bias_ptr,
    row_lse_ptr,          # [n] f32 out: LSE_q S_pq
    col_max_ptr,          # [NPROG, m] f32 in/out (WITH_COL): this program's running column max
    col_sum_ptr,          # [NPROG, m] f32 in/out (WITH_COL): its sum of exp(S - col max)
    pos_ptr,              # [grid] f32 out: this program's sum of the positive logits
    n, m, D, stride_p, stride_q, pos_offset, NPROG,
    WITH_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """CLIP forward statistics in one pass over the logit tiles.

    Grid: NPROG persistent programs; program `pid` owns the row blocks pid, pid + NPROG, ...
    For each of its row blocks it streams the column tiles (BLOCK_N wide) of S, each tile built
    by _dot_tile, and keeps an online log-sum-exp (max, sum) per row in registers; at the end of
    the row block it writes row_lse. With WITH_COL it also folds each tile's column max / sum
    into its own row of the [NPROG, m] partial buffers (load, merge, store: only this program
    touches that row, so no atomics); the host merges the NPROG partials into col_lse.
    It also sums the positive logits S_{p, p + pos_offset} it sees into pos_ptr[pid].
    Masked entries are -inf; a "safe" max (0 where the max is -inf) keeps exp() free of NaNs.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    num_rb = tl.cdiv(n, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_base = pid.to(tl.int64) * m
    pos_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for rb in range(pid, num_rb, NPROG):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for cb in range(0, m, BLOCK_N):
            cols = cb + offs_n
            col_ok = cols < m
            dot = _dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
            valid = row_ok[:, None] & col_ok[None, :]
            s = tl.where(valid, scale * dot + bias, float("-inf"))
            is_pos = valid & ((cols[None, :] - rows[:, None]) == pos_offset)
            pos_acc += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
            # Row statistics: online log-sum-exp.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
            if WITH_COL:
                # Column statistics: merge this tile into the program's partial (max, sum).
                cptr = col_base + cols
                pm = tl.load(col_max_ptr + cptr, mask=col_ok, other=float("-inf"))
                ps = tl.load(col_sum_ptr + cptr, mask=col_ok, other=0.0)
                cm = tl.maximum(pm, tl.max(s, axis=0))
                cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
                ps = ps * tl.exp(pm - cm_safe) + tl.sum(tl.exp(s - cm_safe[None, :]), axis=0)
                tl.store(col_max_ptr + cptr, cm, mask=col_ok)
                tl.store(col_sum_ptr + cptr, ps, mask=col_ok)
                # The next row block re-reads these columns, possibly from other threads of
                # this program (load and store layouts may differ): order them.
                tl.debug_barrier()
        # (Rows past n have l_i = 0; log(1) keeps them finite. They are not stored.)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(row_lse_ptr + rows, m_safe + tl.log(tl.where(row_ok, l_i, 1.0)), mask=row_ok)
    tl.store(pos_ptr + pid, tl.sum(pos_acc, axis=0))


@triton.jit
def siglip_softplus_sum_kernel(
    P, Q, scale_ptr, bias_ptr,
    partial_ptr,          # [NPROG] f32 out: this program's sum of the per-entry losses
    n, m, D, stride_p, stride_q, NPROG,
    HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """SigLIP forward: sum_pq -log sigmoid(z_pq S_pq) (maths::siglip_term).

    That is softplus(S) on negatives and softplus(-S) on the diagonal positives (HAS_POS),
    which equals softplus(S) - S without the cancellation. Grid: NPROG persistent programs
    striding over the (row block, column block) tiles in row-major order (neighbouring
    programs share a row block, for cache reuse); each writes one partial sum.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    num_cb = tl.cdiv(m, BLOCK_N)
    num_tiles = tl.cdiv(n, BLOCK_M) * num_cb
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(pid, num_tiles, NPROG):
        rows = (t // num_cb) * BLOCK_M + offs_m
        cols = (t % num_cb) * BLOCK_N + offs_n
        row_ok = rows < n
        col_ok = cols < m
        dot = _dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
        s = scale * dot + bias
        if HAS_POS:
            s = tl.where(rows[:, None] == cols[None, :], -s, s)
        valid = row_ok[:, None] & col_ok[None, :]
        acc += tl.sum(tl.where(valid, _softplus(s), 0.0), axis=1)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def contrastive_grad_rows_kernel(
    P, Q, scale_ptr, bias_ptr, g_ptr,
    row_lse_ptr,          # [n] f32 (HAS_ROW)
    col_lse_ptr,          # [m] f32 (HAS_COL)
    grad_ptr,             # [n, D] f32 out: grad_P (zero-filled by the host unless ONE_CHUNK)
    stats_ptr,            # [grid, 2] f32 out (WANT_STATS): partial sum dS*<P,Q>, sum dS
    n, m, D, stride_p, stride_q, stride_g, pos_offset, norm,
    SIGLIP: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    POS_COEF: tl.constexpr, WANT_STATS: tl.constexpr, ONE_CHUNK: tl.constexpr,
    LOWP_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Gradient rows of one view: grad_P = scale * dS @ Q, plus the scalar-gradient partials.

    dS = (g / norm) * U with the unit-weight dlogit U (weights folded out so that U lies in
    [-2, 2] and survives a cast to 16 bits):
      CLIP   U = [HAS_ROW] exp(S - row_lse_p) + [HAS_COL] exp(S - col_lse_q) - POS_COEF [pos]
      SigLIP U = sigmoid(S) - POS_COEF [pos]
    with pos = (q - p == pos_offset). (Symmetric CLIP: norm = 2n, POS_COEF = 2; one-sided
    CLIP: norm = n, POS_COEF = 1; SigLIP: norm = n, POS_COEF = 1, or 0 if negative_only.)

    Grid: one program per BLOCK_M row block of P. It streams the column tiles of Q:
    recomputes the logit tile (_dot_tile, or one dot when ONE_CHUNK), forms U, and adds
    U @ Q_tile to the rows' gradient. ONE_CHUNK (D <= BLOCK_D): the P tile and the
    [BLOCK_M, BLOCK_D] accumulator stay in registers. Otherwise (large D, e.g. 768) the
    gradient is accumulated chunk by chunk of BLOCK_D features directly in grad_ptr, whose
    rows this program alone owns (read-modify-write, L2 resident; a barrier after each
    column tile orders the stores before the next tile's loads, which other threads of the
    program may issue), and rescaled at the end.
    LOWP_DS casts U to the 16-bit input dtype for the second dot (tensor cores; as
    flash-attention does), otherwise it stays float32 (fp32 inputs, "ieee" dot).
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    gw = tl.load(g_ptr) / norm
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_rows = grad_ptr + rows.to(tl.int64)[:, None] * stride_g
    if HAS_ROW:
        r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
    if ONE_CHUNK:
        d_ok = offs_d < D
        p_tile = tl.load(P + rows.to(tl.int64)[:, None] * stride_p + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    st_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    st_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for cb in range(0, m, BLOCK_N):
        cols = cb + offs_n
        col_ok = cols < m
        q_rows = Q + cols.to(tl.int64) * stride_q
        if ONE_CHUNK:
            qt = tl.load(q_rows[None, :] + offs_d[:, None],
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            dot = _mma(p_tile, qt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                       DOT_PREC, UPCAST)
        else:
            dot = _dot_tile(P, Q, rows, cols, row_ok, col_ok, D, stride_p, stride_q,
                            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
        valid = row_ok[:, None] & col_ok[None, :]
        s = tl.where(valid, scale * dot + bias, float("-inf"))
        if SIGLIP:
            u = _sigmoid(s)
        else:
            u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_ROW:
                u += tl.exp(s - r[:, None])
            if HAS_COL:
                c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
                u += tl.exp(s - c[None, :])
        if POS_COEF != 0:
            u = tl.where((cols[None, :] - rows[:, None]) == pos_offset, u - POS_COEF, u)
        u = tl.where(valid, u, 0.0)
        if WANT_STATS:
            st_dot += tl.sum(u * dot, axis=1)
            st_sum += tl.sum(u, axis=1)
        if LOWP_DS:
            u_op = u.to(P.dtype.element_ty)
        else:
            u_op = u
        if ONE_CHUNK:
            acc = _mma(u_op, tl.trans(qt), acc, DOT_PREC, UPCAST)
        else:
            for k in range(0, D, BLOCK_D):
                d = k + offs_d
                d_ok2 = d < D
                q = tl.load(q_rows[:, None] + d[None, :],
                            mask=col_ok[:, None] & d_ok2[None, :], other=0.0)
                gmask = row_ok[:, None] & d_ok2[None, :]
                old = tl.load(g_rows + d[None, :], mask=gmask, other=0.0)
                tl.store(g_rows + d[None, :], _mma(u_op, q, old, DOT_PREC, UPCAST), mask=gmask)
            # The next column tile (and the final rescale) re-reads these gradient rows,
            # possibly from other threads of this program: make the stores visible first.
            tl.debug_barrier()
    factor = gw * scale
    if ONE_CHUNK:
        tl.store(g_rows + offs_d[None, :], acc * factor, mask=row_ok[:, None] & d_ok[None, :])
    else:
        for k in range(0, D, BLOCK_D):
            d = k + offs_d
            gmask = row_ok[:, None] & (d < D)[None, :]
            tl.store(g_rows + d[None, :], tl.load(g_rows + d[None, :], mask=gmask) * factor,
                     mask=gmask)
    if WANT_STATS:
        tl.store(stats_ptr + 2 * pid, tl.sum(st_dot, axis=0) * gw)
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(st_sum, axis=0) * gw)
