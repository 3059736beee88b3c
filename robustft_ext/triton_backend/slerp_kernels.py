"""Row-wise Triton kernels of the m^2 slerp (docs/maths.md, section 3): the prologue's row dots
and mix, and the slerp backward together with the step's other gradients of I and T (without
a mix: the Gram formulation's pair pass, section 9.4).

Each program owns BLOCK_M rows and loops over D in BLOCK_D chunks; nothing is written but the
outputs, so the prologue and the backward allocate no n x D temporaries (the ATen form of the
same maths held about ten float64 n x D tensors at once). The weights
(w_a, w_b, dw_a/dc, dw_b/dc) [4, n] come from slerp_maths.slerp_weights on the host: O(n),
and the one Python copy of those formulas.

float64 throughout, as section 3.2 needs near theta = pi: the row dots (c = <I_p, T_p>,
<dM_p, I_p>, <dM_p, T_p>) sum exact products of the inputs in float64, and the mix
w_a I + w_b T and the backward's w_a dM + k T, whose terms grow like 1 / sin theta and cancel
there, are formed in float64 and rounded once to the output's dtype.
"""
import triton
import triton.language as tl


@triton.jit
def _row_dots(X, Y, rows, row_ok, D, stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # <X_p, Y_p> [BLOCK_M] in float64 for rows p (0 for rows past the end).
    acc = tl.zeros((BLOCK_M,), dtype=tl.float64)
    offs_d = tl.arange(0, BLOCK_D)
    base = rows.to(tl.int64)[:, None] * stride
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        mask = row_ok[:, None] & (d < D)[None, :]
        x = tl.load(X + base + d[None, :], mask=mask, other=0.0).to(tl.float64)
        y = tl.load(Y + base + d[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(x * y, axis=1)
    return acc


@triton.jit
def _rounded(x, dtype, ROUND_BF16: tl.constexpr):
    # float64 x in `dtype`, through float32: Triton's interpreter converts float64 straight to
    # bfloat16 wrongly. (Rounding twice differs from rounding once only where the float32
    # value is a tie of the 16-bit type: by one unit in its last place.) ROUND_BF16 (set only
    # under the interpreter, for bfloat16): round to nearest even by hand, as the GPU's
    # conversion does; the interpreter's truncates.
    y = x.to(tl.float32)
    if ROUND_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def pair_dots_kernel(
    I, T,
    cos_f64,              # [n] f64 out: <I_p, T_p>
    n, D, stride,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The cosines c_p = <I_p, T_p> of the matched rows, in float64."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tl.store(cos_f64 + rows, _row_dots(I, T, rows, row_ok, D, stride, BLOCK_M, BLOCK_D),
             mask=row_ok)


@triton.jit
def slerp_mix_kernel(
    I, T,
    weights_f64,          # [4, n] f64: w_a, w_b, dw_a/dc, dw_b/dc
    M,                    # [n, D] out: the mix, in M's dtype
    n, D, stride,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """M_p = w_a[p] I_p + w_b[p] T_p, formed in float64."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    w_a = tl.load(weights_f64 + rows, mask=row_ok, other=0.0)[:, None]
    w_b = tl.load(weights_f64 + n + rows, mask=row_ok, other=0.0)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    base = rows.to(tl.int64)[:, None] * stride
    for k in range(0, D, BLOCK_D):
        d = k + offs_d
        mask = row_ok[:, None] & (d < D)[None, :]
        i = tl.load(I + base + d[None, :], mask=mask, other=0.0).to(tl.float64)
        t = tl.load(T + base + d[None, :], mask=mask, other=0.0).to(tl.float64)
        tl.store(M + base + d[None, :],
                 _rounded(w_a * i + w_b * t, M.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def slerp_bwd_kernel(
    I, T,
    weights_f64,          # [4, n] f64: w_a, w_b, dw_a/dc, dw_b/dc
    grad_m_ptr,           # [n, D] f32: dM, the upstream gradient of the mix
    pair_ptr,             # [n] f32 (WITH_STEP): the coefficient of T in dI and of I in dT
    base_i_ptr,           # [n, D] f32 (WITH_STEP): the rest of dI
    base_t_ptr,           # [n, D] f32 (WITH_STEP): the rest of dT
    stride_base,          # the row stride of base_i_ptr and base_t_ptr
    DI, DT,               # [n, D] out: dI, dT in their dtype
    n, D, stride,
    WITH_MIX: tl.constexpr, WITH_STEP: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The backward of M = slerp(I, T; lam) (docs/maths.md, section 3.1):
        k  = <dM, I> dw_a/dc + <dM, T> dw_b/dc
        dI = w_a dM + k T,     dT = w_b dM + k I,
    and, WITH_STEP (the m^2 step backward), the step's other gradients of I and T added in
    the same pass: dI += base_I + pair T, dT += base_T + pair I, with pair_p the true pair's
    coefficient s_m (dA_pp + dB_pp) (its logit is s_m <I_p, T_p>). Two passes over the row
    block's features: the row dots, then the gradients.

    Without WITH_MIX (the Gram formulation's pair pass, csrc/step_kernels.h pair_backward:
    its slerp weights' terms are in pair, docs/maths.md, section 9.4) there is no dM:
    dI = base_I + pair T, dT = base_T + pair I, and weights_f64 / grad_m_ptr are not read."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    k = tl.zeros((BLOCK_M,), dtype=tl.float64)
    if WITH_MIX:
        w_a = tl.load(weights_f64 + rows, mask=row_ok, other=0.0)[:, None]
        w_b = tl.load(weights_f64 + n + rows, mask=row_ok, other=0.0)[:, None]
        dw_a = tl.load(weights_f64 + 2 * n + rows, mask=row_ok, other=0.0)
        dw_b = tl.load(weights_f64 + 3 * n + rows, mask=row_ok, other=0.0)
        k = (_row_dots(grad_m_ptr, I, rows, row_ok, D, stride, BLOCK_M, BLOCK_D) * dw_a
             + _row_dots(grad_m_ptr, T, rows, row_ok, D, stride, BLOCK_M, BLOCK_D) * dw_b)
    if WITH_STEP:
        k += tl.load(pair_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    k = k[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    base = rows.to(tl.int64)[:, None] * stride
    for c in range(0, D, BLOCK_D):
        d = c + offs_d
        mask = row_ok[:, None] & (d < D)[None, :]
        off = base + d[None, :]
        i = tl.load(I + off, mask=mask, other=0.0).to(tl.float64)
        t = tl.load(T + off, mask=mask, other=0.0).to(tl.float64)
        di = k * t
        dt = k * i
        if WITH_MIX:
            dm = tl.load(grad_m_ptr + off, mask=mask, other=0.0).to(tl.float64)
            di += w_a * dm
            dt += w_b * dm
        if WITH_STEP:
            b_off = rows.to(tl.int64)[:, None] * stride_base + d[None, :]
            di += tl.load(base_i_ptr + b_off, mask=mask, other=0.0).to(tl.float64)
            dt += tl.load(base_t_ptr + b_off, mask=mask, other=0.0).to(tl.float64)
        tl.store(DI + off, _rounded(di, DI.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(DT + off, _rounded(dt, DT.dtype.element_ty, ROUND_BF16), mask=mask)
