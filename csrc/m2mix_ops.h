// The m^2-mix ops (slerp, slerp_bwd, m2mix_fwd, m2mix_bwd), written once on top of a
// device's launchers (m2mix_kernels.h). Each device file instantiates them with its
// launchers and registers them with RFT_REGISTER_M2MIX_OPS for its dispatch key.
//
// What the op bodies do themselves, with ATen on the device (all O(n D)):
//  * the slerp prologue: c_p = <I_p, T_p>, the weights from the device's
//    slerp_weights launcher (maths::slerp_weights), M = w_a I + w_b T kept as one n x D
//    buffer in the input dtype (the tile launchers read it like I and T);
//  * the true-pair diagonal of A and B (value in the forward, gradient in the backward),
//    which flows to T_p / I_p instead of M_p;
//  * the backward of the slerp: dI += w_a dM + k T, dT += w_b dM + k I with
//    k = <dM, I> dw_a/dc + <dM, T> dw_b/dc.
// Everything of size n x n stays inside the tile launchers' passes.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "contrastive_ops.h"
#include "m2mix_kernels.h"

namespace robustft {

struct M2MixKernelSet {
  void (*slerp_weights)(const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*lse)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*grad_rows)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);
  void (*grad_cols)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, at::Tensor&, at::Tensor&);
};

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

inline Mix mix_rows(const M2MixKernelSet& k, const at::Tensor& af, const at::Tensor& bf,
                    const at::Tensor& lam) {
  const auto cos = (af * bf).sum(1);
  at::Tensor w = at::empty({4, af.size(0)}, af.options());
  k.slerp_weights(cos, lam, w);
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

inline at::Tensor slerp_impl(const M2MixKernelSet& k, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  const auto acc = acc_dtype(a.scalar_type());
  return mix_rows(k, a.to(acc), b.to(acc), lam).out.to(a.scalar_type());
}

inline std::tuple<at::Tensor, at::Tensor> slerp_bwd_impl(const M2MixKernelSet& k,
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
  const auto mix = mix_rows(k, af, bf, lam);
  auto grads = mix_rows_backward(grad.to(acc), af, bf, mix.weights);
  return {grads.first.to(a.scalar_type()), grads.second.to(b.scalar_type())};
}

// The inputs of one m^2-mix problem as the tile launchers read them.
struct M2Problem {
  at::Tensor I, T, M;  // [n, D] contiguous, input dtype
  at::Tensor If, Tf;   // [n, D] accumulation dtype
  at::Tensor weights;  // [4, n] slerp weights
  at::Tensor pair_dot; // [n] <I_p, T_p>
};

inline M2Problem m2_problem(const M2MixKernelSet& k, const at::Tensor& image,
                            const at::Tensor& text, const at::Tensor& m2_scale,
                            const at::Tensor& lam, const at::Tensor& clip_scale) {
  check_m2_pair(image, text, lam);
  check_m2_scalar(m2_scale, image, "m2_scale");
  check_m2_scalar(clip_scale, image, "clip_scale");
  const auto acc = acc_dtype(image.scalar_type());
  M2Problem p;
  p.I = image.contiguous();
  p.T = text.contiguous();
  p.If = p.I.to(acc);
  p.Tf = p.T.to(acc);
  auto mix = mix_rows(k, p.If, p.Tf, lam);
  p.M = mix.out.to(image.scalar_type()).contiguous();
  p.weights = mix.weights;
  p.pair_dot = (p.If * p.Tf).sum(1);
  return p;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> m2mix_fwd_impl(
    const M2MixKernelSet& k, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& m2_scale, const at::Tensor& lam, const at::Tensor& clip_scale,
    bool with_clip) {
  RFT_KERNEL_GUARDS();
  const auto p = m2_problem(k, image, text, m2_scale, lam, clip_scale);
  const int64_t n = image.size(0);
  at::Tensor lse = at::empty({with_clip ? 4 : 2, n}, p.If.options());
  const auto diag = p.pair_dot * m2_scale;
  k.lse(p.I, p.T, p.M, diag, m2_scale, clip_scale, lse);
  // CE_rows(A) + CE_rows(B), both with the true pair diag on the diagonal, halved.
  const auto m2_loss = (lse[0].sum() + lse[1].sum() - 2 * diag.sum()) / (2.0 * n);
  at::Tensor clip_loss = at::zeros({}, p.If.options());
  if (with_clip) {
    clip_loss = (lse[2].sum() + lse[3].sum() - 2 * clip_scale * p.pair_dot.sum()) / (2.0 * n);
  }
  return {m2_loss, clip_loss, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> m2mix_bwd_impl(
    const M2MixKernelSet& k, const at::Tensor& grad_m2, const at::Tensor& grad_clip,
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& m2_scale,
    const at::Tensor& lam, const at::Tensor& clip_scale, const at::Tensor& lse,
    bool with_clip) {
  RFT_KERNEL_GUARDS();
  const auto p = m2_problem(k, image, text, m2_scale, lam, clip_scale);
  const int64_t n = image.size(0);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == (with_clip ? 4 : 2) && lse.size(1) == n,
              "robustft_ext: saved m2mix log-sum-exp statistics do not match the inputs");
  const auto opts = p.If.options();
  const auto grads = at::stack({grad_m2.to(opts.dtype()).reshape({}),
                                grad_clip.to(opts.dtype()).reshape({})});
  const auto lse_c = lse.contiguous();
  at::Tensor grad_I = at::empty({n, image.size(1)}, opts);
  at::Tensor grad_T = at::empty({n, image.size(1)}, opts);
  at::Tensor grad_M = at::empty({n, image.size(1)}, opts);
  at::Tensor grad_Tc = with_clip ? at::empty({n, image.size(1)}, opts) : at::Tensor();
  at::Tensor stats = at::zeros({2}, opts);
  k.grad_rows(grads, p.I, p.T, p.M, m2_scale, clip_scale, lse_c, grad_I, grad_T, stats);
  k.grad_cols(grads, p.I, p.T, p.M, m2_scale, clip_scale, lse_c, grad_M, grad_Tc);
  if (with_clip) grad_T += grad_Tc;

  // The true pair on the diagonals of A and B: d(loss)/d(diag_p) summed over both.
  const auto diag = p.pair_dot * m2_scale;
  const auto g_diag = grads[0] / (2.0 * n) * ((diag - lse_c[0]).exp() + (diag - lse_c[1]).exp() - 2);
  grad_I += (m2_scale * g_diag).unsqueeze(1) * p.Tf;
  grad_T += (m2_scale * g_diag).unsqueeze(1) * p.If;
  // Through the mix M = slerp(I, T; lam).
  const auto through_mix = mix_rows_backward(grad_M, p.If, p.Tf, p.weights);
  grad_I += through_mix.first;
  grad_T += through_mix.second;

  const auto grad_m2_scale = stats[0] + (g_diag * p.pair_dot).sum();
  const auto grad_clip_scale = stats[1].clone();
  return {grad_I.to(image.scalar_type()), grad_T.to(text.scalar_type()), grad_m2_scale,
          grad_clip_scale};
}

// Registers the four m^2-mix ops for one dispatch key with that device's launchers.
#define RFT_REGISTER_M2MIX_OPS(KEY, KERNELS)                                          \
  TORCH_LIBRARY_IMPL(robustft_ext, KEY, m) {                                          \
    m.impl("slerp", [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& lam) { \
      return ::robustft::slerp_impl(KERNELS, a, b, lam);                              \
    });                                                                               \
    m.impl("slerp_bwd", [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, \
                           const at::Tensor& lam) {                                   \
      return ::robustft::slerp_bwd_impl(KERNELS, g, a, b, lam);                       \
    });                                                                               \
    m.impl("m2mix_fwd", [](const at::Tensor& image, const at::Tensor& text,           \
                           const at::Tensor& m2_scale, const at::Tensor& lam,         \
                           const at::Tensor& clip_scale, bool with_clip) {            \
      return ::robustft::m2mix_fwd_impl(KERNELS, image, text, m2_scale, lam,          \
                                        clip_scale, with_clip);                       \
    });                                                                               \
    m.impl("m2mix_bwd",                                                               \
           [](const at::Tensor& g_m2, const at::Tensor& g_clip, const at::Tensor& image, \
              const at::Tensor& text, const at::Tensor& m2_scale, const at::Tensor& lam, \
              const at::Tensor& clip_scale, const at::Tensor& lse, bool with_clip) {  \
             return ::robustft::m2mix_bwd_impl(KERNELS, g_m2, g_clip, image, text,    \
                                               m2_scale, lam, clip_scale, lse,        \
                                               with_clip);                            \
           });                                                                        \
  }

}  // namespace robustft
