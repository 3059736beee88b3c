// The per-device kernel launchers behind the m^2-mix ops (METHODS.md section 3).
//
// Each device (cpu/, cuda/) implements these four launchers; m2mix_ops.h builds the
// two public ops (m2mix_fwd, m2mix_bwd) on top of them once, for every device.
//
// The problem, for one batch of n pairs (I_p, T_p) and the mixed negatives
// M_q = slerp(I_q, T_q; lam) (the op body computes M, an n x D buffer, with
// slerp_weights; the tile launchers only read it):
//   A_pq = s_m <I_p, M_q>  (q != p),   A_pp = diag[p]     (the true pair, s_m <I_p, T_p>)
//   B_pq = s_m <T_p, M_q>  (q != p),   B_pp = diag[p]
//   C_pq = s_c <I_p, T_q>                                  (the CLIP logits, optional)
// and one pass over the tiles produces every log-sum-exp the losses need:
//   lse[0][p] = LSE_q A_pq,  lse[1][p] = LSE_q B_pq,
//   lse[2][p] = LSE_q C_pq,  lse[3][q] = LSE_p C_pq       (rows 2-3 only "with clip").
// "With clip" is lse.size(0) == 4; without it lse is [2, n] and s_c is unused.
//
// The backward is two streaming passes with no float atomics:
//  * rows   (owner p):  grad_I[p] = s_m sum_{q != p} dA_pq M_q + s_c sum_q dC_pq T_q
//                       grad_T[p] = s_m sum_{q != p} dB_pq M_q
//                       stats[0]  = sum_{p, q != p} (dA_pq <I_p, M_q> + dB_pq <T_p, M_q>)
//                       stats[1]  = sum_{p, q} dC_pq <I_p, T_q>      (0 without clip)
//  * columns (owner q): grad_M[q]  = s_m sum_{p != q} (dA_pq I_p + dB_pq T_p)
//                       grad_Tc[q] = s_c sum_p dC_pq I_p             (with clip only)
// with the dlogits (g_m = grads[0], g_c = grads[1], maths::clip_dlogit):
//   dA_pq = g_m / (2n) exp(A_pq - lse[0][p]),  dB_pq = g_m / (2n) exp(B_pq - lse[1][p])
//   dC_pq = g_c / (2n) [exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])] - (g_c / n) [p == q]
// The diagonal entries of A and B (the true pair) are excluded from both passes: their
// gradient, which flows to T_p / I_p rather than M_p, is O(n D) and added by the op body.
//
// Conventions (as contrastive_kernels.h): I, T, M are [n, D], contiguous, one dtype
// (float, double, half, bfloat16); diag, lse, grads, scales are in the accumulation
// dtype (double for double inputs, float otherwise) on the device of I; outputs are
// preallocated by the caller in the accumulation dtype and written, not added to.
// No launcher allocates anything of size n x n.
#pragma once

#include <ATen/ATen.h>

namespace robustft {

#define RFT_DECLARE_M2MIX_KERNELS(DEV)                                              \
  /* out [4, n] = (w_a, w_b, dw_a/dc, dw_b/dc) of maths::slerp_weights(cos[p], lam). \
     cos [n] and lam (0-d) are in the accumulation dtype. */                       \
  void slerp_weights_##DEV(const at::Tensor& cos, const at::Tensor& lam,          \
                           at::Tensor& out);                                       \
  /* lse [2 or 4, n] as above, from one pass over the tiles. */                    \
  void m2mix_lse_##DEV(const at::Tensor& I, const at::Tensor& T, const at::Tensor& M, \
                       const at::Tensor& diag, const at::Tensor& m2_scale,         \
                       const at::Tensor& clip_scale, at::Tensor& lse);             \
  /* The row pass: grad_I, grad_T [n, D], stats [2]. */                            \
  void m2mix_grad_rows_##DEV(const at::Tensor& grads, const at::Tensor& I,         \
                             const at::Tensor& T, const at::Tensor& M,             \
                             const at::Tensor& m2_scale, const at::Tensor& clip_scale, \
                             const at::Tensor& lse, at::Tensor& grad_I,            \
                             at::Tensor& grad_T, at::Tensor& stats);               \
  /* The column pass: grad_M [n, D]; grad_Tc [n, D] when with clip (else undefined \
     and not written). */                                                          \
  void m2mix_grad_cols_##DEV(const at::Tensor& grads, const at::Tensor& I,         \
                             const at::Tensor& T, const at::Tensor& M,             \
                             const at::Tensor& m2_scale, const at::Tensor& clip_scale, \
                             const at::Tensor& lse, at::Tensor& grad_M,            \
                             at::Tensor& grad_Tc);

RFT_DECLARE_M2MIX_KERNELS(cpu)
RFT_DECLARE_M2MIX_KERNELS(cuda)

#undef RFT_DECLARE_M2MIX_KERNELS

}  // namespace robustft
