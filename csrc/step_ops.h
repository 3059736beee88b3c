// The ops of a robust fine-tuning step (m2mix_*, lipsum_*, dive_*, robust_step_*) written
// once on top of a device's step launchers (step_kernels.h). Each device file
// instantiates them with its launchers and registers them with RFT_REGISTER_STEP_OPS.
//
// What the op bodies do themselves, with ATen on the device (all O(n D)): the slerp
// prologue and backward (m2mix_ops.h's mix_rows / mix_rows_backward), the true-pair
// diagonal of m^2-mix, assembling the losses from the launchers' statistics, and the input
// checks. Everything of size n x n (or n x K) stays inside the launchers' passes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

#include "contrastive_ops.h"
#include "m2mix_ops.h"
#include "step_kernels.h"

namespace robustft {

struct StepKernelSet {
  void (*slerp_weights)(const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*fwd)(const StepProblem&, at::Tensor&, at::Tensor&, at::Tensor&);
  void (*grad_rows)(const StepProblem&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                    at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);
  void (*grad_cols)(const StepProblem&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                    at::Tensor&);
};

// The arguments of a step op, optional parts as the schema gives them.
struct StepArgs {
  at::Tensor image, text, clip_scale, m2_scale, lam;
  bool with_m2 = false, with_clip = false;
  c10::optional<at::Tensor> image_pre, lipsum_texts;
  at::Tensor lipsum_scale;
  c10::optional<at::Tensor> ref_image_ft, ref_text_ft, ref_image_pre, ref_text_pre, center;
};

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                  a.device() == b.device(),
              "robustft_ext: ", what, " must be [B, D] tensors of one shape, dtype and device, got ",
              a.sizes(), " ", a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
}

// The launchers' problem, with the mix when m^2 is on (its weights kept for the backward).
struct StepSetup {
  StepProblem p;
  at::Tensor If, Tf;       // [n, D] acc dtype (with m^2 / CLIP)
  at::Tensor weights;      // [4, n] slerp weights (with m^2)
  at::Tensor pair_dot;     // [n] <I_p, T_p> (with m^2 / CLIP)
  int64_t K = 0, n_ref = 0;
};

inline StepSetup step_setup(const StepKernelSet& k, const StepArgs& a) {
  StepSetup s;
  StepProblem& p = s.p;
  p.with_m2 = a.with_m2;
  p.with_clip = a.with_clip;
  p.with_lipsum = given(a.image_pre) || given(a.lipsum_texts);
  p.with_dive = given(a.ref_image_ft) || given(a.ref_text_ft) || given(a.ref_image_pre) ||
                given(a.ref_text_pre) || given(a.center);
  const bool batch = p.with_m2 || p.with_clip || p.with_lipsum;
  if (batch) {
    check_features(a.image, a.text, a.clip_scale, a.m2_scale);
    TORCH_CHECK(a.image.sizes() == a.text.sizes(), "robustft_ext: image and text must have one "
                "shape, got ", a.image.sizes(), " and ", a.text.sizes());
    p.n = a.image.size(0);
    p.I = a.image.contiguous();
    p.T = a.text.contiguous();
    p.m2_scale = a.m2_scale;
    p.clip_scale = a.clip_scale;
  }
  const auto acc = acc_dtype(batch ? a.image.scalar_type() : a.ref_image_ft->scalar_type());
  if (p.with_tiles()) {
    s.If = p.I.to(acc);
    s.Tf = p.T.to(acc);
    s.pair_dot = (s.If * s.Tf).sum(1);
  }
  if (p.with_m2) {
    check_m2_scalar(a.lam, a.image, "lam");
    auto mix = mix_rows(k.slerp_weights, s.If, s.Tf, a.lam);
    p.M = mix.out.to(a.image.scalar_type()).contiguous();
    s.weights = mix.weights;
    p.diag = s.pair_dot * a.m2_scale;
  }
  if (p.with_lipsum) {
    TORCH_CHECK(given(a.image_pre) && given(a.lipsum_texts),
                "robustft_ext: Lipsum needs both image_pre and lipsum_texts");
    check_same_shape(a.image, *a.image_pre, "image and image_pre");
    const auto& G = *a.lipsum_texts;
    TORCH_CHECK(G.dim() == 2 && G.size(0) > 0 && G.size(1) == a.image.size(1) &&
                    G.scalar_type() == a.image.scalar_type() && G.device() == a.image.device(),
                "robustft_ext: lipsum_texts must be [K >= 1, D] like image, got ", G.sizes());
    check_m2_scalar(a.lipsum_scale, a.image, "lipsum_scale");
    p.lip_pre = a.image_pre->contiguous();
    p.lip_texts = G.contiguous();
    p.lip_scale = a.lipsum_scale;
    s.K = G.size(0);
  }
  if (p.with_dive) {
    TORCH_CHECK(given(a.ref_image_ft) && given(a.ref_text_ft) && given(a.ref_image_pre) &&
                    given(a.ref_text_pre) && given(a.center),
                "robustft_ext: DiVE needs ref_image_ft, ref_text_ft, ref_image_pre, "
                "ref_text_pre and center");
    const auto& fi = *a.ref_image_ft;
    check_same_shape(fi, *a.ref_text_ft, "ref_image_ft and ref_text_ft");
    check_same_shape(fi, *a.ref_image_pre, "ref_image_ft and ref_image_pre");
    check_same_shape(fi, *a.ref_text_pre, "ref_image_ft and ref_text_pre");
    TORCH_CHECK(fi.size(0) > 0 && fi.size(1) > 0, "robustft_ext: empty DiVE batch");
    TORCH_CHECK(!batch || (fi.scalar_type() == a.image.scalar_type() &&
                           fi.size(1) == a.image.size(1) && fi.device() == a.image.device()),
                "robustft_ext: the DiVE batch must share the training batch's dtype, D and device");
    const auto& c = *a.center;
    TORCH_CHECK(c.dim() == 1 && c.size(0) == fi.size(1) && c.scalar_type() == acc &&
                    c.device() == fi.device(),
                "robustft_ext: center must be a [D] ", acc, " tensor on ", fi.device(), ", got ",
                c.sizes(), " ", c.scalar_type());
    p.dv_fi = fi.contiguous();
    p.dv_ft = a.ref_text_ft->contiguous();
    p.dv_pi = a.ref_image_pre->contiguous();
    p.dv_pt = a.ref_text_pre->contiguous();
    p.center = c.contiguous();
    s.n_ref = fi.size(0);
  }
  TORCH_CHECK(batch || p.with_dive, "robustft_ext: a step with no term");
  return s;
}

inline at::TensorOptions step_acc_options(const StepArgs& a, const StepSetup& s) {
  const auto& ref = s.p.n > 0 ? a.image : *a.ref_image_ft;
  return ref.options().dtype(acc_dtype(ref.scalar_type()));
}

// (terms [5], diff_mean [D or 0], lse [4, n])
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> step_fwd_impl(const StepKernelSet& k,
                                                                     const StepArgs& a) {
  RFT_KERNEL_GUARDS();
  const auto s = step_setup(k, a);
  const auto& p = s.p;
  const auto opts = step_acc_options(a, s);
  at::Tensor lse = at::zeros({4, p.n}, opts);
  at::Tensor sums = at::zeros({3}, opts);
  at::Tensor diff_mean = at::zeros({p.with_dive ? p.dv_fi.size(1) : 0}, opts);
  k.fwd(p, lse, sums, diff_mean);
  std::array<at::Tensor, 5> t;
  for (auto& x : t) x = at::zeros({}, opts);
  const double n = double(p.n);
  if (p.with_m2) t[kM2] = (lse[0].sum() + lse[1].sum() - 2 * p.diag.sum()) / (2.0 * n);
  if (p.with_clip) {
    t[kClip] = (lse[2].sum() + lse[3].sum() - 2 * a.clip_scale * s.pair_dot.sum()) / (2.0 * n);
  }
  if (p.with_lipsum) t[kLipsum] = sums[0] / (2.0 * double(s.K) * n);
  if (p.with_dive) {
    t[kAvl] = sums[1] / double(s.n_ref);
    t[kPvl] = sums[2] / double(s.n_ref);
  }
  return {at::stack({t[0], t[1], t[2], t[3], t[4]}), diff_mean, lse};
}

// (grad_image, grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
step_bwd_impl(const StepKernelSet& k, const at::Tensor& grad_terms, const StepArgs& a,
              const at::Tensor& lse) {
  RFT_KERNEL_GUARDS();
  const auto s = step_setup(k, a);
  const auto& p = s.p;
  const auto opts = step_acc_options(a, s);
  TORCH_CHECK(grad_terms.numel() == 5, "robustft_ext: grad_terms must hold 5 values");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == p.n,
              "robustft_ext: saved log-sum-exp statistics do not match the inputs");
  const auto grads = grad_terms.to(opts.dtype()).reshape({5}).contiguous();
  const auto lse_c = lse.contiguous();
  const int64_t D = p.n > 0 ? a.image.size(1) : a.ref_image_ft->size(1);
  at::Tensor grad_I = at::zeros({p.n, D}, opts), grad_T = at::zeros({p.n, D}, opts);
  at::Tensor stats = at::zeros({2}, opts);
  at::Tensor grad_fi = at::zeros({s.n_ref, D}, opts), grad_ft = at::zeros({s.n_ref, D}, opts);
  k.grad_rows(p, grads, lse_c, grad_I, grad_T, stats, grad_fi, grad_ft);
  at::Tensor grad_m2_scale = at::zeros({}, opts);
  if (p.with_tiles()) {
    at::Tensor grad_M = p.with_m2 ? at::empty({p.n, D}, opts) : at::Tensor();
    at::Tensor grad_Tc = p.with_clip ? at::empty({p.n, D}, opts) : at::Tensor();
    k.grad_cols(p, grads, lse_c, grad_M, grad_Tc);
    if (p.with_clip) grad_T += grad_Tc;
    if (p.with_m2) {
      // The true pair on the diagonals of A and B, then the slerp backward.
      const auto g_diag = grads[kM2] / (2.0 * p.n) *
                          ((p.diag - lse_c[0]).exp() + (p.diag - lse_c[1]).exp() - 2);
      grad_I += (a.m2_scale * g_diag).unsqueeze(1) * s.Tf;
      grad_T += (a.m2_scale * g_diag).unsqueeze(1) * s.If;
      const auto through_mix = mix_rows_backward(grad_M, s.If, s.Tf, s.weights);
      grad_I += through_mix.first;
      grad_T += through_mix.second;
      grad_m2_scale = stats[0] + (g_diag * s.pair_dot).sum();
    }
  }
  const auto in_dtype = p.n > 0 ? a.image.scalar_type() : a.ref_image_ft->scalar_type();
  return {grad_I.to(in_dtype), grad_T.to(in_dtype), stats[1].clone(), grad_m2_scale,
          grad_fi.to(in_dtype), grad_ft.to(in_dtype)};
}

// ---- The ops, each a step with its terms switched on ----------------------------------
inline StepArgs m2mix_args(const at::Tensor& image, const at::Tensor& text,
                           const at::Tensor& m2_scale, const at::Tensor& lam,
                           const at::Tensor& clip_scale, bool with_clip) {
  check_m2_pair(image, text, lam);
  check_m2_scalar(m2_scale, image, "m2_scale");
  check_m2_scalar(clip_scale, image, "clip_scale");
  StepArgs a;
  a.image = image;
  a.text = text;
  a.clip_scale = clip_scale;
  a.m2_scale = m2_scale;
  a.lam = lam;
  a.with_m2 = true;
  a.with_clip = with_clip;
  return a;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> step_m2mix_fwd(
    const StepKernelSet& k, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& m2_scale, const at::Tensor& lam, const at::Tensor& clip_scale,
    bool with_clip) {
  auto [terms, diff_mean, lse] =
      step_fwd_impl(k, m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip));
  // Separate storage per output: outputs must not alias.
  return {terms[kM2].clone(), terms[kClip].clone(),
          with_clip ? lse : lse.narrow(0, 0, 2).clone()};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_m2mix_bwd(
    const StepKernelSet& k, const at::Tensor& grad_m2, const at::Tensor& grad_clip,
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& m2_scale,
    const at::Tensor& lam, const at::Tensor& clip_scale, const at::Tensor& lse, bool with_clip) {
  const auto a = m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == (with_clip ? 4 : 2) && lse.size(1) == image.size(0),
              "robustft_ext: saved m2mix log-sum-exp statistics do not match the inputs");
  const auto acc = acc_dtype(image.scalar_type());
  at::Tensor lse4 = lse.to(acc);
  if (!with_clip) lse4 = at::cat({lse4, at::zeros_like(lse4)});
  const auto zero = at::zeros({}, lse4.options());
  const auto grads = at::stack({grad_clip.to(acc).reshape({}), grad_m2.to(acc).reshape({}),
                                zero, zero, zero});
  auto r = step_bwd_impl(k, grads, a, lse4);
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r), std::get<2>(r)};
}

inline StepArgs lipsum_args(const at::Tensor& image_ft, const at::Tensor& image_pre,
                            const at::Tensor& texts, const at::Tensor& scale) {
  StepArgs a;
  a.image = image_ft;
  a.text = image_ft;  // unused: no tiles
  a.clip_scale = scale;
  a.m2_scale = scale;
  a.lam = scale;
  a.image_pre = image_pre;
  a.lipsum_texts = texts;
  a.lipsum_scale = scale;
  return a;
}

inline StepArgs dive_args(const at::Tensor& image_ft, const at::Tensor& text_ft,
                          const at::Tensor& image_pre, const at::Tensor& text_pre,
                          const at::Tensor& center) {
  StepArgs a;
  a.ref_image_ft = image_ft;
  a.ref_text_ft = text_ft;
  a.ref_image_pre = image_pre;
  a.ref_text_pre = text_pre;
  a.center = center;
  return a;
}

inline StepArgs robust_args(const at::Tensor& image, const at::Tensor& text,
                            const at::Tensor& clip_scale, const at::Tensor& m2_scale,
                            const at::Tensor& lam, bool with_m2, bool with_clip,
                            const c10::optional<at::Tensor>& image_pre,
                            const c10::optional<at::Tensor>& lipsum_texts,
                            const at::Tensor& lipsum_scale,
                            const c10::optional<at::Tensor>& ref_image_ft,
                            const c10::optional<at::Tensor>& ref_text_ft,
                            const c10::optional<at::Tensor>& ref_image_pre,
                            const c10::optional<at::Tensor>& ref_text_pre,
                            const c10::optional<at::Tensor>& center) {
  StepArgs a;
  a.image = image;
  a.text = text;
  a.clip_scale = clip_scale;
  a.m2_scale = m2_scale;
  a.lam = lam;
  a.with_m2 = with_m2;
  a.with_clip = with_clip;
  a.image_pre = image_pre;
  a.lipsum_texts = lipsum_texts;
  a.lipsum_scale = lipsum_scale;
  a.ref_image_ft = ref_image_ft;
  a.ref_text_ft = ref_text_ft;
  a.ref_image_pre = ref_image_pre;
  a.ref_text_pre = ref_text_pre;
  a.center = center;
  return a;
}

inline at::Tensor grads_one(const at::Tensor& g, StepTerm term, const at::Tensor& like) {
  at::Tensor grads = at::zeros({5}, like.options().dtype(acc_dtype(like.scalar_type())));
  grads[term] = g.to(grads.scalar_type()).reshape({});
  return grads;
}

#define RFT_OPT const c10::optional<at::Tensor>&

// Registers every step op for one dispatch key with that device's launchers.
#define RFT_REGISTER_STEP_OPS(KEY, KERNELS)                                                   \
  TORCH_LIBRARY_IMPL(robustft_ext, KEY, m) {                                                  \
    using namespace ::robustft;                                                               \
    m.impl("slerp", [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& lam) {     \
      return slerp_impl(KERNELS.slerp_weights, a, b, lam);                                     \
    });                                                                                       \
    m.impl("slerp_bwd", [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,     \
                           const at::Tensor& lam) {                                           \
      return slerp_bwd_impl(KERNELS.slerp_weights, g, a, b, lam);                              \
    });                                                                                       \
    m.impl("m2mix_fwd", [](const at::Tensor& i, const at::Tensor& t, const at::Tensor& sm,    \
                           const at::Tensor& lam, const at::Tensor& sc, bool clip) {          \
      return step_m2mix_fwd(KERNELS, i, t, sm, lam, sc, clip);                                \
    });                                                                                       \
    m.impl("m2mix_bwd", [](const at::Tensor& gm, const at::Tensor& gc, const at::Tensor& i,   \
                           const at::Tensor& t, const at::Tensor& sm, const at::Tensor& lam,  \
                           const at::Tensor& sc, const at::Tensor& lse, bool clip) {          \
      return step_m2mix_bwd(KERNELS, gm, gc, i, t, sm, lam, sc, lse, clip);                   \
    });                                                                                       \
    m.impl("lipsum_fwd", [](const at::Tensor& f, const at::Tensor& f0, const at::Tensor& g,   \
                            const at::Tensor& s) {                                            \
      return std::get<0>(step_fwd_impl(KERNELS, lipsum_args(f, f0, g, s)))[kLipsum].clone();  \
    });                                                                                       \
    m.impl("lipsum_bwd", [](const at::Tensor& gl, const at::Tensor& f, const at::Tensor& f0,  \
                            const at::Tensor& g, const at::Tensor& s) {                       \
      return std::get<0>(step_bwd_impl(KERNELS, grads_one(gl, kLipsum, f),                    \
                                       lipsum_args(f, f0, g, s), at::zeros({4, f.size(0)},   \
                                       f.options().dtype(acc_dtype(f.scalar_type())))));     \
    });                                                                                       \
    m.impl("dive_fwd", [](const at::Tensor& fi, const at::Tensor& ft, const at::Tensor& pi,   \
                          const at::Tensor& pt, const at::Tensor& c) {                        \
      auto r = step_fwd_impl(KERNELS, dive_args(fi, ft, pi, pt, c));                          \
      const auto& terms = std::get<0>(r);                                                     \
      return std::make_tuple(terms[kAvl].clone(), terms[kPvl].clone(), std::get<1>(r));       \
    });                                                                                       \
    m.impl("dive_bwd", [](const at::Tensor& ga, const at::Tensor& gp, const at::Tensor& fi,   \
                          const at::Tensor& ft, const at::Tensor& pi, const at::Tensor& pt,   \
                          const at::Tensor& c) {                                              \
      auto grads = grads_one(ga, kAvl, fi);                                                   \
      grads[kPvl] = gp.to(grads.scalar_type()).reshape({});                                   \
      auto r = step_bwd_impl(KERNELS, grads, dive_args(fi, ft, pi, pt, c),                    \
                             at::zeros({4, 0}, grads.options()));                             \
      return std::make_tuple(std::get<4>(r), std::get<5>(r));                                 \
    });                                                                                       \
    m.impl("robust_step_fwd",                                                                 \
           [](const at::Tensor& i, const at::Tensor& t, const at::Tensor& sc,                 \
              const at::Tensor& sm, const at::Tensor& lam, bool with_m2, bool with_clip,      \
              RFT_OPT ip, RFT_OPT g, const at::Tensor& sl, RFT_OPT rfi, RFT_OPT rft,          \
              RFT_OPT rpi, RFT_OPT rpt, RFT_OPT c) {                                          \
             return step_fwd_impl(KERNELS, robust_args(i, t, sc, sm, lam, with_m2, with_clip, \
                                                       ip, g, sl, rfi, rft, rpi, rpt, c));    \
           });                                                                                \
    m.impl("robust_step_bwd",                                                                 \
           [](const at::Tensor& gt, const at::Tensor& i, const at::Tensor& t,                 \
              const at::Tensor& sc, const at::Tensor& sm, const at::Tensor& lam, bool with_m2, \
              bool with_clip, RFT_OPT ip, RFT_OPT g, const at::Tensor& sl, RFT_OPT rfi,       \
              RFT_OPT rft, RFT_OPT rpi, RFT_OPT rpt, RFT_OPT c, const at::Tensor& lse) {      \
             return step_bwd_impl(KERNELS, gt,                                                \
                                  robust_args(i, t, sc, sm, lam, with_m2, with_clip, ip, g,   \
                                              sl, rfi, rft, rpi, rpt, c),                     \
                                  lse);                                                       \
           });                                                                                \
  }

}  // namespace robustft
