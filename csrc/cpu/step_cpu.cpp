// Fused C++ CPU kernels of the m^2-mix ops: the launchers of m2mix_kernels.h.
//
// One pass over the (row block, column tile) grid of cpu_tiles.h computes, per tile, the
// dot-product tiles I_p M_q^T and T_p M_q^T (and I_p T_q^T with the CLIP term) with three
// sequential ATen matmuls; the per-entry maths (diagonal substitution, logits, dlogits) is
// robustft_maths.h's. The mixed negatives are read from the n x D buffer M that the op body
// computed: the prologue costs O(n D) against the O(n^2 D) of the tiles, and mixing the
// GEMM tiles instead (s <I_p, M_q> = w_a[q] <I_p, I_q> + w_b[q] <I_p, T_q>) would need four
// tile products per step where the prologue needs three.
//
// The backward is two passes with no shared writes: rows (owner p: grad_I, grad_T) and
// columns (owner q: grad_M, grad_Tc), each recomputing its tiles.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_tiles.h"
#include "m2mix_kernels.h"
#include "m2mix_ops.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

// The problem's inputs in the accumulation dtype, and its scalars.
template <typename T>
struct M2Tiles {
  at::Tensor I, Tt, M;  // [n, D] acc dtype, contiguous
  T s_m, s_c;
  bool with_clip;
  int64_t n;

  M2Tiles(const at::Tensor& I_, const at::Tensor& T_, const at::Tensor& M_,
          const at::Tensor& m2_scale, const at::Tensor& clip_scale, bool clip)
      : s_m(value<T>(m2_scale)), s_c(value<T>(clip_scale)), with_clip(clip), n(I_.size(0)) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    I = I_.to(acc).contiguous();
    Tt = T_.to(acc).contiguous();
    M = M_.to(acc).contiguous();
  }
};

// The dlogits of one entry (p, q) of the three logit matrices (m2mix_kernels.h).
template <typename T>
struct M2Dlogits {
  T wm, wc;                       // g_m / (2n), g_c / (2n)
  const T *lse_a, *lse_b, *lse_r, *lse_c;

  T a(int64_t p, int64_t q, T logit) const {  // A and the true pair excluded
    return p == q ? T(0) : mx::clip_dlogit(logit, lse_a[p], T(0), wm, T(0), T(0), false);
  }
  T b(int64_t p, int64_t q, T logit) const {
    return p == q ? T(0) : mx::clip_dlogit(logit, lse_b[p], T(0), wm, T(0), T(0), false);
  }
  T c(int64_t p, int64_t q, T logit) const {
    return mx::clip_dlogit(logit, lse_r[p], lse_c[q], wc, wc, T(2) * wc, p == q);
  }
};

template <typename T>
M2Dlogits<T> dlogits(const at::Tensor& grads, const at::Tensor& lse, int64_t n, bool with_clip) {
  const T* g = grads.data_ptr<T>();
  const T* l = lse.data_ptr<T>();
  return M2Dlogits<T>{g[0] / T(2 * n), g[1] / T(2 * n), l, l + n,
                      with_clip ? l + 2 * n : nullptr, with_clip ? l + 3 * n : nullptr};
}

template <typename T>
void m2mix_lse_impl(const at::Tensor& I, const at::Tensor& Tx, const at::Tensor& M,
                    const at::Tensor& diag_t, const at::Tensor& m2_scale,
                    const at::Tensor& clip_scale, at::Tensor& lse) {
  const bool with_clip = lse.size(0) == 4;
  const M2Tiles<T> x(I, Tx, M, m2_scale, clip_scale, with_clip);
  const int64_t n = x.n;
  const at::Tensor diag_c = diag_t.contiguous();
  const T* diag = diag_c.data_ptr<T>();
  std::vector<mx::LseState<T>> a_state(n, mx::lse_empty<T>()), b_state(n, mx::lse_empty<T>()),
      r_state(with_clip ? n : 0, mx::lse_empty<T>());
  ColumnStates<T> c_state(with_clip ? n : 0, with_clip ? at::get_num_threads() : 0);

  for_each_block(n, n, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    // A and B: mixed negatives off the diagonal, the true pair on it.
    for (int k = 0; k < 2; ++k) {
      at::Tensor tile = dot_tile(k == 0 ? x.I : x.Tt, x.M, i0, rows, j0, cols);
      T* d = tile.data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t p = i0 + r, q = j0 + c;
          d[r * cols + c] = p == q ? diag[p] : mx::logit(d[r * cols + c], x.s_m, T(0));
        }
      }
      push_row_lse(d, rows, cols, i0, k == 0 ? a_state : b_state);
    }
    if (!with_clip) return;
    at::Tensor tile = dot_tile(x.I, x.Tt, i0, rows, j0, cols);
    T* d = tile.data_ptr<T>();
    for (int64_t e = 0; e < rows * cols; ++e) d[e] = mx::logit(d[e], x.s_c, T(0));
    push_row_lse(d, rows, cols, i0, r_state);
    push_col_lse(d, rows, cols, j0, c_state.mine());
  });

  T* out = lse.data_ptr<T>();
  write_lse(a_state, out);
  write_lse(b_state, out + n);
  if (with_clip) {
    write_lse(r_state, out + 2 * n);
    c_state.write(out + 3 * n, n);
  }
}

// In place: a tile of dot products (owner rows x other columns) -> dlogits, with
// sum(dS * dot) added to stat[r] when stat is given. dl(p, q, logit) gives dS.
template <typename T, typename Dl>
void to_dlogits(T* d, int64_t rows, int64_t cols, int64_t o0, int64_t x0, bool transposed,
                T scale, Dl&& dl, T* stat) {
  for (int64_t r = 0; r < rows; ++r) {
    T acc = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t o = o0 + r, x = x0 + c;
      const T dot = d[r * cols + c];
      const T ds = transposed ? dl(x, o, scale * dot) : dl(o, x, scale * dot);
      acc += ds * dot;
      d[r * cols + c] = ds;
    }
    if (stat) stat[o0 + r] += acc;
  }
}

template <typename T>
void m2mix_grad_rows_impl(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& Tx,
                          const at::Tensor& M, const at::Tensor& m2_scale,
                          const at::Tensor& clip_scale, const at::Tensor& lse,
                          at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats) {
  const bool with_clip = lse.size(0) == 4;
  const M2Tiles<T> x(I, Tx, M, m2_scale, clip_scale, with_clip);
  const int64_t n = x.n;
  const auto dl = dlogits<T>(grads.contiguous(), lse.contiguous(), n, with_clip);
  grad_I.zero_();
  grad_T.zero_();
  std::vector<T> stat_m(n, T(0)), stat_c(n, T(0));

  for_each_block(n, n, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    const auto M_cols = x.M.narrow(0, j0, cols);
    at::Tensor ta = dot_tile(x.I, x.M, i0, rows, j0, cols);
    to_dlogits(ta.data_ptr<T>(), rows, cols, i0, j0, false, x.s_m,
               [&](int64_t p, int64_t q, T s) { return dl.a(p, q, s); }, stat_m.data());
    grad_I.narrow(0, i0, rows).addmm_(ta, M_cols, 1, x.s_m);
    at::Tensor tb = dot_tile(x.Tt, x.M, i0, rows, j0, cols);
    to_dlogits(tb.data_ptr<T>(), rows, cols, i0, j0, false, x.s_m,
               [&](int64_t p, int64_t q, T s) { return dl.b(p, q, s); }, stat_m.data());
    grad_T.narrow(0, i0, rows).addmm_(tb, M_cols, 1, x.s_m);
    if (!with_clip) return;
    at::Tensor tc = dot_tile(x.I, x.Tt, i0, rows, j0, cols);
    to_dlogits(tc.data_ptr<T>(), rows, cols, i0, j0, false, x.s_c,
               [&](int64_t p, int64_t q, T s) { return dl.c(p, q, s); }, stat_c.data());
    grad_I.narrow(0, i0, rows).addmm_(tc, x.Tt.narrow(0, j0, cols), 1, x.s_c);
  });

  T sm = 0, sc = 0;
  for (int64_t i = 0; i < n; ++i) {
    sm += stat_m[i];
    sc += stat_c[i];
  }
  stats[0].fill_(sm);
  stats[1].fill_(sc);
}

template <typename T>
void m2mix_grad_cols_impl(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& Tx,
                          const at::Tensor& M, const at::Tensor& m2_scale,
                          const at::Tensor& clip_scale, const at::Tensor& lse,
                          at::Tensor& grad_M, at::Tensor& grad_Tc) {
  const bool with_clip = lse.size(0) == 4;
  const M2Tiles<T> x(I, Tx, M, m2_scale, clip_scale, with_clip);
  const int64_t n = x.n;
  const auto dl = dlogits<T>(grads.contiguous(), lse.contiguous(), n, with_clip);
  grad_M.zero_();
  if (with_clip) grad_Tc.zero_();

  // Owner q (rows of M / T), other p (columns): the transposed tiles.
  for_each_block(n, n, [&](int64_t q0, int64_t rows, int64_t p0, int64_t cols) {
    const auto I_cols = x.I.narrow(0, p0, cols), T_cols = x.Tt.narrow(0, p0, cols);
    at::Tensor ta = dot_tile(x.M, x.I, q0, rows, p0, cols);
    to_dlogits(ta.data_ptr<T>(), rows, cols, q0, p0, true, x.s_m,
               [&](int64_t p, int64_t q, T s) { return dl.a(p, q, s); }, (T*)nullptr);
    grad_M.narrow(0, q0, rows).addmm_(ta, I_cols, 1, x.s_m);
    at::Tensor tb = dot_tile(x.M, x.Tt, q0, rows, p0, cols);
    to_dlogits(tb.data_ptr<T>(), rows, cols, q0, p0, true, x.s_m,
               [&](int64_t p, int64_t q, T s) { return dl.b(p, q, s); }, (T*)nullptr);
    grad_M.narrow(0, q0, rows).addmm_(tb, T_cols, 1, x.s_m);
    if (!with_clip) return;
    at::Tensor tc = dot_tile(x.Tt, x.I, q0, rows, p0, cols);
    to_dlogits(tc.data_ptr<T>(), rows, cols, q0, p0, true, x.s_c,
               [&](int64_t p, int64_t q, T s) { return dl.c(p, q, s); }, (T*)nullptr);
    grad_Tc.narrow(0, q0, rows).addmm_(tc, I_cols, 1, x.s_c);
  });
}

template <typename T>
void slerp_weights_impl(const at::Tensor& cos, const at::Tensor& lam_t, at::Tensor& out) {
  const at::Tensor c = cos.contiguous();
  const T lam = value<T>(lam_t);
  const int64_t n = c.numel();
  const T* cp = c.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t p = 0; p < n; ++p) {
    const auto w = mx::slerp_weights<T>(cp[p], lam);
    o[p] = w.wa;
    o[n + p] = w.wb;
    o[2 * n + p] = w.dwa_dc;
    o[3 * n + p] = w.dwb_dc;
  }
}

}  // namespace

void slerp_weights_cpu(const at::Tensor& cos, const at::Tensor& lam, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == 4 &&
                  out.size(1) == cos.numel() && out.scalar_type() == cos.scalar_type(),
              "robustft_ext: slerp_weights output must be a contiguous [4, n] tensor");
  RFT_DISPATCH_ACC(cos, [&] { slerp_weights_impl<acc_t>(cos, lam, out); });
}

void m2mix_lse_cpu(const at::Tensor& I, const at::Tensor& T, const at::Tensor& M,
                   const at::Tensor& diag, const at::Tensor& m2_scale,
                   const at::Tensor& clip_scale, at::Tensor& lse) {
  TORCH_CHECK(lse.is_contiguous(), "robustft_ext: lse output must be contiguous");
  RFT_DISPATCH_ACC(I, [&] {
    m2mix_lse_impl<acc_t>(I, T, M, diag, m2_scale, clip_scale, lse);
  });
}

void m2mix_grad_rows_cpu(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& T,
                         const at::Tensor& M, const at::Tensor& m2_scale,
                         const at::Tensor& clip_scale, const at::Tensor& lse,
                         at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats) {
  RFT_DISPATCH_ACC(I, [&] {
    m2mix_grad_rows_impl<acc_t>(grads, I, T, M, m2_scale, clip_scale, lse, grad_I, grad_T,
                                stats);
  });
}

void m2mix_grad_cols_cpu(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& T,
                         const at::Tensor& M, const at::Tensor& m2_scale,
                         const at::Tensor& clip_scale, const at::Tensor& lse,
                         at::Tensor& grad_M, at::Tensor& grad_Tc) {
  RFT_DISPATCH_ACC(I, [&] {
    m2mix_grad_cols_impl<acc_t>(grads, I, T, M, m2_scale, clip_scale, lse, grad_M, grad_Tc);
  });
}

static const M2MixKernelSet kCpuM2MixKernels{&slerp_weights_cpu, &m2mix_lse_cpu,
                                             &m2mix_grad_rows_cpu, &m2mix_grad_cols_cpu};

RFT_REGISTER_M2MIX_OPS(CPU, kCpuM2MixKernels)

}  // namespace robustft
