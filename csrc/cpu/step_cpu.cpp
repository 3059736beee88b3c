// Fused C++ CPU kernels of a robust fine-tuning step: the launchers of step_kernels.h
// (CLIP, m^2-mix, Lipsum-FT, DiVE), on which step_ops.h builds the m2mix_*, lipsum_*,
// dive_* and robust_step_* ops.
//
// One parallel region per launch (cpu_tiles.h). Its tasks are the row blocks of the
// training batch; each streams the column tiles of its rows: up to three dot-product tiles
// per step from sequential ATen matmuls (I_p M_q^T and T_p M_q^T for m^2, I_p T_q^T for
// CLIP), folded with robustft_maths.h's per-entry maths; then its K Lipsum columns
// ((I_p - P_p) G^T); then an equal slice of DiVE's reference rows. (DiVE as tasks of their
// own after the training blocks left one thread with every training block under the static
// split of at::parallel_for: 1.4x slower on two threads.) Per-task partial sums are reduced
// in task order afterwards, so results do not depend on the scheduling.
//
// The mixed negatives are read from the n x D buffer M that the op body computed: the
// prologue costs O(n D), and mixing GEMM tiles instead (s <I_p, M_q> = w_a[q] <I_p, I_q> +
// w_b[q] <I_p, T_q>) needs four tile products per step where the prologue needs three
// (measured: docs/backends.md, m^2-mix in the fused kernels).
//
// The backward is two passes with no shared writes: rows (owner p: grad_I, grad_T, the
// Lipsum gradient; DiVE rows) and columns (owner q: grad_M, grad_Tc), each recomputing its
// tiles.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/cpu_tiles.h"
#include "robustft_maths.h"
#include "step_kernels.h"
#include "step_ops.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// A step's inputs in the accumulation dtype, and its scalars.
template <typename T>
struct StepTiles {
  const StepProblem& p;
  at::Tensor I, Tt, M, P, G;            // training batch (acc dtype, contiguous)
  at::Tensor fi, ft, pi, pt;            // DiVE batch
  T s_m = 0, s_c = 0, s_l = 0;
  RowBlocks train, ref;

  explicit StepTiles(const StepProblem& p_)
      : p(p_), train(p_.n), ref(p_.with_dive ? p_.dv_fi.size(0) : 0) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    auto f = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
    if (p.n > 0) I = f(p.I);
    if (p.with_tiles()) Tt = f(p.T);
    if (p.with_m2) {
      M = f(p.M);
      s_m = value<T>(p.m2_scale);
    }
    if (p.with_clip) s_c = value<T>(p.clip_scale);
    if (p.with_lipsum) {
      P = f(p.lip_pre);
      G = f(p.lip_texts);
      s_l = value<T>(p.lip_scale);
    }
    if (p.with_dive) {
      fi = f(p.dv_fi);
      ft = f(p.dv_ft);
      pi = f(p.dv_pi);
      pt = f(p.dv_pt);
    }
  }

  // One task per block of training rows, each also folding an equal slice of DiVE's rows
  // (a cheap O(B' D / tasks) extra): the static split of the tasks over the threads then
  // balances. Without a training batch, DiVE's own row blocks are the tasks.
  int64_t tasks() const { return train.count > 0 ? train.count : ref.count; }
  int64_t ref_per_task() const { return (ref.n + tasks() - 1) / tasks(); }
  // The DiVE rows [j0, j0 + rows) of a task (possibly none).
  std::pair<int64_t, int64_t> ref_rows(int64_t task) const {
    if (!p.with_dive) return {0, 0};
    const int64_t j0 = std::min(ref.n, task * ref_per_task());
    return {j0, std::min(ref.n, j0 + ref_per_task()) - j0};
  }
  // (I_p - P_p) G^T for the rows of a block: the Lipsum entries / s_l.
  at::Tensor lipsum_tile(int64_t i0, int64_t rows, at::Tensor* diff) const {
    *diff = I.narrow(0, i0, rows) - P.narrow(0, i0, rows);
    return at::mm(*diff, G.t()).contiguous();
  }
};

// The dlogits of one entry (p, q) of the three logit matrices (step_kernels.h).
template <typename T>
struct Dlogits {
  T wm, wc;  // g_m2 / (2n), g_clip / (2n)
  const T *lse_a, *lse_b, *lse_r, *lse_c;

  T a(int64_t p, int64_t q, T logit) const {  // A, the true pair excluded
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
Dlogits<T> dlogits(const at::Tensor& grads, const at::Tensor& lse, int64_t n) {
  const T* g = grads.data_ptr<T>();
  const T* l = lse.data_ptr<T>();
  const T w = n > 0 ? T(1) / T(2 * n) : T(0);
  return Dlogits<T>{g[kM2] * w, g[kClip] * w, l, l + n, l + 2 * n, l + 3 * n};
}

// ---- Forward -------------------------------------------------------------------------
template <typename T>
void step_fwd_impl(const StepProblem& p, at::Tensor& lse, at::Tensor& sums,
                   at::Tensor& diff_mean) {
  const StepTiles<T> x(p);
  const int64_t n = p.n;
  const at::Tensor diag_c = p.with_m2 ? p.diag.contiguous() : at::Tensor();
  const T* diag = p.with_m2 ? diag_c.data_ptr<T>() : nullptr;
  std::vector<mx::LseState<T>> a_state(p.with_m2 ? n : 0, mx::lse_empty<T>()),
      b_state(p.with_m2 ? n : 0, mx::lse_empty<T>()),
      r_state(p.with_clip ? n : 0, mx::lse_empty<T>());
  ColumnStates<T> c_state(p.with_clip ? n : 0, p.with_clip ? at::get_num_threads() : 0);
  const int64_t D = p.with_dive ? p.dv_fi.size(1) : 0;
  // Per-task partial sums (Lipsum, AVL, PVL) and DiVE column sums, reduced in task order.
  std::vector<T> part(3 * x.tasks(), T(0));
  std::vector<T> mean_part(p.with_dive ? x.tasks() * D : 0, T(0));

  parallel_tasks(x.tasks(), [&](int64_t task) {
    if (task < x.train.count) {
      const int64_t i0 = x.train.start(task), rows = x.train.rows(task);
      if (p.with_tiles()) {
        for_each_col_tile(n, [&](int64_t j0, int64_t cols) {
          if (p.with_m2) {
            // A and B: mixed negatives off the diagonal, the true pair on it.
            for (int k = 0; k < 2; ++k) {
              at::Tensor tile = dot_tile(k == 0 ? x.I : x.Tt, x.M, i0, rows, j0, cols);
              T* d = tile.data_ptr<T>();
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) {
                  const int64_t row = i0 + r, col = j0 + c;
                  d[r * cols + c] = row == col ? diag[row] : mx::logit(d[r * cols + c], x.s_m, T(0));
                }
              }
              push_row_lse(d, rows, cols, i0, k == 0 ? a_state : b_state);
            }
          }
          if (p.with_clip) {
            at::Tensor tile = dot_tile(x.I, x.Tt, i0, rows, j0, cols);
            T* d = tile.data_ptr<T>();
            for (int64_t e = 0; e < rows * cols; ++e) d[e] = mx::logit(d[e], x.s_c, T(0));
            push_row_lse(d, rows, cols, i0, r_state);
            push_col_lse(d, rows, cols, j0, c_state.mine());
          }
        });
      }
      if (p.with_lipsum) {
        at::Tensor diff;
        const at::Tensor v = x.lipsum_tile(i0, rows, &diff);
        const T* d = v.data_ptr<T>();
        T acc = 0;
        for (int64_t e = 0; e < v.numel(); ++e) acc += mx::lipsum_term(d[e], x.s_l);
        part[3 * task + 0] = acc;
      }
    }
    // The task's slice of DiVE's reference rows.
    const auto [j0, rows] = x.ref_rows(task);
    if (rows == 0) return;
    const T* m = p.center.data_ptr<T>();
    const T *fi = ptr<T>(x.fi), *ft = ptr<T>(x.ft), *pi = ptr<T>(x.pi), *pt = ptr<T>(x.pt);
    T avl = 0, pvl = 0;
    T* mean = mean_part.data() + task * D;
    for (int64_t j = j0; j < j0 + rows; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t e = j * D + d;
        const T u = fi[e] - pi[e], v = ft[e] - pt[e];
        avl += mx::dive_avl_term(u, v, m[d]);
        pvl += mx::dive_pvl_term(u, v);
        mean[d] += (u + v) / T(2);
      }
    }
    part[3 * task + 1] = avl;
    part[3 * task + 2] = pvl;
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
  T total[3] = {0, 0, 0};
  for (int64_t t = 0; t < x.tasks(); ++t) {
    for (int k = 0; k < 3; ++k) total[k] += part[3 * t + k];
  }
  for (int k = 0; k < 3; ++k) sums[k].fill_(total[k]);
  if (p.with_dive) {
    T* out = diff_mean.data_ptr<T>();
    const T inv = T(1) / T(p.dv_fi.size(0));
    for (int64_t d = 0; d < D; ++d) {
      T acc = 0;
      for (int64_t t = 0; t < x.tasks(); ++t) acc += mean_part[t * D + d];
      out[d] = acc * inv;
    }
  }
}

// ---- Backward --------------------------------------------------------------------------
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
void step_grad_rows_impl(const StepProblem& p, const at::Tensor& grads_t, const at::Tensor& lse,
                         at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats,
                         at::Tensor& grad_fi, at::Tensor& grad_ft) {
  const StepTiles<T> x(p);
  const int64_t n = p.n;
  const at::Tensor grads = grads_t.contiguous(), lse_c = lse.contiguous();
  const T* g = grads.data_ptr<T>();
  const auto dl = dlogits<T>(grads, lse_c, n);
  if (n > 0) {
    grad_I.zero_();
    grad_T.zero_();
  }
  std::vector<T> stat_m(n, T(0)), stat_c(n, T(0));
  const T w_lip = p.with_lipsum ? g[kLipsum] / T(p.lip_texts.size(0) * n) : T(0);  // g / (K n)

  parallel_tasks(x.tasks(), [&](int64_t task) {
    if (task < x.train.count) {
      const int64_t i0 = x.train.start(task), rows = x.train.rows(task);
      auto gI = grad_I.narrow(0, i0, rows);
      if (p.with_tiles()) {
        for_each_col_tile(n, [&](int64_t j0, int64_t cols) {
          if (p.with_m2) {
            const auto M_cols = x.M.narrow(0, j0, cols);
            at::Tensor ta = dot_tile(x.I, x.M, i0, rows, j0, cols);
            to_dlogits(ta.data_ptr<T>(), rows, cols, i0, j0, false, x.s_m,
                       [&](int64_t a, int64_t b, T s) { return dl.a(a, b, s); }, stat_m.data());
            gI.addmm_(ta, M_cols, 1, x.s_m);
            at::Tensor tb = dot_tile(x.Tt, x.M, i0, rows, j0, cols);
            to_dlogits(tb.data_ptr<T>(), rows, cols, i0, j0, false, x.s_m,
                       [&](int64_t a, int64_t b, T s) { return dl.b(a, b, s); }, stat_m.data());
            grad_T.narrow(0, i0, rows).addmm_(tb, M_cols, 1, x.s_m);
          }
          if (p.with_clip) {
            at::Tensor tc = dot_tile(x.I, x.Tt, i0, rows, j0, cols);
            to_dlogits(tc.data_ptr<T>(), rows, cols, i0, j0, false, x.s_c,
                       [&](int64_t a, int64_t b, T s) { return dl.c(a, b, s); }, stat_c.data());
            gI.addmm_(tc, x.Tt.narrow(0, j0, cols), 1, x.s_c);
          }
        });
      }
      if (p.with_lipsum) {
        // grad_I += [g / (K n) * s_l^2 * ((I - P) G^T)] G
        at::Tensor diff;
        at::Tensor v = x.lipsum_tile(i0, rows, &diff);
        T* d = v.data_ptr<T>();
        for (int64_t e = 0; e < v.numel(); ++e) d[e] = mx::lipsum_dgrad(d[e], x.s_l, w_lip);
        gI.addmm_(v, x.G);
      }
    }
    const auto [j0, rows] = x.ref_rows(task);
    if (rows == 0) return;
    const int64_t D = p.dv_fi.size(1);
    const T* m = p.center.data_ptr<T>();
    const T *fi = ptr<T>(x.fi), *ft = ptr<T>(x.ft), *pi = ptr<T>(x.pi), *pt = ptr<T>(x.pt);
    T* gfi = grad_fi.data_ptr<T>();
    T* gft = grad_ft.data_ptr<T>();
    const T inv = T(1) / T(p.dv_fi.size(0));
    const T w_a = g[kAvl] * inv, w_p = g[kPvl] * inv;
    for (int64_t e = j0 * D; e < (j0 + rows) * D; ++e) {
      mx::dive_grads(fi[e] - pi[e], ft[e] - pt[e], m[e % D], w_a, w_p, gfi + e, gft + e);
    }
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
void step_grad_cols_impl(const StepProblem& p, const at::Tensor& grads_t, const at::Tensor& lse,
                         at::Tensor& grad_M, at::Tensor& grad_Tc) {
  const StepTiles<T> x(p);
  const int64_t n = p.n;
  const at::Tensor grads = grads_t.contiguous(), lse_c = lse.contiguous();
  const auto dl = dlogits<T>(grads, lse_c, n);
  if (p.with_m2) grad_M.zero_();
  if (p.with_clip) grad_Tc.zero_();

  // Owner q (rows of M / T), other p (columns): the transposed tiles.
  for_each_block(n, n, [&](int64_t q0, int64_t rows, int64_t p0, int64_t cols) {
    const auto I_cols = x.I.narrow(0, p0, cols);
    if (p.with_m2) {
      const auto T_cols = x.Tt.narrow(0, p0, cols);
      at::Tensor ta = dot_tile(x.M, x.I, q0, rows, p0, cols);
      to_dlogits(ta.data_ptr<T>(), rows, cols, q0, p0, true, x.s_m,
                 [&](int64_t a, int64_t b, T s) { return dl.a(a, b, s); }, (T*)nullptr);
      grad_M.narrow(0, q0, rows).addmm_(ta, I_cols, 1, x.s_m);
      at::Tensor tb = dot_tile(x.M, x.Tt, q0, rows, p0, cols);
      to_dlogits(tb.data_ptr<T>(), rows, cols, q0, p0, true, x.s_m,
                 [&](int64_t a, int64_t b, T s) { return dl.b(a, b, s); }, (T*)nullptr);
      grad_M.narrow(0, q0, rows).addmm_(tb, T_cols, 1, x.s_m);
    }
    if (p.with_clip) {
      at::Tensor tc = dot_tile(x.Tt, x.I, q0, rows, p0, cols);
      to_dlogits(tc.data_ptr<T>(), rows, cols, q0, p0, true, x.s_c,
                 [&](int64_t a, int64_t b, T s) { return dl.c(a, b, s); }, (T*)nullptr);
      grad_Tc.narrow(0, q0, rows).addmm_(tc, I_cols, 1, x.s_c);
    }
  });
}

template <typename T>
void slerp_weights_impl(const at::Tensor& cos, const at::Tensor& lam_t, at::Tensor& out) {
  const at::Tensor c = cos.contiguous();
  const T lam = value<T>(lam_t);
  const int64_t n = c.numel();
  const T* cp = c.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t q = 0; q < n; ++q) {
    const auto w = mx::slerp_weights<T>(cp[q], lam);
    o[q] = w.wa;
    o[n + q] = w.wb;
    o[2 * n + q] = w.dwa_dc;
    o[3 * n + q] = w.dwb_dc;
  }
}

// The dtype that decides the accumulation type of a step.
const at::Tensor& step_dtype_source(const StepProblem& p) { return p.n > 0 ? p.I : p.dv_fi; }

}  // namespace

void slerp_weights_cpu(const at::Tensor& cos, const at::Tensor& lam, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == 4 &&
                  out.size(1) == cos.numel() && out.scalar_type() == cos.scalar_type(),
              "robustft_ext: slerp_weights output must be a contiguous [4, n] tensor");
  RFT_DISPATCH_ACC(cos, [&] { slerp_weights_impl<acc_t>(cos, lam, out); });
}

void step_fwd_cpu(const StepProblem& p, at::Tensor& lse, at::Tensor& sums, at::Tensor& diff_mean) {
  TORCH_CHECK(lse.is_contiguous() && diff_mean.is_contiguous(),
              "robustft_ext: step outputs must be contiguous");
  RFT_DISPATCH_ACC(step_dtype_source(p), [&] { step_fwd_impl<acc_t>(p, lse, sums, diff_mean); });
}

void step_grad_rows_cpu(const StepProblem& p, const at::Tensor& grads, const at::Tensor& lse,
                        at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats,
                        at::Tensor& grad_fi, at::Tensor& grad_ft) {
  TORCH_CHECK((!p.with_dive || (grad_fi.is_contiguous() && grad_ft.is_contiguous())),
              "robustft_ext: DiVE gradient outputs must be contiguous");
  RFT_DISPATCH_ACC(step_dtype_source(p), [&] {
    step_grad_rows_impl<acc_t>(p, grads, lse, grad_I, grad_T, stats, grad_fi, grad_ft);
  });
}

void step_grad_cols_cpu(const StepProblem& p, const at::Tensor& grads, const at::Tensor& lse,
                        at::Tensor& grad_M, at::Tensor& grad_Tc) {
  RFT_DISPATCH_ACC(step_dtype_source(p), [&] {
    step_grad_cols_impl<acc_t>(p, grads, lse, grad_M, grad_Tc);
  });
}

static const StepKernelSet kCpuStepKernels{&slerp_weights_cpu, &step_fwd_cpu,
                                           &step_grad_rows_cpu, &step_grad_cols_cpu};

RFT_REGISTER_STEP_OPS(CPU, kCpuStepKernels)

}  // namespace robustft
