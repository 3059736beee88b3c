// Fused C++ CPU kernels of a robust fine-tuning step's tile work: the launchers of
// step_kernels.h (CLIP and m^2-mix), on which step_ops.h builds the m2mix_*, lipsum_*,
// dive_* and robust_step_* ops.
//
// Forward: one parallel region (cpu_tiles.h) whose tasks are the row blocks of the
// training batch; each streams the column tiles of its rows: up to three dot-product tiles
// per step from sequential ATen matmuls (I_p M_q^T and T_p M_q^T for m^2, I_p T_q^T for
// CLIP), folded with robustft_maths.h's per-entry maths into the row (and CLIP column)
// log-sum-exp states. Float tiles run the vectorised loops of cpu_vec_kernels.h, double
// tiles robustft_maths.h's functions (contrastive_cpu.cpp says more).
//
// The mixed negatives are read from the n x D buffer M that the op body computed: the
// prologue costs O(n D), and mixing GEMM tiles instead (s <I_p, M_q> = w_a[q] <I_p, I_q> +
// w_b[q] <I_p, T_q>) needs four tile products per step where the prologue needs three.
//
// Backward: a chunk of rows against every column (step_ops.h sizes it to the workspace):
// each of the chunk's logit blocks comes from one multi-threaded BLAS call into its
// workspace slice and is turned into dlogits in place, parallel over rows; step_ops.h's
// GEMMs then take every gradient from the chunk.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/double_sums.h"
#include "cpu/cpu_tiles.h"
#include "robustft_maths.h"
#include "contrastive_kernels.h"
#include "step_kernels.h"
#include "launcher_contract.h"
#include "step_ops.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

// A step's tile operands in the accumulation dtype, and its scalars.
template <typename T>
struct StepTiles {
  at::Tensor I, Tt, M;  // contiguous
  T s_m = 0, s_c = 0;

  explicit StepTiles(const StepProblem& p) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    auto f = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
    I = f(p.I);
    Tt = f(p.T);
    if (p.with_m2) {
      M = f(p.M);
      s_m = value<T>(p.m2_scale);
    }
    if (p.with_clip) s_c = value<T>(p.clip_scale);
  }
};

// ---- Forward -------------------------------------------------------------------------
template <typename T>
void step_lse_impl(const StepProblem& p, at::Tensor& lse) {
  const StepTiles<T> x(p);
  const int64_t n = p.n;
  const at::Tensor diag_c = p.with_m2 ? p.diag.contiguous() : at::Tensor();
  const T* diag = p.with_m2 ? diag_c.data_ptr<T>() : nullptr;
  std::vector<mx::LseState<T>> a_state(p.with_m2 ? n : 0, mx::lse_empty<T>()),
      b_state(p.with_m2 ? n : 0, mx::lse_empty<T>()),
      r_state(p.with_clip ? n : 0, mx::lse_empty<T>());
  ColumnStates<T> c_state(p.with_clip ? n : 0, p.with_clip ? at::get_num_threads() : 0);

  // A = I M^T and B = T M^T (m^2), C = I T^T (CLIP); one task's tiles of them share its
  // scratch, each tile folded before the next is formed.
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> operands;
  if (p.with_m2) {
    operands.emplace_back(&x.I, &x.M);
    operands.emplace_back(&x.Tt, &x.M);
  }
  if (p.with_clip) operands.emplace_back(&x.I, &x.Tt);
  // Kept for the backward (p.keep): each view's whole product from one threaded GEMM into
  // its slice of p.keep, before the parallel region; a tile is a copy of its block in the
  // task's buffer (the logits are formed in place). Else DotProducts' own products.
  const bool keep = p.keep.defined();
  std::vector<DotProducts<T>> views;
  std::vector<const T*> kept;
  for (size_t v = 0; v < operands.size(); ++v) {
    if (keep) {
      at::Tensor out = p.keep[v];
      at::mm_out(out, *operands[v].first, operands[v].second->t());
      kept.push_back(out.data_ptr<T>());
    } else {
      views.emplace_back(*operands[v].first, *operands[v].second);
    }
  }
  auto scratch = [&](int64_t rows) {
    if (!keep) return views.front().scratch(rows);
    return TileScratch<T>(rows, n, at::empty({rows * std::min(n, kColBlock)}, x.I.options()));
  };
  auto tile_of = [&](size_t v, TileScratch<T>& s, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols) {
    if (!keep) return views[v].tile(s, i0, rows, j0, cols);
    T* dst = s.buffer.template data_ptr<T>();
    const T* src = kept[v] + i0 * n + j0;
    for (int64_t r = 0; r < rows; ++r) std::copy(src + r * n, src + r * n + cols, dst + r * cols);
    return Tile<T>{dst, rows, cols, cols};
  };
  for_each_row_block(n, [&](int64_t i0, int64_t rows) {
    TileScratch<T> s = scratch(rows);
    for_each_col_tile(n, [&](int64_t j0, int64_t cols) {
      size_t v = 0;
      if (p.with_m2) {
        // A and B: mixed negatives off the diagonal, the true pair on it.
        for (int k = 0; k < 2; ++k) {
          const Tile<T> t = tile_of(v++, s, i0, rows, j0, cols);
          tile_logits(t, x.s_m, T(0), s, false);
          const int64_t lo = std::max(i0, j0), hi = std::min(i0 + rows, j0 + cols);
          for (int64_t row = lo; row < hi; ++row) {
            tile_set_logit(t, row - i0, row - j0, diag[row], s);
          }
          tile_fold<T>(t, i0, j0, s, k == 0 ? a_state : b_state, nullptr);
        }
      }
      if (p.with_clip) {
        const Tile<T> t = tile_of(v, s, i0, rows, j0, cols);
        tile_logits(t, x.s_c, T(0), s, true);
        tile_fold(t, i0, j0, s, r_state, &c_state.mine());
      }
    });
  });

  T* l = lse.data_ptr<T>();
  if (p.with_m2) {
    write_lse(a_state, l);
    write_lse(b_state, l + n);
  }
  if (p.with_clip) {
    write_lse(r_state, l + 2 * n);
    c_state.write(l + 3 * n, n);
  }
}

// ---- Backward --------------------------------------------------------------------------
// The dlogits of one view: CLIP's (maths::clip_dlogit) with weights w_row, w_col, w_pos
// over row log-sum-exps row_lse and column log-sum-exps col_lse (null: that term off), the
// special entry (p, p) either a positive pair (w_pos subtracted) or an m^2 true pair
// (zero_diag: 0, its gradient is the op body's).
template <typename T>
struct ViewDlogits {
  T scale, w_row, w_col, w_pos;
  const T* row_lse;
  const T* col_lse;
  bool zero_diag;
};

// Rows [r_begin, r_end) of a chunk whose row 0 is problem row r0, in place; each row's
// sum of dS * dot into stat[r].
inline void view_dlogit_rows(const ViewDlogits<float>& v, float* d, int64_t m, int64_t r0,
                             int64_t r_begin, int64_t r_end, float* stat) {
  const int64_t p0 = r0 + r_begin;
  vec::ClipDlogitArgs a;
  a.scale = v.scale;
  a.w_row = v.w_row;
  a.w_col = v.w_col;
  a.w_pos = v.w_pos;
  a.row_lse = v.row_lse ? v.row_lse + p0 : nullptr;
  a.col_lse = v.col_lse;
  a.special = v.zero_diag ? vec::Special::kZero : vec::Special::kSubtract;
  vec::kernels().clip_dlogits(d + r_begin * m, r_end - r_begin, m, p0, a, stat + r_begin,
                              nullptr);
}

inline void view_dlogit_rows(const ViewDlogits<double>& v, double* d, int64_t m, int64_t r0,
                             int64_t r_begin, int64_t r_end, double* stat) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t row = r0 + r;
    double* drow = d + r * m;
    double acc = 0;
    for (int64_t q = 0; q < m; ++q) {
      const double dot = drow[q];
      const double g =
          v.zero_diag && q == row
              ? 0.0
              : mx::clip_dlogit(mx::logit(dot, v.scale, 0.0), v.row_lse ? v.row_lse[row] : 0.0,
                                v.col_lse ? v.col_lse[q] : 0.0, v.w_row, v.w_col, v.w_pos,
                                !v.zero_diag && q == row);
      drow[q] = g;
      acc += g * dot;
    }
    stat[r] = acc;
  }
}

// The chunk's dot products X[r0 : r0 + rows] Y^T straight into the workspace slice ws
// (unless ws already holds them: the forward's, kept), then its dlogits in place, parallel
// over rows; returns the sum of dS * dot over the chunk, in row order (independent of the
// split).
template <typename T>
T chunk_dlogits(const at::Tensor& X, const at::Tensor& Y, int64_t r0, at::Tensor& ws,
                const ViewDlogits<T>& v, bool kept) {
  const int64_t rows = ws.size(0), m = Y.size(0);
  if (!kept) at::mm_out(ws, X.narrow(0, r0, rows), Y.t());
  T* d = ws.data_ptr<T>();
  std::vector<T> stat(rows, T(0));
  at::parallel_for(0, rows, rows_per_task(m), [&](int64_t r_begin, int64_t r_end) {
    view_dlogit_rows(v, d, m, r0, r_begin, r_end, stat.data());
  });
  T total = 0;
  for (const T s : stat) total += s;
  return total;
}

template <typename T>
void step_dlogits_impl(const StepProblem& p, const at::Tensor& lse_t, int64_t r0, at::Tensor& dA,
                       at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  const StepTiles<T> x(p);
  const int64_t n = p.n;
  const at::Tensor lse_c = lse_t.contiguous();
  const T* lse = lse_c.data_ptr<T>();
  const bool kept = p.keep.defined();
  if (p.with_m2) {
    // exp(A_pq - lse[0][p]) off the diagonal (the true pair's gradient is the op body's).
    T m2 = 0;
    for (int k = 0; k < 2; ++k) {
      const ViewDlogits<T> v{x.s_m, T(1), T(0), T(0), lse + k * n, nullptr, true};
      m2 += chunk_dlogits<T>(k == 0 ? x.I : x.Tt, x.M, r0, k == 0 ? dA : dB, v, kept);
    }
    stats[0] += m2;
  }
  if (p.with_clip) {
    const ViewDlogits<T> v{x.s_c, T(0.5), T(0.5), T(1), lse + 2 * n, lse + 3 * n, false};
    stats[1] += chunk_dlogits<T>(x.I, x.Tt, r0, dC, v, kept);
  }
}

// Rows per task of the O(n D) loops below: a task of fewer than ~64k entries costs less
// than waking the pool.
inline int64_t mix_grain(int64_t D) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D)); }

// The slerp prologue in one pass per row, in double: c = <I_p, T_p>, the weights,
// M_p = w_a I_p + w_b T_p rounded once to M's dtype (no M: the weights alone), and with
// pair_dot (acc), c rounded to it.
template <typename In, typename Out>
void mix_rows_fused(const at::Tensor& I, const at::Tensor& T, double lam, at::Tensor& M,
                    at::Tensor& weights, const at::Tensor& pair_dot) {
  const int64_t n = I.size(0), D = I.size(1);
  const In* ip = I.data_ptr<In>();
  const In* tp = T.data_ptr<In>();
  Out* mp = M.defined() ? M.data_ptr<Out>() : nullptr;
  double* w = weights.data_ptr<double>();
  const bool pair_double = pair_dot.defined() && pair_dot.scalar_type() == at::kDouble;
  float* pf = pair_dot.defined() && !pair_double ? pair_dot.data_ptr<float>() : nullptr;
  double* pd = pair_double ? pair_dot.data_ptr<double>() : nullptr;
  at::parallel_for(0, n, mix_grain(D), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const In* a = ip + p * D;
      const In* b = tp + p * D;
      const double c = dot_double(a, b, D);
      if (pf != nullptr) pf[p] = float(c);
      if (pd != nullptr) pd[p] = c;
      const auto sw = mx::slerp_weights<double>(c, lam);
      w[p] = sw.wa;
      w[n + p] = sw.wb;
      w[2 * n + p] = sw.dwa_dc;
      w[3 * n + p] = sw.dwb_dc;
      if (mp == nullptr) continue;
      Out* m = mp + p * D;
      for (int64_t j = 0; j < D; ++j) m[j] = Out(sw.wa * double(a[j]) + sw.wb * double(b[j]));
    }
  });
}

// grad_I += g_pair[p] T_p + (w_a dM_p + k T_p), grad_T += g_pair[p] I_p + (w_b dM_p + k I_p),
// k = <dM_p, I_p> dw_a/dc + <dM_p, T_p> dw_b/dc: the true-pair term and the slerp backward
// in one pass per row (the true-pair product in Acc, the slerp backward in double).
template <typename In, typename Acc>
void mix_backward_fused(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T,
                        const at::Tensor& weights, const at::Tensor& g_pair, at::Tensor& grad_I,
                        at::Tensor& grad_T) {
  const int64_t n = I.size(0), D = I.size(1);
  const Acc* dp = dM.data_ptr<Acc>();
  const In* ip = I.data_ptr<In>();
  const In* tp = T.data_ptr<In>();
  const double* w = weights.data_ptr<double>();
  const Acc* gp = g_pair.data_ptr<Acc>();
  Acc* gi = grad_I.data_ptr<Acc>();
  Acc* gt = grad_T.data_ptr<Acc>();
  at::parallel_for(0, n, mix_grain(D), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const Acc* d = dp + p * D;
      const In* a = ip + p * D;
      const In* b = tp + p * D;
      const double da = dot_double(d, a, D), db = dot_double(d, b, D);
      const double wa = w[p], wb = w[n + p];
      const double k = da * w[2 * n + p] + db * w[3 * n + p];
      const Acc g = gp[p];
      Acc* oi = gi + p * D;
      Acc* ot = gt + p * D;
      for (int64_t j = 0; j < D; ++j) {
        const double dj = d[j], aj = double(a[j]), bj = double(b[j]);
        oi[j] = (oi[j] + g * Acc(b[j])) + Acc(wa * dj + k * bj);
        ot[j] = (ot[j] + g * Acc(a[j])) + Acc(wb * dj + k * aj);
      }
    }
  });
}

// DiVE's sums in one pass over the reference rows (robustft_maths.h's entries; dive_sums of
// step_ops.h does the same with a dozen ATen passes). Rows go in fixed blocks whose partial
// sums (in double) are added in block order: the result does not depend on the threads.
template <typename In, typename Acc>
void dive_sums_fused(const DiveInputs& d, at::Tensor& sums, at::Tensor& mean) {
  const int64_t B = d.fi.size(0), D = d.fi.size(1);
  const In *fi = d.fi.data_ptr<In>(), *ft = d.ft.data_ptr<In>();
  const In *pi = d.pi.data_ptr<In>(), *pt = d.pt.data_ptr<In>();
  const Acc* m = d.center.data_ptr<Acc>();
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (B + kBlock - 1) / kBlock;
  std::vector<double> avl(blocks, 0.0), pvl(blocks, 0.0), part(blocks * D, 0.0);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / (kBlock * D)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Accumulated in locals and written once: neighbouring blocks' slots share cache lines.
      // The AVL and PVL sums by column first (a running sum over the whole block would be
      // one dependent add per entry: double_sums.h), then over the columns by lanes.
      double* pm = part.data() + b * D;
      thread_local std::vector<double> col_a, col_p;
      col_a.assign(D, 0.0);
      col_p.assign(D, 0.0);
      double* ca = col_a.data();
      double* cp = col_p.data();
      for (int64_t j = b * kBlock; j < std::min(B, (b + 1) * kBlock); ++j) {
        const int64_t o = j * D;
        for (int64_t e = 0; e < D; ++e) {
          const Acc u = Acc(fi[o + e]) - Acc(pi[o + e]), v = Acc(ft[o + e]) - Acc(pt[o + e]);
          ca[e] += double(mx::dive_avl_entry(u, v, m[e]));
          cp[e] += double(mx::dive_pvl_entry(u, v));
          pm[e] += double(u) + double(v);
        }
      }
      avl[b] = lane_sum(D, [&](int64_t e) { return ca[e]; });
      pvl[b] = lane_sum(D, [&](int64_t e) { return cp[e]; });
    }
  });
  double a = 0, p = 0;
  std::vector<double> total(D, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    a += avl[b];
    p += pvl[b];
    for (int64_t e = 0; e < D; ++e) total[e] += part[b * D + e];
  }
  Acc* s = sums.data_ptr<Acc>();
  s[0] = Acc(a);
  s[1] = Acc(p);
  Acc* out = mean.data_ptr<Acc>();
  for (int64_t e = 0; e < D; ++e) out[e] = Acc(total[e] / (2.0 * double(B)));
}

template <typename In, typename Acc>
void dive_grads_fused(const DiveInputs& d, Acc w_a, Acc w_p, at::Tensor& grad_fi,
                      at::Tensor& grad_ft) {
  const int64_t B = d.fi.size(0), D = d.fi.size(1);
  const In *fi = d.fi.data_ptr<In>(), *ft = d.ft.data_ptr<In>();
  const In *pi = d.pi.data_ptr<In>(), *pt = d.pt.data_ptr<In>();
  const Acc* m = d.center.data_ptr<Acc>();
  Acc *gi = grad_fi.data_ptr<Acc>(), *gt = grad_ft.data_ptr<Acc>();
  at::parallel_for(0, B, mix_grain(D), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = j * D;
      for (int64_t e = 0; e < D; ++e) {
        const Acc u = Acc(fi[o + e]) - Acc(pi[o + e]), v = Acc(ft[o + e]) - Acc(pt[o + e]);
        mx::dive_entry_grads(u, v, m[e], w_a, w_p, gi + o + e, gt + o + e);
      }
    }
  });
}

}  // namespace

void step_lse_cpu(const StepProblem& p, at::Tensor& lse) {
  check_step_problem(p, workspace_dtype_cpu(p.I.scalar_type()), c10::kCPU);
  check_step_lse(p, lse);
  RFT_DISPATCH_ACC(p.I, [&] { step_lse_impl<acc_t>(p, lse); });
}

void step_dlogits_cpu(const StepProblem& p, const at::Tensor& lse, int64_t r0, at::Tensor& dA,
                      at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  check_step_problem(p, workspace_dtype_cpu(p.I.scalar_type()), c10::kCPU);
  check_step_lse(p, lse);
  check_step_chunks(p, r0, dA, dB, dC, workspace_dtype_cpu(p.I.scalar_type()));
  check_acc_vector(stats, 2, p.I, "stats");
  RFT_DISPATCH_ACC(p.I, [&] { step_dlogits_impl<acc_t>(p, lse, r0, dA, dB, dC, stats); });
}

namespace {

void mix_rows_dispatch(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                       at::Tensor& M, at::Tensor& weights, const at::Tensor& pair_dot) {
  const double l = lam.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(), "mix_rows_cpu", [&] {
    if (!M.defined() || M.scalar_type() == I.scalar_type()) {
      mix_rows_fused<scalar_t, scalar_t>(I, T, l, M, weights, pair_dot);
    } else if (M.scalar_type() == at::kDouble) {
      mix_rows_fused<scalar_t, double>(I, T, l, M, weights, pair_dot);
    } else {
      mix_rows_fused<scalar_t, float>(I, T, l, M, weights, pair_dot);
    }
  });
}

}  // namespace

void mix_rows_cpu(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam, at::Tensor& M,
                  at::Tensor& weights) {
  check_mix(I, T, lam, M, weights, workspace_dtype_cpu(I.scalar_type()), c10::kCPU);
  mix_rows_dispatch(I, T, lam, M, weights, at::Tensor());
}

void mix_rows_pair_dot_cpu(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                           at::Tensor& M, at::Tensor& weights, at::Tensor& pair_dot) {
  check_mix_pair_dot(I, T, lam, M, weights, pair_dot, workspace_dtype_cpu(I.scalar_type()),
                     c10::kCPU);
  mix_rows_dispatch(I, T, lam, M, weights, pair_dot);
}

void mix_backward_cpu(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T,
                      const at::Tensor& weights, const at::Tensor& g_pair, at::Tensor& grad_I,
                      at::Tensor& grad_T) {
  check_mix_backward(dM, I, T, weights, g_pair, grad_I, grad_T, c10::kCPU);
  const auto acc = acc_dtype(I.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(), "mix_backward_cpu", [&] {
    if (acc == at::kDouble) {
      mix_backward_fused<scalar_t, double>(dM, I, T, weights, g_pair, grad_I, grad_T);
    } else {
      mix_backward_fused<scalar_t, float>(dM, I, T, weights, g_pair, grad_I, grad_T);
    }
  });
}

void dive_sums_cpu(const DiveInputs& d, at::Tensor& sums, at::Tensor& mean) {
  check_dive(d, c10::kCPU);
  check_acc_vector(sums, 2, d.fi, "sums");
  check_acc_vector(mean, d.fi.size(1), d.fi, "mean");
  const auto acc = acc_dtype(d.fi.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.fi.scalar_type(), "dive_sums_cpu", [&] {
    if (acc == at::kDouble) {
      dive_sums_fused<scalar_t, double>(d, sums, mean);
    } else {
      dive_sums_fused<scalar_t, float>(d, sums, mean);
    }
  });
}

void dive_grads_cpu(const DiveInputs& d, const at::Tensor& w_a, const at::Tensor& w_p,
                    at::Tensor& grad_fi, at::Tensor& grad_ft) {
  check_dive_grads(d, w_a, w_p, grad_fi, grad_ft, c10::kCPU);
  const auto acc = acc_dtype(d.fi.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.fi.scalar_type(), "dive_grads_cpu", [&] {
    if (acc == at::kDouble) {
      dive_grads_fused<scalar_t, double>(d, w_a.item<double>(), w_p.item<double>(), grad_fi, grad_ft);
    } else {
      dive_grads_fused<scalar_t, float>(d, w_a.item<float>(), w_p.item<float>(), grad_fi, grad_ft);
    }
  });
}

static const StepKernelSet kCpuStepKernels{&step_lse_cpu,
                                           &step_dlogits_cpu,
                                           GemmKernels{&gemm_acc_cpu, &workspace_dtype_cpu},
                                           &mix_rows_cpu,
                                           &mix_backward_cpu,
                                           &dive_sums_cpu,
                                           &dive_grads_cpu,
                                           &pair_backward_cpu,
                                           &gram_lse_cpu,
                                           &gram_strip_cpu,
                                           /*gram_serves=*/nullptr,
                                           kCpuGramStripRows,
                                           GramLayout::kInterleaved,
                                           &unstack_pair_backward_cpu,
                                           &mix_rows_pair_dot_cpu};

RFT_REGISTER_STEP_OPS(robustft_ext, CPU, kCpuStepKernels)

// The forwards that keep their dot products for the backward (step_fwd_impl's `kept`), and
// the backwards that consume them: CPU only, where the n x n products fit in memory that
// the workspace limit bounds, and dropping the backward's recompute removes a quarter of
// the step's GEMM work.
TORCH_LIBRARY_IMPL(robustft_ext, CPU, m) {
  m.impl("robust_step_fwd_keep", [](RFT_STEP_PARAMS) {
    at::Tensor kept;
    StepCarry carry;
    auto [terms, diff_mean, lse] = step_fwd_impl(kCpuStepKernels, RFT_STEP_ARGS, &kept, &carry);
    return std::make_tuple(terms, diff_mean, lse, kept, carry);
  });
  m.impl("robust_step_bwd_kept", [](const at::Tensor& grad_terms, RFT_STEP_PARAMS,
                                    const at::Tensor& lse, at::Tensor& kept,
                                    at::TensorList carried) {
    const StepCarry c(carried.begin(), carried.end());
    return step_bwd_impl(kCpuStepKernels, grad_terms, RFT_STEP_ARGS, lse, kept, &c);
  });
  m.impl("m2mix_fwd_keep", [](const at::Tensor& image, const at::Tensor& text,
                              const at::Tensor& m2_scale, const at::Tensor& lam,
                              const at::Tensor& clip_scale, bool with_clip) {
    at::Tensor kept;
    StepCarry carry;
    auto [m2, clip, lse] = step_m2mix_fwd(kCpuStepKernels, image, text, m2_scale, lam,
                                          clip_scale, with_clip, &kept, &carry);
    return std::make_tuple(m2, clip, lse, kept, carry);
  });
  m.impl("m2mix_bwd_kept", [](const at::Tensor& grad_m2, const at::Tensor& grad_clip,
                              const at::Tensor& image, const at::Tensor& text,
                              const at::Tensor& m2_scale, const at::Tensor& lam,
                              const at::Tensor& clip_scale, const at::Tensor& lse,
                              at::Tensor& kept, at::TensorList carried, bool with_clip) {
    const StepCarry c(carried.begin(), carried.end());
    return step_m2mix_bwd(kCpuStepKernels, grad_m2, grad_clip, image, text, m2_scale, lam,
                          clip_scale, lse, with_clip, kept, &c);
  });
}

}  // namespace robustft
