// Fused C++ CPU kernels of the contrastive ops.
//
// The similarity matrix is never materialised. Rows are split into blocks that are
// processed in parallel (at::parallel_for); each task streams the column tiles of its
// block: the tile's dot products come from one ATen matmul (sequential inside the
// parallel region), then the per-entry maths of robustft_maths.h, the same code the
// CUDA kernels run, folds the tile into the block's state. One parallel region per
// launch keeps the threads busy on whole blocks: alternating multi-threaded BLAS calls
// with short parallel loops per tile made the threads spin-wait for each other and ran
// slower on two threads than on one. Like the CUDA kernels, the gradient is two
// row-streaming passes (rows of P, then rows of Q of the transposed problem), so no
// task ever writes rows it does not own. Extra memory: one tile per thread, one
// column state per thread and float copies of half/bfloat16 inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

namespace mx = ::robustft::maths;

constexpr int64_t kMaxRowBlock = 512;
constexpr int64_t kMinRowBlock = 32;
constexpr int64_t kColBlock = 1024;

template <typename T>
T value(const at::Tensor& t) {
  return t.defined() ? t.item<T>() : T(0);
}

// Rows per block: enough blocks for every thread, no more rows than kMaxRowBlock.
inline int64_t row_block(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t even = (n + 2 * threads - 1) / (2 * threads);
  return std::min(kMaxRowBlock, std::max(kMinRowBlock, even));
}

// Calls fn(i0, rows, j0, cols, dots) for every tile of P Q^T, row blocks in parallel
// and column tiles in order within a block; dots is the rows x cols tile of dot
// products (contiguous, accumulation dtype), which fn may overwrite. fn must only
// write state of rows [i0, i0 + rows) or state private to the calling thread.
template <typename Fn>
void for_each_tile(const at::Tensor& Pf, const at::Tensor& Qf, Fn&& fn) {
  const int64_t n = Pf.size(0), m = Qf.size(0);
  const int64_t block = row_block(n);
  const int64_t blocks = (n + block - 1) / block;
  // Worker threads start with default thread-local state (grad mode on, no dispatch
  // keys excluded): give them the caller's, set by the op's RFT_KERNEL_GUARDS.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * block, rows = std::min(block, n - i0);
      const auto P_blk = Pf.narrow(0, i0, rows);
      for (int64_t j0 = 0; j0 < m; j0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, m - j0);
        at::Tensor dots = at::mm(P_blk, Qf.narrow(0, j0, cols).t()).contiguous();
        fn(i0, rows, j0, cols, dots);
      }
    }
  });
}

// The calling thread's slot in per-thread state.
inline int64_t thread_slot(int64_t slots) {
  const int64_t t = at::get_thread_num();
  TORCH_CHECK(t >= 0 && t < slots, "robustft_ext: thread ", t, " has no state slot");
  return t;
}

template <typename T>
void clip_lse_impl(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale_t,
                   const at::Tensor& bias_t, at::Tensor& row_lse, at::Tensor& col_lse) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const int64_t n = P.size(0), m = Q.size(0);
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  const bool with_cols = col_lse.defined();
  const int64_t slots = with_cols ? at::get_num_threads() : 0;
  std::vector<mx::LseState<T>> rows_state(n, mx::lse_empty<T>());
  // One column state per thread, merged at the end (no thread shares a row block).
  std::vector<std::vector<mx::LseState<T>>> cols_state(
      slots, std::vector<mx::LseState<T>>(m, mx::lse_empty<T>()));

  for_each_tile(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                            at::Tensor& dots) {
    T* d = dots.data_ptr<T>();
    // Dot products -> logits in place; each row's (max, sum exp) joins its state.
    for (int64_t r = 0; r < rows; ++r) {
      T* row = d + r * cols;
      T row_max = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < cols; ++c) {
        row[c] = mx::logit(row[c], scale, bias);
        row_max = std::max(row_max, row[c]);
      }
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += std::exp(row[c] - row_max);
      rows_state[i0 + r] = mx::lse_push_block(rows_state[i0 + r], row_max, sum);
    }
    if (!with_cols) return;
    // Each column's (max, sum exp) over the block's rows, rows streamed so the inner
    // loop stays contiguous, joined into this thread's column states.
    std::vector<T> cmax(cols, -std::numeric_limits<T>::infinity()), csum(cols, T(0));
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = d + r * cols;
      for (int64_t c = 0; c < cols; ++c) cmax[c] = std::max(cmax[c], row[c]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = d + r * cols;
      for (int64_t c = 0; c < cols; ++c) csum[c] += std::exp(row[c] - cmax[c]);
    }
    auto& mine = cols_state[thread_slot(slots)];
    for (int64_t c = 0; c < cols; ++c) {
      mine[j0 + c] = mx::lse_push_block(mine[j0 + c], cmax[c], csum[c]);
    }
  });

  T* r_out = row_lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) r_out[i] = mx::lse_value(rows_state[i]);
  if (with_cols) {
    T* c_out = col_lse.data_ptr<T>();
    for (int64_t j = 0; j < m; ++j) {
      mx::LseState<T> st = mx::lse_empty<T>();
      for (const auto& part : cols_state) st = mx::lse_merge(st, part[j]);
      c_out[j] = mx::lse_value(st);
    }
  }
}

template <typename T>
void siglip_sum_impl(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale_t,
                     const at::Tensor& bias_t, at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  std::vector<T> row_sums(P.size(0), T(0));
  for_each_tile(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t, int64_t cols, at::Tensor& dots) {
    const T* d = dots.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += mx::softplus(mx::logit(d[r * cols + c], scale, bias));
      row_sums[i0 + r] += sum;
    }
  });
  T total = 0;
  for (T v : row_sums) total += v;
  out.fill_(total);
}

template <typename T>
void grad_rows_impl(const DlogitSpec& spec, const at::Tensor& grad_loss, const at::Tensor& P,
                    const at::Tensor& Q, const at::Tensor& scale_t, const at::Tensor& bias_t,
                    at::Tensor& grad_P, at::Tensor& stats) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const T scale = value<T>(scale_t), bias = value<T>(bias_t), g = value<T>(grad_loss);
  const T w_row = T(spec.w_row) * g, w_col = T(spec.w_col) * g, w_pos = T(spec.w_pos) * g;
  const T* row_lse = (!spec.siglip && spec.w_row != 0.0) ? spec.row_lse.data_ptr<T>() : nullptr;
  const T* col_lse = (!spec.siglip && spec.w_col != 0.0) ? spec.col_lse.data_ptr<T>() : nullptr;
  grad_P.zero_();
  std::vector<T> s_dot(P.size(0), T(0)), s_sum(P.size(0), T(0));

  for_each_tile(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                            at::Tensor& dots) {
    T* d = dots.data_ptr<T>();
    // dots -> g * dS in place, keeping the two scalar-gradient sums per row.
    for (int64_t r = 0; r < rows; ++r) {
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
    // grad_P[block rows] += scale * dS Q[cols]: rows this task owns.
    grad_P.narrow(0, i0, rows).addmm_(dots, Qf.narrow(0, j0, cols), /*beta=*/1, /*alpha=*/scale);
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

#define RFT_DISPATCH_ACC(TENSOR, ...)                                   \
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
  RFT_DISPATCH_ACC(P, [&] { clip_lse_impl<acc_t>(P, Q, scale, bias, row_lse, col_lse); });
}

void siglip_softplus_sum_cpu(const at::Tensor& P, const at::Tensor& Q,
                             const at::Tensor& scale, const at::Tensor& bias,
                             at::Tensor& out) {
  RFT_DISPATCH_ACC(P, [&] { siglip_sum_impl<acc_t>(P, Q, scale, bias, out); });
}

void contrastive_grad_rows_cpu(const DlogitSpec& spec, const at::Tensor& grad_loss,
                               const at::Tensor& P, const at::Tensor& Q,
                               const at::Tensor& scale, const at::Tensor& bias,
                               at::Tensor& grad_P, at::Tensor& stats) {
  RFT_DISPATCH_ACC(P, [&] {
    grad_rows_impl<acc_t>(spec, grad_loss, P, Q, scale, bias, grad_P, stats);
  });
}

static const KernelSet kCpuKernels{&clip_lse_cpu, &siglip_softplus_sum_cpu,
                                   &contrastive_grad_rows_cpu};

RFT_REGISTER_CONTRASTIVE_OPS(CPU, kCpuKernels)

}  // namespace robustft
