// The slerp helpers of the m^2-mix terms (docs/maths.md, section 3), written once with ATen on
// the device (all O(n D)) and shared by every device's step ops (step_ops.h):
//  * check_m2_pair / check_m2_scalar: the input checks of the mixed pair and its scalars;
//  * mix_rows: the slerp prologue: c_p = <I_p, T_p>, the weights from the device's
//    slerp_weights launcher (step_kernels.h; maths::slerp_weights), M = w_a I + w_b T;
//  * mix_rows_backward: the backward of the slerp, dI += w_a dM + k T, dT += w_b dM + k I
//    with k = <dM, I> dw_a/dc + <dM, T> dw_b/dc;
//  * slerp_impl / slerp_bwd_impl: the bodies of the ops slerp and slerp_bwd.
// The m^2-mix tile work (everything of size n x n) is in the step launchers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "contrastive_ops.h"

namespace robustft {

// A device's slerp_weights launcher (step_kernels.h): out [4, n] = (w_a, w_b, dw_a/dc,
// dw_b/dc) for cos [n] and lam (0-d), in the accumulation dtype.
using SlerpWeightsFn = void (*)(const at::Tensor&, const at::Tensor&, at::Tensor&);

inline void check_m2_pair(const at::Tensor& a, const at::Tensor& b, const at::Tensor& lam) {
  check_features(a, b, lam, lam);
  TORCH_CHECK(a.sizes() == b.sizes(), "robustft_ext: the mixed pair must have one shape, got ",
              a.sizes(), " and ", b.sizes());
}

inline void check_m2_scalar(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == acc_dtype(a.scalar_type()) &&
                  t.device() == a.device(),
              "robustft_ext: ", name, " must be a 0-d ", acc_dtype(a.scalar_type()),
              " tensor on ", a.device());
}

// The mix of matched rows with its weights [4, n] (w_a, w_b, dw_a/dc, dw_b/dc), in the
// accumulation dtype. af, bf: the rows in the accumulation dtype.
struct Mix {
  at::Tensor out;      // [n, D] acc dtype
  at::Tensor weights;  // [4, n] acc dtype
};

inline Mix mix_rows(SlerpWeightsFn slerp_weights, const at::Tensor& af, const at::Tensor& bf,
                    const at::Tensor& lam) {
  const auto cos = (af * bf).sum(1);
  at::Tensor w = at::empty({4, af.size(0)}, af.options());
  slerp_weights(cos, lam, w);
  return {w[0].unsqueeze(1) * af + w[1].unsqueeze(1) * bf, w};
}

// (dA, dB) of out = mix(a, b) for the upstream gradient dM (all acc dtype).
inline std::pair<at::Tensor, at::Tensor> mix_rows_backward(const at::Tensor& dM,
                                                          const at::Tensor& af,
                                                          const at::Tensor& bf,
                                                          const at::Tensor& w) {
  const auto k = ((dM * af).sum(1) * w[2] + (dM * bf).sum(1) * w[3]).unsqueeze(1);
  return {w[0].unsqueeze(1) * dM + k * bf, w[1].unsqueeze(1) * dM + k * af};
}

inline at::Tensor slerp_impl(SlerpWeightsFn slerp_weights, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  const auto acc = acc_dtype(a.scalar_type());
  return mix_rows(slerp_weights, a.to(acc), b.to(acc), lam).out.to(a.scalar_type());
}

inline std::tuple<at::Tensor, at::Tensor> slerp_bwd_impl(SlerpWeightsFn slerp_weights,
                                                         const at::Tensor& grad,
                                                         const at::Tensor& a,
                                                         const at::Tensor& b,
                                                         const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  TORCH_CHECK(grad.sizes() == a.sizes(), "robustft_ext: slerp_bwd grad_out has shape ",
              grad.sizes(), ", expected ", a.sizes());
  const auto acc = acc_dtype(a.scalar_type());
  const auto af = a.to(acc), bf = b.to(acc);
  const auto mix = mix_rows(slerp_weights, af, bf, lam);
  auto grads = mix_rows_backward(grad.to(acc), af, bf, mix.weights);
  return {grads.first.to(a.scalar_type()), grads.second.to(b.scalar_type())};
}

}  // namespace robustft
