// The per-device kernel launchers behind the contrastive ops.
//
// Each device (cpu/, cuda/) implements these three launchers; contrastive_ops.h
// builds the four public ops on top of them once, for every device. Conventions:
//  * P [n, D] and Q [m, D] are contiguous and share one dtype (float, double, half,
//    bfloat16); the logits of this "view" are S_pq = scale * <P_p, Q_q> + bias.
//  * scale, bias and grad_loss are 0-d tensors of the accumulation dtype
//    (double for double inputs, float otherwise) on the device of P.
//  * Outputs are preallocated by the caller in the accumulation dtype.
//  * No launcher allocates anything of size n x m.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace robustft {

// How dL/dS_pq is formed for one view (see maths::clip_dlogit / siglip_dlogit).
struct DlogitSpec {
  bool siglip = false;     // false: CLIP dlogit; true: SigLIP dlogit (weight w_row)
  double w_row = 0.0;      // CLIP: weight of exp(S - row_lse[p]); SigLIP: weight w
  double w_col = 0.0;      // CLIP: weight of exp(S - col_lse[q]); 0 switches it off
  double w_pos = 0.0;      // CLIP: subtracted on positives (SigLIP subtracts w_row)
  bool has_positives = false;
  int64_t pos_offset = 0;  // (p, q) is positive where q - p == pos_offset
  at::Tensor row_lse;      // [n] acc dtype; undefined when w_row == 0 or siglip
  at::Tensor col_lse;      // [m] acc dtype; undefined when w_col == 0 or siglip

  // The same dlogits seen from the transposed problem (rows of Q against P).
  DlogitSpec transposed() const {
    DlogitSpec t = *this;
    if (!siglip) {
      std::swap(t.w_row, t.w_col);
      std::swap(t.row_lse, t.col_lse);
    }
    t.pos_offset = -pos_offset;
    return t;
  }
};

#define RFT_DECLARE_KERNELS(DEV)                                                 \
  /* row_lse[p] = LSE_q S_pq; if col_lse is defined, also col_lse[q] = LSE_p   \
     S_pq from the same tiles. */                                              \
  void clip_lse_##DEV(const at::Tensor& P, const at::Tensor& Q,                \
                      const at::Tensor& scale, const at::Tensor& bias,         \
                      at::Tensor& row_lse, at::Tensor& col_lse);               \
  /* out (0-d) = sum_pq softplus(S_pq). */                                     \
  void siglip_softplus_sum_##DEV(const at::Tensor& P, const at::Tensor& Q,     \
                                 const at::Tensor& scale,                      \
                                 const at::Tensor& bias, at::Tensor& out);     \
  /* One row-streaming gradient pass: grad_P [n, D] = scale * sum_q g dS_pq   \
     Q_q (written, not added). If stats ([2]) is defined: stats[0] = sum_pq    \
     g dS_pq <P_p, Q_q>, stats[1] = sum_pq g dS_pq. The gradient of Q is the   \
     same pass on the transposed problem (Q, P, spec.transposed()). */         \
  void contrastive_grad_rows_##DEV(                                            \
      const DlogitSpec& spec, const at::Tensor& grad_loss, const at::Tensor& P, \
      const at::Tensor& Q, const at::Tensor& scale, const at::Tensor& bias,    \
      at::Tensor& grad_P, at::Tensor& stats);

RFT_DECLARE_KERNELS(cpu)
RFT_DECLARE_KERNELS(cuda)

#undef RFT_DECLARE_KERNELS

}  // namespace robustft
