// Fused C++ CPU kernels of the contrastive ops.
//
// The similarity matrix is never materialised.
//  * Forward: rows are split into blocks processed in parallel (cpu_tiles.h); each task
//    streams the column tiles of its block: the tile's dot products come from one ATen
//    matmul (sequential inside the parallel region) into the task's tile buffer, then
//    the per-entry maths folds the tile into the block's state. One parallel region per
//    launch keeps the threads busy on whole blocks: alternating multi-threaded BLAS calls
//    with short parallel loops per small tile made the threads spin-wait for each other.
//  * Backward: one chunk of rows against every column at a time (contrastive_ops.h sizes
//    the chunk to the workspace): its dot products come from one multi-threaded BLAS
//    call into the workspace, the per-entry maths turns them into dlogits in place
//    (parallel over rows), and contrastive_ops.h's two GEMMs take both feature gradients
//    from the chunk. Each logit is recomputed once, and the chunks are large enough for
//    BLAS to run at speed.
// The per-entry maths is robustft_maths.h's: in double through its functions (the code
// the CUDA kernels run), in float through the vectorised loops of cpu_vec_kernels.h,
// which evaluate the same formulas with a SIMD exp / log1p (cpu_vec_math.h).
//  * Kept dot products (contrastive_ops.h): when the autograd Function will need
//    gradients and the n x m dot products fit the workspace limit, the forward takes them
//    from one multi-threaded GEMM and keeps them; its statistics come from them without
//    writing over them, and the backward forms its dlogits from them in place: 6 n m D
//    FLOPs in all instead of 8.
// Extra memory: one tile per thread, one column state per thread, the workspace chunk (or
// the kept dot products, within the same limit) and float copies of half/bfloat16 inputs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "cpu/cpu_tiles.h"
#include "cpu/shared_shift.h"
#include "launcher_contract.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

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

  const DotProducts<T> dots(Pf, Qf);
  for_each_row_block(n, [&](int64_t i0, int64_t rows) {
    TileScratch<T> s = dots.scratch(rows);
    for_each_col_tile(m, [&](int64_t j0, int64_t cols) {
      const Tile<T> t = dots.tile(s, i0, rows, j0, cols);
      tile_logits(t, scale, bias, s, with_cols);
      tile_fold(t, i0, j0, s, rows_state, with_cols ? &cols_state.mine() : nullptr);
    });
  });

  write_lse(rows_state, row_lse.data_ptr<T>());
  if (with_cols) cols_state.write(col_lse.data_ptr<T>(), m);
}

// out[r] = the sum of softplus(scale d + bias) over row r of a tile of dot products d.
inline void softplus_row_sums(const Tile<float>& t, float scale, float bias, float* out) {
  vec::kernels().softplus_sums(t.d, t.rows, t.cols, t.ld, scale, bias, out);
}

inline void softplus_row_sums(const Tile<double>& t, double scale, double bias, double* out) {
  for (int64_t r = 0; r < t.rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < t.cols; ++c) sum += mx::softplus(mx::logit(t.row(r)[c], scale, bias));
    out[r] = sum;
  }
}

template <typename T>
void siglip_sum_impl(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale_t,
                     const at::Tensor& bias_t, at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor Pf = P.to(acc).contiguous(), Qf = Q.to(acc).contiguous();
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  std::vector<T> row_sums(P.size(0), T(0));
  const DotProducts<T> dots(Pf, Qf);
  for_each_row_block(P.size(0), [&](int64_t i0, int64_t rows) {
    TileScratch<T> s = dots.scratch(rows);
    for_each_col_tile(Qf.size(0), [&](int64_t j0, int64_t cols) {
      softplus_row_sums(dots.tile(s, i0, rows, j0, cols), scale, bias, s.row_sum.data());
      for (int64_t r = 0; r < rows; ++r) row_sums[i0 + r] += s.row_sum[r];
    });
  });
  T total = 0;
  for (T v : row_sums) total += v;
  out.fill_(total);
}

// clip_lse_impl over dot products the forward keeps for its backward (left as they are).
template <typename T>
void clip_lse_from_dots_impl(const at::Tensor& dots, const at::Tensor& scale_t,
                             const at::Tensor& bias_t, at::Tensor& row_lse, at::Tensor& col_lse) {
  const int64_t n = dots.size(0), m = dots.size(1);
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  const bool with_cols = col_lse.defined();
  std::vector<mx::LseState<T>> rows_state(n, mx::lse_empty<T>());
  ColumnStates<T> cols_state(with_cols ? m : 0, with_cols ? at::get_num_threads() : 0);
  const T* d = dots.data_ptr<T>();
  for_each_row_block(n, [&](int64_t i0, int64_t rows) {
    TileScratch<T> s(rows, m, at::Tensor());
    for_each_col_tile(m, [&](int64_t j0, int64_t cols) {
      const Tile<T> t{const_cast<T*>(d) + i0 * m + j0, rows, cols, m};
      tile_fold_dots(t, scale, bias, i0, j0, s, rows_state,
                     with_cols ? &cols_state.mine() : nullptr);
    });
  });
  write_lse(rows_state, row_lse.data_ptr<T>());
  if (with_cols) cols_state.write(col_lse.data_ptr<T>(), m);
}

template <typename T>
void siglip_sum_from_dots_impl(const at::Tensor& dots, const at::Tensor& scale_t,
                               const at::Tensor& bias_t, at::Tensor& out) {
  const int64_t n = dots.size(0), m = dots.size(1);
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  std::vector<T> row_sums(n, T(0));
  const T* d = dots.data_ptr<T>();
  for_each_row_block(n, [&](int64_t i0, int64_t rows) {
    std::vector<T> sums(rows);
    for_each_col_tile(m, [&](int64_t j0, int64_t cols) {
      const Tile<T> t{const_cast<T*>(d) + i0 * m + j0, rows, cols, m};
      softplus_row_sums(t, scale, bias, sums.data());
      for (int64_t r = 0; r < rows; ++r) row_sums[i0 + r] += sums[r];
    });
  });
  T total = 0;
  for (T v : row_sums) total += v;
  out.fill_(total);
}

// The factors that give CLIP's two dlogit terms from one exp (vec::ClipDlogitArgs), for the
// rows [r0, r0 + rows) of a problem whose log-sum-exps are row_lse [n] and col_lse [m]: off
// where one term is off (shift_factors, shared_shift.h, for the rest).
struct SharedShift {
  ShiftFactors f;

  SharedShift(const DlogitSpec& spec, const float* row_lse, int64_t n, const float* col_lse,
              int64_t m, int64_t r0, int64_t rows) {
    if (spec.siglip || row_lse == nullptr || col_lse == nullptr) return;
    f = shift_factors(row_lse, n, col_lse, m, float(spec.w_row), float(spec.w_col), r0, rows,
                      0, m);
  }
};

// Rows [r_begin, r_end) of a dlogit chunk whose row 0 is problem row r0: dot products on
// entry, the dlogits `spec` describes on exit; each row's sum of dS <P_p, Q_q> into
// s_dot[r] and of dS into s_sum[r]. row_lse is indexed by problem row.
inline void dlogit_rows(const DlogitSpec& spec, float* d, int64_t m, int64_t r0,
                        int64_t r_begin, int64_t r_end, float scale, float bias,
                        const float* row_lse, const float* col_lse, float* s_dot,
                        float* s_sum, const SharedShift& shared) {
  const auto& k = vec::kernels();
  const int64_t p0 = r0 + r_begin;
  float* rows_d = d + r_begin * m;
  if (spec.siglip) {
    k.siglip_dlogits(rows_d, r_end - r_begin, m, p0, scale, bias, float(spec.w_row),
                     spec.has_positives, spec.pos_offset, s_dot + r_begin, s_sum + r_begin);
    return;
  }
  vec::ClipDlogitArgs a;
  a.scale = scale;
  a.bias = bias;
  a.w_row = float(spec.w_row);
  a.w_col = float(spec.w_col);
  a.w_pos = float(spec.w_pos);
  a.row_lse = row_lse ? row_lse + p0 : nullptr;
  a.col_lse = col_lse;
  a.special = spec.has_positives ? vec::Special::kSubtract : vec::Special::kNone;
  a.offset = spec.pos_offset;
  if (shared.f.on) {
    a.row_factor = shared.f.row_f.data() + r_begin;
    a.col_factor = shared.f.col_f.data();
    a.shift = shared.f.shift;
  }
  k.clip_dlogits(rows_d, r_end - r_begin, m, p0, a, s_dot + r_begin, s_sum + r_begin);
}

// Double keeps the two exps.
struct NoSharedShift {
  NoSharedShift(const DlogitSpec&, const double*, int64_t, const double*, int64_t, int64_t,
                int64_t) {}
};

inline void dlogit_rows(const DlogitSpec& spec, double* d, int64_t m, int64_t r0,
                        int64_t r_begin, int64_t r_end, double scale, double bias,
                        const double* row_lse, const double* col_lse, double* s_dot,
                        double* s_sum, const NoSharedShift&) {
  const double w_row = spec.w_row, w_col = spec.w_col, w_pos = spec.w_pos;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t p = r0 + r;
    const double r_lse = row_lse ? row_lse[p] : 0.0;
    double acc_dot = 0, acc_sum = 0;
    double* row = d + r * m;
    for (int64_t q = 0; q < m; ++q) {
      const double dot = row[q];
      const double s = mx::logit(dot, scale, bias);
      const bool pos = mx::is_positive(p, q, spec.has_positives, spec.pos_offset);
      const double g = spec.siglip ? mx::siglip_dlogit(s, w_row, pos)
                                   : mx::clip_dlogit(s, r_lse, col_lse ? col_lse[q] : 0.0,
                                                     w_row, w_col, w_pos, pos);
      acc_dot += g * dot;
      acc_sum += g;
      row[q] = g;
    }
    s_dot[r] = acc_dot;
    s_sum[r] = acc_sum;
  }
}

template <typename T>
void dlogits_impl(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                  const at::Tensor& scale_t, const at::Tensor& bias_t, int64_t r0, at::Tensor& ds,
                  at::Tensor& stats) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t rows = ds.size(0), m = Q.size(0);
  // The chunk's dot products from one multi-threaded BLAS call, straight into the workspace
  // (unless the forward kept them there).
  if (!spec.ds_holds_dots) at::mm_out(ds, P.narrow(0, r0, rows).to(acc), Q.to(acc).t());
  const T scale = value<T>(scale_t), bias = value<T>(bias_t);
  const T* row_lse = (!spec.siglip && spec.w_row != 0.0) ? spec.row_lse.data_ptr<T>() : nullptr;
  const T* col_lse = (!spec.siglip && spec.w_col != 0.0) ? spec.col_lse.data_ptr<T>() : nullptr;
  T* d = ds.data_ptr<T>();
  std::vector<T> s_dot(rows, T(0)), s_sum(rows, T(0));
  using Shift = std::conditional_t<std::is_same_v<T, float>, SharedShift, NoSharedShift>;
  const Shift shared(spec, row_lse, P.size(0), col_lse, m, r0, rows);
  at::parallel_for(0, rows, rows_per_task(m), [&](int64_t r_begin, int64_t r_end) {
    dlogit_rows(spec, d, m, r0, r_begin, r_end, scale, bias, row_lse, col_lse, s_dot.data(),
                s_sum.data(), shared);
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
  check_tile_operands(P, Q, scale, bias, c10::kCPU);
  check_acc_vector(row_lse, P.size(0), P, "row_lse");
  if (col_lse.defined()) check_acc_vector(col_lse, Q.size(0), P, "col_lse");
  RFT_DISPATCH_ACC(P, [&] { clip_lse_impl<acc_t>(P, Q, scale, bias, row_lse, col_lse); });
}

void siglip_softplus_sum_cpu(const at::Tensor& P, const at::Tensor& Q,
                             const at::Tensor& scale, const at::Tensor& bias,
                             at::Tensor& out) {
  check_tile_operands(P, Q, scale, bias, c10::kCPU);
  check_acc_vector(out, 1, P, "out");
  RFT_DISPATCH_ACC(P, [&] { siglip_sum_impl<acc_t>(P, Q, scale, bias, out); });
}

void contrastive_dlogits_cpu(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                             const at::Tensor& scale, const at::Tensor& bias, int64_t r0,
                             at::Tensor& ds, at::Tensor& stats) {
  check_tile_operands(P, Q, scale, bias, c10::kCPU);
  check_dlogits(spec, P, Q, r0, ds, stats, workspace_dtype_cpu(P.scalar_type()));
  RFT_DISPATCH_ACC(P, [&] { dlogits_impl<acc_t>(spec, P, Q, scale, bias, r0, ds, stats); });
}

void dot_products_cpu(const at::Tensor& P, const at::Tensor& Q, at::Tensor& dots) {
  const auto acc = dots.scalar_type();
  at::mm_out(dots, P.to(acc), Q.to(acc).t());
}

void clip_lse_from_dots_cpu(const at::Tensor& dots, const at::Tensor& scale,
                            const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  RFT_DISPATCH_ACC(dots, [&] { clip_lse_from_dots_impl<acc_t>(dots, scale, bias, row_lse, col_lse); });
}

void siglip_softplus_sum_from_dots_cpu(const at::Tensor& dots, const at::Tensor& scale,
                                       const at::Tensor& bias, at::Tensor& out) {
  RFT_DISPATCH_ACC(dots, [&] { siglip_sum_from_dots_impl<acc_t>(dots, scale, bias, out); });
}

// The CPU runs every product in the accumulation dtype (no 16-bit matrix units to feed).
at::ScalarType workspace_dtype_cpu(at::ScalarType t) { return acc_dtype(t); }

void gemm_acc_cpu(const at::Tensor& A, bool transpose_a, const at::Tensor& B, bool transpose_b,
                  const at::Tensor& alpha, double beta, at::Tensor& out) {
  check_gemm_acc(A, transpose_a, B, transpose_b, alpha, beta, out, c10::kCPU);
  // The operands are of the accumulation dtype here (workspace_dtype_cpu): no copies.
  const at::Tensor a = A.to(out.scalar_type()), b = B.to(out.scalar_type());
  out.addmm_(transpose_a ? a.t() : a, transpose_b ? b.t() : b, beta, alpha.item());
}

static const KernelSet kCpuKernels{&clip_lse_cpu, &siglip_softplus_sum_cpu,
                                   &contrastive_dlogits_cpu,
                                   GemmKernels{&gemm_acc_cpu, &workspace_dtype_cpu}};

static const KeptDotKernels kCpuKeptDotKernels{&dot_products_cpu, &clip_lse_from_dots_cpu,
                                                &siglip_softplus_sum_from_dots_cpu};

RFT_REGISTER_CONTRASTIVE_OPS(robustft_ext, CPU, kCpuKernels)
RFT_REGISTER_KEPT_DOT_OPS(robustft_ext, CPU, kCpuKernels, kCpuKeptDotKernels)

}  // namespace robustft
