// The slerp helpers of the m^2-mix terms (docs/maths.md, section 3), written once with ATen
// on the device (all O(n D)) and shared by every device's step ops (step_ops.h):
//  * check_m2_pair / check_m2_scalar: the input checks of the mixed pair and its scalars;
//  * mix_rows: the slerp prologue, in double: c_p = <I_p, T_p>, the weights from the
//    device's slerp_weights launcher (step_kernels.h; maths::slerp_weights), M = w_a I + w_b T;
//  * mix_rows_backward: the backward of the slerp, dI += w_a dM + k T, dT += w_b dM + k I
//    with k = <dM, I> dw_a/dc + <dM, T> dw_b/dc;
//  * slerp_impl / slerp_bwd_impl: the bodies of the ops slerp and slerp_bwd.
// The m^2-mix tile work (everything of size n x n) is in the step launchers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

#include "contrastive_ops.h"

namespace robustft {

// A device's slerp_weights launcher (step_kernels.h): out [4, n] = (w_a, w_b, dw_a/dc,
// dw_b/dc) for cos [n] and lam (0-d), all double.
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

// The mix of matched rows and its weights [4, n] (w_a, w_b, dw_a/dc, dw_b/dc), in double.
// The whole prologue runs in double (it is O(n D)): near theta = pi the weights grow like
// 1 / sin theta while the mix stays a unit vector, so w_a a + w_b b cancels, and c =
// <a, b> must be exact there for the weights and their derivatives to be right
// (docs/maths.md, section 3).
struct Mix {
  at::Tensor out;      // [n, D] double
  at::Tensor weights;  // [4, n] double
};

inline Mix mix_rows(SlerpWeightsFn slerp_weights, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& lam) {
  const auto ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  at::Tensor w = at::empty({4, a.size(0)}, ad.options());
  slerp_weights((ad * bd).sum(1), lam.to(at::kDouble), w);
  return {w[0].unsqueeze(1) * ad + w[1].unsqueeze(1) * bd, w};
}

// (dA, dB) in double of out = mix(a, b) for the upstream gradient dM.
inline std::pair<at::Tensor, at::Tensor> mix_rows_backward(const at::Tensor& dM,
                                                          const at::Tensor& a,
                                                          const at::Tensor& b,
                                                          const at::Tensor& w) {
  const auto dMd = dM.to(at::kDouble), ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  const auto k = ((dMd * ad).sum(1) * w[2] + (dMd * bd).sum(1) * w[3]).unsqueeze(1);
  return {w[0].unsqueeze(1) * dMd + k * bd, w[1].unsqueeze(1) * dMd + k * ad};
}

inline at::Tensor slerp_impl(SlerpWeightsFn slerp_weights, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  return mix_rows(slerp_weights, a, b, lam).out.to(a.scalar_type());
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
  const auto mix = mix_rows(slerp_weights, a, b, lam);
  auto grads = mix_rows_backward(grad, a, b, mix.weights);
  return {grads.first.to(a.scalar_type()), grads.second.to(b.scalar_type())};
}

}  // namespace robustft
