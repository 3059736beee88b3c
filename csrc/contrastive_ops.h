// The four contrastive ops, written once on top of a device's kernel launchers
// (contrastive_kernels.h). Each device file instantiates them with its launchers
// and registers them with TORCH_LIBRARY_IMPL for its dispatch key.
//
// The checks here are the op-level contract (the Python API validates user input
// with friendlier messages before it gets here).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

#include "contrastive_kernels.h"
#include "kept_cache.h"
#include "launcher_contract.h"
#include "workspace.h"

namespace robustft {

// The GEMM and workspace launchers, shared by the contrastive and the step ops.
struct GemmKernels {
  void (*gemm_acc)(const at::Tensor&, bool, const at::Tensor&, bool, const at::Tensor&, double,
                   at::Tensor&);
  at::ScalarType (*workspace_dtype)(at::ScalarType);
};

// The rows of X as a GEMM operand: in the workspace dtype of X's dtype (a no-op where they
// match), so that both operands of every gemm_acc share it.
inline at::Tensor gemm_operand(const GemmKernels& g, const at::Tensor& X) {
  return X.to(g.workspace_dtype(X.scalar_type())).contiguous();
}

struct KernelSet {
  void (*clip_lse)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, at::Tensor&, at::Tensor&);
  void (*siglip_softplus_sum)(const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*dlogits)(const DlogitSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, int64_t, at::Tensor&, at::Tensor&);
  GemmKernels gemm;
};

// Row block of every device's dlogit kernels: chunks are multiples of it.
constexpr int64_t kChunkAlign = 128;

// The kernels' internal ATen calls (tile matmuls, casts) are plain tensor maths: they
// must run in the dtypes chosen here, never re-cast by an autocast region the op was
// called from, and never record autograd history (inputs may require grad; a recorded
// graph would keep every tile alive).
#define RFT_KERNEL_GUARDS()                                                        \
  c10::impl::ExcludeDispatchKeyGuard rft_no_autocast_(c10::autocast_dispatch_keyset); \
  at::AutoDispatchBelowADInplaceOrView rft_below_autograd_

inline void check_features(const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "robustft_ext: a and b must be 2-D, got ",
              a.dim(), "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0 && a.size(1) > 0,
              "robustft_ext: empty feature matrix");
  TORCH_CHECK(a.size(1) == b.size(1), "robustft_ext: feature dims differ: ", a.size(1),
              " vs ", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "robustft_ext: a and b dtypes differ");
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "robustft_ext: unsupported dtype ", t);
  TORCH_CHECK(a.device() == b.device() && scale.device() == a.device() &&
                  bias.device() == a.device(),
              "robustft_ext: all tensors must be on one device");
  TORCH_CHECK(scale.dim() == 0 && bias.dim() == 0, "robustft_ext: scale and bias must be 0-d");
  TORCH_CHECK(scale.scalar_type() == acc_dtype(t) && bias.scalar_type() == acc_dtype(t),
              "robustft_ext: scale and bias must have dtype ", acc_dtype(t));
}

// <a_i, b_i> for every row i, in the accumulation dtype, through a product buffer from the
// block cache (kept_cache.h): an n x D temporary of its own every step would be faulted in
// afresh each time (a 4 MiB one took 1.1 ms at n = 2048, D = 512, with glibc's mmap
// threshold at 128 KiB, against 0.3 ms from the cache).
inline at::Tensor row_dot_products(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = acc_dtype(a.scalar_type());
  at::Tensor prod = cached_empty(a.sizes(), a.options().dtype(acc));
  at::mul_out(prod, a.to(acc), b.to(acc));
  return prod.sum(1);
}

// The sum over the rows i of the positives' logits scale * <a_i, b_{i+offset}> + bias, in the
// accumulation dtype: from the diagonal of the dot products a forward keeps (the values its
// statistics were formed from, read without an n x D temporary), else from the features.
inline at::Tensor positive_logit_sum(const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& scale, const at::Tensor& bias,
                                     int64_t offset, const at::Tensor& kept_dots = at::Tensor()) {
  const auto acc = acc_dtype(a.scalar_type());
  const at::Tensor dots = kept_dots.defined()
                              ? kept_dots.diagonal(offset).to(acc)
                              : row_dot_products(a, b.narrow(0, offset, a.size(0)));
  return (dots * scale + bias).sum();
}

inline void check_clip_problem(const at::Tensor& a, const at::Tensor& b, int64_t diag_offset,
                               bool symmetric) {
  const int64_t n = a.size(0), m = b.size(0);
  if (symmetric) {
    TORCH_CHECK(n == m && diag_offset == 0,
                "robustft_ext: symmetric clip loss needs a square problem, offset 0");
  } else {
    TORCH_CHECK(diag_offset >= 0 && diag_offset + n <= m,
                "robustft_ext: positives (i, i + ", diag_offset, ") fall outside ", m,
                " columns");
  }
}

inline void check_siglip_problem(const at::Tensor& a, const at::Tensor& b, bool negative_only) {
  TORCH_CHECK(negative_only || b.size(0) == a.size(0),
              "robustft_ext: siglip with positives needs as many rows in b as in a");
}

// The CLIP loss from its log-sum-exp statistics, which lse(ac, bc, row_lse, col_lse) fills
// (col_lse undefined when not symmetric); kept_dots: the forward's kept dot products, if any.
template <typename Lse>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_from_lse(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    int64_t diag_offset, bool symmetric, Lse&& lse, const at::Tensor& kept_dots = at::Tensor()) {
  const int64_t n = a.size(0), m = b.size(0);
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto opts = a.options().dtype(acc_dtype(a.scalar_type()));
  at::Tensor row_lse = at::empty({n}, opts);
  at::Tensor col_lse = at::empty({symmetric ? m : 0}, opts);
  at::Tensor col_arg = symmetric ? col_lse : at::Tensor();
  lse(ac, bc, row_lse, col_arg);
  const auto pos = positive_logit_sum(ac, bc, scale, bias, diag_offset, kept_dots);
  at::Tensor loss = symmetric ? (row_lse.sum() + col_lse.sum() - 2 * pos) / (2.0 * n)
                              : (row_lse.sum() - pos) / double(n);
  return {loss, row_lse, col_lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_fwd_impl(
    const KernelSet& k, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& bias, int64_t diag_offset,
    bool symmetric) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_clip_problem(a, b, diag_offset, symmetric);
  return clip_loss_from_lse(a, b, scale, bias, diag_offset, symmetric,
                            [&](const at::Tensor& ac, const at::Tensor& bc, at::Tensor& r,
                                at::Tensor& c) { k.clip_lse(ac, bc, scale, bias, r, c); });
}

// Both feature gradients (in the inputs' dtypes) and the two scalar gradients of one
// problem whose dlogits `spec` describes. One pass over row chunks of a: the device forms
// the chunk's dlogits dS [R, m] into the workspace, then two GEMMs take
//   grad_a[chunk] = scale g norm dS b,   grad_b += scale g norm dS^T a[chunk]
// (docs/maths.md, section 1: dI = s dS T, dT = s dS^T I). Each logit tile is recomputed
// once, and the GEMMs run on the library's tensor-core kernels where the device has them.
//
// With kept_dots (the CPU forward's dot products, [n, m] in the workspace dtype) the one
// chunk is every row, formed in place from those products: no dot product is recomputed,
// and kept_dots holds the dlogits afterwards.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_grad(
    const KernelSet& k, DlogitSpec spec, const at::Tensor& grad_loss,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const at::Tensor& bias, const at::Tensor& kept_dots = at::Tensor()) {
  const auto acc = acc_dtype(a.scalar_type());
  const int64_t n = a.size(0), m = b.size(0), D = a.size(1);
  const auto g_norm = grad_loss.to(acc).reshape({}) * spec.norm;  // the dlogits' true factor
  const auto alpha = scale * g_norm;
  // From the block cache, as the step's gradients (step_ops.h): the caller's next step asks
  // for the same sizes. grad_b is written by the first chunk's product (beta 0).
  at::Tensor grad_a = cached_empty({n, D}, a.options().dtype(acc));
  at::Tensor grad_b = cached_empty({m, D}, b.options().dtype(acc));
  at::Tensor stats = at::zeros({2}, a.options().dtype(acc));
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto ws_dtype = k.gemm.workspace_dtype(a.scalar_type());
  spec.ds_holds_dots = kept_dots.defined();
  if (spec.ds_holds_dots) {
    TORCH_CHECK(kept_dots.dim() == 2 && kept_dots.size(0) == n && kept_dots.size(1) == m &&
                    kept_dots.is_contiguous() && kept_dots.scalar_type() == ws_dtype &&
                    kept_dots.device() == a.device(),
                "robustft_ext: the kept dot products must be a contiguous [", n, ", ", m,
                "] tensor of dtype ", ws_dtype, " on the features' device");
  }
  const int64_t rows = spec.ds_holds_dots
                           ? n
                           : workspace_chunk_rows(n, m * at::elementSize(ws_dtype), kChunkAlign);
  at::Tensor ws = spec.ds_holds_dots ? kept_dots : at::empty({rows, m}, a.options().dtype(ws_dtype));
  const auto a_op = gemm_operand(k.gemm, ac), b_op = gemm_operand(k.gemm, bc);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    at::Tensor ds = ws.narrow(0, 0, r);
    k.dlogits(spec, ac, bc, scale, bias, r0, ds, stats);
    at::Tensor grad_rows = grad_a.narrow(0, r0, r);
    k.gemm.gemm_acc(ds, /*transpose_a=*/false, b_op, false, alpha, 0.0, grad_rows);
    k.gemm.gemm_acc(ds, /*transpose_a=*/true, a_op.narrow(0, r0, r), false, alpha,
                    r0 == 0 ? 0.0 : 1.0, grad_b);
  }
  stats = stats * g_norm;
  // Separate storage for the two scalars: outputs must not alias.
  return {grad_a.to(a.scalar_type()), grad_b.to(b.scalar_type()), stats[0].clone(),
          stats[1].clone()};
}

// dS = (1/n) [w_row exp(S - r) + w_col exp(S - c) - [positive]]; symmetric: both terms put
// 1/(2n) on the diagonal.
inline DlogitSpec clip_spec(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_lse,
                            const at::Tensor& col_lse, int64_t diag_offset, bool symmetric) {
  const int64_t n = a.size(0), m = b.size(0);
  TORCH_CHECK(row_lse.numel() == n && (!symmetric || col_lse.numel() == m),
              "robustft_ext: saved log-sum-exp statistics do not match the inputs");
  DlogitSpec spec;
  spec.w_row = symmetric ? 0.5 : 1.0;
  spec.w_col = symmetric ? 0.5 : 0.0;
  spec.w_pos = 1.0;
  spec.norm = 1.0 / n;
  spec.has_positives = true;
  spec.pos_offset = diag_offset;
  spec.row_lse = row_lse;
  if (symmetric) spec.col_lse = col_lse;
  return spec;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_bwd_impl(
    const KernelSet& k, const at::Tensor& grad_loss, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& row_lse, const at::Tensor& col_lse, int64_t diag_offset,
    bool symmetric) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_clip_problem(a, b, diag_offset, symmetric);
  return run_grad(k, clip_spec(a, b, row_lse, col_lse, diag_offset, symmetric), grad_loss, a, b,
                  scale, bias);
}

// The SigLIP loss from the sum of softplus(S) over every pair, which sum(ac, bc, out) fills;
// kept_dots: the forward's kept dot products, if any.
template <typename Sum>
at::Tensor siglip_loss_from_sum(const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& scale, const at::Tensor& bias,
                                bool negative_only, Sum&& sum,
                                const at::Tensor& kept_dots = at::Tensor()) {
  const auto ac = a.contiguous(), bc = b.contiguous();
  at::Tensor total = at::empty({}, a.options().dtype(acc_dtype(a.scalar_type())));
  sum(ac, bc, total);
  // -log sigmoid(s) = softplus(s) - s on the positives.
  if (!negative_only) total = total - positive_logit_sum(ac, bc, scale, bias, 0, kept_dots);
  return total / double(a.size(0));
}

inline at::Tensor siglip_fwd_impl(const KernelSet& k, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& scale,
                                  const at::Tensor& bias, bool negative_only) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_siglip_problem(a, b, negative_only);
  return siglip_loss_from_sum(a, b, scale, bias, negative_only,
                              [&](const at::Tensor& ac, const at::Tensor& bc, at::Tensor& out) {
                                k.siglip_softplus_sum(ac, bc, scale, bias, out);
                              });
}

inline DlogitSpec siglip_spec(const at::Tensor& a, bool negative_only) {
  DlogitSpec spec;
  spec.siglip = true;
  spec.w_row = 1.0;
  spec.norm = 1.0 / a.size(0);
  spec.has_positives = !negative_only;
  spec.pos_offset = 0;
  return spec;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_impl(
    const KernelSet& k, const at::Tensor& grad_loss, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    bool negative_only) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_siglip_problem(a, b, negative_only);
  return run_grad(k, siglip_spec(a, negative_only), grad_loss, a, b, scale, bias);
}

// ---- Kept dot products (CPU) --------------------------------------------------------
// A CPU backward that recomputes its dot products runs 8 n m D FLOPs in all against the
// eager reference's 6 n m D (which keeps the n x m logits), and on a CPU those FLOPs are
// the time. So, when the autograd Function will need gradients and the n x m products fit
// the workspace limit, the CPU forward keeps them: clip_fwd_keep / siglip_fwd_keep return
// them as an extra output, and clip_bwd_kept / siglip_bwd_kept turn them into dlogits in
// place (their schemas mark them mutated) and take the gradients from them with two GEMMs.
struct KeptDotKernels {
  void (*dot_products)(const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*clip_lse_from_dots)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::Tensor&, at::Tensor&);
  void (*siglip_softplus_sum_from_dots)(const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, at::Tensor&);
};

// dots = a b^T in the workspace dtype, refused when it would exceed the workspace limit.
inline at::Tensor kept_dot_products(const KernelSet& k, const KeptDotKernels& kd,
                                    const at::Tensor& a, const at::Tensor& b) {
  const auto ws_dtype = k.gemm.workspace_dtype(a.scalar_type());
  const int64_t n = a.size(0), m = b.size(0);
  const int64_t bytes = n * m * int64_t(at::elementSize(ws_dtype));
  const int64_t limit = workspace_limit_bytes().load();
  TORCH_CHECK(bytes <= limit, "robustft_ext: keeping the ", n, " x ", m, " dot products takes ",
              bytes, " bytes, more than the workspace limit of ", limit,
              " bytes (use the forward that keeps nothing)");
  at::Tensor dots = cached_empty({n, m}, a.options().dtype(ws_dtype));
  kd.dot_products(a.contiguous(), b.contiguous(), dots);
  return dots;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_fwd_keep_impl(
    const KernelSet& k, const KeptDotKernels& kd, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& bias, int64_t diag_offset, bool symmetric) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_clip_problem(a, b, diag_offset, symmetric);
  const at::Tensor dots = kept_dot_products(k, kd, a, b);
  auto [loss, row_lse, col_lse] = clip_loss_from_lse(
      a, b, scale, bias, diag_offset, symmetric,
      [&](const at::Tensor&, const at::Tensor&, at::Tensor& r, at::Tensor& c) {
        kd.clip_lse_from_dots(dots, scale, bias, r, c);
      },
      dots);
  return {loss, row_lse, col_lse, dots};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_bwd_kept_impl(
    const KernelSet& k, const at::Tensor& grad_loss, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& dots,
    int64_t diag_offset, bool symmetric) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_clip_problem(a, b, diag_offset, symmetric);
  return run_grad(k, clip_spec(a, b, row_lse, col_lse, diag_offset, symmetric), grad_loss, a, b,
                  scale, bias, dots);
}

inline std::tuple<at::Tensor, at::Tensor> siglip_fwd_keep_impl(
    const KernelSet& k, const KeptDotKernels& kd, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& scale, const at::Tensor& bias, bool negative_only) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_siglip_problem(a, b, negative_only);
  const at::Tensor dots = kept_dot_products(k, kd, a, b);
  at::Tensor loss = siglip_loss_from_sum(
      a, b, scale, bias, negative_only, [&](const at::Tensor&, const at::Tensor&, at::Tensor& out) {
        kd.siglip_softplus_sum_from_dots(dots, scale, bias, out);
      },
      dots);
  return {loss, dots};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_kept_impl(
    const KernelSet& k, const at::Tensor& grad_loss, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& dots, bool negative_only) {
  RFT_KERNEL_GUARDS();
  check_features(a, b, scale, bias);
  check_siglip_problem(a, b, negative_only);
  return run_grad(k, siglip_spec(a, negative_only), grad_loss, a, b, scale, bias, dots);
}

// Registers the four ops of namespace NS for one dispatch key with that device's launchers.
#define RFT_REGISTER_CONTRASTIVE_OPS(NS, KEY, KERNELS)                               \
  TORCH_LIBRARY_IMPL(NS, KEY, m) {                                         \
    m.impl("clip_fwd", [](const at::Tensor& a, const at::Tensor& b,                  \
                          const at::Tensor& scale, const at::Tensor& bias,           \
                          int64_t off, bool sym) {                                   \
      return ::robustft::clip_fwd_impl(KERNELS, a, b, scale, bias, off, sym);        \
    });                                                                              \
    m.impl("clip_bwd",                                                               \
           [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,         \
              const at::Tensor& scale, const at::Tensor& bias, const at::Tensor& r,  \
              const at::Tensor& c, int64_t off, bool sym) {                          \
             return ::robustft::clip_bwd_impl(KERNELS, g, a, b, scale, bias, r, c,   \
                                              off, sym);                             \
           });                                                                       \
    m.impl("siglip_fwd", [](const at::Tensor& a, const at::Tensor& b,                \
                            const at::Tensor& scale, const at::Tensor& bias,         \
                            bool neg) {                                              \
      return ::robustft::siglip_fwd_impl(KERNELS, a, b, scale, bias, neg);           \
    });                                                                              \
    m.impl("siglip_bwd", [](const at::Tensor& g, const at::Tensor& a,                \
                            const at::Tensor& b, const at::Tensor& scale,            \
                            const at::Tensor& bias, bool neg) {                      \
      return ::robustft::siglip_bwd_impl(KERNELS, g, a, b, scale, bias, neg);        \
    });                                                                              \
  }

// Registers the four kept-dot-product ops for one dispatch key (the CPU's).
#define RFT_REGISTER_KEPT_DOT_OPS(NS, KEY, KERNELS, KEPT)                              \
  TORCH_LIBRARY_IMPL(NS, KEY, m) {                                         \
    m.impl("clip_fwd_keep", [](const at::Tensor& a, const at::Tensor& b,             \
                               const at::Tensor& scale, const at::Tensor& bias,      \
                               int64_t off, bool sym) {                              \
      return ::robustft::clip_fwd_keep_impl(KERNELS, KEPT, a, b, scale, bias, off, sym); \
    });                                                                              \
    m.impl("clip_bwd_kept",                                                          \
           [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,         \
              const at::Tensor& scale, const at::Tensor& bias, const at::Tensor& r,  \
              const at::Tensor& c, at::Tensor& dots, int64_t off, bool sym) {        \
             return ::robustft::clip_bwd_kept_impl(KERNELS, g, a, b, scale, bias, r, c, \
                                                   dots, off, sym);                  \
           });                                                                       \
    m.impl("siglip_fwd_keep", [](const at::Tensor& a, const at::Tensor& b,           \
                                 const at::Tensor& scale, const at::Tensor& bias,    \
                                 bool neg) {                                         \
      return ::robustft::siglip_fwd_keep_impl(KERNELS, KEPT, a, b, scale, bias, neg); \
    });                                                                              \
    m.impl("siglip_bwd_kept", [](const at::Tensor& g, const at::Tensor& a,           \
                                 const at::Tensor& b, const at::Tensor& scale,       \
                                 const at::Tensor& bias, at::Tensor& dots, bool neg) { \
      return ::robustft::siglip_bwd_kept_impl(KERNELS, g, a, b, scale, bias, dots, neg); \
    });                                                                              \
  }

}  // namespace robustft
