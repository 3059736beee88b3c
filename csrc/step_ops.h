// The ops of a robust fine-tuning step (slerp*, m2mix_*, lipsum_*, dive_*, robust_step_*)
// written once on top of a device's step launchers (step_kernels.h) and GEMM launchers
// (contrastive_kernels.h). Each device file instantiates them with its launchers and
// registers them with RFT_REGISTER_STEP_OPS.
//
// What the op bodies do themselves, with ATen on the device (all O(n D) or O(n K D)): the
// true-pair diagonal of m^2-mix, the Lipsum-FT product (docs/maths.md, section 5: an n x K
// product with K ~ 80 through the device's GEMM), the chunk loop of the backward with its
// GEMMs, assembling the losses, and the input checks. The slerp prologue and its backward
// and DiVE's sums and gradients are the device's one-pass row launchers; everything of size
// n x n stays inside the tile launchers and the workspace chunks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <vector>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "contrastive_ops.h"
#include "kept_cache.h"
#include "step_args.h"
#include "step_kernels.h"
#include "workspace.h"

namespace robustft {

// The five losses of a step, in the order of robust_step_fwd's `terms` and of `grads`.
enum StepTerm { kClip = 0, kM2 = 1, kLipsum = 2, kAvl = 3, kPvl = 4 };

struct StepKernelSet {
  void (*lse)(const StepProblem&, at::Tensor&);
  void (*dlogits)(const StepProblem&, const at::Tensor&, int64_t, at::Tensor&, at::Tensor&,
                  at::Tensor&, at::Tensor&);
  GemmKernels gemm;
  void (*mix)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&);
  void (*mix_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, at::Tensor&, at::Tensor&);
  void (*dive_sums)(const DiveInputs&, at::Tensor&, at::Tensor&);
  void (*dive_grads)(const DiveInputs&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                     at::Tensor&);
  // The symmetric Gram formulation (step_kernels.h); a device without these launchers (null)
  // evaluates every step with the three tile products. gram_serves (null: every dtype) says
  // whether the device's Gram launchers serve a dtype under the current settings.
  void (*pair_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                        at::Tensor&) = nullptr;
  void (*gram_lse)(const GramProblem&, at::Tensor&) = nullptr;
  void (*gram_strip)(const GramProblem&, const at::Tensor&, int64_t, const at::Tensor&,
                     const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) = nullptr;
  bool (*gram_serves)(at::ScalarType) = nullptr;
  int64_t gram_strip_rows_max = 0;  // 0: as many rows as the workspace allows
  GramLayout gram_layout = GramLayout::kBlocks;  // the strips gram_strip takes
  // The interleaved layout's unstacking of the gradients with pair_backward's terms
  // (step_kernels.h); a device of that layout has it.
  void (*unstack_pair_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                at::Tensor&, at::Tensor&) = nullptr;
  // mix that also writes <I_p, T_p> (step_kernels.h, mix_rows_pair_dot), where the device
  // has it: a step with m^2 then takes the pair's dot products from the slerp prologue's
  // pass over I and T instead of one of their own (null: row_dot_products).
  void (*mix_pair_dot)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                       at::Tensor&, at::Tensor&) = nullptr;
};

// The input checks of the mixed pair and its scalars (the op-level contract).
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

// The slerp op: out_p = slerp(a_p, b_p; lam) in the inputs' dtype, rounded once from the
// double mix (docs/maths.md, section 3).
inline at::Tensor slerp_impl(const StepKernelSet& k, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  const auto ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(ac.sizes(), ac.options());
  at::Tensor weights = at::empty({4, ac.size(0)}, ac.options().dtype(at::kDouble));
  k.mix(ac, bc, lam.to(at::kDouble), out, weights);
  return out;
}

// (grad_a, grad_b) of the slerp op for the upstream gradient grad.
inline std::tuple<at::Tensor, at::Tensor> slerp_bwd_impl(const StepKernelSet& k,
                                                         const at::Tensor& grad,
                                                         const at::Tensor& a,
                                                         const at::Tensor& b,
                                                         const at::Tensor& lam) {
  RFT_KERNEL_GUARDS();
  check_m2_pair(a, b, lam);
  TORCH_CHECK(grad.sizes() == a.sizes(), "robustft_ext: slerp_bwd grad_out has shape ",
              grad.sizes(), ", expected ", a.sizes());
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto acc = acc_dtype(a.scalar_type());
  const auto opts = ac.options().dtype(acc);
  // The weights alone (an undefined M): the mixed rows themselves are not needed.
  at::Tensor weights = at::empty({4, ac.size(0)}, ac.options().dtype(at::kDouble)), no_mix;
  k.mix(ac, bc, lam.to(at::kDouble), no_mix, weights);
  at::Tensor grad_a = at::zeros(ac.sizes(), opts), grad_b = at::zeros(ac.sizes(), opts);
  k.mix_backward(grad.to(acc).contiguous(), ac, bc, weights, at::zeros({ac.size(0)}, opts),
                 grad_a, grad_b);
  return {grad_a.to(a.scalar_type()), grad_b.to(b.scalar_type())};
}

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                  a.device() == b.device(),
              "robustft_ext: ", what, " must be [B, D] tensors of one shape, dtype and device, got ",
              a.sizes(), " ", a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
}

// Lipsum-FT's inputs (docs/maths.md, section 5): F = the training rows of image, F0 = P.
struct LipsumInputs {
  at::Tensor F, P, G;  // [n, D], [n, D], [K, D], contiguous
  at::Tensor scale;    // 0-d s_0
};

// The launchers' problem, with the mix when m^2 is on (its weights kept for the backward).
struct StepSetup {
  StepProblem p;
  bool gram = false;  // the tile work by the Gram formulation (g), else by p's three products
  GramProblem g;
  bool with_lipsum = false, with_dive = false;
  LipsumInputs lip;
  DiveInputs dive;
  at::Tensor weights;      // [4, n] double slerp weights (with m^2)
  at::Tensor pair_dot;     // [n] acc <I_p, T_p> (with m^2 / CLIP)
  at::ScalarType acc = at::kFloat;
  at::TensorOptions acc_options;
};

// What a CPU forward that keeps its products (the _keep ops) also hands its backward, so
// that the backward does not form it again: the list [pair_dot, weights, stacked, lipsum_v]
// of a step's <I_p, T_p> ([n] acc, with m^2 or CLIP), slerp weights ([4, n] double, with
// m^2), the Gram strips' stacked rows X ([2 n, D] of the workspace dtype, with m^2 under the
// Gram design where the device's strips take them) and Lipsum's products V ([n, K] acc, where
// one chunk holds them). An entry the step does not form is empty ([0] of the accumulation
// dtype), so that the shapes depend on the arguments and settings alone, as the ops' fakes
// (robustft_ext/ops/m2mix.py, carry_fakes) need.
enum CarryEntry : int64_t { kCarryPairDot, kCarryWeights, kCarryStacked, kCarryLipsumV, kCarryEntries };
using StepCarry = std::vector<at::Tensor>;

// Entry e of a carry from the forward (nullptr: none, the backward forms it), checked against
// the shape and dtype the backward would form it in: a carry is only valid for the arguments
// of its own forward.
inline const at::Tensor* carried_entry(const StepCarry* carried, CarryEntry e,
                                       at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (carried == nullptr) return nullptr;
  TORCH_CHECK(int64_t(carried->size()) == kCarryEntries,
              "robustft_ext: carried must be the forward's list of ", int64_t(kCarryEntries),
              " tensors, got ", carried->size());
  const at::Tensor& t = (*carried)[e];
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == opts.dtype().toScalarType() &&
                  t.device() == opts.device() && t.is_contiguous(),
              "robustft_ext: carried[", int64_t(e), "] must be the forward's contiguous ", sizes,
              " ", opts.dtype().toScalarType(), " tensor on ", opts.device(), ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
  return &t;
}

inline void setup_lipsum(const StepArgs& a, StepSetup& s) {
  TORCH_CHECK(given(a.image_pre) && given(a.lipsum_texts),
              "robustft_ext: Lipsum needs both image_pre and lipsum_texts");
  check_same_shape(a.image, *a.image_pre, "image and image_pre");
  const auto& G = *a.lipsum_texts;
  TORCH_CHECK(G.dim() == 2 && G.size(0) > 0 && G.size(1) == a.image.size(1) &&
                  G.scalar_type() == a.image.scalar_type() && G.device() == a.image.device(),
              "robustft_ext: lipsum_texts must be [K >= 1, D] like image, got ", G.sizes());
  check_m2_scalar(a.lipsum_scale, a.image, "lipsum_scale");
  s.lip = LipsumInputs{a.image.contiguous(), a.image_pre->contiguous(), G.contiguous(),
                       a.lipsum_scale};
}

inline void setup_dive(const StepArgs& a, bool batch, StepSetup& s) {
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
  TORCH_CHECK(c.dim() == 1 && c.size(0) == fi.size(1) && c.scalar_type() == s.acc &&
                  c.device() == fi.device(),
              "robustft_ext: center must be a [D] ", s.acc, " tensor on ", fi.device(), ", got ",
              c.sizes(), " ", c.scalar_type());
  s.dive = DiveInputs{fi.contiguous(), a.ref_text_ft->contiguous(), a.ref_image_pre->contiguous(),
                      a.ref_text_pre->contiguous(), c.contiguous()};
}

// Whether a step with m^2 is evaluated by the Gram formulation: the design asks for it and
// the device has its launchers for this dtype.
inline bool gram_wanted(const StepKernelSet& k, at::ScalarType dtype) {
  return step_design() == StepDesign::kGram && k.gram_lse != nullptr &&
         (k.gram_serves == nullptr || k.gram_serves(dtype));
}

// The strips of the Gram formulation for n rows of element size `elem` in the workspace:
// rows per strip (at most max_rows unless 0; the backward's chunk is a strip), and the
// strips a forward keeps within the workspace limit, packed (gram_kept_strip, step_kernels.h),
// with their entries.
struct GramStrips {
  int64_t rows = 0, kept = 0, entries = 0;
};

inline GramStrips gram_strips(int64_t n, int64_t elem, int64_t max_rows) {
  GramStrips g;
  g.rows = workspace_chunk_rows(n, 4 * n * elem, kChunkAlign);
  if (max_rows > 0) g.rows = std::min(g.rows, max_rows);
  const int64_t limit = workspace_limit_bytes().load();
  for (int64_t r0 = 0; r0 < n; r0 += g.rows) {
    const int64_t more = gram_strip_entries(n, g.rows, g.kept);
    if ((g.entries + more) * elem > limit) break;
    g.entries += more;
    ++g.kept;
  }
  return g;
}

// X [2 n, D] of `dtype` = [I_0; T_0; I_1; T_1; ...]: block b holds the rows [b R, (b + 1) R)
// of I, then the same rows of T (the last block fewer where R does not divide n). Strip j's
// rows of the interleaved layout are X's block j, its columns the blocks from j on, both
// contiguous.
inline at::Tensor interleave_strips(const at::Tensor& I, const at::Tensor& T, int64_t R,
                                    at::ScalarType dtype) {
  const int64_t n = I.size(0), D = I.size(1), full = n / R * R, rest = n - full;
  at::Tensor X = cached_empty({2 * n, D}, I.options().dtype(dtype));
  if (full > 0) {
    at::Tensor blocks = X.narrow(0, 0, 2 * full).view({full / R, 2, R, D});
    blocks.select(1, 0).copy_(I.narrow(0, 0, full).view({full / R, R, D}));
    blocks.select(1, 1).copy_(T.narrow(0, 0, full).view({full / R, R, D}));
  }
  if (rest > 0) {
    X.narrow(0, 2 * full, rest).copy_(I.narrow(0, full, rest));
    X.narrow(0, 2 * full + rest, rest).copy_(T.narrow(0, full, rest));
  }
  return X;
}

// Whether the slerp weights stay within the Gram formulation's limit (docs/maths.md, section
// 9.4): a batch with a near-opposite pair takes the three products, whose M is formed in
// double. (One host synchronisation, on the weights' maximum.)
inline bool weights_suit_gram(const at::Tensor& weights) {
  return weights.narrow(0, 0, 2).abs().max().item<double>() <= kGramWeightLimit;
}

// allow_gram false: the three products whatever the design (the backward of kept three-view
// dot products). carried: what the forward formed (StepCarry), taken instead of forming it.
inline StepSetup step_setup(const StepKernelSet& k, const StepArgs& a, bool allow_gram = true,
                            const StepCarry* carried = nullptr) {
  StepSetup s;
  StepProblem& p = s.p;
  p.with_m2 = a.with_m2;
  p.with_clip = a.with_clip;
  s.with_lipsum = given(a.image_pre) || given(a.lipsum_texts);
  s.with_dive = given(a.ref_image_ft) || given(a.ref_text_ft) || given(a.ref_image_pre) ||
                given(a.ref_text_pre) || given(a.center);
  const bool batch = p.with_m2 || p.with_clip || s.with_lipsum;
  TORCH_CHECK(batch || s.with_dive, "robustft_ext: a step with no term");
  const auto& dtype_source = batch ? a.image : *a.ref_image_ft;
  s.acc = acc_dtype(dtype_source.scalar_type());
  s.acc_options = dtype_source.options().dtype(s.acc);
  if (batch) {
    check_features(a.image, a.text, a.clip_scale, a.m2_scale);
    TORCH_CHECK(a.image.sizes() == a.text.sizes(), "robustft_ext: image and text must have one "
                "shape, got ", a.image.sizes(), " and ", a.text.sizes());
    p.n = a.image.size(0);
  }
  if (p.with_m2 || p.with_clip) {
    p.I = a.image.contiguous();
    p.T = a.text.contiguous();
    p.m2_scale = a.m2_scale;
    p.clip_scale = a.clip_scale;
    const auto* pair = carried_entry(carried, kCarryPairDot, {p.n}, s.acc_options);
    if (pair != nullptr) s.pair_dot = *pair;
  }
  if (p.with_m2) {
    check_m2_scalar(a.lam, a.image, "lam");
    const auto lam = a.lam.to(at::kDouble);
    const auto* weights =
        carried_entry(carried, kCarryWeights, {4, p.n}, p.I.options().dtype(at::kDouble));
    s.weights = weights != nullptr ? *weights : at::empty({4, p.n}, p.I.options().dtype(at::kDouble));
    // The slerp prologue, which forms <I_p, T_p> in double for the weights: where the device
    // can, it also writes them as the pair's dot products (once, the first time).
    auto mix = [&](at::Tensor& M) {
      if (k.mix_pair_dot != nullptr && !s.pair_dot.defined()) {
        s.pair_dot = at::empty({p.n}, s.acc_options);
        k.mix_pair_dot(p.I, p.T, lam, M, s.weights, s.pair_dot);
      } else {
        k.mix(p.I, p.T, lam, M, s.weights);
      }
    };
    s.gram = allow_gram && gram_wanted(k, a.image.scalar_type());
    if (s.gram) {
      at::Tensor no_mix;
      if (weights == nullptr) mix(no_mix);
      s.gram = weights_suit_gram(s.weights);
    }
    if (!s.gram) {
      // (The mix writes the weights again: not into the forward's carry, an input.)
      if (weights != nullptr) s.weights = at::empty({4, p.n}, p.I.options().dtype(at::kDouble));
      // The tile operand: rounded once to the dtype the device's tile products take.
      p.M = at::empty(p.I.sizes(), p.I.options().dtype(k.gemm.workspace_dtype(a.image.scalar_type())));
      mix(p.M);
    }
  }
  if ((p.with_m2 || p.with_clip) && !s.pair_dot.defined()) {
    s.pair_dot = row_dot_products(p.I, p.T);
  }
  if (p.with_m2) {
    p.diag = s.pair_dot * a.m2_scale;
    if (s.gram) {
      const auto ws_dtype = k.gemm.workspace_dtype(a.image.scalar_type());
      s.g = GramProblem{p.n, p.with_clip, p.I, p.T, s.weights, p.diag, a.m2_scale,
                        p.with_clip ? a.clip_scale : at::Tensor(),
                        gram_strips(p.n, at::elementSize(ws_dtype), k.gram_strip_rows_max).rows};
      s.g.layout = k.gram_layout;
      if (s.g.layout == GramLayout::kInterleaved) {
        const auto* stacked = carried_entry(carried, kCarryStacked, {2 * p.n, p.I.size(1)},
                                            p.I.options().dtype(ws_dtype));
        s.g.stacked = stacked != nullptr ? *stacked
                                         : interleave_strips(p.I, p.T, s.g.strip_rows, ws_dtype);
      }
    }
  }
  if (s.with_lipsum) setup_lipsum(a, s);
  if (s.with_dive) setup_dive(a, batch, s);
  return s;
}

// V = (F - P) G^T for rows [r0, r0 + r), in the accumulation dtype. Where the GEMMs take
// 16-bit operands, two GEMMs of the exact inputs (F G^T - P G^T, accumulated in float)
// rather than one of their difference rounded to 16 bits; where they take the accumulation
// dtype (the CPU, float32 on CUDA), one GEMM of the difference formed in that dtype, which
// is as exact and half the work.
inline at::Tensor lipsum_dots(const GemmKernels& g, const LipsumInputs& lip, int64_t r0, int64_t r,
                              const at::Tensor& one, const at::Tensor& minus_one) {
  at::Tensor v = cached_empty({r, lip.G.size(0)}, one.options());
  const auto G = gemm_operand(g, lip.G);
  const auto F = lip.F.narrow(0, r0, r), P = lip.P.narrow(0, r0, r);
  if (g.workspace_dtype(F.scalar_type()) == one.scalar_type()) {
    // The difference in a buffer from the block cache (kept_cache.h), as every n x D buffer
    // of a step: its own allocation would be faulted in afresh each step.
    at::Tensor diff = cached_empty(F.sizes(), one.options());
    at::sub_out(diff, F.to(diff.scalar_type()), P.to(diff.scalar_type()));
    g.gemm_acc(diff, false, G, true, one, 0.0, v);
    return v;
  }
  g.gemm_acc(gemm_operand(g, F), false, G, true, one, 0.0, v);
  g.gemm_acc(gemm_operand(g, P), false, G, true, minus_one, 1.0, v);
  return v;
}

// Rows per chunk of the Lipsum product (an n x K block in the accumulation dtype, K the
// number of random texts): as many as fit in the workspace limit. The half-the-rows cap of
// workspace_chunk_rows is for n x n blocks; an n x K one may be whole.
inline int64_t lipsum_chunk_rows(const LipsumInputs& lip, const at::Tensor& one) {
  const int64_t per_row = std::max<int64_t>(1, lip.G.size(0) * one.element_size());
  return std::min(lip.F.size(0), std::max<int64_t>(1, workspace_limit_bytes().load() / per_row));
}

// sum_pk (s_0 V_pk)^2 (docs/maths.md, section 5). With keep_v, V in *keep_v where one chunk
// holds it (else *keep_v is left as it is).
inline at::Tensor lipsum_sum_sq(const GemmKernels& g, const LipsumInputs& lip,
                                const at::TensorOptions& acc, at::Tensor* keep_v = nullptr) {
  const auto one = at::ones({}, acc), minus_one = -one;
  const int64_t n = lip.F.size(0), rows = lipsum_chunk_rows(lip, one);
  at::Tensor total = at::zeros({}, acc);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const at::Tensor v = lipsum_dots(g, lip, r0, std::min(rows, n - r0), one, minus_one);
    total += v.square().sum();
    if (keep_v != nullptr && rows == n) *keep_v = v;
  }
  return total * lip.scale * lip.scale;
}

// grad_F += w s_0^2 V G with w = g_lipsum / (K n). V is formed in the accumulation dtype, so
// G joins it there (a GEMM takes one operand dtype): rounding V to 16 bits instead would add
// an error the forward does not have, and G is only K x D. v_all: the forward's V, whole
// (none: formed again chunk by chunk).
inline void lipsum_backward(const GemmKernels& g, const LipsumInputs& lip, const at::Tensor& w,
                            at::Tensor& grad_F, const at::Tensor* v_all = nullptr) {
  const auto one = at::ones({}, grad_F.options()), minus_one = -one;
  const int64_t n = lip.F.size(0), rows = lipsum_chunk_rows(lip, one);
  const auto alpha = w * lip.scale * lip.scale;
  const auto G = lip.G.to(one.scalar_type()).contiguous();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const at::Tensor v = v_all != nullptr ? v_all->narrow(0, r0, r)
                                          : lipsum_dots(g, lip, r0, r, one, minus_one);
    at::Tensor grad_rows = grad_F.narrow(0, r0, r);
    g.gemm_acc(v, false, G, false, alpha, 1.0, grad_rows);
  }
}

// (terms [5], diff_mean [D or 0], lse [4, n])
// The number of dot-product views of a step's tiles (A, B with m^2; C with CLIP).
inline int64_t step_views(const StepProblem& p) { return (p.with_m2 ? 2 : 0) + (p.with_clip ? 1 : 0); }

// With `kept`, the forward also returns in *kept the views' dot products [V, n, n] for the
// backward (StepProblem::keep; the CPU's kept dot products, contrastive_ops.h): the backward
// then needs no GEMM to recompute them. Refused when they would exceed the workspace limit
// (the caller decides beforehand, so that the output's shape is known).
// With `carry` (and `kept`), also what the backward would form again (StepCarry).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> step_fwd_impl(const StepKernelSet& k,
                                                                     const StepArgs& a,
                                                                     at::Tensor* kept = nullptr,
                                                                     StepCarry* carry = nullptr) {
  RFT_KERNEL_GUARDS();
  auto s = step_setup(k, a);
  auto& p = s.p;
  const auto& opts = s.acc_options;
  if (kept != nullptr && p.with_m2 && gram_wanted(k, a.image.scalar_type())) {
    // The Gram blocks of the strips that fit the limit, packed; a batch that the weights'
    // limit sends to the three products keeps nothing (the buffer stays unused).
    const auto ws_dtype = k.gemm.workspace_dtype(a.image.scalar_type());
    const auto strips = gram_strips(p.n, at::elementSize(ws_dtype), k.gram_strip_rows_max);
    TORCH_CHECK(strips.kept > 0, "robustft_ext: not one Gram strip of ", strips.rows,
                " rows fits the workspace limit of ", workspace_limit_bytes().load(),
                " bytes (use the forward that keeps nothing)");
    *kept = cached_empty({strips.entries}, a.image.options().dtype(ws_dtype));
    if (s.gram) s.g.keep = *kept;
  } else if (kept != nullptr) {
    const auto ws_dtype = k.gemm.workspace_dtype(a.image.scalar_type());
    const int64_t views = step_views(p);
    const int64_t bytes = views * p.n * p.n * int64_t(at::elementSize(ws_dtype));
    const int64_t limit = workspace_limit_bytes().load();
    TORCH_CHECK(views > 0, "robustft_ext: a step without m^2 or CLIP has no dot products to keep");
    TORCH_CHECK(bytes <= limit, "robustft_ext: keeping the step's ", views, " x ", p.n, " x ",
                p.n, " dot products takes ", bytes, " bytes, more than the workspace limit of ",
                limit, " bytes (use the forward that keeps nothing)");
    p.keep = cached_empty({views, p.n, p.n}, a.image.options().dtype(ws_dtype));
    *kept = p.keep;
  }
  at::Tensor lse = at::zeros({4, p.n}, opts);
  if (s.gram) {
    k.gram_lse(s.g, lse);
  } else if (p.with_m2 || p.with_clip) {
    k.lse(p, lse);
  }
  std::array<at::Tensor, 5> t;
  for (auto& x : t) x = at::zeros({}, opts);
  at::Tensor diff_mean = at::zeros({s.with_dive ? s.dive.fi.size(1) : 0}, opts);
  const double n = double(p.n);
  if (p.with_m2) t[kM2] = (lse[0].sum() + lse[1].sum() - 2 * p.diag.sum()) / (2.0 * n);
  if (p.with_clip) {
    t[kClip] = (lse[2].sum() + lse[3].sum() - 2 * a.clip_scale * s.pair_dot.sum()) / (2.0 * n);
  }
  at::Tensor lipsum_v;
  if (s.with_lipsum) {
    t[kLipsum] = lipsum_sum_sq(k.gemm, s.lip, opts, carry != nullptr ? &lipsum_v : nullptr) /
                 (2.0 * double(s.lip.G.size(0)) * n);
  }
  if (s.with_dive) {
    const double n_ref = double(s.dive.fi.size(0));
    at::Tensor sums = at::empty({2}, opts);
    k.dive_sums(s.dive, sums, diff_mean);
    t[kAvl] = sums[0] / n_ref;
    t[kPvl] = sums[1] / n_ref;
  }
  if (carry != nullptr) {
    const auto none = at::empty({0}, opts);
    carry->assign(kCarryEntries, none);
    if (p.with_m2 || p.with_clip) (*carry)[kCarryPairDot] = s.pair_dot;
    if (p.with_m2) (*carry)[kCarryWeights] = s.weights;
    if (p.with_m2 && gram_wanted(k, a.image.scalar_type()) &&
        k.gram_layout == GramLayout::kInterleaved) {
      // (Weights that send the batch to the three products leave the entry unused.)
      const auto ws_dtype = k.gemm.workspace_dtype(a.image.scalar_type());
      (*carry)[kCarryStacked] =
          s.gram ? s.g.stacked : at::empty({2 * p.n, p.I.size(1)}, p.I.options().dtype(ws_dtype));
    }
    if (lipsum_v.defined()) (*carry)[kCarryLipsumV] = lipsum_v;
  }
  return {at::stack({t[0], t[1], t[2], t[3], t[4]}), diff_mean, lse};
}

// The tile terms' gradients: grad_I, grad_T [n, D] (written), grad_M [n, D] (written, with
// m^2) and the two scale statistics, from chunks of dlogits (step_kernels.h).
struct TileGrads {
  at::Tensor grad_I, grad_T, grad_M, stats;
};

inline TileGrads tile_backward(const StepKernelSet& k, const StepSetup& s, const at::Tensor& grads,
                               const at::Tensor& lse) {
  const auto& p = s.p;
  const int64_t n = p.n, D = p.I.size(1);
  const auto& opts = s.acc_options;
  TileGrads out{at::zeros({n, D}, opts), at::zeros({n, D}, opts),
                p.with_m2 ? at::zeros({n, D}, opts) : at::Tensor(), at::zeros({2}, opts)};
  // The dlogits' true factors (step_kernels.h) times the logit scales: the GEMMs' alphas.
  const auto f_m2 = grads[kM2] / (2.0 * n), f_clip = grads[kClip] / double(n);
  const auto alpha_m2 = p.with_m2 ? p.m2_scale * f_m2 : at::Tensor();
  const auto alpha_clip = p.with_clip ? p.clip_scale * f_clip : at::Tensor();
  const auto ws_dtype = k.gemm.workspace_dtype(p.I.scalar_type());
  const int64_t per_row = n * at::elementSize(ws_dtype) * step_views(p);
  // Kept dot products are one chunk of every row, their dlogits formed in place.
  const bool kept = p.keep.defined();
  const int64_t rows = kept ? n : workspace_chunk_rows(n, per_row, kChunkAlign);
  const auto ws_opts = p.I.options().dtype(ws_dtype);
  at::Tensor wsA, wsB, wsC;
  if (p.with_m2) {
    wsA = kept ? p.keep[0] : at::empty({rows, n}, ws_opts);
    wsB = kept ? p.keep[1] : at::empty({rows, n}, ws_opts);
  }
  if (p.with_clip) wsC = kept ? p.keep[step_views(p) - 1] : at::empty({rows, n}, ws_opts);
  const auto I = gemm_operand(k.gemm, p.I), T = gemm_operand(k.gemm, p.T);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor dA = p.with_m2 ? wsA.narrow(0, 0, r) : at::Tensor();
    at::Tensor dB = p.with_m2 ? wsB.narrow(0, 0, r) : at::Tensor();
    at::Tensor dC = p.with_clip ? wsC.narrow(0, 0, r) : at::Tensor();
    k.dlogits(p, lse, r0, dA, dB, dC, out.stats);
    at::Tensor gI = out.grad_I.narrow(0, r0, r), gT = out.grad_T.narrow(0, r0, r);
    const auto I_rows = I.narrow(0, r0, r), T_rows = T.narrow(0, r0, r);
    // Every GEMM adds (beta 1): rows of grad_T receive CLIP's column terms from every chunk.
    if (p.with_m2) {
      k.gemm.gemm_acc(dA, false, p.M, false, alpha_m2, 1.0, gI);
      k.gemm.gemm_acc(dB, false, p.M, false, alpha_m2, 1.0, gT);
      k.gemm.gemm_acc(dA, true, I_rows, false, alpha_m2, 1.0, out.grad_M);
      k.gemm.gemm_acc(dB, true, T_rows, false, alpha_m2, 1.0, out.grad_M);
    }
    if (p.with_clip) {
      k.gemm.gemm_acc(dC, false, T, false, alpha_clip, 1.0, gI);
      k.gemm.gemm_acc(dC, true, I_rows, false, alpha_clip, 1.0, out.grad_T);
    }
  }
  const auto zero = at::zeros({}, opts);
  out.stats = at::stack({p.with_m2 ? out.stats[0] * f_m2 : zero,
                         p.with_clip ? out.stats[1] * f_clip : zero});
  return out;
}

// The tile terms' gradients by the Gram formulation (docs/maths.md, section 9.4): strips of
// rows [r0, r1) against the columns [r0, n), each formed by the device into the four blocks
// of S / (|a_m| + |a_c|) in the workspace, from which GEMMs take every gradient (eight per
// strip in the blocks layout; two in the interleaved one, into the gradients of X =
// [I_0; T_0; ...]); then the true pair's and the slerp weights' terms per row. grad_I, grad_T
// are written; the scale statistics returned in stats as tile_backward's.
inline TileGrads gram_backward(const StepKernelSet& k, const StepSetup& s, const at::Tensor& grads,
                               const at::Tensor& lse) {
  const auto& g = s.g;
  const int64_t n = g.n, D = g.I.size(1);
  const auto& opts = s.acc_options;
  const bool interleaved = g.layout == GramLayout::kInterleaved;
  // (The interleaved layout writes every gradient row whole: unstack_pair_backward.)
  auto rows_of_D = [&] { return interleaved ? cached_empty({n, D}, opts) : at::zeros({n, D}, opts); };
  TileGrads out{rows_of_D(), rows_of_D(), at::Tensor(), at::zeros({2}, opts)};
  const auto zero = at::zeros({}, opts);
  const auto f_m2 = grads[kM2] / (2.0 * n), f_clip = grads[kClip] / double(n);
  const auto a_m = g.m2_scale * f_m2;
  const auto a_c = g.with_clip ? g.clip_scale * f_clip : zero;
  // S is stored divided by norm, so that 16-bit workspaces hold entries of order one; the
  // GEMMs multiply it back. (No gradient at all: S = 0, any norm.)
  const auto norm = (a_m.abs() + a_c.abs()).clamp_min(std::numeric_limits<float>::min());
  const auto r_m = a_m / norm, r_c = a_c / norm;
  const auto ws_dtype = k.gemm.workspace_dtype(g.I.scalar_type());
  const int64_t rows = g.strip_rows;
  // The kept strips are formed in place; the later strips reuse the first strip's entries
  // (the widest strip: it holds any other), else a workspace of that size.
  const int64_t kept = g.keep.defined() ? gram_kept_count(n, rows, g.keep.numel()) : 0;
  const at::Tensor ws = kept > 0 ? gram_kept_strip(g.keep, n, rows, 0)
                                 : cached_empty({gram_strip_entries(n, rows, 0)},
                                                g.I.options().dtype(ws_dtype));
  at::Tensor u = at::zeros({2, n}, opts), stats = at::zeros({2}, opts);
  // Strip j, rows [r0, r0 + R), formed in its kept entries or the workspace as `shape`.
  auto form_strip = [&](int64_t j, int64_t r0, std::initializer_list<int64_t> shape) {
    at::Tensor S = (j < kept ? gram_kept_strip(g.keep, n, rows, j) : ws)
                       .narrow(0, 0, c10::multiply_integers(shape))
                       .view(shape);
    k.gram_strip(g, lse, r0, r_m, r_c, S, stats, u);
    return S;
  };
  at::Tensor grad_X;  // the interleaved layout's
  if (interleaved) {
    TORCH_CHECK(k.unstack_pair_backward != nullptr,
                "robustft_ext: a device of the interleaved Gram layout needs unstack_pair_backward");
    // X's gradient: strip j's rows (X's block j) take S X_c; the blocks past it take S's
    // columns past its own block, transposed, times X_r. The first strip's two products
    // cover every row of X, so they write rather than add (beta 0 reads nothing).
    grad_X = cached_empty({2 * n, D}, opts);
    for (int64_t r0 = 0, j = 0; r0 < n; r0 += rows, ++j) {
      const int64_t R = std::min(rows, n - r0), W = n - r0;
      const double beta = j == 0 ? 0.0 : 1.0;
      const at::Tensor S = form_strip(j, r0, {2 * R, 2 * W});
      at::Tensor own = grad_X.narrow(0, 2 * r0, 2 * R);
      k.gemm.gemm_acc(S, false, g.stacked.narrow(0, 2 * r0, 2 * W), false, norm, beta, own);
      if (W > R) {
        at::Tensor past = grad_X.narrow(0, 2 * (r0 + R), 2 * (W - R));
        k.gemm.gemm_acc(S.narrow(1, 2 * R, 2 * (W - R)), true,
                        g.stacked.narrow(0, 2 * r0, 2 * R), false, norm, beta, past);
      }
    }
  } else {
    const auto I = gemm_operand(k.gemm, g.I), T = gemm_operand(k.gemm, g.T);
    for (int64_t r0 = 0, j = 0; r0 < n; r0 += rows, ++j) {
      const int64_t R = std::min(rows, n - r0), W = n - r0;
      const at::Tensor S = form_strip(j, r0, {4, R, W});
      at::Tensor gI = out.grad_I.narrow(0, r0, R), gT = out.grad_T.narrow(0, r0, R);
      const auto Ic = I.narrow(0, r0, W), Tc = T.narrow(0, r0, W);
      k.gemm.gemm_acc(S[0], false, Ic, false, norm, 1.0, gI);
      k.gemm.gemm_acc(S[1], false, Tc, false, norm, 1.0, gI);
      k.gemm.gemm_acc(S[2], false, Ic, false, norm, 1.0, gT);
      k.gemm.gemm_acc(S[3], false, Tc, false, norm, 1.0, gT);
      if (W > R) {  // the columns past the strip's own rows, transposed onto their rows
        at::Tensor gIq = out.grad_I.narrow(0, r0 + R, W - R);
        at::Tensor gTq = out.grad_T.narrow(0, r0 + R, W - R);
        const auto Ir = I.narrow(0, r0, R), Tr = T.narrow(0, r0, R);
        auto beyond = [&](int64_t b) { return S[b].narrow(1, R, W - R); };
        k.gemm.gemm_acc(beyond(0), true, Ir, false, norm, 1.0, gIq);
        k.gemm.gemm_acc(beyond(2), true, Tr, false, norm, 1.0, gIq);
        k.gemm.gemm_acc(beyond(1), true, Ir, false, norm, 1.0, gTq);
        k.gemm.gemm_acc(beyond(3), true, Tr, false, norm, 1.0, gTq);
      }
    }
  }
  // The slerp weights' derivatives (k_p = a_m (dw_a/dc u_I + dw_b/dc u_T)) and the true pair.
  const auto w = g.weights.to(s.acc);
  const auto g_diag = f_m2 * ((g.diag - lse[0]).exp() + (g.diag - lse[1]).exp() - 2);
  const auto coef = (a_m * (w[2] * u[0] + w[3] * u[1]) + g.m2_scale * g_diag).contiguous();
  if (interleaved) {
    k.unstack_pair_backward(coef, g.stacked, grad_X, rows, out.grad_I, out.grad_T);
  } else {
    k.pair_backward(coef, g.I, g.T, out.grad_I, out.grad_T);
  }
  out.stats = at::stack({stats[0] * f_m2 + (g_diag * s.pair_dot).sum(),
                         g.with_clip ? stats[1] * f_clip : zero});
  return out;
}

// (grad_image, grad_text, grad_clip_scale, grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
step_bwd_impl(const StepKernelSet& k, const at::Tensor& grad_terms, const StepArgs& a,
              const at::Tensor& lse, const at::Tensor& kept = at::Tensor(),
              const StepCarry* carried = nullptr) {
  RFT_KERNEL_GUARDS();
  // Kept Gram strips are packed, flat; kept three-view products [V, n, n].
  const bool kept_strips = kept.defined() && kept.dim() == 1;
  auto s = step_setup(k, a, /*allow_gram=*/!kept.defined() || kept_strips, carried);
  if (kept_strips && s.gram) {
    TORCH_CHECK(kept.is_contiguous() && gram_kept_count(s.g.n, s.g.strip_rows, kept.numel()) > 0 &&
                    kept.scalar_type() == k.gemm.workspace_dtype(a.image.scalar_type()) &&
                    kept.device() == a.image.device(),
                "robustft_ext: the kept Gram strips must be the forward's packed strips (a "
                "contiguous 1-d tensor of the workspace dtype holding whole strips of ",
                s.g.strip_rows, " rows), got ", kept.sizes(), " ", kept.scalar_type());
    s.g.keep = kept;
  } else if (kept.defined() && !kept_strips) {
    // The forward's dot products (step_fwd_impl), overwritten here by the dlogits.
    const auto ws_dtype = k.gemm.workspace_dtype(a.image.scalar_type());
    TORCH_CHECK(kept.dim() == 3 && kept.size(0) == step_views(s.p) && kept.size(1) == s.p.n &&
                    kept.size(2) == s.p.n && kept.is_contiguous() &&
                    kept.scalar_type() == ws_dtype && kept.device() == a.image.device(),
                "robustft_ext: the kept dot products must be the forward's contiguous [",
                step_views(s.p), ", n, n] ", ws_dtype, " tensor, got ", kept.sizes(), " ",
                kept.scalar_type());
    s.p.keep = kept;
  }
  const auto& p = s.p;
  const auto& opts = s.acc_options;
  TORCH_CHECK(grad_terms.numel() == 5, "robustft_ext: grad_terms must hold 5 values");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == p.n,
              "robustft_ext: saved log-sum-exp statistics do not match the inputs");
  const auto grads = grad_terms.to(s.acc).reshape({5}).contiguous();
  const auto lse_c = lse.to(s.acc).contiguous();
  const int64_t D = p.n > 0 ? a.image.size(1) : a.ref_image_ft->size(1);
  at::Tensor grad_I, grad_T;  // the tile terms' (written whole), else zeros
  at::Tensor grad_clip_scale = at::zeros({}, opts), grad_m2_scale = at::zeros({}, opts);
  if (s.gram) {
    TileGrads tg = gram_backward(k, s, grads, lse_c);
    grad_I = tg.grad_I;
    grad_T = tg.grad_T;
    grad_m2_scale = tg.stats[0].clone();
    grad_clip_scale = tg.stats[1].clone();
  } else if (p.with_m2 || p.with_clip) {
    TileGrads tg = tile_backward(k, s, grads, lse_c);
    grad_I = tg.grad_I;
    grad_T = tg.grad_T;
    grad_clip_scale = tg.stats[1].clone();  // own storage; dC includes the positives
    if (p.with_m2) {
      // The true pair on the diagonals of A and B, then the slerp backward (in double).
      const auto g_diag = grads[kM2] / (2.0 * p.n) *
                          ((p.diag - lse_c[0]).exp() + (p.diag - lse_c[1]).exp() - 2);
      const auto g_pair = a.m2_scale * g_diag;
      k.mix_backward(tg.grad_M, p.I, p.T, s.weights, g_pair, grad_I, grad_T);
      grad_m2_scale = tg.stats[0] + (g_diag * s.pair_dot).sum();
    }
  }
  if (!grad_I.defined()) {
    grad_I = at::zeros({p.n, D}, opts);
    grad_T = at::zeros({p.n, D}, opts);
  }
  if (s.with_lipsum) {
    const auto w = grads[kLipsum] / (double(s.lip.G.size(0)) * double(p.n));
    // V is carried where the forward's limit held it in one chunk: taken whenever carried
    // (the limit may have changed since), formed again otherwise.
    const bool has_v = carried != nullptr && int64_t(carried->size()) == kCarryEntries &&
                       (*carried)[kCarryLipsumV].numel() > 0;
    const auto* v = has_v ? carried_entry(carried, kCarryLipsumV, {p.n, s.lip.G.size(0)}, opts)
                          : nullptr;
    lipsum_backward(k.gemm, s.lip, w, grad_I, v);
  }
  at::Tensor grad_fi = at::zeros({0, D}, opts), grad_ft = at::zeros({0, D}, opts);
  if (s.with_dive) {
    const double n_ref = double(s.dive.fi.size(0));
    const auto w_a = grads[kAvl] / n_ref, w_p = grads[kPvl] / n_ref;
    grad_fi = cached_empty(s.dive.fi.sizes(), opts);  // as the step's other gradients
    grad_ft = cached_empty(s.dive.fi.sizes(), opts);
    k.dive_grads(s.dive, w_a, w_p, grad_fi, grad_ft);
  }
  const auto in_dtype = p.n > 0 ? a.image.scalar_type() : a.ref_image_ft->scalar_type();
  return {grad_I.to(in_dtype), grad_T.to(in_dtype), grad_clip_scale, grad_m2_scale,
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

// m2mix_fwd (kept == nullptr) and the CPU's m2mix_fwd_keep, which also returns the tiles'
// dot products in *kept (step_fwd_impl).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> step_m2mix_fwd(
    const StepKernelSet& k, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& m2_scale, const at::Tensor& lam, const at::Tensor& clip_scale,
    bool with_clip, at::Tensor* kept = nullptr, StepCarry* carry = nullptr) {
  auto [terms, diff_mean, lse] =
      step_fwd_impl(k, m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip), kept, carry);
  // Separate storage per output: outputs must not alias.
  return {terms[kM2].clone(), terms[kClip].clone(),
          with_clip ? lse : lse.narrow(0, 0, 2).clone()};
}

// m2mix_bwd, and m2mix_bwd_kept with the forward's dot products (which it overwrites).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_m2mix_bwd(
    const StepKernelSet& k, const at::Tensor& grad_m2, const at::Tensor& grad_clip,
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& m2_scale,
    const at::Tensor& lam, const at::Tensor& clip_scale, const at::Tensor& lse, bool with_clip,
    const at::Tensor& kept = at::Tensor(), const StepCarry* carried = nullptr) {
  const auto a = m2mix_args(image, text, m2_scale, lam, clip_scale, with_clip);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == (with_clip ? 4 : 2) && lse.size(1) == image.size(0),
              "robustft_ext: saved m2mix log-sum-exp statistics do not match the inputs");
  const auto acc = acc_dtype(image.scalar_type());
  at::Tensor lse4 = lse.to(acc);
  if (!with_clip) lse4 = at::cat({lse4, at::zeros_like(lse4)});
  const auto zero = at::zeros({}, lse4.options());
  const auto grads = at::stack({grad_clip.to(acc).reshape({}), grad_m2.to(acc).reshape({}),
                                zero, zero, zero});
  auto r = step_bwd_impl(k, grads, a, lse4, kept, carried);
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

inline at::Tensor grads_one(const at::Tensor& g, StepTerm term, const at::Tensor& like) {
  at::Tensor grads = at::zeros({5}, like.options().dtype(acc_dtype(like.scalar_type())));
  grads[term] = g.to(grads.scalar_type()).reshape({});
  return grads;
}

// Registers every step op of namespace NS for one dispatch key with that device's launchers.
#define RFT_REGISTER_STEP_OPS(NS, KEY, KERNELS)                                               \
  TORCH_LIBRARY_IMPL(NS, KEY, m) {                                                  \
    using namespace ::robustft;                                                               \
    m.impl("slerp", [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& lam) {     \
      return slerp_impl(KERNELS, a, b, lam);                                                  \
    });                                                                                       \
    m.impl("slerp_bwd", [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,     \
                           const at::Tensor& lam) {                                           \
      return slerp_bwd_impl(KERNELS, g, a, b, lam);                                           \
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
           [](RFT_STEP_PARAMS) { return step_fwd_impl(KERNELS, RFT_STEP_ARGS); });            \
    m.impl("robust_step_bwd",                                                                 \
           [](const at::Tensor& grad_terms, RFT_STEP_PARAMS, const at::Tensor& lse) {         \
             return step_bwd_impl(KERNELS, grad_terms, RFT_STEP_ARGS, lse);                   \
           });                                                                                \
  }

}  // namespace robustft
