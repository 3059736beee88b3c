// The per-device kernel launchers of a robust fine-tuning step: CLIP, m^2-mix, Lipsum-FT
// and DiVE (docs/maths.md, sections 1, 3, 4, 5) from one pass over the data.
//
// Each device (cpu/, cuda/) implements these four launchers; step_ops.h builds every op of
// these losses on top of them once (m2mix_*, lipsum_*, dive_*, robust_step_*), each op
// switching on the terms it needs.
//
// The problem (StepProblem below). Training batch: n pairs (I_p, T_p), and for m^2-mix the
// mixed negatives M_q = slerp(I_q, T_q; lam) (an n x D buffer the op body computes):
//   A_pq = s_m <I_p, M_q> (q != p),  A_pp = diag[p] = s_m <I_p, T_p>      (with_m2)
//   B_pq = s_m <T_p, M_q> (q != p),  B_pp = diag[p]                        (with_m2)
//   C_pq = s_c <I_p, T_q>                                                  (with_clip)
//   V_pk = s_l <I_p - P_p, G_k>,  k < K   (Lipsum: P the pre-trained image
//                                          features, G the random-text features) (with_lipsum)
// Reference batch (DiVE, with_dive): B' rows, u_j = fi_j - pi_j, v_j = ft_j - pt_j, centre m.
//
// One forward pass produces every statistic the losses need:
//   lse [4, n]:  lse[0][p] = LSE_q A_pq, lse[1][p] = LSE_q B_pq,
//                lse[2][p] = LSE_q C_pq, lse[3][q] = LSE_p C_pq (rows of absent terms: unset)
//   sums [3]:    sum_pk V_pk^2,  sum_j |u_j - m|^2 + |v_j - m|^2,  sum_j |u_j - v_j|^2
//   diff_mean [D]: (1 / B') sum_j (u_j + v_j) / 2    (the DiVE centre update's batch mean)
// In one launch (per device: one parallel region on the CPU, one grid on CUDA): the tasks
// that own a block of training rows stream its column tiles for A, B, C and then its K
// Lipsum columns; DiVE's reference rows are extra blocks of the same launch.
//
// The backward is two passes with no float atomics. grads [5] holds the upstream gradients
// of the five losses in StepTerm order (g_clip, g_m2, g_lipsum, g_avl, g_pvl), and the
// losses are
//   m2 = (sum lse0 + sum lse1 - 2 sum diag) / 2n,  clip = (sum lse2 + sum lse3 - 2 sum C_pp) / 2n,
//   lipsum = sums[0] / (2 K n),  avl = sums[1] / B',  pvl = sums[2] / B'.
//  * rows (owner p; and the DiVE rows j):
//      grad_I[p] = s_m sum_{q != p} dA_pq M_q + s_c sum_q dC_pq T_q
//                  + g_lipsum / (K n) * s_l^2 sum_k <I_p - P_p, G_k> G_k
//      grad_T[p] = s_m sum_{q != p} dB_pq M_q
//      stats[0]  = sum_{p, q != p} (dA_pq <I_p, M_q> + dB_pq <T_p, M_q>),  stats[1] = sum dC_pq <I_p, T_q>
//      grad_fi[j], grad_ft[j] = maths::dive_grads(u_j, v_j, m; g_avl / B', g_pvl / B')
//  * columns (owner q; m^2 and CLIP only):
//      grad_M[q]  = s_m sum_{p != q} (dA_pq I_p + dB_pq T_p),  grad_Tc[q] = s_c sum_p dC_pq I_p
// with the dlogits of maths::clip_dlogit:
//   dA_pq = g_m2 / 2n exp(A_pq - lse[0][p]),  dB_pq = g_m2 / 2n exp(B_pq - lse[1][p])
//   dC_pq = g_clip / 2n [exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])] - (g_clip / n) [p == q]
// The diagonal entries of A and B (the true pair) are excluded from both passes: their
// O(n D) gradient, which flows to T_p / I_p rather than M_p, is added by the op body, as is
// the backward of the slerp. Outputs of absent terms are not written (grad_T is zeroed
// when only Lipsum is on; the column pass is not called without m^2 or CLIP).
//
// Conventions: the feature tensors of one batch are contiguous and share one dtype (float,
// double, half, bfloat16); diag, lse, sums, diff_mean, grads, stats, the scales and the
// centre are in the accumulation dtype (double for double inputs, float otherwise), on the
// device of the features; outputs are preallocated by the caller in the accumulation dtype
// and written, not added to. No launcher allocates anything of size n x n or n x K beyond a
// tile.
#pragma once

#include <ATen/ATen.h>

namespace robustft {

// The five losses of a step, in the order of robust_step_fwd's `terms` and of `grads`.
enum StepTerm { kClip = 0, kM2 = 1, kLipsum = 2, kAvl = 3, kPvl = 4 };

struct StepProblem {
  // Training batch.
  int64_t n = 0;
  bool with_m2 = false;
  bool with_clip = false;
  at::Tensor I, T, M;                  // [n, D]; M only with m^2; T may alias I (Lipsum only)
  at::Tensor diag;                     // [n] s_m <I_p, T_p> (with m^2)
  at::Tensor m2_scale, clip_scale;     // 0-d; each defined when its term is on
  // Lipsum-FT on the rows of I.
  bool with_lipsum = false;
  at::Tensor lip_pre, lip_texts;       // P [n, D], G [K, D]
  at::Tensor lip_scale;                // 0-d s_l
  // DiVE on the reference batch.
  bool with_dive = false;
  at::Tensor dv_fi, dv_ft, dv_pi, dv_pt;  // [B', D]
  at::Tensor center;                      // [D]

  bool with_tiles() const { return with_m2 || with_clip; }
};

#define RFT_DECLARE_STEP_KERNELS(DEV)                                                 \
  /* out [4, n] = (w_a, w_b, dw_a/dc, dw_b/dc) of maths::slerp_weights(cos[p], lam);   \
     cos [n] and lam (0-d) in the accumulation dtype. */                              \
  void slerp_weights_##DEV(const at::Tensor& cos, const at::Tensor& lam, at::Tensor& out); \
  void step_fwd_##DEV(const StepProblem& p, at::Tensor& lse, at::Tensor& sums,        \
                      at::Tensor& diff_mean);                                         \
  void step_grad_rows_##DEV(const StepProblem& p, const at::Tensor& grads,            \
                            const at::Tensor& lse, at::Tensor& grad_I, at::Tensor& grad_T, \
                            at::Tensor& stats, at::Tensor& grad_fi, at::Tensor& grad_ft); \
  void step_grad_cols_##DEV(const StepProblem& p, const at::Tensor& grads,            \
                            const at::Tensor& lse, at::Tensor& grad_M, at::Tensor& grad_Tc);

RFT_DECLARE_STEP_KERNELS(cpu)
RFT_DECLARE_STEP_KERNELS(cuda)

#undef RFT_DECLARE_STEP_KERNELS

}  // namespace robustft
