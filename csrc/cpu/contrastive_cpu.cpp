// Fused C++ CPU kernels of the contrastive ops.
//
// The similarity matrix is never materialised: rows are processed in blocks of
// kRowBlock and columns in tiles of kColBlock. Each tile's dot products come from a
// blocked ATen matmul (multi-threaded BLAS); the per-entry maths (logits, online
// log-sum-exp, dlogits) is robustft_maths.h, the same code the CUDA kernels run,
// applied in at::parallel_for loops. Peak extra memory: one kRowBlock x kColBlock
// tile plus O((n + m) * D) fp32 copies of the inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

namespace mx = ::robustft::maths;

constexpr int64_t kRowBlock = 512;
constexpr int64_t kColBlock = 1024;
constexpr int64_t kGrain = 16;  // rows (or columns) per parallel task

template <typename T>
struct Scalars {
  T scale, bias, g;
};

template <typename T>
T value(const at::Tensor& t) {
  return t.defined() ? t.item<T>() : T(0);
}

// Calls fn(i0, rows, j0, cols, dots) for every tile of P Q^T, where dots is the
// rows x cols tile of dot products in the accumulation dtype.
template <typename T, typename Fn>
void for_each_tile(const at::Tensor& Pf, const at::Tensor& Qf, Fn&& fn) {
  const int64_t n = Pf.size(0), m = Qf.size(0);
  for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - i0);
    const auto P_blk = Pf.narrow(0, i0, rows);
    for (int64_t j0 = 0; j0 < m; j0 += kColBlock) {
      const int64_t cols = std::min(kColBlock, m - j0);
      at::Tensor dots = at::mm(P_blk, Qf.narrow(0, j0, cols).t()).contiguous();
      fn(i0, rows, j0, cols, dots);
    }
  }
}

template <typename T>
void clip_lse_impl(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale_t,
                   const at::Tensor& bias_t, at::Tensor& row_lse, at::Tensor& col_lse) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const int64_t n = P.size(0), m = Q.size(0);
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  const bool with_cols = col_lse.defined();
  std::vector<mx::LseState<T>> rows_state(n, mx::lse_empty<T>());
  std::vector<mx::LseState<T>> cols_state(with_cols ? m : 0, mx::lse_empty<T>());

  for_each_tile<T>(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                               at::Tensor& dots) {
    T* d = dots.data_ptr<T>();
    // Turn dot products into logits in place, then fold each row into its state.
    at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* row = d + r * cols;
        T mx_ = -std::numeric_limits<T>::infinity();
        for (int64_t c = 0; c < cols; ++c) {
          row[c] = mx::logit(row[c], scale, bias);
          mx_ = std::max(mx_, row[c]);
        }
        T sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += std::exp(row[c] - mx_);
        rows_state[i0 + r] = mx::lse_push_block(rows_state[i0 + r], mx_, sum);
      }
    });
    if (!with_cols) return;
    // Column statistics of the same tile, column chunks in parallel, rows streamed
    // so the inner loop stays contiguous.
    at::parallel_for(0, cols, 64, [&](int64_t c0, int64_t c1) {
      std::vector<T> cmax(c1 - c0, -std::numeric_limits<T>::infinity());
      std::vector<T> csum(c1 - c0, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = d + r * cols;
        for (int64_t c = c0; c < c1; ++c) cmax[c - c0] = std::max(cmax[c - c0], row[c]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = d + r * cols;
        for (int64_t c = c0; c < c1; ++c) csum[c - c0] += std::exp(row[c] - cmax[c - c0]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        cols_state[j0 + c] = mx::lse_push_block(cols_state[j0 + c], cmax[c - c0], csum[c - c0]);
      }
    });
  });

  T* r_out = row_lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) r_out[i] = mx::lse_value(rows_state[i]);
  if (with_cols) {
    T* c_out = col_lse.data_ptr<T>();
    for (int64_t j = 0; j < m; ++j) c_out[j] = mx::lse_value(cols_state[j]);
  }
}

template <typename T>
void siglip_sum_impl(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale_t,
                     const at::Tensor& bias_t, at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  std::vector<T> row_sums(P.size(0), T(0));
  for_each_tile<T>(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t, int64_t cols,
                               at::Tensor& dots) {
    const T* d = dots.data_ptr<T>();
    at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += mx::softplus(mx::logit(d[r * cols + c], scale, bias));
        row_sums[i0 + r] += sum;
      }
    });
  });
  T total = 0;
  for (T v : row_sums) total += v;
  out.fill_(total);
}

template <typename T>
void grad_impl(const DlogitSpec& spec, const at::Tensor& grad_loss, const at::Tensor& P,
               const at::Tensor& Q, const at::Tensor& scale_t, const at::Tensor& bias_t,
               at::Tensor& grad_P, at::Tensor& grad_Q, at::Tensor& stats) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const T scale = value<T>(scale_t), bias = value<T>(bias_t), g = value<T>(grad_loss);
  const T w_row = T(spec.w_row) * g, w_col = T(spec.w_col) * g, w_pos = T(spec.w_pos) * g;
  const T* row_lse = (!spec.siglip && spec.w_row != 0.0) ? spec.row_lse.data_ptr<T>() : nullptr;
  const T* col_lse = (!spec.siglip && spec.w_col != 0.0) ? spec.col_lse.data_ptr<T>() : nullptr;
  grad_P.zero_();
  grad_Q.zero_();
  std::vector<T> s_dot(P.size(0), T(0)), s_sum(P.size(0), T(0));

  for_each_tile<T>(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                               at::Tensor& dots) {
    T* d = dots.data_ptr<T>();
    // dots -> g * dS in place, keeping the two scalar-gradient sums per row.
    at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = i0 + r;
        const T r_lse = row_lse ? row_lse[p] : T(0);
        T acc_dot = 0, acc_sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t q = j0 + c;
          const T dot = d[r * cols + c];
          const T s = mx::logit(dot, scale, bias);
          const bool pos = mx::is_positive(p, q, spec.has_positives, spec.pos_offset);
          const T ds = spec.siglip
                           ? mx::siglip_dlogit(s, w_row, pos)
                           : mx::clip_dlogit(s, r_lse, col_lse ? col_lse[q] : T(0), w_row,
                                             w_col, w_pos, pos);
          acc_dot += ds * dot;
          acc_sum += ds;
          d[r * cols + c] = ds;
        }
        s_dot[p] += acc_dot;
        s_sum[p] += acc_sum;
      }
    });
    // grad_P[rows] += scale * dS Q[cols];  grad_Q[cols] += scale * dS^T P[rows].
    auto gP = grad_P.narrow(0, i0, rows);
    gP.addmm_(dots, Qf.narrow(0, j0, cols), /*beta=*/1, /*alpha=*/scale);
    auto gQ = grad_Q.narrow(0, j0, cols);
    gQ.addmm_(dots.t(), Pf.narrow(0, i0, rows), /*beta=*/1, /*alpha=*/scale);
  });

  if (stats.defined()) {
    T sd = 0, ss = 0;
    for (size_t i = 0; i < s_dot.size(); ++i) {
      sd += s_dot[i];
      ss += s_sum[i];
    }
    stats[0].fill_(sd);
    stats[1].fill_(ss);
  }
}

#define RFT_DISPATCH_ACC(TENSOR, NAME, ...)                                   \
  [&] {                                                                       \
    if ((TENSOR).scalar_type() == at::kDouble) {                              \
      using acc_t = double;                                                   \
      return __VA_ARGS__();                                                   \
    }                                                                         \
    using acc_t = float;                                                      \
    return __VA_ARGS__();                                                     \
  }()

}  // namespace

void clip_lse_cpu(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                  const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  RFT_DISPATCH_ACC(P, "clip_lse_cpu",
                   [&] { clip_lse_impl<acc_t>(P, Q, scale, bias, row_lse, col_lse); });
}

void siglip_softplus_sum_cpu(const at::Tensor& P, const at::Tensor& Q,
                             const at::Tensor& scale, const at::Tensor& bias,
                             at::Tensor& out) {
  RFT_DISPATCH_ACC(P, "siglip_softplus_sum_cpu",
                   [&] { siglip_sum_impl<acc_t>(P, Q, scale, bias, out); });
}

void contrastive_grad_cpu(const DlogitSpec& spec, const at::Tensor& grad_loss,
                          const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                          const at::Tensor& bias, at::Tensor& grad_P, at::Tensor& grad_Q,
                          at::Tensor& stats) {
  RFT_DISPATCH_ACC(P, "contrastive_grad_cpu", [&] {
    grad_impl<acc_t>(spec, grad_loss, P, Q, scale, bias, grad_P, grad_Q, stats);
  });
}

static const KernelSet kCpuKernels{&clip_lse_cpu, &siglip_softplus_sum_cpu,
                                   &contrastive_grad_cpu};

RFT_REGISTER_CONTRASTIVE_OPS(CPU, kCpuKernels)

}  // namespace robustft
