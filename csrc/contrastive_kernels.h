// The per-device kernel launchers behind the contrastive ops.
//
// Each device (cpu/, cuda/) implements these launchers; contrastive_ops.h builds the four
// public ops on top of them once, for every device. Conventions:
//  * P [n, D] and Q [m, D] are contiguous and share one dtype (float, double, half,
//    bfloat16); the logits of this "view" are S_pq = scale * <P_p, Q_q> + bias.
//  * scale and bias are 0-d tensors of the accumulation dtype (double for double
//    inputs, float otherwise) on the device of P.
//  * Outputs are preallocated by the caller.
//  * No launcher allocates anything of size n x m: the backward forms its dlogits one row
//    chunk at a time into a workspace the caller sizes (workspace.h). The one n x m buffer
//    is the CPU's kept dot products (below), which the caller allocates only when they fit
//    the same workspace limit.
#pragma once

#include <ATen/ATen.h>

namespace robustft {

// How dL/dS_pq is formed for one view (maths::clip_dlogit / siglip_dlogit), up to the
// factor `norm` that the backward applies in its GEMMs: the launcher forms
//   CLIP:   w_row exp(S - row_lse[p]) + w_col exp(S - col_lse[q]) - w_pos [positive]
//   SigLIP: w_row (sigmoid(S) - [positive])
// with weights of order one (the true dlogit is norm * grad_loss times this). Keeping the
// stored dlogits O(1) lets 16-bit workspaces hold them without underflow (the true values
// are O(1/n)) or overflow (grad_loss may carry a loss scale).
struct DlogitSpec {
  bool siglip = false;     // false: CLIP dlogit; true: SigLIP dlogit (weight w_row)
  double w_row = 0.0;      // CLIP: weight of exp(S - row_lse[p]); SigLIP: weight w
  double w_col = 0.0;      // CLIP: weight of exp(S - col_lse[q]); 0 switches it off
  double w_pos = 0.0;      // CLIP: subtracted on positives (SigLIP subtracts w_row)
  double norm = 1.0;       // the true dlogit is norm * grad_loss * (the formed one)
  bool has_positives = false;
  int64_t pos_offset = 0;  // (p, q) is positive where q - p == pos_offset
  at::Tensor row_lse;      // [n] acc dtype; undefined when w_row == 0 or siglip
  at::Tensor col_lse;      // [m] acc dtype; undefined when w_col == 0 or siglip
  // ds already holds the chunk's dot products <P_p, Q_q> (the CPU forward kept them), so
  // the launcher forms the dlogits from them in place instead of recomputing them.
  bool ds_holds_dots = false;
};

#define RFT_DECLARE_KERNELS(DEV)                                                  \
  /* row_lse[p] = LSE_q S_pq; if col_lse is defined, also col_lse[q] = LSE_p    \
     S_pq from the same tiles. */                                               \
  void clip_lse_##DEV(const at::Tensor& P, const at::Tensor& Q,                 \
                      const at::Tensor& scale, const at::Tensor& bias,          \
                      at::Tensor& row_lse, at::Tensor& col_lse);                \
  /* out (0-d) = sum_pq softplus(S_pq). */                                      \
  void siglip_softplus_sum_##DEV(const at::Tensor& P, const at::Tensor& Q,      \
                                 const at::Tensor& scale,                       \
                                 const at::Tensor& bias, at::Tensor& out);      \
  /* One row chunk of dlogits: ds [R, m] (workspace dtype, contiguous) gets the  \
     dlogits of rows [r0, r0 + R) of P against every row of Q, as `spec` says;   \
     stats ([2], acc dtype) is incremented by sum dS_pq <P_p, Q_q> and sum dS_pq  \
     over the chunk (the gradients of the scale and the bias). */               \
  void contrastive_dlogits_##DEV(const DlogitSpec& spec, const at::Tensor& P,   \
                                 const at::Tensor& Q, const at::Tensor& scale,  \
                                 const at::Tensor& bias, int64_t r0,            \
                                 at::Tensor& ds, at::Tensor& stats);            \
  /* out [r, c] (acc dtype, contiguous) = alpha * op(A) @ op(B) + beta * out,    \
     op(X) = X or X^T; A and B are 2-D of unit column stride (rows may be a       \
     column slice of a wider matrix) and of ONE dtype (the workspace             \
     dtype or the accumulation dtype: library GEMMs take one operand type),       \
     alpha is a 0-d acc-dtype tensor on the device, beta 0 or 1                   \
     (launcher_contract.h, check_gemm_acc). */                                     \
  void gemm_acc_##DEV(const at::Tensor& A, bool transpose_a, const at::Tensor& B, \
                      bool transpose_b, const at::Tensor& alpha, double beta,   \
                      at::Tensor& out);                                         \
  /* The dtype of the dlogit workspace and of the GEMM operands for features of   \
     dtype t: the input dtype where the tile products run on tensor cores, the    \
     accumulation dtype otherwise. */                                           \
  at::ScalarType workspace_dtype_##DEV(at::ScalarType t);

RFT_DECLARE_KERNELS(cpu)
RFT_DECLARE_KERNELS(cuda)
RFT_DECLARE_KERNELS(cuda_rules)

#undef RFT_DECLARE_KERNELS

// The CPU forward that keeps its dot products for the backward (contrastive_ops.h,
// "kept dot products"): a CPU has no FLOPs to spare for the backward's recomputation,
// and the n x m products fit in memory whenever they fit the workspace limit.
//  dot_products: dots [n, m] (acc dtype, contiguous) = P Q^T.
//  clip_lse_from_dots / siglip_softplus_sum_from_dots: clip_lse / siglip_softplus_sum
//  from those dot products, which they leave as they are.
void dot_products_cpu(const at::Tensor& P, const at::Tensor& Q, at::Tensor& dots);
void clip_lse_from_dots_cpu(const at::Tensor& dots, const at::Tensor& scale,
                            const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse);
void siglip_softplus_sum_from_dots_cpu(const at::Tensor& dots, const at::Tensor& scale,
                                       const at::Tensor& bias, at::Tensor& out);

}  // namespace robustft
