// The C++ CPU kernels of the symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md,
// section 9.4): the launchers gram_lse_cpu, gram_strip_cpu, pair_backward_cpu and
// unstack_pair_backward_cpu of step_kernels.h. Their row loops are gram_rows.h's (vectorised
// for float by cpu_vec_kernels.cpp).
//
// Forward: by the backward's strips (rows [r0, r1) against the columns [r0, n), the chunk
// the workspace limit allows), so that both passes take their Gram entries from the same
// BLAS calls (their rounding agrees) and the forward can keep the first strips for the
// backward. A strip's four Gram blocks come from multi-threaded BLAS calls of the stacked
// rows in the interleaved layout, one for the columns past its own block and two for that
// block, whose T I^T quarter is copied (four calls in the blocks layout of the CUDA
// emulation, step_kernels.h); its 128 x 128 fold tiles are the tasks of one parallel
// region, each folding both orientations into its thread's own statistics, merged at the
// end.
//
// Backward strip: its Gram blocks from the same call(s) straight into the workspace strip
// (unless the forward kept them), then one pass per row turns each entry
// into the four S entries in place, with the scale sums and the weight path's column sums
// u in per-thread vectors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_tiles.h"
#include "cpu/gram_rows.h"
#include "cpu/shared_shift.h"
#include "kept_cache.h"
#include "launcher_contract.h"
#include "robustft_maths.h"
#include "step_kernels.h"

namespace robustft {
namespace {

using namespace ::robustft::cpu;

// Rows and columns of a fold tile: a divisor of every strip's row count (kChunkAlign), so no
// tile straddles the end of its strip's rows.
constexpr int64_t kGramTile = 128;

// The slerp weights w_a, w_b in the accumulation dtype.
template <typename T>
struct Weights {
  std::vector<T> wa, wb;
  explicit Weights(const at::Tensor& w) {
    const int64_t n = w.size(1);
    const at::Tensor wc = w.contiguous();
    const double* d = wc.data_ptr<double>();
    wa.assign(d, d + n);
    wb.assign(d + n, d + 2 * n);
  }
};

// dst[i, j] = src[j, i] for an R x R block of either acc dtype (row strides ld_dst, ld_src),
// by 32 x 32 tiles whose rows of both sides stay in cache: ATen's copy of the transposed view
// took 0.12-0.15 ms for R = 256 (AMD EPYC, 2 threads, 2026-12-08).
template <typename T>
void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t R) {
  constexpr int64_t kTile = 32;
  at::parallel_for(0, (R + kTile - 1) / kTile, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i0 = b0 * kTile; i0 < std::min(R, b1 * kTile); i0 += kTile) {
      const int64_t i1 = std::min(R, i0 + kTile);
      for (int64_t j0 = 0; j0 < R; j0 += kTile) {
        const int64_t j1 = std::min(R, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) dst[i * ld_dst + j] = src[j * ld_src + i];
        }
      }
    }
  });
}

// The Gram blocks of the strip of R rows from r0 against the rows [r0, n), into buffer in
// the problem's layout (step_kernels.h), returned as that strip's view: interleaved,
// X_r X_c^T of the stacked rows; blocks, four products (I I^T, I T^T, T I^T, T T^T) of I and
// T in the accumulation dtype (Xi, Xt: the caller's copies).
at::Tensor strip_gram(const GramProblem& p, const at::Tensor& Xi, const at::Tensor& Xt,
                      int64_t r0, int64_t R, const at::Tensor& buffer) {
  const int64_t W = p.n - r0;
  if (p.layout == GramLayout::kInterleaved) {
    at::Tensor G = buffer.narrow(0, 0, 4 * R * W).view({2 * R, 2 * W});
    const at::Tensor Xr = p.stacked.narrow(0, 2 * r0, 2 * R);
    // The columns past the strip's own rows in one product. The own block [[II, IT], [TI,
    // TT]] is symmetric, so its TI quarter is copied from IT, transposed, rather than
    // multiplied: R^2 D fewer multiply-adds a strip, a tenth of the forward's at n = 1024.
    // (With MKL the losses and gradients came out bit-identical to one product over the
    // whole strip, at n = 300 and 1024.)
    if (W > R) {
      at::Tensor past = G.narrow(1, 2 * R, 2 * (W - R));
      at::mm_out(past, Xr, p.stacked.narrow(0, 2 * (r0 + R), 2 * (W - R)).t());
    }
    const at::Tensor Ir = Xr.narrow(0, 0, R), Tr = Xr.narrow(0, R, R);
    at::Tensor own_i = G.narrow(0, 0, R).narrow(1, 0, 2 * R);  // II, IT
    at::Tensor own_tt = G.narrow(0, R, R).narrow(1, R, R);
    at::mm_out(own_i, Ir, Xr.t());
    at::mm_out(own_tt, Tr, Tr.t());
    // TI = IT^T: G[R + i, j] = G[j, R + i].
    const int64_t ld = 2 * W;
    if (G.scalar_type() == at::kDouble) {
      double* g = G.data_ptr<double>();
      transpose_block(g + R, ld, g + R * ld, ld, R);
    } else {
      float* g = G.data_ptr<float>();
      transpose_block(g + R, ld, g + R * ld, ld, R);
    }
    return G;
  }
  at::Tensor G = buffer.narrow(0, 0, 4 * R * W).view({4, R, W});
  const at::Tensor Ir = Xi.narrow(0, r0, R), Tr = Xt.narrow(0, r0, R);
  const at::Tensor Ic = Xi.narrow(0, r0, W), Tc = Xt.narrow(0, r0, W);
  at::Tensor G0 = G[0], G1 = G[1], G2 = G[2], G3 = G[3];
  at::mm_out(G0, Ir, Ic.t());
  at::mm_out(G1, Ir, Tc.t());
  at::mm_out(G2, Tr, Ic.t());
  at::mm_out(G3, Tr, Tc.t());
  return G;
}

// I and T in the accumulation dtype where the blocks layout multiplies them (undefined
// where the stacked rows serve).
std::pair<at::Tensor, at::Tensor> block_operands(const GramProblem& p, at::ScalarType acc) {
  if (p.layout == GramLayout::kInterleaved) {
    TORCH_CHECK(p.stacked.scalar_type() == acc,
                "robustft_ext: the CPU's stacked Gram rows must be of the accumulation dtype ",
                acc, ", got ", p.stacked.scalar_type());
    return {};
  }
  return {p.I.to(acc).contiguous(), p.T.to(acc).contiguous()};
}

// The four statistics of one strip's fold tiles into the calling thread's states: the
// direct orientation always, the transposed one for the tiles past the strip's rows. A
// mixed tile is formed in the thread's buffer and folded by rows (direct) or by columns
// (transposed: its columns are the rows of that orientation); CLIP's tiles are folded from
// the Gram entries in place, G_IT's rows and columns directly and G_TI's transposed.
template <typename T>
struct StripFold {
  const GramProblem& p;
  const Weights<T>& w;
  const T* diag;
  T sm, sc;
  std::array<ColumnStates<T>, 4>& st;  // A, B and C rows, C columns

  // g_ii: the tile's first II entry in a strip of layout L; its columns [c, c + bq) of the
  // strip lie in one column block.
  void tile(const T* g_ii, const gram::StripLayout& L, int64_t c, int64_t i0, int64_t j0, int64_t bp,
            int64_t bq, bool transposed_too) const {
    const int64_t ld = L.ld();
    const T* g_it = g_ii + L.it_off(c);
    const T* g_ti = g_ii + L.ti_off();
    const T* g_tt = g_ti + L.it_off(c);
    thread_local std::vector<T> buf;
    buf.resize(size_t(kGramTile) * kGramTile);
    TileScratch<T> s(kGramTile, kGramTile, at::Tensor());
    auto& A = st[0].mine();
    auto& B = st[1].mine();
    const Tile<T> out{buf.data(), bp, bq, bq};
    auto mixed = [&](const T* ga, const T* gb, bool direct, std::vector<mx::LseState<T>>& states) {
      gram::MixArgs<T> a;
      a.g_a = ga;
      a.g_b = gb;
      a.ld_g = ld;
      a.w_a = w.wa.data() + (direct ? j0 : i0);
      a.w_b = w.wb.data() + (direct ? j0 : i0);
      a.per_row = !direct;
      a.scale = sm;
      if (direct) {  // the true pairs' logits where the tile holds them
        a.special = diag + i0;
        a.offset = i0 - j0;
      }
      tile_mixed_logits(out, a, s, /*by_rows=*/direct);
      if (direct) {
        tile_fold<T>(out, i0, j0, s, states, nullptr);
      } else {
        tile_fold_columns(out, j0, s, states);
      }
    };
    auto gram_tile = [&](const T* g) { return Tile<T>{const_cast<T*>(g), bp, bq, ld}; };
    mixed(g_ii, g_it, true, A);
    mixed(g_ti, g_tt, true, B);
    if (p.with_clip) tile_fold_dots(gram_tile(g_it), sc, T(0), i0, j0, s, st[2].mine(), &st[3].mine());
    if (!transposed_too) return;
    mixed(g_ii, g_ti, false, A);
    mixed(g_it, g_tt, false, B);
    if (p.with_clip) tile_fold_dots(gram_tile(g_ti), sc, T(0), i0, j0, s, st[3].mine(), &st[2].mine());
  }
};

template <typename T>
void gram_lse_impl(const GramProblem& p, at::Tensor& lse) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t n = p.n, R = p.strip_rows;
  const auto [Xi, Xt] = block_operands(p, acc);
  const Weights<T> w(p.weights);
  const at::Tensor diag_c = p.diag.contiguous();
  const int64_t slots = at::get_num_threads();
  std::array<ColumnStates<T>, 4> st{ColumnStates<T>(n, slots), ColumnStates<T>(n, slots),
                                    ColumnStates<T>(p.with_clip ? n : 0, slots),
                                    ColumnStates<T>(p.with_clip ? n : 0, slots)};
  const StripFold<T> fold{p, w, diag_c.data_ptr<T>(), value<T>(p.m2_scale),
                          value<T>(p.clip_scale), st};
  const int64_t kept = p.keep.defined() ? gram_kept_count(n, R, p.keep.numel()) : 0;
  at::Tensor scratch;
  for (int64_t r0 = 0, j = 0; r0 < n; r0 += R, ++j) {
    const int64_t Rj = std::min(R, n - r0), W = n - r0;
    if (j >= kept && !scratch.defined()) {  // (strip j's size holds any later strip)
      scratch = cached_empty({gram_strip_entries(n, R, j)}, p.I.options().dtype(acc));
    }
    const at::Tensor G =
        strip_gram(p, Xi, Xt, r0, Rj, j < kept ? gram_kept_strip(p.keep, n, R, j) : scratch);
    const T* g = G.data_ptr<T>();
    const gram::StripLayout L{Rj, W, p.layout == GramLayout::kInterleaved};
    // (A strip's column blocks are whole fold tiles wide but for the last, so no tile
    // straddles two.)
    std::vector<std::pair<int64_t, int64_t>> tiles;
    for (int64_t rr = 0; rr < Rj; rr += kGramTile)
      for (int64_t cc = 0; cc < W; cc += kGramTile) tiles.emplace_back(rr, cc);
    parallel_tasks(int64_t(tiles.size()), [&](int64_t t) {
      const int64_t rr = tiles[t].first, cc = tiles[t].second;
      fold.tile(g + rr * L.ld() + L.col(cc), L, cc, r0 + rr, r0 + cc,
                std::min(kGramTile, Rj - rr), std::min(kGramTile, W - cc),
                /*transposed_too=*/cc >= Rj);
    });
  }
  T* l = lse.data_ptr<T>();
  st[0].write(l, n);
  st[1].write(l + n, n);
  if (p.with_clip) {
    st[2].write(l + 2 * n, n);
    st[3].write(l + 3 * n, n);
  }
}

// Rows [rb, re) of a backward strip (gram_rows.h): float through the vectorised loops,
// double with std::exp.
inline void strip_rows(const gram::StripArgs<float>& a, int64_t rb, int64_t re, double* stats,
                       float* u) {
  vec::kernels().gram_strip_rows(a, rb, re, stats, u);
}

struct StdExp {
  double operator()(double x) const { return std::exp(x); }
};

inline void strip_rows(const gram::StripArgs<double>& a, int64_t rb, int64_t re, double* stats,
                       double* u) {
  gram::strip_rows(a, rb, re, stats, u, StdExp{});
}

template <typename T>
void gram_strip_impl(const GramProblem& p, const at::Tensor& lse_t, int64_t r0, T f_m, T f_c,
                     bool holds_gram, at::Tensor& S, at::Tensor& stats_t, at::Tensor& u_t) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t n = p.n, R = gram_strip_rows_of(p, S);
  if (!holds_gram) {  // (a strip the forward kept holds its Gram blocks already)
    const auto [Xi, Xt] = block_operands(p, acc);
    strip_gram(p, Xi, Xt, r0, R, S.view({-1}));
  }
  const Weights<T> w(p.weights);
  const at::Tensor lse_c = lse_t.contiguous();
  gram::StripArgs<T> a;
  a.s = S.data_ptr<T>();
  a.rows = R;
  a.width = n - r0;
  a.r0 = r0;
  a.n = n;
  a.w_a = w.wa.data();
  a.w_b = w.wb.data();
  a.lse = lse_c.data_ptr<T>();
  a.m2_scale = value<T>(p.m2_scale);
  a.clip_scale = p.with_clip ? value<T>(p.clip_scale) : T(0);
  a.f_m = f_m;
  a.f_c = f_c;
  a.with_clip = p.with_clip;
  a.interleaved = p.layout == GramLayout::kInterleaved;
  // Float: CLIP's two terms of an entry from one exp where its log-sum-exps allow it, the
  // factors of the strip's rows and columns (entities r0 on) from the C rows' and the C
  // columns' log-sum-exps.
  [[maybe_unused]] ShiftFactors clip_f;
  if constexpr (std::is_same_v<T, float>) {
    if (p.with_clip) {
      const T* l_c = a.lse + 2 * n;
      clip_f = shift_factors(l_c, n, l_c + n, n, 0.5f, 0.5f, r0, n - r0, r0, n - r0);
      if (clip_f.on) {
        a.clip_row_f = clip_f.row_f.data();
        a.clip_col_f = clip_f.col_f.data();
        a.clip_shift = clip_f.shift;
      }
    }
  }
  // Per-thread sums, added in slot order (a fixed thread count fixes which rows each slot
  // took).
  const int64_t slots = at::get_num_threads();
  std::vector<std::array<double, 2>> stats(slots, {0.0, 0.0});
  std::vector<std::vector<T>> u(slots);
  at::parallel_for(0, R, rows_per_task(6 * a.width), [&](int64_t rb, int64_t re) {
    const int64_t slot = thread_slot(slots);
    if (u[slot].empty()) u[slot].assign(2 * n, T(0));
    strip_rows(a, rb, re, stats[slot].data(), u[slot].data());
  });
  double total[2] = {0.0, 0.0};
  std::vector<double> u_total(2 * n, 0.0);
  for (int64_t t = 0; t < slots; ++t) {
    total[0] += stats[t][0];
    total[1] += stats[t][1];
    if (u[t].empty()) continue;
    for (int64_t i = 0; i < 2 * n; ++i) u_total[i] += double(u[t][i]);
  }
  T* st = stats_t.data_ptr<T>();
  st[0] += T(total[0]);
  st[1] += T(total[1]);
  T* u_out = u_t.data_ptr<T>();
  for (int64_t i = 0; i < 2 * n; ++i) u_out[i] += T(u_total[i]);
}

template <typename In, typename Acc>
void pair_backward_impl(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T,
                        at::Tensor& grad_I, at::Tensor& grad_T) {
  const int64_t n = I.size(0), D = I.size(1);
  const Acc* c = coef.data_ptr<Acc>();
  const In* ip = I.data_ptr<In>();
  const In* tp = T.data_ptr<In>();
  Acc* gi = grad_I.data_ptr<Acc>();
  Acc* gt = grad_T.data_ptr<Acc>();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const Acc k = c[p];
      for (int64_t j = 0; j < D; ++j) {
        gi[p * D + j] += k * Acc(tp[p * D + j]);
        gt[p * D + j] += k * Acc(ip[p * D + j]);
      }
    }
  });
}

template <typename X_t, typename Acc>
void unstack_pair_backward_impl(const at::Tensor& coef, const at::Tensor& X, const at::Tensor& dX,
                                int64_t R, at::Tensor& grad_I, at::Tensor& grad_T) {
  const int64_t n = coef.size(0), D = X.size(1);
  const Acc* c = coef.data_ptr<Acc>();
  const X_t* x = X.data_ptr<X_t>();
  const Acc* dx = dX.data_ptr<Acc>();
  Acc* gi = grad_I.data_ptr<Acc>();
  Acc* gt = grad_T.data_ptr<Acc>();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // Row p is row o of block b, whose I rows come first, then its T rows.
      const int64_t b = p / R, o = p % R, rows = std::min(R, n - b * R);
      const int64_t i_row = 2 * b * R + o, t_row = i_row + rows;
      const X_t* __restrict__ xi = x + i_row * D;
      const X_t* __restrict__ xt = x + t_row * D;
      const Acc* __restrict__ di = dx + i_row * D;
      const Acc* __restrict__ dt = dx + t_row * D;
      Acc* __restrict__ oi = gi + p * D;
      Acc* __restrict__ ot = gt + p * D;
      const Acc k = c[p];
      for (int64_t j = 0; j < D; ++j) {
        oi[j] = di[j] + k * Acc(xt[j]);
        ot[j] = dt[j] + k * Acc(xi[j]);
      }
    }
  });
}

}  // namespace

void gram_lse_cpu(const GramProblem& p, at::Tensor& lse) {
  check_gram_problem(p, c10::kCPU);
  check_lse_rows(lse, p.n, p.I);
  TORCH_CHECK(p.strip_rows > 0 && (p.strip_rows % kGramTile == 0 || p.strip_rows >= p.n),
              "robustft_ext: the CPU Gram forward's strips are whole fold tiles of ", kGramTile,
              " rows, got ", p.strip_rows);
  TORCH_CHECK(!p.keep.defined() ||
                  (p.keep.dim() == 1 && p.keep.is_contiguous() &&
                   gram_kept_count(p.n, p.strip_rows, p.keep.numel()) >= 0 &&
                   p.keep.scalar_type() == acc_dtype(p.I.scalar_type())),
              "robustft_ext: the kept Gram strips must be a contiguous 1-d tensor of the "
              "accumulation dtype holding whole strips, packed (gram_kept_strip)");
  RFT_DISPATCH_ACC(p.I, [&] { gram_lse_impl<acc_t>(p, lse); });
}

void gram_strip_cpu(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                    const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S,
                    at::Tensor& stats, at::Tensor& u) {
  check_gram_strip(p, lse, r0, f_m2, f_clip, S, stats, u, acc_dtype(p.I.scalar_type()),
                   c10::kCPU);
  const bool holds_gram =
      p.keep.defined() && r0 < gram_kept_count(p.n, p.strip_rows, p.keep.numel()) * p.strip_rows;
  RFT_DISPATCH_ACC(p.I, [&] {
    gram_strip_impl<acc_t>(p, lse, r0, f_m2.item<acc_t>(),
                           p.with_clip ? f_clip.item<acc_t>() : acc_t(0), holds_gram, S, stats, u);
  });
}

void pair_backward_cpu(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T,
                       at::Tensor& grad_I, at::Tensor& grad_T) {
  check_pair_backward(coef, I, T, grad_I, grad_T, c10::kCPU);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(), "pair_backward_cpu", [&] {
    if (coef.scalar_type() == at::kDouble) {
      pair_backward_impl<scalar_t, double>(coef, I, T, grad_I, grad_T);
    } else {
      pair_backward_impl<scalar_t, float>(coef, I, T, grad_I, grad_T);
    }
  });
}

void unstack_pair_backward_cpu(const at::Tensor& coef, const at::Tensor& X, const at::Tensor& dX,
                               int64_t R, at::Tensor& grad_I, at::Tensor& grad_T) {
  check_unstack_pair_backward(coef, X, dX, R, grad_I, grad_T, c10::kCPU);
  if (coef.scalar_type() == at::kDouble) {
    TORCH_CHECK(X.scalar_type() == at::kDouble, "robustft_ext: float64 gradients take float64 X");
    unstack_pair_backward_impl<double, double>(coef, X, dX, R, grad_I, grad_T);
  } else {
    TORCH_CHECK(coef.scalar_type() == at::kFloat && X.scalar_type() == at::kFloat,
                "robustft_ext: unstack_pair_backward takes float X and gradients or float64 ones, "
                "got ", X.scalar_type(), " and ", coef.scalar_type());
    unstack_pair_backward_impl<float, float>(coef, X, dX, R, grad_I, grad_T);
  }
}

}  // namespace robustft
