// The Gram kernels of csrc/cuda/gram_device.cuh (the symmetric Gram formulation of CLIP +
// m^2-mix, docs/maths.md, section 9.4), compiled by the host compiler against the CPU
// emulation of emu.h and emu_mma.h, launched as csrc/cuda/gram_cuda.cu launches them, and
// compared with double references written here as plain loops over the full n x n matrices
//   A_pq = s_m (w_a[q] <I_p, I_q> + w_b[q] <I_p, T_q>),  B_pq = s_m (w_a[q] <T_p, I_q> + w_b[q] <T_p, T_q>)
//   (the true pair diag[p] on both diagonals),  C_pq = s_c <I_p, T_q>
// of the values the engine multiplies. Every kernel runs on each engine the launchers take:
// ffma_float (FfmaEngine<float>) and mma_bf16, mma_f16, mma_tf32 (MmaEngine) with the step's
// large (128 x 64, 8 warps) and small (64 x 64, 4 warps) shapes; double inputs have no Gram
// kernels (launcher_contract.h, atomic_gram_serves).
//
// Per engine, shape and term combination (m^2 + CLIP, m^2 alone):
//   * gram_lse_kernel between init / finalize_col_states_kernel: the four log-sum-exps (rows
//     of A, B and C, columns of C) at several tile counts per CTA (one tile each; counts
//     whose CTAs cross row blocks; one CTA for the whole triangle); absent CLIP rows unset;
//   * gram_strip_kernel + gram_u_merge_kernel over strips of rows [r0, r0 + R) against the
//     columns [r0, n), for one strip of every row and for strips of R rows that are not a
//     multiple of the tile (r0 = 0 and r0 > 0), at one and at many column tiles per CTA:
//     S_II, S_IT, S_TI, S_TT entry by entry, the scale sums and u (both accumulated into
//     buffers that hold values already) against the strip's ordered pairs (both orientations
//     of the entries with q >= r0 + R, the direct one of the others);
//   * the counting rule: over strips that cover [0, n) the scale sums and u add up to the
//     sums over all n^2 ordered pairs, and the gradient that the op's eight products
//     assemble from the strips' S (reference S, in double) is the three-product design's;
//   * the triangle's schedule (triangle_tile) at sizes up to n = 10^6, and the row pass
//     pair_backward_kernel.
// Tile edges: n not a multiple of the tile, n = 1, tiles across the diagonal, D not a
// multiple of 16 (rows zero-padded to 16 bytes, as engine_inputs pads them). Every output
// buffer starts with garbage (each entry must be written).
//
// Usage: robustft_gram_emulated_tests [--list | GROUP...] (harness.h); groups are
// gram_<engine>, gram_schedule and gram_rows.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "cuda/ffma_tile.cuh"
#include "cuda/gram_device.cuh"
#include "cuda/mma_tile.cuh"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_shapes.cuh"
#include "emu_checks.h"
#include "harness.h"
#include "robustft_maths.h"

namespace {

using namespace robustft::cuda_tiles;
using cuda_emu::launch;
using rft_test::cat;

// The engines under test, with the launchers' tile shapes (emu_checks.h has the tolerances).
using FfmaFloat = rft_emu_test::FfmaFloat;
using MmaBf16 = rft_emu_test::MmaBf16<StepMmaShape>;
using MmaF16 = rft_emu_test::MmaF16<StepMmaShape>;
using MmaTf32 = rft_emu_test::MmaTf32<StepMmaShape>;
using MmaBf16Small = rft_emu_test::MmaBf16<StepMmaShapeSmall>;
using MmaF16Small = rft_emu_test::MmaF16<StepMmaShapeSmall>;
using MmaTf32Small = rft_emu_test::MmaTf32<StepMmaShapeSmall>;
using rft_emu_test::check_err;
using rft_emu_test::g_worst_ratio;
using rft_emu_test::g_worst_what;
using rft_emu_test::rel_err;
using rft_emu_test::round_tf32;
using rft_emu_test::to_double;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

double lse_of(const std::vector<double>& v) {
  double mx = -INFINITY, sum = 0;
  for (const double x : v) mx = std::max(mx, x);
  for (const double x : v) sum += std::exp(x - mx);
  return mx + std::log(sum);
}

// One Gram problem: unit rows I_p and T_p = normalise(alpha_p I_p + noise), alpha_p random,
// so the pairs' cosines (and with them the slerp weights) spread over about [-0.8, 0.95].
template <class C>
struct GramCase {
  using in_t = typename C::in_t;
  int64_t n, D, ld;
  std::vector<in_t> I, T;          // [n, ld], zero-padded
  std::vector<double> Id, Td;      // [n, D]: what the engine multiplies
  std::vector<double> w;           // [4, n]: maths::slerp_weights of the pairs, lam = 0.3
  float s_m = 14.3f, s_c = 9.5f;
  std::vector<float> diag;         // s_m <I_p, T_p>, as the op body computes it
  std::vector<double> GII, GIT, GTI, GTT;  // n x n Gram blocks of Id, Td
  std::vector<double> A, B, Cm;    // n x n logits

  GramCase(int64_t n_, int64_t D_, std::mt19937& rng) : n(n_), D(D_) {
    const int64_t per_chunk = C::kMma ? int64_t(16 / sizeof(in_t)) : 1;
    ld = (D + per_chunk - 1) / per_chunk * per_chunk;
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> alpha(-1.5, 3.0);
    I.assign(n * ld, in_t(0));
    T.assign(n * ld, in_t(0));
    Id.assign(n * D, 0.0);
    Td.assign(n * D, 0.0);
    w.assign(4 * n, 0.0);
    diag.resize(n);
    auto unit = [&](std::vector<double>& v) {
      double s = 0;
      for (const double x : v) s += x * x;
      for (double& x : v) x /= std::sqrt(s);
    };
    for (int64_t p = 0; p < n; ++p) {
      std::vector<double> x(D), y(D);
      for (auto& v : x) v = normal(rng);
      unit(x);
      const double a = alpha(rng);
      for (int64_t k = 0; k < D; ++k) y[k] = a * x[k] + normal(rng) / std::sqrt(double(D));
      unit(y);
      double c = 0;
      for (int64_t k = 0; k < D; ++k) {
        I[p * ld + k] = static_cast<in_t>(x[k]);
        T[p * ld + k] = static_cast<in_t>(y[k]);
        const double iv = static_cast<double>(I[p * ld + k]), tv = static_cast<double>(T[p * ld + k]);
        c += iv * tv;
        Id[p * D + k] = C::kTf32 ? round_tf32(static_cast<float>(iv)) : iv;
        Td[p * D + k] = C::kTf32 ? round_tf32(static_cast<float>(tv)) : tv;
      }
      const auto sw = robustft::maths::slerp_weights<double>(c, 0.3);
      w[p] = sw.wa;
      w[n + p] = sw.wb;
      w[2 * n + p] = sw.dwa_dc;
      w[3 * n + p] = sw.dwb_dc;
      diag[p] = static_cast<float>(double(s_m) * c);
    }
    auto gram = [&](const std::vector<double>& X, const std::vector<double>& Y) {
      std::vector<double> G(n * n);
      for (int64_t p = 0; p < n; ++p)
        for (int64_t q = 0; q < n; ++q) {
          double s = 0;
          for (int64_t k = 0; k < D; ++k) s += X[p * D + k] * Y[q * D + k];
          G[p * n + q] = s;
        }
      return G;
    };
    GII = gram(Id, Id);
    GIT = gram(Id, Td);
    GTI = gram(Td, Id);
    GTT = gram(Td, Td);
    A.resize(n * n);
    B.resize(n * n);
    Cm.resize(n * n);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) {
        const int64_t e = p * n + q;
        A[e] = p == q ? double(diag[p]) : double(s_m) * (w[q] * GII[e] + w[n + q] * GIT[e]);
        B[e] = p == q ? double(diag[p]) : double(s_m) * (w[q] * GTI[e] + w[n + q] * GTT[e]);
        Cm[e] = double(s_c) * GIT[e];
      }
  }
  // Row LSEs of a logit matrix, or its column LSEs.
  std::vector<double> lse(const std::vector<double>& L, bool cols) const {
    std::vector<double> out(n), v(n);
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b < n; ++b) v[b] = cols ? L[b * n + a] : L[a * n + b];
      out[a] = lse_of(v);
    }
    return out;
  }
  TileOperands<in_t> operands() const {
    TileOperands<in_t> ops{};
    ops.x[0] = ops.y[0] = I.data();
    ops.x[1] = ops.y[1] = T.data();
    ops.n = ops.m = n;
    ops.D = ops.ld = ld;
    return ops;
  }
};

// The reference's logit gradients up to their factors (docs/maths.md, section 9.4).
struct Dlogits {
  std::vector<double> dA, dB, dC;  // n x n
};

template <class C>
Dlogits reference_dlogits(const GramCase<C>& gc, const std::vector<double>& lA,
                          const std::vector<double>& lB, const std::vector<double>& lR,
                          const std::vector<double>& lC, bool clip) {
  const int64_t n = gc.n;
  Dlogits d{std::vector<double>(n * n), std::vector<double>(n * n), std::vector<double>(n * n, 0.0)};
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = 0; q < n; ++q) {
      const int64_t e = p * n + q;
      d.dA[e] = p == q ? 0.0 : std::exp(gc.A[e] - lA[p]);
      d.dB[e] = p == q ? 0.0 : std::exp(gc.B[e] - lB[p]);
      if (clip) {
        d.dC[e] = 0.5 * std::exp(gc.Cm[e] - lR[p]) + 0.5 * std::exp(gc.Cm[e] - lC[q]) -
                  (p == q ? 1.0 : 0.0);
      }
    }
  return d;
}

// lse [4, n] as launch_gram_lse composes it (absent rows stay NaN).
template <class C, bool kClip>
std::vector<double> run_gram_lse(const GramCase<C>& gc, int64_t tiles_per_cta) {
  using E = typename C::E;
  const int64_t n = gc.n;
  GramTriangle tri{n, (n + E::BM - 1) / E::BM, (n + E::BN - 1) / E::BN, E::BM / E::BN, 0};
  tri.tiles = triangle_prefix(tri, tri.row_blocks);
  const int64_t per_cta = std::min(tiles_per_cta, tri.tiles);
  const int64_t ctas = (tri.tiles + per_cta - 1) / per_cta;
  const int64_t states = (kClip ? 4 : 2) * n;
  std::vector<unsigned long long> state(states, 0x5555555555555555ull);  // garbage
  std::vector<float> lse(4 * n, kNaN);
  const GramScalars<float> sc{&gc.s_m, kClip ? &gc.s_c : nullptr, gc.diag.data(), nullptr, nullptr};
  launch(dim3(2), 64, &init_col_states_kernel, state.data(), states);
  launch(dim3(static_cast<unsigned>(ctas)), E::kThreads, gram_lse_smem_bytes<E, kClip>(),
         &gram_lse_kernel<E, typename C::in_t, kClip>, gc.operands(), sc, gc.w.data(), tri,
         per_cta, state.data());
  launch(dim3(3), 32, &finalize_col_states_kernel,
         static_cast<const unsigned long long*>(state.data()), states, lse.data());
  return to_double(lse);
}

struct Split {
  int64_t tiles_per_split, splits;
};
Split split_of(int64_t cols, int BN, int64_t tps) {
  const int64_t tiles = (cols + BN - 1) / BN;
  const int64_t t = std::min(tps, tiles);
  return Split{t, (tiles + t - 1) / t};
}

// One strip as launch_gram_strip runs it: S [4, rows, n - r0] written, stats [2] and u [2, n]
// accumulated.
template <class C, bool kClip>
void run_gram_strip(const GramCase<C>& gc, const std::vector<float>& lse, int64_t r0, int64_t rows,
                    int64_t tps, float f_m, float f_c, std::vector<typename C::ws_t>& S,
                    std::vector<float>& stats, std::vector<float>& u) {
  using E = typename C::E;
  using L = typename E::L;
  using ws_t = typename C::ws_t;
  const int64_t n = gc.n, width = n - r0, r1 = r0 + rows;
  const Split sp = split_of(width, E::BN, tps);
  const dim3 grid(static_cast<unsigned>((rows + E::BM - 1) / E::BM), static_cast<unsigned>(sp.splits));
  const int64_t row_parts = sp.splits * L::kRowWarps;
  S.assign(4 * rows * width, static_cast<ws_t>(3e3f));  // garbage
  std::vector<double> stats_part(size_t(grid.x) * grid.y * 2, 1e300);
  std::vector<float> row_part(row_parts * 2 * rows, 7e7f), col_part(grid.x * 2 * (n - r1), 7e7f);
  const GramScalars<float> sc{&gc.s_m, kClip ? &gc.s_c : nullptr, nullptr, &f_m,
                              kClip ? &f_c : nullptr};
  launch(grid, E::kThreads, E::template smem_bytes<GramPairs>(),
         &gram_strip_kernel<E, typename C::in_t, ws_t, kClip>, gc.operands(), sc, gc.w.data(),
         lse.data(), r0, rows, sp.tiles_per_split, S.data(), stats_part.data(), row_part.data(),
         col_part.data());
  launch(dim3(2), 64, &gram_u_merge_kernel<float>, static_cast<const float*>(row_part.data()),
         row_parts, static_cast<const float*>(col_part.data()), int64_t(grid.x), r0, rows, n,
         u.data());
  double sm = 0, scl = 0;
  for (size_t b = 0; b < size_t(grid.x) * grid.y; ++b) {
    sm += stats_part[2 * b];
    scl += stats_part[2 * b + 1];
  }
  stats[0] += static_cast<float>(sm);
  stats[1] += static_cast<float>(scl);
}

// The reference sums of a set of ordered pairs (x, y): the scale sums and the column sums u,
// each with the scale of its rounding error. The kernels' dot products of unit rows are
// accurate to about float's epsilon of the rows' norms, not of the (possibly small) dot
// product: a term dlogit * dot errs by about eps |dlogit| (|w_a| + |w_b|) for A and B, eps
// |dlogit| for C and u; the mag_* sums add those scales up.
struct PairSums {
  double stat_m = 0, stat_c = 0, mag_m = 1e-300, mag_c = 1e-300;
  std::vector<double> u, mag_u;  // [2, n]
  explicit PairSums(int64_t n) : u(2 * n, 0.0), mag_u(2 * n, 0.0) {}
};

template <class C>
void add_pair(const GramCase<C>& gc, const Dlogits& d, int64_t x, int64_t y, PairSums& s) {
  const int64_t n = gc.n, e = x * n + y, t = y * n + x;
  const double dot_scale = std::fabs(gc.w[y]) + std::fabs(gc.w[n + y]);
  s.stat_m += (d.dA[e] * gc.A[e] + d.dB[e] * gc.B[e]) / double(gc.s_m);
  s.mag_m += (std::fabs(d.dA[e]) + std::fabs(d.dB[e])) * dot_scale;
  s.stat_c += d.dC[e] * gc.Cm[e] / double(gc.s_c);
  s.mag_c += std::fabs(d.dC[e]);
  // u_I[y] += dA'_xy <I_y, I_x> + dB'_xy <I_y, T_x>; u_T[y] likewise with T_y.
  s.u[y] += d.dA[e] * gc.GII[t] + d.dB[e] * gc.GIT[t];
  s.u[n + y] += d.dA[e] * gc.GTI[t] + d.dB[e] * gc.GTT[t];
  s.mag_u[y] += std::fabs(d.dA[e]) + std::fabs(d.dB[e]);
  s.mag_u[n + y] += std::fabs(d.dA[e]) + std::fabs(d.dB[e]);
}

// max |ref - got| over the largest error scale.
double u_err(const PairSums& s, const std::vector<double>& got) {
  double err = 0, mag = 1e-300;
  for (size_t i = 0; i < got.size(); ++i) {
    err = std::max(err, std::fabs(s.u[i] - got[i]));
    mag = std::max(mag, s.mag_u[i]);
  }
  return std::isnan(err) ? INFINITY : err / mag;
}

// The four S blocks of the strip [r0, r0 + rows) x [r0, n) (factors f_m, f_c), in double.
template <class C>
std::vector<double> reference_strip(const GramCase<C>& gc, const Dlogits& d, int64_t r0,
                                    int64_t rows, double f_m, double f_c) {
  const int64_t n = gc.n, width = n - r0;
  std::vector<double> S(4 * rows * width);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const int64_t p = r0 + i, q = r0 + j, e = p * n + q, t = q * n + p;
      const double wap = gc.w[p], wbp = gc.w[n + p], waq = gc.w[q], wbq = gc.w[n + q];
      const int64_t o = i * width + j, blk = rows * width;
      S[o] = f_m * (d.dA[e] * waq + d.dA[t] * wap);
      S[blk + o] = f_m * (d.dA[e] * wbq + d.dB[t] * wap) + f_c * d.dC[e];
      S[2 * blk + o] = f_m * (d.dB[e] * waq + d.dA[t] * wbp) + f_c * d.dC[t];
      S[3 * blk + o] = f_m * (d.dB[e] * wbq + d.dB[t] * wbp);
    }
  return S;
}

// The op's eight products of one strip (docs/maths.md, section 9.4), in double:
//   grad_I[R] += S_II X_I[r0:] + S_IT X_T[r0:],   grad_T[R] += S_TI X_I[r0:] + S_TT X_T[r0:]
//   grad_I[r1:] += S_II[:, r1:]^T X_I[R] + S_TI[:, r1:]^T X_T[R]
//   grad_T[r1:] += S_IT[:, r1:]^T X_I[R] + S_TT[:, r1:]^T X_T[R]
template <class C>
void assemble_strip(const GramCase<C>& gc, const std::vector<double>& S, int64_t r0, int64_t rows,
                    std::vector<double>& gI, std::vector<double>& gT) {
  const int64_t n = gc.n, D = gc.D, width = n - r0, r1 = r0 + rows, blk = rows * width;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) {
      const int64_t p = r0 + i, q = r0 + j, o = i * width + j;
      const double sii = S[o], sit = S[blk + o], sti = S[2 * blk + o], stt = S[3 * blk + o];
      for (int64_t k = 0; k < D; ++k) {
        gI[p * D + k] += sii * gc.Id[q * D + k] + sit * gc.Td[q * D + k];
        gT[p * D + k] += sti * gc.Id[q * D + k] + stt * gc.Td[q * D + k];
        if (q >= r1) {
          gI[q * D + k] += sii * gc.Id[p * D + k] + sti * gc.Td[p * D + k];
          gT[q * D + k] += sit * gc.Id[p * D + k] + stt * gc.Td[p * D + k];
        }
      }
    }
}

// The three-product design's gradient (docs/maths.md, section 9.3) with the factors f_m, f_c:
//   grad_I = f_m dA' M + f_c dC' T + w_a grad_M,  grad_T = f_m dB' M + f_c dC'^T I + w_b grad_M,
//   grad_M = f_m (dA'^T I + dB'^T T),  M_q = w_a[q] I_q + w_b[q] T_q.
template <class C>
void three_product_grads(const GramCase<C>& gc, const Dlogits& d, double f_m, double f_c,
                         std::vector<double>& gI, std::vector<double>& gT) {
  const int64_t n = gc.n, D = gc.D;
  std::vector<double> M(n * D), gM(n * D, 0.0);
  for (int64_t q = 0; q < n; ++q)
    for (int64_t k = 0; k < D; ++k) M[q * D + k] = gc.w[q] * gc.Id[q * D + k] + gc.w[n + q] * gc.Td[q * D + k];
  gI.assign(n * D, 0.0);
  gT.assign(n * D, 0.0);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = 0; q < n; ++q) {
      const int64_t e = p * n + q;
      for (int64_t k = 0; k < D; ++k) {
        gI[p * D + k] += f_m * d.dA[e] * M[q * D + k] + f_c * d.dC[e] * gc.Td[q * D + k];
        gT[p * D + k] += f_m * d.dB[e] * M[q * D + k];
        gT[q * D + k] += f_c * d.dC[e] * gc.Id[p * D + k];
        gM[q * D + k] += f_m * (d.dA[e] * gc.Id[p * D + k] + d.dB[e] * gc.Td[p * D + k]);
      }
    }
  for (int64_t p = 0; p < n; ++p)
    for (int64_t k = 0; k < D; ++k) {
      gI[p * D + k] += gc.w[p] * gM[p * D + k];
      gT[p * D + k] += gc.w[n + p] * gM[p * D + k];
    }
}

template <class C, bool kClip>
void check_gram(int64_t n, int64_t D, const std::vector<int64_t>& lse_tps,
                const std::vector<std::vector<int64_t>>& chunkings, std::mt19937& rng) {
  const GramCase<C> gc(n, D, rng);
  const std::string terms = kClip ? "m2+clip" : "m2";
  const auto lA = gc.lse(gc.A, false), lB = gc.lse(gc.B, false);
  const auto lR = gc.lse(gc.Cm, false), lC = gc.lse(gc.Cm, true);

  // Forward.
  for (const int64_t tps : lse_tps) {
    const std::string tag = cat(terms, " n=", n, " D=", D, " tiles/CTA=", tps);
    const auto lse = run_gram_lse<C, kClip>(gc, tps);
    auto row = [&](int k) { return std::vector<double>(lse.begin() + k * n, lse.begin() + (k + 1) * n); };
    check_err(tag + " lse A", rel_err(lA, row(0)), C::tol);
    check_err(tag + " lse B", rel_err(lB, row(1)), C::tol);
    if (kClip) {
      check_err(tag + " lse C rows", rel_err(lR, row(2)), C::tol);
      check_err(tag + " lse C cols", rel_err(lC, row(3)), C::tol);
    } else {
      RFT_CHECK_MSG(std::isnan(lse[2 * n]) && std::isnan(lse[4 * n - 1]), tag,
                    ": the absent CLIP rows were written");
    }
  }

  // Backward: the reference statistics as the op passes them (absent rows NaN), strip by strip.
  std::vector<float> lse_in(4 * n, kNaN);
  for (int64_t p = 0; p < n; ++p) {
    lse_in[p] = float(lA[p]);
    lse_in[n + p] = float(lB[p]);
    if (kClip) {
      lse_in[2 * n + p] = float(lR[p]);
      lse_in[3 * n + p] = float(lC[p]);
    }
  }
  const Dlogits d = reference_dlogits(gc, lA, lB, lR, lC, kClip);
  const float f_m = 0.7f, f_c = kClip ? 0.3f : 0.f;
  // Sums over every ordered pair, and the three-product gradient.
  PairSums all(n);
  for (int64_t x = 0; x < n; ++x)
    for (int64_t y = 0; y < n; ++y) add_pair(gc, d, x, y, all);
  std::vector<double> gI3, gT3;
  three_product_grads(gc, d, f_m, f_c, gI3, gT3);

  std::mt19937 init_rng(static_cast<unsigned>(n + D));
  std::normal_distribution<float> normal;
  for (const auto& chunks : chunkings) {
    for (const int64_t tps : {int64_t(1), int64_t(1) << 20}) {
      std::vector<float> stats = {0.25f, -0.5f}, u(2 * n);
      for (auto& v : u) v = normal(init_rng);
      const std::vector<float> stats0 = stats, u0 = u;
      std::vector<double> gI(n * D, 0.0), gT(n * D, 0.0);
      int64_t r0 = 0;
      for (const int64_t rows : chunks) {
        const int64_t r1 = r0 + rows, width = n - r0;
        const std::string t = cat(terms, " n=", n, " D=", D, " strip [", r0, ", ", r1,
                                  ") tiles/CTA=", tps);
        std::vector<typename C::ws_t> S;
        const std::vector<float> stats_before = stats, u_before = u;
        run_gram_strip<C, kClip>(gc, lse_in, r0, rows, tps, f_m, f_c, S, stats, u);
        const auto ref = reference_strip(gc, d, r0, rows, f_m, f_c);
        const char* names[4] = {" S_II", " S_IT", " S_TI", " S_TT"};
        for (int k = 0; k < 4; ++k) {
          const auto first = ref.begin() + k * rows * width;
          const std::vector<double> rk(first, first + rows * width);
          std::vector<double> gk(rows * width);
          for (int64_t o = 0; o < rows * width; ++o) gk[o] = double(S[k * rows * width + o]);
          check_err(t + names[k], rel_err(rk, gk), C::ws_tol);
        }
        // The strip's ordered pairs: (p, q) for every entry, (q, p) for q >= r1.
        PairSums own(n);
        for (int64_t p = r0; p < r1; ++p)
          for (int64_t q = r0; q < n; ++q) {
            add_pair(gc, d, p, q, own);
            if (q >= r1) add_pair(gc, d, q, p, own);
          }
        check_err(t + " stats m2", std::fabs(double(stats[0]) - double(stats_before[0]) - own.stat_m) / own.mag_m,
                  C::tol);
        if (kClip) {
          check_err(t + " stats clip",
                    std::fabs(double(stats[1]) - double(stats_before[1]) - own.stat_c) / own.mag_c, C::tol);
        } else {
          RFT_CHECK_MSG(stats[1] == stats_before[1], t, ": the absent CLIP term's sum changed");
        }
        std::vector<double> du(2 * n);
        for (int64_t x = 0; x < 2 * n; ++x) du[x] = double(u[x]) - double(u_before[x]);
        check_err(t + " u", u_err(own, du), C::tol);
        for (int64_t x = 0; x < r0; ++x)
          RFT_CHECK_MSG(u[x] == u_before[x] && u[n + x] == u_before[n + x], t,
                        ": u of column ", x, " (before the strip) changed");
        assemble_strip(gc, ref, r0, rows, gI, gT);
        r0 = r1;
      }
      RFT_CHECK_MSG(r0 == n, "the chunks must cover the rows");
      // Each ordered pair exactly once over the strips.
      const std::string t = cat(terms, " n=", n, " D=", D, " ", chunks.size(), " strips, tiles/CTA=", tps);
      check_err(t + " total stats m2", std::fabs(double(stats[0]) - double(stats0[0]) - all.stat_m) / all.mag_m,
                C::tol);
      if (kClip) {
        check_err(t + " total stats clip",
                  std::fabs(double(stats[1]) - double(stats0[1]) - all.stat_c) / all.mag_c, C::tol);
      }
      std::vector<double> du(2 * n);
      for (int64_t x = 0; x < 2 * n; ++x) du[x] = double(u[x]) - double(u0[x]);
      check_err(t + " total u", u_err(all, du), C::tol);
      check_err(t + " assembled grad_I", rel_err(gI3, gI), 1e-12);
      check_err(t + " assembled grad_T", rel_err(gT3, gT), 1e-12);
    }
  }
}

// Strips: one of every row, and strips of `rows` rows (the last one shorter).
std::vector<std::vector<int64_t>> chunkings_of(int64_t n, int64_t rows) {
  std::vector<int64_t> strips;
  for (int64_t r0 = 0; r0 < n; r0 += rows) strips.push_back(std::min(rows, n - r0));
  return {{n}, strips};
}

template <class C>
void add_engine(const char* group, int64_t n, int64_t D, std::vector<int64_t> lse_tps,
                int64_t strip_rows) {
  const std::string base = cat(group, "/n=", n, ",D=", D);
  const auto chunkings = chunkings_of(n, strip_rows);
  rft_test::add_case(base + ",m2+clip", [=] {
    std::mt19937 rng(static_cast<unsigned>(n * 31 + D));
    g_worst_ratio = 0;
    g_worst_what.clear();
    check_gram<C, true>(n, D, lse_tps, chunkings, rng);
    rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
  });
  rft_test::add_case(base + ",m2", [=] {
    std::mt19937 rng(static_cast<unsigned>(n * 37 + D));
    g_worst_ratio = 0;
    g_worst_what.clear();
    check_gram<C, false>(n, D, lse_tps, chunkings, rng);
    rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
  });
}

// ---- The triangle's schedule --------------------------------------------------------------
// triangle_tile maps tile numbers onto the row blocks' column tiles in order: every tile
// (i, j) with ratio i <= j < col_tiles once, and every entry p <= q of the n x n matrix in
// one of them. Small n: all numbers; large n: each row block's first and last number.
void check_triangle(int64_t n, int64_t BM, int64_t BN) {
  GramTriangle g{n, (n + BM - 1) / BM, (n + BN - 1) / BN, BM / BN, 0};
  g.tiles = triangle_prefix(g, g.row_blocks);
  const std::string tag = cat("n=", n, " BM=", BM, " BN=", BN);
  if (g.tiles <= 5000) {
    int64_t t = 0;
    for (int64_t i = 0; i < g.row_blocks; ++i)
      for (int64_t j = g.ratio * i; j < g.col_tiles; ++j, ++t) {
        int64_t bi = -1, bj = -1;
        triangle_tile(g, t, bi, bj);
        RFT_CHECK_MSG(bi == i && bj == j, tag, ": tile ", t, " is (", bi, ", ", bj, "), not (", i,
                      ", ", j, ")");
      }
    RFT_CHECK_MSG(t == g.tiles, tag, ": ", g.tiles, " tiles counted, ", t, " enumerated");
    std::set<std::pair<int64_t, int64_t>> tiles;
    for (int64_t k = 0; k < g.tiles; ++k) {
      int64_t i, j;
      triangle_tile(g, k, i, j);
      tiles.insert({i, j});
    }
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p; q < n; ++q)
        RFT_CHECK_MSG(tiles.count({p / BM, q / BN}) == 1, tag, ": entry (", p, ", ", q,
                      ") lies in no tile of the triangle");
    return;
  }
  for (int64_t i = 0; i < g.row_blocks; ++i) {
    const int64_t first = triangle_prefix(g, i), last = triangle_prefix(g, i + 1) - 1;
    int64_t bi, bj;
    triangle_tile(g, first, bi, bj);
    RFT_CHECK_MSG(bi == i && bj == g.ratio * i, tag, ": the first tile of row block ", i,
                  " is (", bi, ", ", bj, ")");
    triangle_tile(g, last, bi, bj);
    RFT_CHECK_MSG(bi == i && bj == g.col_tiles - 1, tag, ": the last tile of row block ", i,
                  " is (", bi, ", ", bj, ")");
  }
}

// ---- pair_backward_kernel: the host formula, entry by entry ---------------------------------
template <typename in_t, typename acc_t>
void check_pair_backward(int64_t n, int64_t D) {
  std::mt19937_64 rng(n * 11 + D);
  std::normal_distribution<double> normal;
  std::vector<in_t> a(n * D), b(n * D);
  for (auto& v : a) v = in_t(normal(rng));
  for (auto& v : b) v = in_t(normal(rng));
  std::vector<acc_t> coef(n), gI(n * D), gT(n * D);
  for (auto& v : coef) v = acc_t(normal(rng));
  for (auto& v : gI) v = acc_t(normal(rng));
  for (auto& v : gT) v = acc_t(normal(rng));
  const std::vector<acc_t> gI0 = gI, gT0 = gT;
  launch(dim3(2), kRowThreads, &pair_backward_kernel<in_t, acc_t>,
         static_cast<const acc_t*>(coef.data()), static_cast<const in_t*>(a.data()),
         static_cast<const in_t*>(b.data()), n, D, gI.data(), gT.data());
  for (int64_t o = 0; o < n * D; ++o) {
    const acc_t k = coef[o / D];
    RFT_CHECK_MSG(gI[o] == acc_t(gI0[o] + k * acc_t(b[o])) && gT[o] == acc_t(gT0[o] + k * acc_t(a[o])),
                  "pair_backward entry ", o, " differs");
  }
}

RFT_CASES(gram_emulated) {
  // FMA engine: 64 x 64 tiles (ratio 1); n = 65 leaves a one-row block and a one-column tile.
  add_engine<FfmaFloat>("gram_ffma_float", 65, 17, {1, 2, 1 << 20}, 20);
  add_engine<FfmaFloat>("gram_ffma_float", 1, 5, {1 << 20}, 1);
  // Tensor cores, 128 x 64 tiles (ratio 2: two column tiles per row block on the diagonal);
  // n = 200 leaves partial row and column tiles; D = 136 bf16 runs three K blocks, D = 20
  // is padded to 24, D = 67 (tf32) to 68.
  add_engine<MmaBf16>("gram_mma_bf16", 200, 136, {1, 3, 1 << 20}, 50);
  add_engine<MmaBf16>("gram_mma_bf16", 1, 20, {1 << 20}, 1);
  add_engine<MmaF16>("gram_mma_f16", 130, 24, {1, 1 << 20}, 70);
  add_engine<MmaTf32>("gram_mma_tf32", 150, 67, {2, 1 << 20}, 100);
  // The small shape: 64 x 64 tiles of 4 warps (ratio 1).
  add_engine<MmaBf16Small>("gram_mma_bf16_small", 130, 136, {1, 3, 1 << 20}, 45);
  add_engine<MmaF16Small>("gram_mma_f16_small", 100, 40, {2}, 30);
  add_engine<MmaTf32Small>("gram_mma_tf32_small", 70, 36, {1}, 33);

  rft_test::add_case("gram_schedule/triangle", [] {
    for (const int64_t n : {int64_t(1), int64_t(64), int64_t(65), int64_t(129), int64_t(200),
                            int64_t(1000), int64_t(999983), int64_t(1000000)}) {
      check_triangle(n, 128, 64);
      check_triangle(n, 64, 64);
    }
  });
  rft_test::add_case("gram_rows/pair_backward_double", [] { check_pair_backward<double, double>(37, 70); });
  rft_test::add_case("gram_rows/pair_backward_float", [] { check_pair_backward<float, float>(37, 70); });
  rft_test::add_case("gram_rows/pair_backward_bf16", [] { check_pair_backward<c10::BFloat16, float>(50, 33); });
  rft_test::add_case("gram_rows/pair_backward_half", [] { check_pair_backward<c10::Half, float>(7, 300); });
}

}  // namespace
