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
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "cpu/cpu_tiles.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

// Calls fn(i0, rows, j0, cols, dots) for every tile of P Q^T (see for_each_block); dots
// is the rows x cols tile of dot products (contiguous, accumulation dtype), which fn may
// overwrite.
template <typename Fn>
void for_each_tile(const at::Tensor& Pf, const at::Tensor& Qf, Fn&& fn) {
  for_each_block(Pf.size(0), Qf.size(0), [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    at::Tensor dots = dot_tile(Pf, Qf, i0, rows, j0, cols);
    fn(i0, rows, j0, cols, dots);
  });
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
  // One column state per thread, merged at the end (no thread shares a row block).
  ColumnStates<T> cols_state(with_cols ? m : 0, with_cols ? at::get_num_threads() : 0);

  for_each_tile(Pf, Qf, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                            at::Tensor& dots) {
    T* d = dots.data_ptr<T>();
    for (int64_t e = 0; e < rows * cols; ++e) d[e] = mx::logit(d[e], scale, bias);
    push_row_lse(d, rows, cols, i0, rows_state);
    if (with_cols) push_col_lse(d, rows, cols, j0, cols_state.mine());
  });

  write_lse(rows_state, row_lse.data_ptr<T>());
  if (with_cols) cols_state.write(col_lse.data_ptr<T>(), m);
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
