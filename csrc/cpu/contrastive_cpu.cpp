// Fused C++ CPU kernels of the contrastive ops.
//
// The similarity matrix is never materialised.
//  * Forward: rows are split into blocks processed in parallel (at::parallel_for); each
//    task streams the column tiles of its block: the tile's dot products come from one
//    ATen matmul (sequential inside the parallel region), then the per-entry maths of
//    robustft_maths.h, the same code the CUDA kernels run, folds the tile into the
//    block's state. One parallel region per launch keeps the threads busy on whole
//    blocks: alternating multi-threaded BLAS calls with short parallel loops per small
//    tile made the threads spin-wait for each other.
//  * Backward: one chunk of rows against every column at a time (contrastive_ops.h sizes
//    the chunk to the workspace): its dot products come from one multi-threaded BLAS
//    call into the workspace, the per-entry maths turns them into dlogits in place
//    (parallel over rows), and contrastive_ops.h's two GEMMs take both feature gradients
//    from the chunk. Each logit is recomputed once, and the chunks are large enough for
//    BLAS to run at speed.
// Extra memory: one tile per thread, one column state per thread, the workspace chunk
// and float copies of half/bfloat16 inputs.
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
void dlogits_impl(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                  const at::Tensor& scale_t, const at::Tensor& bias_t, int64_t r0, at::Tensor& ds,
                  at::Tensor& stats) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t rows = ds.size(0), m = Q.size(0);
  // The chunk's dot products from one multi-threaded BLAS call, straight into the workspace.
  at::mm_out(ds, P.narrow(0, r0, rows).to(acc), Q.to(acc).t());
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  const T w_row = T(spec.w_row), w_col = T(spec.w_col), w_pos = T(spec.w_pos);
  const T* row_lse = (!spec.siglip && spec.w_row != 0.0) ? spec.row_lse.data_ptr<T>() : nullptr;
  const T* col_lse = (!spec.siglip && spec.w_col != 0.0) ? spec.col_lse.data_ptr<T>() : nullptr;
  T* d = ds.data_ptr<T>();
  std::vector<T> s_dot(rows, T(0)), s_sum(rows, T(0));
  at::parallel_for(0, rows, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t p = r0 + r;
      const T r_lse = row_lse ? row_lse[p] : T(0);
      T acc_dot = 0, acc_sum = 0;
      T* row = d + r * m;
      for (int64_t q = 0; q < m; ++q) {
        const T dot = row[q];
        const T s = mx::logit(dot, scale, bias);
        const bool pos = mx::is_positive(p, q, spec.has_positives, spec.pos_offset);
        const T g = spec.siglip ? mx::siglip_dlogit(s, w_row, pos)
                                : mx::clip_dlogit(s, r_lse, col_lse ? col_lse[q] : T(0), w_row,
                                                  w_col, w_pos, pos);
        acc_dot += g * dot;
        acc_sum += g;
        row[q] = g;
      }
      s_dot[r] = acc_dot;
      s_sum[r] = acc_sum;
    }
  });
  T sd = 0, ss = 0;
  for (int64_t r = 0; r < rows; ++r) {  // in row order: independent of the thread split
    sd += s_dot[r];
    ss += s_sum[r];
  }
  stats[0] += sd;
  stats[1] += ss;
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

void contrastive_dlogits_cpu(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                             const at::Tensor& scale, const at::Tensor& bias, int64_t r0,
                             at::Tensor& ds, at::Tensor& stats) {
  TORCH_CHECK(ds.is_contiguous() && ds.dim() == 2 && ds.size(1) == Q.size(0) &&
                  r0 >= 0 && r0 + ds.size(0) <= P.size(0) &&
                  ds.scalar_type() == workspace_dtype_cpu(P.scalar_type()),
              "robustft_ext: the dlogit chunk must be a contiguous [rows, m] workspace slice");
  RFT_DISPATCH_ACC(P, [&] { dlogits_impl<acc_t>(spec, P, Q, scale, bias, r0, ds, stats); });
}

// The CPU runs every product in the accumulation dtype (no 16-bit matrix units to feed).
at::ScalarType workspace_dtype_cpu(at::ScalarType t) { return acc_dtype(t); }

void gemm_acc_cpu(const at::Tensor& A, bool transpose_a, const at::Tensor& B, bool transpose_b,
                  const at::Tensor& alpha, double beta, at::Tensor& out) {
  const auto acc = out.scalar_type();
  const at::Tensor a = A.to(acc), b = B.to(acc);
  out.addmm_(transpose_a ? a.t() : a, transpose_b ? b.t() : b, beta, alpha.item());
}

static const KernelSet kCpuKernels{&clip_lse_cpu, &siglip_softplus_sum_cpu,
                                   &contrastive_dlogits_cpu,
                                   GemmKernels{&gemm_acc_cpu, &workspace_dtype_cpu}};

RFT_REGISTER_CONTRASTIVE_OPS(CPU, kCpuKernels)

}  // namespace robustft
