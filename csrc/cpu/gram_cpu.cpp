// The C++ CPU kernels of the symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md,
// section 9.4): the launchers gram_lse_cpu, gram_strip_cpu and pair_backward_cpu of
// step_kernels.h.
//
// Forward: by the backward's strips (rows [r0, r1) against the columns [r0, n), the chunk
// the workspace limit allows), so that both passes take their Gram entries from the same
// BLAS calls (their rounding agrees) and the forward can keep the first strips for the
// backward. A strip's four Gram blocks come from four multi-threaded BLAS calls; its
// 128 x 128 fold tiles are the tasks of one parallel region: each forms the logits of the
// direct orientation and, past the strip's rows, of the transposed one (stored transposed,
// so that every fold is a row fold of cpu_tiles.h's vectorised loops; CLIP's column
// statistics are the column folds of the two C tiles), into its thread's own statistics,
// merged at the end.
//
// Backward strip: its four Gram blocks from four multi-threaded BLAS calls straight into the
// workspace strip, then one pass per row turns each entry into the four S entries in place,
// with the row's exponentials vectorised (cpu_vec_kernels.h's exp over the row), its scale
// sums, and the weight path's column sums u in per-thread vectors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "cpu/cpu_tiles.h"
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

// G [4, R, n - r0] = the Gram blocks I I^T, I T^T, T I^T, T T^T of rows [r0, r0 + R) against
// rows [r0, n): four multi-threaded BLAS calls (I, T of the accumulation dtype).
void strip_gram_blocks(const at::Tensor& I, const at::Tensor& T, int64_t r0, at::Tensor& G) {
  const int64_t R = G.size(1), W = G.size(2);
  const at::Tensor Ir = I.narrow(0, r0, R), Tr = T.narrow(0, r0, R);
  const at::Tensor Ic = I.narrow(0, r0, W), Tc = T.narrow(0, r0, W);
  at::Tensor G0 = G[0], G1 = G[1], G2 = G[2], G3 = G[3];
  at::mm_out(G0, Ir, Ic.t());
  at::mm_out(G1, Ir, Tc.t());
  at::mm_out(G2, Tr, Ic.t());
  at::mm_out(G3, Tr, Tc.t());
}

// Strip j's Gram blocks: its slot of the kept strips, or the scratch (rows R, width n - r0).
at::Tensor strip_view(const at::Tensor& buffer, int64_t R, int64_t W) {
  return buffer.narrow(0, 0, 4 * R * W).view({4, R, W});
}

// A logit tile's maxima (tile_logits in place, scale 1) and its fold into row states and,
// with col_states, column states.
template <typename T>
void fold_tile(const Tile<T>& t, int64_t i0, int64_t j0, TileScratch<T>& s,
               std::vector<mx::LseState<T>>& rows, std::vector<mx::LseState<T>>* cols) {
  tile_logits(t, T(1), T(0), s, cols != nullptr);
  tile_fold(t, i0, j0, s, rows, cols);
}

// The four statistics of one strip's fold tiles into the calling thread's states: the
// direct orientation always, the transposed one (stored transposed, so that every fold is a
// row fold of cpu_tiles.h's vectorised loops) for the tiles past the strip's rows.
template <typename T>
struct StripFold {
  const GramProblem& p;
  const Weights<T>& w;
  const T* diag;
  T sm, sc;
  std::array<ColumnStates<T>, 4>& st;  // A, B and C rows, C columns

  void tile(const T* g0, int64_t ld, int64_t block, int64_t i0, int64_t j0, int64_t bp,
            int64_t bq, bool transposed_too) const {
    const T* g1 = g0 + block;
    const T* g2 = g1 + block;
    const T* g3 = g2 + block;
    auto gii = [&](int64_t r, int64_t c) { return g0[r * ld + c]; };
    auto git = [&](int64_t r, int64_t c) { return g1[r * ld + c]; };
    auto gti = [&](int64_t r, int64_t c) { return g2[r * ld + c]; };
    auto gtt = [&](int64_t r, int64_t c) { return g3[r * ld + c]; };
    std::vector<T> buf(size_t(kGramTile) * kGramTile);
    TileScratch<T> s(kGramTile, kGramTile, at::Tensor());
    auto& A = st[0].mine();
    auto& B = st[1].mine();
    auto* Crow = p.with_clip ? &st[2].mine() : nullptr;
    auto* Ccol = p.with_clip ? &st[3].mine() : nullptr;
    const Tile<T> dir{buf.data(), bp, bq, bq};
    auto direct = [&](auto&& logit, std::vector<mx::LseState<T>>& rows,
                      std::vector<mx::LseState<T>>* cols, bool true_pair) {
      for (int64_t r = 0; r < bp; ++r)
        for (int64_t c = 0; c < bq; ++c)
          buf[r * bq + c] = (true_pair && i0 + r == j0 + c) ? diag[i0 + r] : logit(r, c);
      fold_tile(dir, i0, j0, s, rows, cols);
    };
    direct([&](int64_t r, int64_t c) { return sm * (w.wa[j0 + c] * gii(r, c) + w.wb[j0 + c] * git(r, c)); },
           A, nullptr, true);
    direct([&](int64_t r, int64_t c) { return sm * (w.wa[j0 + c] * gti(r, c) + w.wb[j0 + c] * gtt(r, c)); },
           B, nullptr, true);
    if (p.with_clip) direct([&](int64_t r, int64_t c) { return sc * git(r, c); }, *Crow, Ccol, false);
    if (!transposed_too) return;
    // Rows q of the tile's columns against columns p of its rows.
    const Tile<T> tr{buf.data(), bq, bp, bp};
    auto transposed = [&](auto&& logit, std::vector<mx::LseState<T>>& rows,
                          std::vector<mx::LseState<T>>* cols) {
      for (int64_t c = 0; c < bq; ++c)
        for (int64_t r = 0; r < bp; ++r) buf[c * bp + r] = logit(r, c);
      fold_tile(tr, j0, i0, s, rows, cols);
    };
    transposed([&](int64_t r, int64_t c) { return sm * (w.wa[i0 + r] * gii(r, c) + w.wb[i0 + r] * gti(r, c)); },
               A, nullptr);
    transposed([&](int64_t r, int64_t c) { return sm * (w.wa[i0 + r] * git(r, c) + w.wb[i0 + r] * gtt(r, c)); },
               B, nullptr);
    if (p.with_clip) transposed([&](int64_t r, int64_t c) { return sc * gti(r, c); }, *Crow, Ccol);
  }
};

template <typename T>
void gram_lse_impl(const GramProblem& p, at::Tensor& lse) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t n = p.n, R = p.strip_rows;
  const at::Tensor I = p.I.to(acc).contiguous(), Tt = p.T.to(acc).contiguous();
  const Weights<T> w(p.weights);
  const at::Tensor diag_c = p.diag.contiguous();
  const int64_t slots = at::get_num_threads();
  std::array<ColumnStates<T>, 4> st{ColumnStates<T>(n, slots), ColumnStates<T>(n, slots),
                                    ColumnStates<T>(p.with_clip ? n : 0, slots),
                                    ColumnStates<T>(p.with_clip ? n : 0, slots)};
  const StripFold<T> fold{p, w, diag_c.data_ptr<T>(), value<T>(p.m2_scale),
                          value<T>(p.clip_scale), st};
  const int64_t kept = p.keep.defined() ? p.keep.size(0) : 0;
  at::Tensor scratch;
  for (int64_t r0 = 0, j = 0; r0 < n; r0 += R, ++j) {
    const int64_t Rj = std::min(R, n - r0), W = n - r0;
    if (j >= kept && !scratch.defined()) scratch = at::empty({4 * R * n}, I.options());
    at::Tensor G = strip_view(j < kept ? p.keep[j] : scratch, Rj, W);
    strip_gram_blocks(I, Tt, r0, G);
    const T* g = G.data_ptr<T>();
    std::vector<std::pair<int64_t, int64_t>> tiles;
    for (int64_t rr = 0; rr < Rj; rr += kGramTile)
      for (int64_t cc = 0; cc < W; cc += kGramTile) tiles.emplace_back(rr, cc);
    parallel_tasks(int64_t(tiles.size()), [&](int64_t t) {
      const int64_t rr = tiles[t].first, cc = tiles[t].second;
      fold.tile(g + rr * W + cc, W, Rj * W, r0 + rr, r0 + cc, std::min(kGramTile, Rj - rr),
                std::min(kGramTile, W - cc), /*transposed_too=*/cc >= Rj);
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

// exp over an array: the vectorised loop for float, std::exp for double.
inline void exp_inplace(std::vector<float>& x, int64_t n) { vec::kernels().exp_n(x.data(), x.data(), n); }
inline void exp_inplace(std::vector<double>& x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// Per-thread sums of a strip: the two scale sums and u [2, n].
template <typename T>
struct StripSums {
  std::vector<std::vector<double>> stats, u;
  StripSums(int64_t n, int64_t slots) : stats(slots, std::vector<double>(2, 0.0)),
                                       u(slots, std::vector<double>(2 * n, 0.0)) {}
};

template <typename T>
void gram_strip_impl(const GramProblem& p, const at::Tensor& lse_t, int64_t r0, T f_m, T f_c,
                     bool holds_gram, at::Tensor& S, at::Tensor& stats_t, at::Tensor& u_t) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t n = p.n, R = S.size(1), W = n - r0, r1 = r0 + R;
  if (!holds_gram) {  // (a strip the forward kept holds its Gram blocks already)
    strip_gram_blocks(p.I.to(acc).contiguous(), p.T.to(acc).contiguous(), r0, S);
  }
  const Weights<T> w(p.weights);
  const T sm = value<T>(p.m2_scale), sc = value<T>(p.clip_scale);
  const at::Tensor lse_c = lse_t.contiguous();
  const T* l = lse_c.data_ptr<T>();
  const T *l0 = l, *l1 = l + n, *l2 = l + 2 * n, *l3 = l + 3 * n;
  T* s_base = S.data_ptr<T>();
  const int64_t block = R * W;
  const int64_t slots = at::get_num_threads();
  StripSums<T> sums(n, slots);
  at::parallel_for(0, R, rows_per_task(6 * W), [&](int64_t rb, int64_t re) {
    const int64_t slot = thread_slot(slots);
    auto& st = sums.stats[slot];
    auto& u = sums.u[slot];
    // The row's exponent arguments, then their exponentials: dA'_pq, dA'_qp, dB'_pq,
    // dB'_qp, and CLIP's four halves.
    std::array<std::vector<T>, 8> e;
    for (auto& v : e) v.resize(W);
    for (int64_t r = rb; r < re; ++r) {
      const int64_t pr = r0 + r;
      T* sii = s_base + r * W;
      T* sit = sii + block;
      T* sti = sit + block;
      T* stt = sti + block;
      const T wap = w.wa[pr], wbp = w.wb[pr];
      for (int64_t c = 0; c < W; ++c) {
        const int64_t q = r0 + c;
        const T gii = sii[c], git = sit[c], gti = sti[c], gtt = stt[c];
        e[0][c] = sm * (w.wa[q] * gii + w.wb[q] * git) - l0[pr];
        e[1][c] = sm * (wap * gii + wbp * gti) - l0[q];
        e[2][c] = sm * (w.wa[q] * gti + w.wb[q] * gtt) - l1[pr];
        e[3][c] = sm * (wap * git + wbp * gtt) - l1[q];
        if (p.with_clip) {
          e[4][c] = sc * git - l2[pr];
          e[5][c] = sc * git - l3[q];
          e[6][c] = sc * gti - l2[q];
          e[7][c] = sc * gti - l3[pr];
        }
      }
      for (int k = 0; k < (p.with_clip ? 8 : 4); ++k) exp_inplace(e[k], W);
      double st0 = 0, st1 = 0, ui = 0, ut = 0;
      for (int64_t c = 0; c < W; ++c) {
        const int64_t q = r0 + c;
        const bool same = q == pr, both = q >= r1;
        const T gii = sii[c], git = sit[c], gti = sti[c], gtt = stt[c];
        const T dApq = same ? T(0) : e[0][c], dAqp = same ? T(0) : e[1][c];
        const T dBpq = same ? T(0) : e[2][c], dBqp = same ? T(0) : e[3][c];
        T dCpq = 0, dCqp = 0;
        if (p.with_clip) {
          dCpq = (e[4][c] + e[5][c]) / T(2) - (same ? T(1) : T(0));
          dCqp = (e[6][c] + e[7][c]) / T(2) - (same ? T(1) : T(0));
        }
        const T waq = w.wa[q], wbq = w.wb[q];
        sii[c] = f_m * (dApq * waq + dAqp * wap);
        sit[c] = f_m * (dApq * wbq + dBqp * wap) + f_c * dCpq;
        sti[c] = f_m * (dBpq * waq + dAqp * wbp) + f_c * dCqp;
        stt[c] = f_m * (dBpq * wbq + dBqp * wbp);
        // Scale sums (logit / scale = its dot product) and the weight path's u.
        st0 += double(dApq * (waq * gii + wbq * git) + dBpq * (waq * gti + wbq * gtt));
        st1 += double(dCpq * git);
        ui += double(dAqp * gii + dBqp * git);
        ut += double(dAqp * gti + dBqp * gtt);
        if (both) {
          st0 += double(dAqp * (wap * gii + wbp * gti) + dBqp * (wap * git + wbp * gtt));
          st1 += double(dCqp * gti);
          u[q] += double(dApq * gii + dBpq * gti);
          u[n + q] += double(dApq * git + dBpq * gtt);
        }
      }
      st[0] += st0;
      st[1] += st1;
      u[pr] += ui;
      u[n + pr] += ut;
    }
  });
  // Added in slot order (a fixed thread count fixes which rows each slot took).
  std::array<double, 2> total{0.0, 0.0};
  std::vector<double> u_total(2 * n, 0.0);
  for (int64_t t = 0; t < slots; ++t) {
    total[0] += sums.stats[t][0];
    total[1] += sums.stats[t][1];
    for (int64_t i = 0; i < 2 * n; ++i) u_total[i] += sums.u[t][i];
  }
  T* stats = stats_t.data_ptr<T>();
  stats[0] += T(total[0]);
  stats[1] += T(total[1]);
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

void check_gram_problem(const GramProblem& p, c10::DeviceType dev) {
  check_mix_pair(p.I, p.T, dev);
  TORCH_CHECK(p.I.size(0) == p.n, "robustft_ext: the Gram problem's n does not match I");
  check_slerp_weight_rows(p.weights, p.I);
  check_acc_vector(p.diag, p.n, p.I, "diag");
  check_acc_vector(p.m2_scale, 1, p.I, "m2_scale");
  if (p.with_clip) check_acc_vector(p.clip_scale, 1, p.I, "clip_scale");
}

}  // namespace

void gram_lse_cpu(const GramProblem& p, at::Tensor& lse) {
  check_gram_problem(p, c10::kCPU);
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == p.n &&
                  lse.scalar_type() == acc_dtype(p.I.scalar_type()),
              "robustft_ext: lse must be a contiguous [4, n] accumulation-dtype tensor");
  TORCH_CHECK(p.strip_rows > 0 && (p.strip_rows % kGramTile == 0 || p.strip_rows >= p.n),
              "robustft_ext: the CPU Gram forward's strips are whole fold tiles of ", kGramTile,
              " rows, got ", p.strip_rows);
  TORCH_CHECK(!p.keep.defined() ||
                  (p.keep.dim() == 2 && p.keep.is_contiguous() &&
                   p.keep.size(1) == 4 * p.strip_rows * p.n &&
                   p.keep.scalar_type() == acc_dtype(p.I.scalar_type())),
              "robustft_ext: the kept Gram strips must be a contiguous [K, 4 R n] tensor");
  RFT_DISPATCH_ACC(p.I, [&] { gram_lse_impl<acc_t>(p, lse); });
}

void gram_strip_cpu(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                    const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S,
                    at::Tensor& stats, at::Tensor& u) {
  check_gram_problem(p, c10::kCPU);
  const auto acc = acc_dtype(p.I.scalar_type());
  TORCH_CHECK(S.is_contiguous() && S.dim() == 3 && S.size(0) == 4 && S.size(1) > 0 &&
                  r0 >= 0 && r0 + S.size(1) <= p.n && S.size(2) == p.n - r0 &&
                  S.scalar_type() == acc && S.device() == p.I.device(),
              "robustft_ext: the Gram strip must be a contiguous [4, rows, n - r0] ", acc,
              " tensor whose rows lie in [r0, n), got ", S.sizes(), " at r0 = ", r0);
  check_acc_vector(stats, 2, p.I, "stats");
  check_acc_vector(u, 2 * p.n, p.I, "u");
  check_acc_vector(f_m2, 1, p.I, "f_m2");
  check_acc_vector(f_clip, 1, p.I, "f_clip");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == p.n && lse.scalar_type() == acc,
              "robustft_ext: lse must be a [4, n] accumulation-dtype tensor");
  const bool holds_gram = p.keep.defined() && r0 < p.keep.size(0) * p.strip_rows;
  RFT_DISPATCH_ACC(p.I, [&] {
    gram_strip_impl<acc_t>(p, lse, r0, f_m2.item<acc_t>(), f_clip.item<acc_t>(), holds_gram, S,
                           stats, u);
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

}  // namespace robustft
