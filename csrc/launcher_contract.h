// What a device's launchers (contrastive_kernels.h, step_kernels.h) may assume of their
// arguments, written once and checked the same way by every device's launchers: the CPU's,
// the CUDA's, and the CPU launchers that run under CUDA's rules (cpu/cuda_rules_cpu.cpp).
// A call that breaks the contract fails on the CPU in the tests, not first on a GPU.
//
// Each check takes the device type its launcher serves; everything else is the same rule
// for every device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>

#include "contrastive_kernels.h"
#include "step_kernels.h"

namespace robustft {

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The workspace dtype of a device whose tile products run on tensor cores (CUDA): 16-bit
// inputs keep their dtype, so the dlogits are rounded to it as flash-attention rounds its
// dS and the GEMMs read 16-bit operands; float and double keep the accumulation dtype.
inline at::ScalarType tensor_core_workspace_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? t : acc_dtype(t);
}

inline void check_on(const at::Tensor& t, c10::DeviceType dev, const at::Tensor& like,
                     const char* what) {
  TORCH_CHECK(t.device().type() == dev && t.device() == like.device(), "robustft_ext: ", what,
              " must be on ", like.device(), " (a ", c10::DeviceTypeName(dev),
              " tensor), got ", t.device());
}

// The feature pair of a tile problem: P [n, D], Q [m, D], contiguous, one supported dtype;
// scale and bias one-element tensors of the accumulation dtype on P's device.
inline void check_tile_operands(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                                const at::Tensor& bias, c10::DeviceType dev) {
  check_on(P, dev, P, "P");
  TORCH_CHECK(P.dim() == 2 && Q.dim() == 2 && P.size(1) == Q.size(1),
              "robustft_ext: P and Q must be [n, D] and [m, D], got ", P.sizes(), " and ",
              Q.sizes());
  TORCH_CHECK(P.size(0) > 0 && Q.size(0) > 0 && P.size(1) > 0,
              "robustft_ext: empty feature matrix");
  TORCH_CHECK(P.is_contiguous() && Q.is_contiguous(), "robustft_ext: P and Q must be contiguous");
  TORCH_CHECK(P.scalar_type() == Q.scalar_type(), "robustft_ext: P and Q dtypes differ");
  const auto acc = acc_dtype(P.scalar_type());
  for (const at::Tensor* t : {&Q, &scale, &bias}) check_on(*t, dev, P, "every operand");
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1 && scale.scalar_type() == acc &&
                  bias.scalar_type() == acc,
              "robustft_ext: scale and bias must be one-element tensors of dtype ", acc);
}

// A contiguous accumulation-dtype vector of `len` entries on P's device.
inline void check_acc_vector(const at::Tensor& t, int64_t len, const at::Tensor& P,
                             const char* name) {
  TORCH_CHECK(t.defined(), "robustft_ext: ", name, " is undefined");
  TORCH_CHECK(t.numel() == len && t.is_contiguous() &&
                  t.scalar_type() == acc_dtype(P.scalar_type()) && t.device() == P.device(),
              "robustft_ext: ", name, " must be a contiguous ", acc_dtype(P.scalar_type()),
              " tensor of ", len, " entries on ", P.device(), ", got ", t.sizes(), " ",
              t.scalar_type());
}

// A dlogit chunk: a contiguous [rows, cols] slice of the workspace, of the workspace dtype.
inline void check_dlogit_chunk(const at::Tensor& ds, int64_t cols, at::ScalarType ws_dtype,
                               const at::Tensor& P, const char* name) {
  TORCH_CHECK(ds.defined() && ds.device() == P.device() && ds.is_contiguous() && ds.dim() == 2 &&
                  ds.size(1) == cols && ds.scalar_type() == ws_dtype,
              "robustft_ext: ", name, " must be a contiguous [rows, ", cols, "] ", ws_dtype,
              " workspace slice on ", P.device(), ", got ",
              ds.defined() ? ds.sizes() : at::IntArrayRef{}, " ",
              ds.defined() ? ds.scalar_type() : at::ScalarType::Undefined);
}

// contrastive_dlogits: the chunk, its rows [r0, r0 + rows) of P, the statistics [2] and the
// log-sum-exp vectors that the spec's nonzero weights read.
inline void check_dlogits(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                          int64_t r0, const at::Tensor& ds, const at::Tensor& stats,
                          at::ScalarType ws_dtype) {
  check_dlogit_chunk(ds, Q.size(0), ws_dtype, P, "the dlogit chunk");
  TORCH_CHECK(r0 >= 0 && r0 + ds.size(0) <= P.size(0), "robustft_ext: the dlogit chunk's rows [",
              r0, ", ", r0 + ds.size(0), ") fall outside P's ", P.size(0));
  check_acc_vector(stats, 2, P, "stats");
  if (!spec.siglip && spec.w_row != 0.0) check_acc_vector(spec.row_lse, P.size(0), P, "row_lse");
  if (!spec.siglip && spec.w_col != 0.0) check_acc_vector(spec.col_lse, Q.size(0), P, "col_lse");
}

// gemm_acc (contrastive_kernels.h): out [r, c] = alpha op(A) op(B) + beta out. The operands'
// rows are contiguous (their row stride may exceed their width: a column slice); the two
// operands share one dtype (a library GEMM, cuBLAS's included, takes one type for both):
// the workspace dtype of the features or the accumulation dtype. out and alpha are of the
// operands' accumulation dtype. Returns (r, k, c).
struct GemmShape {
  int64_t r, k, c;
};

inline GemmShape check_gemm_acc(const at::Tensor& A, bool transpose_a, const at::Tensor& B,
                                bool transpose_b, const at::Tensor& alpha, double beta,
                                const at::Tensor& out, c10::DeviceType dev) {
  check_on(A, dev, A, "gemm_acc's A");
  for (const at::Tensor* t : {&B, &out, &alpha}) check_on(*t, dev, A, "gemm_acc's operands");
  auto rows_of = [](const at::Tensor& t) {  // row-major rows, possibly a column slice
    return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1));
  };
  TORCH_CHECK(rows_of(A) && rows_of(B) && out.dim() == 2 && out.is_contiguous(),
              "robustft_ext: gemm_acc takes 2-D operands of unit column stride (rows may be a "
              "column slice of a wider matrix) and a contiguous output");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(),
              "robustft_ext: gemm_acc operands must share a dtype, got ", A.scalar_type(), " and ",
              B.scalar_type());
  const auto acc = acc_dtype(A.scalar_type());
  TORCH_CHECK(out.scalar_type() == acc && alpha.scalar_type() == acc && alpha.numel() == 1,
              "robustft_ext: gemm_acc output and alpha must be ", acc, ", got ",
              out.scalar_type(), " and ", alpha.scalar_type());
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "robustft_ext: gemm_acc's beta is 0 or 1, got ", beta);
  const GemmShape s{transpose_a ? A.size(1) : A.size(0), transpose_a ? A.size(0) : A.size(1),
                    transpose_b ? B.size(0) : B.size(1)};
  TORCH_CHECK((transpose_b ? B.size(1) : B.size(0)) == s.k && out.size(0) == s.r &&
                  out.size(1) == s.c,
              "robustft_ext: gemm_acc shapes do not match: op(A) ", s.r, " x ", s.k, ", op(B) ",
              (transpose_b ? B.size(1) : B.size(0)), " x ", s.c, ", out ", out.sizes());
  return s;
}

// slerp_weights (step_kernels.h): double cos [n] and lam (0-d), a contiguous [4, n] double out.
inline void check_slerp_weights(const at::Tensor& cos, const at::Tensor& lam,
                                const at::Tensor& out, c10::DeviceType dev) {
  check_on(cos, dev, cos, "cos");
  for (const at::Tensor* t : {&lam, &out}) check_on(*t, dev, cos, "slerp_weights' operands");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == 4 &&
                  out.size(1) == cos.numel() && out.scalar_type() == at::kDouble &&
                  cos.scalar_type() == at::kDouble && lam.scalar_type() == at::kDouble &&
                  lam.numel() == 1,
              "robustft_ext: slerp_weights takes double cos and lam and a contiguous [4, n] "
              "double output");
}

// ---- The step's launchers (step_kernels.h) ---------------------------------------------
// The tile problem: I, T [n, D] contiguous of one dtype; with m^2, M [n, D] contiguous of the
// workspace dtype and diag [n] of the accumulation dtype; each term's scale 0-d of the
// accumulation dtype.
inline void check_step_problem(const StepProblem& p, at::ScalarType ws_dtype, c10::DeviceType dev) {
  check_on(p.I, dev, p.I, "the step's I");
  check_on(p.T, dev, p.I, "the step's T");
  TORCH_CHECK(p.I.dim() == 2 && p.I.sizes() == p.T.sizes() && p.I.size(0) == p.n &&
                  p.I.is_contiguous() && p.T.is_contiguous() &&
                  p.I.scalar_type() == p.T.scalar_type(),
              "robustft_ext: the step's I and T must be contiguous [n, D] tensors of one dtype");
  TORCH_CHECK(p.with_m2 || p.with_clip, "robustft_ext: a step's tile work needs m^2 or CLIP");
  const auto acc = acc_dtype(p.I.scalar_type());
  auto scalar = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined() && t.numel() == 1 && t.scalar_type() == acc &&
                    t.device() == p.I.device(),
                "robustft_ext: ", name, " must be a one-element ", acc, " tensor on ",
                p.I.device());
  };
  if (p.with_m2) {
    check_on(p.M, dev, p.I, "the mixed negatives M");
    TORCH_CHECK(p.M.sizes() == p.I.sizes() && p.M.is_contiguous() && p.M.scalar_type() == ws_dtype,
                "robustft_ext: the mixed negatives must be a contiguous [n, D] ", ws_dtype,
                " tensor (the workspace dtype), got ", p.M.sizes(), " ", p.M.scalar_type());
    check_acc_vector(p.diag, p.n, p.I, "diag");
    scalar(p.m2_scale, "m2_scale");
  }
  if (p.with_clip) scalar(p.clip_scale, "clip_scale");
}

// step_dlogits' chunks: dA, dB (with m^2) and dC (with CLIP) of one row count, rows
// [r0, r0 + rows) of the problem; absent terms' chunks undefined.
inline int64_t check_step_chunks(const StepProblem& p, int64_t r0, const at::Tensor& dA,
                                 const at::Tensor& dB, const at::Tensor& dC,
                                 at::ScalarType ws_dtype) {
  TORCH_CHECK(p.with_m2 == dA.defined() && p.with_m2 == dB.defined() &&
                  p.with_clip == dC.defined(),
              "robustft_ext: step_dlogits takes dA and dB with m^2 and dC with CLIP, and only those");
  if (p.with_m2) {
    check_dlogit_chunk(dA, p.n, ws_dtype, p.I, "dA");
    check_dlogit_chunk(dB, p.n, ws_dtype, p.I, "dB");
  }
  if (p.with_clip) check_dlogit_chunk(dC, p.n, ws_dtype, p.I, "dC");
  const int64_t rows = p.with_m2 ? dA.size(0) : dC.size(0);
  TORCH_CHECK((!p.with_m2 || dB.size(0) == rows) && (!p.with_clip || dC.size(0) == rows) &&
                  r0 >= 0 && r0 + rows <= p.n,
              "robustft_ext: the dlogit chunks must hold the same rows [r0, r0 + rows) of the "
              "problem's ", p.n);
  return rows;
}

// The step's statistics: lse [4, n] contiguous of the accumulation dtype on I's device.
inline void check_lse_rows(const at::Tensor& lse, int64_t n, const at::Tensor& I) {
  TORCH_CHECK(lse.defined() && lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == 4 &&
                  lse.size(1) == n && lse.scalar_type() == acc_dtype(I.scalar_type()) &&
                  lse.device() == I.device(),
              "robustft_ext: lse must be a contiguous [4, n] ", acc_dtype(I.scalar_type()),
              " tensor on ", I.device());
}

inline void check_step_lse(const StepProblem& p, const at::Tensor& lse) {
  check_lse_rows(lse, p.n, p.I);
}


// The mixed pair of mix / mix_backward: I, T contiguous [n, D] of one dtype.
inline void check_mix_pair(const at::Tensor& I, const at::Tensor& T, c10::DeviceType dev) {
  check_on(I, dev, I, "the mixed pair");
  check_on(T, dev, I, "the mixed pair");
  TORCH_CHECK(I.is_contiguous() && T.is_contiguous() && I.dim() == 2 && I.sizes() == T.sizes() &&
                  I.scalar_type() == T.scalar_type(),
              "robustft_ext: the mixed pair must be contiguous [n, D] tensors of one dtype");
}

inline void check_slerp_weight_rows(const at::Tensor& w, const at::Tensor& I) {
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == 4 && w.size(1) == I.size(0) &&
                  w.scalar_type() == at::kDouble && w.device() == I.device(),
              "robustft_ext: the slerp weights are a contiguous [4, n] double tensor");
}

// mix: lam a one-element double tensor; M [n, D] contiguous of the workspace dtype or of
// the pair's own dtype (the slerp op's output), or undefined (the weights alone);
// weights [4, n] double.
inline void check_mix(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                      const at::Tensor& M, const at::Tensor& weights, at::ScalarType ws_dtype,
                      c10::DeviceType dev) {
  check_mix_pair(I, T, dev);
  TORCH_CHECK(lam.numel() == 1 && lam.scalar_type() == at::kDouble && lam.device() == I.device(),
              "robustft_ext: mix takes lam as a one-element double tensor on ", I.device());
  TORCH_CHECK(!M.defined() ||
                  (M.is_contiguous() && M.sizes() == I.sizes() && M.device() == I.device() &&
                   (M.scalar_type() == ws_dtype || M.scalar_type() == I.scalar_type())),
              "robustft_ext: mix writes a contiguous [n, D] M of the workspace dtype ", ws_dtype,
              " or the inputs' ", I.scalar_type(), ", got ", M.scalar_type());
  check_slerp_weight_rows(weights, I);
}

// mix_rows_pair_dot: mix's contract, and pair_dot a contiguous [n] of the accumulation dtype.
inline void check_mix_pair_dot(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                               const at::Tensor& M, const at::Tensor& weights,
                               const at::Tensor& pair_dot, at::ScalarType ws_dtype,
                               c10::DeviceType dev) {
  check_mix(I, T, lam, M, weights, ws_dtype, dev);
  TORCH_CHECK(pair_dot.defined(), "robustft_ext: mix_rows_pair_dot needs a pair_dot tensor");
  TORCH_CHECK(pair_dot.dim() == 1 && pair_dot.size(0) == I.size(0) && pair_dot.is_contiguous() &&
                  pair_dot.scalar_type() == acc_dtype(I.scalar_type()) &&
                  pair_dot.device() == I.device(),
              "robustft_ext: mix writes pair_dot as a contiguous [", I.size(0), "] ",
              acc_dtype(I.scalar_type()), " tensor on ", I.device(), ", got ", pair_dot.sizes(),
              " ", pair_dot.scalar_type(), " on ", pair_dot.device());
}

// mix_backward: dM, grad_I, grad_T contiguous [n, D] of the accumulation dtype, g_pair [n] too.
inline void check_mix_backward(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T,
                               const at::Tensor& weights, const at::Tensor& g_pair,
                               const at::Tensor& grad_I, const at::Tensor& grad_T,
                               c10::DeviceType dev) {
  check_mix_pair(I, T, dev);
  const auto acc = acc_dtype(I.scalar_type());
  for (const at::Tensor* t : {&dM, &grad_I, &grad_T}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == I.sizes() && t->scalar_type() == acc &&
                    t->device() == I.device(),
                "robustft_ext: mix_backward takes contiguous [n, D] ", acc, " gradients on ",
                I.device());
  }
  check_acc_vector(g_pair, I.size(0), I, "g_pair");
  check_slerp_weight_rows(weights, I);
}

// pair_backward: coef [n] and the gradients [n, D] of the accumulation dtype.
inline void check_pair_backward(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T,
                                const at::Tensor& grad_I, const at::Tensor& grad_T,
                                c10::DeviceType dev) {
  check_mix_pair(I, T, dev);
  const auto acc = acc_dtype(I.scalar_type());
  check_acc_vector(coef, I.size(0), I, "coef");
  for (const at::Tensor* t : {&grad_I, &grad_T}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == I.sizes() && t->scalar_type() == acc &&
                    t->device() == I.device(),
                "robustft_ext: pair_backward adds to contiguous [n, D] ", acc, " gradients");
  }
}

// unstack_pair_backward (step_kernels.h): X [2 n, D] contiguous, dX [2 n, D] contiguous of
// coef's dtype, R > 0, the gradients contiguous [n, D] of coef's dtype, all on one device.
inline void check_unstack_pair_backward(const at::Tensor& coef, const at::Tensor& X,
                                        const at::Tensor& dX, int64_t R, const at::Tensor& grad_I,
                                        const at::Tensor& grad_T, c10::DeviceType dev) {
  check_on(coef, dev, coef, "coef");
  TORCH_CHECK(coef.dim() == 1 && coef.is_contiguous(), "robustft_ext: coef must be a contiguous [n] vector");
  const int64_t n = coef.size(0);
  TORCH_CHECK(R > 0, "robustft_ext: the stacked rows' blocks must hold R > 0 rows, got ", R);
  TORCH_CHECK(X.dim() == 2 && X.size(0) == 2 * n && X.is_contiguous() && X.device() == coef.device(),
              "robustft_ext: the stacked rows X must be a contiguous [2 n, D] tensor, got ", X.sizes());
  for (const at::Tensor* t : {&dX, &grad_I, &grad_T}) {
    const int64_t rows = t == &dX ? 2 * n : n;
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == X.size(1) &&
                    t->is_contiguous() && t->scalar_type() == coef.scalar_type() &&
                    t->device() == coef.device(),
                "robustft_ext: unstack_pair_backward takes contiguous [", rows, ", ", X.size(1),
                "] ", coef.scalar_type(), " ", t == &dX ? "dX" : "gradients", ", got ", t->sizes(),
                " ", t->scalar_type());
  }
}

// DiVE's launchers: fi, ft, pi, pt contiguous [B', D] of one dtype, center [D] accumulation.
inline void check_dive(const DiveInputs& d, c10::DeviceType dev) {
  check_on(d.fi, dev, d.fi, "ref_image_ft");
  for (const at::Tensor* t : {&d.ft, &d.pi, &d.pt}) {
    check_on(*t, dev, d.fi, "the DiVE batch");
    TORCH_CHECK(t->sizes() == d.fi.sizes() && t->scalar_type() == d.fi.scalar_type() &&
                    t->is_contiguous(),
                "robustft_ext: the DiVE batch must be contiguous [B', D] tensors of one dtype");
  }
  TORCH_CHECK(d.fi.dim() == 2 && d.fi.is_contiguous(),
              "robustft_ext: the DiVE batch must be contiguous [B', D] tensors");
  check_acc_vector(d.center, d.fi.size(1), d.fi, "center");
}

inline void check_dive_grads(const DiveInputs& d, const at::Tensor& w_a, const at::Tensor& w_p,
                             const at::Tensor& grad_fi, const at::Tensor& grad_ft,
                             c10::DeviceType dev) {
  check_dive(d, dev);
  const auto acc = acc_dtype(d.fi.scalar_type());
  check_acc_vector(w_a, 1, d.fi, "w_a");
  check_acc_vector(w_p, 1, d.fi, "w_p");
  for (const at::Tensor* t : {&grad_fi, &grad_ft}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == d.fi.sizes() && t->scalar_type() == acc &&
                    t->device() == d.fi.device(),
                "robustft_ext: dive_grads writes contiguous [B', D] ", acc, " gradients");
  }
}

// ---- The Gram formulation's launchers (step_kernels.h) ---------------------------------
// Whether a device whose Gram forward merges its statistics by atomics (CUDA: gram_lse
// folds every tile's columns with 64-bit compare-and-swap) serves a dtype under the current
// settings: not double (its tile engines accumulate in float), not under
// torch.use_deterministic_algorithms(True). Otherwise the step takes the three products.
inline bool atomic_gram_serves(at::ScalarType t) {
  return t != at::kDouble && !at::globalContext().deterministicAlgorithms();
}

// The Gram problem (step_kernels.h, GramProblem): I, T non-empty [n, D] contiguous of one
// dtype, the slerp weights [4, n] double, diag [n] and each present term's scale 0-d of the
// accumulation dtype.
inline void check_gram_problem(const GramProblem& p, c10::DeviceType dev) {
  check_mix_pair(p.I, p.T, dev);
  TORCH_CHECK(p.I.size(0) == p.n && p.n > 0 && p.I.size(1) > 0,
              "robustft_ext: the Gram problem's I and T must be non-empty [n, D] tensors with "
              "n = ", p.n, ", got ", p.I.sizes());
  check_slerp_weight_rows(p.weights, p.I);
  check_acc_vector(p.diag, p.n, p.I, "diag");
  check_acc_vector(p.m2_scale, 1, p.I, "m2_scale");
  if (p.with_clip) check_acc_vector(p.clip_scale, 1, p.I, "clip_scale");
  TORCH_CHECK(p.layout == GramLayout::kBlocks ||
                  (p.stacked.defined() && p.stacked.device() == p.I.device() &&
                   p.stacked.is_contiguous() && p.stacked.dim() == 2 &&
                   p.stacked.size(0) == 2 * p.n && p.stacked.size(1) == p.I.size(1) &&
                   p.strip_rows > 0),
              "robustft_ext: the interleaved Gram layout needs the stacked rows [2 n, D] and "
              "the strips' rows");
}

// The rows R of a backward strip S in the problem's layout (step_kernels.h): [4, R, n - r0]
// or [2 R, 2 (n - r0)].
inline int64_t gram_strip_rows_of(const GramProblem& p, const at::Tensor& S) {
  return p.layout == GramLayout::kBlocks ? S.size(1) : S.size(0) / 2;
}

// gram_strip: S contiguous of the workspace dtype in the problem's layout with rows
// [r0, r0 + R) inside the problem (an interleaved strip on the strips' grid, whole unless
// it is the last), the factors 0-d (f_clip with CLIP only), stats [2] and u [2, n] of the
// accumulation dtype.
inline void check_gram_strip(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                             const at::Tensor& f_m2, const at::Tensor& f_clip,
                             const at::Tensor& S, const at::Tensor& stats, const at::Tensor& u,
                             at::ScalarType ws_dtype, c10::DeviceType dev) {
  check_gram_problem(p, dev);
  check_lse_rows(lse, p.n, p.I);
  TORCH_CHECK(S.defined() && S.device() == p.I.device() && S.is_contiguous() &&
                  S.scalar_type() == ws_dtype && r0 >= 0,
              "robustft_ext: the Gram strip S must be a contiguous ", ws_dtype, " tensor on ",
              p.I.device(), ", got ", S.scalar_type(), " at r0 = ", r0);
  if (p.layout == GramLayout::kBlocks) {
    TORCH_CHECK(S.dim() == 3 && S.size(0) == 4 && S.size(1) > 0 && r0 + S.size(1) <= p.n &&
                    S.size(2) == p.n - r0,
                "robustft_ext: the Gram strip S must be [4, R, n - r0] with rows [r0, r0 + R) "
                "inside the problem's ", p.n, ", got ", S.sizes(), " at r0 = ", r0);
  } else {
    const int64_t R = S.size(0) / 2;
    TORCH_CHECK(S.dim() == 2 && S.size(0) % 2 == 0 && R > 0 && r0 % p.strip_rows == 0 &&
                    R == std::min(p.strip_rows, p.n - r0) && S.size(1) == 2 * (p.n - r0),
                "robustft_ext: the interleaved Gram strip S must be [2 R, 2 (n - r0)] with R = "
                "min(", p.strip_rows, ", n - r0) and r0 on the strips' grid, got ", S.sizes(),
                " at r0 = ", r0);
  }
  check_acc_vector(f_m2, 1, p.I, "f_m2");
  if (p.with_clip) check_acc_vector(f_clip, 1, p.I, "f_clip");
  check_acc_vector(stats, 2, p.I, "stats");
  check_acc_vector(u, 2 * p.n, p.I, "u");
}

}  // namespace robustft
