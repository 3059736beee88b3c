// The step CUDA kernels of csrc/cuda/step_device.cuh (the tile work of CLIP and m^2-mix in
// one pass), compiled by the host compiler against the CPU emulation of emu.h and emu_mma.h,
// launched as csrc/cuda/step_cuda.cu launches them, and compared with double references
// written here as plain loops over the full matrices A = s_m I M^T (true pair diag[p] on the
// diagonal), B = s_m T M^T and C = s_c I T^T of step_kernels.h, from the values the engine
// multiplies. Every kernel runs on each tile engine it is instantiated with: ffma_float,
// ffma_double (FfmaEngine) and mma_bf16, mma_f16, mma_tf32 (MmaEngine with the launchers'
// StepMmaShape: 128 x 64 tiles, 8 warps, up to four operand slabs per stage).
//
// Per engine, shape, column split and term combination (m^2 + CLIP, m^2 alone, CLIP alone):
//   * step_lse_kernel + merge_row_states_kernel: the row LSEs of A, B and C; the column LSE
//     of C through init / packed atomic merge / finalize_col_states_kernel (float
//     accumulation) or a transposed clip_lse_kernel pass (double), as launch_step_lse does;
//   * step_dlogits_kernel over chunks of rows: dA, dB, dC in the workspace dtype, entry by
//     entry, and both scale-gradient sums (exactly 0 for an absent term);
//   * absent terms never enter: their lse rows are NaN, their scales and outputs null;
//   * the row passes of row_device.cuh (the slerp prologue and backward, DiVE) against
//     host loops of the same formulas.
// Every output buffer starts with garbage (each entry must be written).
//
// Usage: robustft_step_emulated_tests [--list | GROUP...] (harness.h); groups are
// step_<engine> and step_rows.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/contrastive_device.cuh"
#include "cuda/ffma_tile.cuh"
#include "cuda/mma_tile.cuh"
#include "cuda/row_device.cuh"
#include "cuda/step_device.cuh"
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
using FfmaDouble = rft_emu_test::FfmaDouble;
using MmaBf16 = rft_emu_test::MmaBf16<StepMmaShape>;
using MmaF16 = rft_emu_test::MmaF16<StepMmaShape>;
using MmaTf32 = rft_emu_test::MmaTf32<StepMmaShape>;
// The shape of devices with 99 KB of shared memory per block (tile_plan.h).
using MmaBf16Small = rft_emu_test::MmaBf16<StepMmaShapeSmall>;
using rft_emu_test::check_err;
using rft_emu_test::g_worst_ratio;
using rft_emu_test::g_worst_what;
using rft_emu_test::rel_err;
using rft_emu_test::round_tf32;
using rft_emu_test::to_double;

double lse_of(const std::vector<double>& v) {
  double mx = -INFINITY, sum = 0;
  for (const double x : v) mx = std::max(mx, x);
  for (const double x : v) sum += std::exp(x - mx);
  return mx + std::log(sum);
}

// One step problem: I, T, M [n, D] of in_t (rows padded to ld for the tensor-core engine).
template <class C>
struct StepCase {
  using in_t = typename C::in_t;
  using acc_t = typename C::E::acc_t;
  int64_t n, D, ld;
  bool m2, clip;
  std::vector<in_t> I, T, M;
  std::vector<double> Id, Td, Md;  // what the engine multiplies, in double
  acc_t s_m, s_c;
  std::vector<acc_t> diag;         // s_m <I_p, T_p>, as the op body computes it
  std::vector<double> A, B, Cm;    // n x n logits (A, B with the true pair on the diagonal)

  StepCase(int64_t n_, int64_t D_, bool m2_, bool clip_, std::mt19937& rng)
      : n(n_), D(D_), m2(m2_), clip(clip_), s_m(acc_t(14.3)), s_c(acc_t(9.5)) {
    const int64_t per_chunk = C::kMma ? int64_t(16 / sizeof(in_t)) : 1;
    ld = (D + per_chunk - 1) / per_chunk * per_chunk;
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(static_cast<double>(D)));
    auto fill = [&](std::vector<in_t>& X, std::vector<double>& Xd) {
      X.assign(n * ld, in_t(0));
      Xd.assign(n * D, 0.0);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t k = 0; k < D; ++k) {
          X[r * ld + k] = static_cast<in_t>(nd(rng));
          const double v = static_cast<double>(X[r * ld + k]);
          Xd[r * D + k] = C::kTf32 ? round_tf32(static_cast<float>(v)) : v;
        }
    };
    fill(I, Id);
    fill(T, Td);
    fill(M, Md);
    diag.resize(n);
    for (int64_t p = 0; p < n; ++p) {
      double d = 0;
      for (int64_t k = 0; k < D; ++k)
        d += static_cast<double>(I[p * ld + k]) * static_cast<double>(T[p * ld + k]);
      diag[p] = static_cast<acc_t>(double(s_m) * d);
    }
    A.resize(n * n);
    B.resize(n * n);
    Cm.resize(n * n);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) {
        A[p * n + q] = p == q ? double(diag[p]) : double(s_m) * dot(Id, p, Md, q);
        B[p * n + q] = p == q ? double(diag[p]) : double(s_m) * dot(Td, p, Md, q);
        Cm[p * n + q] = double(s_c) * dot(Id, p, Td, q);
      }
  }
  double dot(const std::vector<double>& X, int64_t p, const std::vector<double>& Y, int64_t q) const {
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += X[p * D + k] * Y[q * D + k];
    return s;
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
    if (m2) {
      ops.x[0] = I.data();
      ops.x[1] = T.data();
      ops.y[0] = M.data();
      ops.y[1] = T.data();
    } else {
      ops.x[0] = I.data();
      ops.y[0] = T.data();
    }
    ops.n = ops.m = n;
    ops.D = ld;
    ops.ld = ld;
    return ops;
  }
  StepScalars<acc_t> scalars() const {
    return StepScalars<acc_t>{m2 ? &s_m : nullptr, clip ? &s_c : nullptr, m2 ? diag.data() : nullptr};
  }
};

struct Split {
  int64_t tiles_per_split, splits;
};
Split split_of(int64_t cols, int BN, int64_t tps) {
  const int64_t tiles = (cols + BN - 1) / BN;
  const int64_t t = std::min(tps, tiles);
  return Split{t, (tiles + t - 1) / t};
}

template <class E, bool kM2, bool kClip>
constexpr int step_smem() {
  return E::template smem_bytes<StepPairs<kM2, kClip>>();
}

// lse [4, n] as launch_step_lse composes it; absent rows stay NaN.
template <class C, bool kM2, bool kClip>
std::vector<double> run_step_lse(const StepCase<C>& sc, int64_t tps) {
  using E = typename C::E;
  using acc_t = typename E::acc_t;
  constexpr bool kFloat = std::is_same<acc_t, float>::value;
  const int64_t n = sc.n;
  const Split sp = split_of(n, E::BN, tps);
  const dim3 grid(static_cast<unsigned>((n + E::BM - 1) / E::BM), static_cast<unsigned>(sp.splits));
  std::vector<acc_t> part(3 * sp.splits * n * 2, acc_t(4242));  // garbage
  std::vector<acc_t> lse(4 * n, std::numeric_limits<acc_t>::quiet_NaN());
  std::vector<unsigned long long> state(n, 0x5555555555555555ull);
  const bool col_atomic = kClip && kFloat;
  if (col_atomic) launch(dim3(1), 32, &init_col_states_kernel, state.data(), n);
  launch(grid, E::kThreads, step_smem<E, kM2, kClip>(),
         &step_lse_kernel<E, typename C::in_t, kM2, kClip, kClip && kFloat>, sc.operands(),
         sc.scalars(), sp.tiles_per_split, part.data(), col_atomic ? state.data() : nullptr);
  auto merge = [&](int term, acc_t* out) {
    launch(dim3(2), 64, &merge_row_states_kernel<acc_t>,
           static_cast<const acc_t*>(part.data() + term * sp.splits * n * 2), sp.splits, n, out);
  };
  if (kM2) {
    merge(0, lse.data());
    merge(1, lse.data() + n);
  }
  if (kClip) {
    merge(2, lse.data() + 2 * n);
    if (col_atomic) {
      launch(dim3(3), 32, &finalize_col_states_kernel,
             static_cast<const unsigned long long*>(state.data()), n,
             reinterpret_cast<float*>(lse.data() + 3 * n));
    } else {  // double: the row LSE of s_c T I^T (the contrastive kernel on (T, I))
      using CE = typename C::E;
      TileOperands<typename C::in_t> ops{};
      ops.x[0] = sc.T.data();
      ops.y[0] = sc.I.data();
      ops.n = ops.m = n;
      ops.D = ops.ld = sc.ld;
      const Split cs = split_of(n, CE::BN, tps);
      std::vector<acc_t> cpart(cs.splits * n * 2, acc_t(4242));
      const acc_t zero = acc_t(0);
      launch(dim3(static_cast<unsigned>((n + CE::BM - 1) / CE::BM), static_cast<unsigned>(cs.splits)),
             CE::kThreads, CE::template smem_bytes<OneDotPair>(),
             &clip_lse_kernel<CE, typename C::in_t, false>, ops, &sc.s_c, &zero, cs.tiles_per_split,
             cpart.data(), static_cast<unsigned long long*>(nullptr));
      launch(dim3(2), 64, &merge_row_states_kernel<acc_t>, static_cast<const acc_t*>(cpart.data()),
             cs.splits, n, lse.data() + 3 * n);
    }
  }
  return to_double(lse);
}

template <class C, bool kM2, bool kClip>
void check_step(int64_t n, int64_t D, const std::vector<int64_t>& tps_list, std::mt19937& rng) {
  using E = typename C::E;
  using acc_t = typename E::acc_t;
  using ws_t = typename C::ws_t;
  const StepCase<C> sc(n, D, kM2, kClip, rng);
  const std::string terms = kM2 && kClip ? "m2+clip" : (kM2 ? "m2" : "clip");
  const auto lA = sc.lse(sc.A, false), lB = sc.lse(sc.B, false);
  const auto lR = sc.lse(sc.Cm, false), lC = sc.lse(sc.Cm, true);
  for (const int64_t tps : tps_list) {
    const std::string tag = cat(terms, " n=", n, " D=", D, " tps=", tps);
    const auto lse = run_step_lse<C, kM2, kClip>(sc, tps);
    auto row = [&](int k) { return std::vector<double>(lse.begin() + k * n, lse.begin() + (k + 1) * n); };
    if (kM2) {
      check_err(tag + " lse A", rel_err(lA, row(0)), C::tol);
      check_err(tag + " lse B", rel_err(lB, row(1)), C::tol);
    } else {
      RFT_CHECK_MSG(std::isnan(lse[0]) && std::isnan(lse[n]), tag, ": absent m^2 rows written");
    }
    if (kClip) {
      check_err(tag + " lse C rows", rel_err(lR, row(2)), C::tol);
      check_err(tag + " lse C cols", rel_err(lC, row(3)), C::tol);
    } else {
      RFT_CHECK_MSG(std::isnan(lse[2 * n]) && std::isnan(lse[3 * n]), tag, ": absent CLIP rows written");
    }

    // Backward: the reference statistics as the op passes them (absent rows NaN), in chunks.
    std::vector<acc_t> lse_in(4 * n, std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t p = 0; p < n; ++p) {
      if (kM2) {
        lse_in[p] = acc_t(lA[p]);
        lse_in[n + p] = acc_t(lB[p]);
      }
      if (kClip) {
        lse_in[2 * n + p] = acc_t(lR[p]);
        lse_in[3 * n + p] = acc_t(lC[p]);
      }
    }
    std::vector<std::pair<int64_t, int64_t>> chunks = {{0, n}};
    if (n > E::BM) chunks.push_back({E::BM, n - E::BM});
    for (const auto& ch : chunks) {
      const int64_t r0 = ch.first, rows = ch.second;
      const Split sp = split_of(n, E::BN, tps);
      const dim3 grid(static_cast<unsigned>((rows + E::BM - 1) / E::BM),
                      static_cast<unsigned>(sp.splits));
      std::vector<ws_t> dA(kM2 ? rows * n : 0, static_cast<ws_t>(3e3f)),
          dB(kM2 ? rows * n : 0, static_cast<ws_t>(3e3f)),
          dC(kClip ? rows * n : 0, static_cast<ws_t>(3e3f));
      std::vector<double> stats_part(size_t(grid.x) * grid.y * 2, 1e300);
      launch(grid, E::kThreads, step_smem<E, kM2, kClip>(),
             &step_dlogits_kernel<E, typename C::in_t, ws_t, kM2, kClip>, sc.operands(),
             sc.scalars(), static_cast<const acc_t*>(lse_in.data()), r0, rows, sp.tiles_per_split,
             kM2 ? dA.data() : nullptr, kM2 ? dB.data() : nullptr, kClip ? dC.data() : nullptr,
             stats_part.data());
      std::vector<double> rA(rows * n), rB(rows * n), rC(rows * n);
      double st_m = 0, st_c = 0, mag_m = 1e-300, mag_c = 1e-300;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t q = 0; q < n; ++q) {
          const int64_t p = r0 + i, e = i * n + q;
          if (kM2) {
            rA[e] = p == q ? 0.0 : std::exp(sc.A[p * n + q] - lA[p]);
            rB[e] = p == q ? 0.0 : std::exp(sc.B[p * n + q] - lB[p]);
            const double tA = rA[e] * sc.A[p * n + q] / double(sc.s_m);
            const double tB = rB[e] * sc.B[p * n + q] / double(sc.s_m);
            st_m += tA + tB;
            mag_m += std::fabs(tA) + std::fabs(tB);
          }
          if (kClip) {
            rC[e] = 0.5 * std::exp(sc.Cm[p * n + q] - lR[p]) + 0.5 * std::exp(sc.Cm[p * n + q] - lC[q]) -
                    (p == q ? 1.0 : 0.0);
            const double tC = rC[e] * sc.Cm[p * n + q] / double(sc.s_c);
            st_c += tC;
            mag_c += std::fabs(tC);
          }
        }
      double got_m = 0, got_c = 0;
      for (size_t b = 0; b < size_t(grid.x) * grid.y; ++b) {
        got_m += stats_part[2 * b];
        got_c += stats_part[2 * b + 1];
      }
      const std::string t = cat(tag, " rows [", r0, ", ", r0 + rows, ")");
      if (kM2) {
        check_err(t + " dA", rel_err(rA, to_double(dA)), C::ws_tol);
        check_err(t + " dB", rel_err(rB, to_double(dB)), C::ws_tol);
        check_err(t + " stats m2", std::fabs(got_m - st_m) / mag_m, C::tol);
      } else {
        RFT_CHECK_MSG(got_m == 0.0, t, ": stats of the absent m^2 term not 0: ", got_m);
      }
      if (kClip) {
        check_err(t + " dC", rel_err(rC, to_double(dC)), C::ws_tol);
        check_err(t + " stats clip", std::fabs(got_c - st_c) / mag_c, C::tol);
      } else {
        RFT_CHECK_MSG(got_c == 0.0, t, ": stats of the absent CLIP term not 0: ", got_c);
      }
    }
  }
}

template <class C>
void add_engine(const char* group, int64_t n, int64_t D, std::vector<int64_t> tps) {
  const std::string base = cat(group, "/n=", n, ",D=", D);
  rft_test::add_case(base + ",m2+clip", [=] {
    std::mt19937 rng(static_cast<unsigned>(n * 31 + D));
    g_worst_ratio = 0;
    check_step<C, true, true>(n, D, tps, rng);
    rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
  });
  rft_test::add_case(base + ",m2", [=] {
    std::mt19937 rng(static_cast<unsigned>(n * 37 + D));
    check_step<C, true, false>(n, D, tps, rng);
  });
  rft_test::add_case(base + ",clip", [=] {
    std::mt19937 rng(static_cast<unsigned>(n * 41 + D));
    check_step<C, false, true>(n, D, tps, rng);
  });
}

// ---- The row passes (row_device.cuh) -----------------------------------------------------
// Unit rows a_p, b_p at prescribed cosines: the Taylor branch, the middle, near the clamp at
// -1 + kSlerpCosEps and beyond it (not at it: there the rounding of c decides the branch).
template <typename in_t>
void pair_rows(int64_t n, int64_t D, std::mt19937_64& rng, std::vector<in_t>& a,
               std::vector<in_t>& b) {
  const double cosines[] = {1.0, 1.0 - 1e-12, 0.9999, 0.5, 0.0, -0.5, -0.999, -1.0 + 2e-6,
                            -1.0 + 4e-6, -1.0};
  std::normal_distribution<double> normal;
  a.assign(n * D, in_t(0));
  b.assign(n * D, in_t(0));
  for (int64_t p = 0; p < n; ++p) {
    std::vector<double> x(D), e(D);
    for (auto& v : x) v = normal(rng);
    for (auto& v : e) v = normal(rng);
    double nx = 0, xe = 0, ne = 0;
    for (int64_t j = 0; j < D; ++j) nx += x[j] * x[j];
    for (auto& v : x) v /= std::sqrt(nx);
    for (int64_t j = 0; j < D; ++j) xe += x[j] * e[j];
    for (int64_t j = 0; j < D; ++j) e[j] -= xe * x[j];
    for (int64_t j = 0; j < D; ++j) ne += e[j] * e[j];
    const double c = cosines[p % 10], s = std::sqrt(std::max(0.0, 1 - c * c));
    for (int64_t j = 0; j < D; ++j) {
      a[p * D + j] = in_t(x[j]);
      b[p * D + j] = in_t(c * x[j] + s * e[j] / std::sqrt(ne));
    }
  }
}

// mix_rows_kernel against the one-pass host formula: weights from maths::slerp_weights of the
// row dot in double (the kernel sums it in another order: equal to rounding), M = w_a a + w_b b
// rounded once to out_t (or not written: the weights alone).
template <typename in_t, typename out_t>
void check_mix_rows(int64_t n, int64_t D, double tol, bool with_m) {
  std::mt19937_64 rng(n * 131 + D);
  std::vector<in_t> a, b;
  pair_rows(n, D, rng, a, b);
  for (const double lam : {0.0, 0.3, 0.97, 1.0}) {
    std::vector<double> w(4 * n, 1e300);
    std::vector<out_t> M(with_m ? n * D : 0, out_t(1e30f));
    launch(dim3(2), kRowThreads, &mix_rows_kernel<in_t, out_t>, a.data(), b.data(), &lam, n, D,
           with_m ? M.data() : nullptr, w.data());
    for (int64_t p = 0; p < n; ++p) {
      double c = 0;
      for (int64_t j = 0; j < D; ++j) c += double(a[p * D + j]) * double(b[p * D + j]);
      const auto sw = robustft::maths::slerp_weights<double>(c, lam);
      const double ref[4] = {sw.wa, sw.wb, sw.dwa_dc, sw.dwb_dc};
      for (int k = 0; k < 4; ++k) {
        RFT_CHECK_MSG(std::fabs(w[k * n + p] - ref[k]) <= 1e-9 * (1 + std::fabs(ref[k])),
                      "mix weight ", k, " of row ", p, " lam ", lam, ": ", w[k * n + p], " vs ",
                      ref[k]);
      }
      // The mix from the kernel's own weights: near c = -1 they amplify the rounding of c,
      // which the check above bounds.
      for (int64_t j = 0; with_m && j < D; ++j) {
        const double m = w[p] * double(a[p * D + j]) + w[n + p] * double(b[p * D + j]);
        RFT_CHECK_MSG(std::fabs(double(M[p * D + j]) - m) <= tol * (1 + std::fabs(m)),
                      "mixed row ", p, " entry ", j, ": ", double(M[p * D + j]), " vs ", m);
      }
    }
  }
}

// mix_backward_kernel against the host formula of cpu/step_cpu.cpp's one-pass loop.
template <typename in_t, typename acc_t>
void check_mix_backward(int64_t n, int64_t D, double tol) {
  std::mt19937_64 rng(n * 7 + D);
  std::vector<in_t> a, b;
  pair_rows(n, D, rng, a, b);
  std::normal_distribution<double> normal;
  std::vector<acc_t> dM(n * D), g_pair(n), gI(n * D), gT(n * D);
  for (auto& v : dM) v = acc_t(normal(rng));
  for (auto& v : g_pair) v = acc_t(normal(rng));
  for (auto& v : gI) v = acc_t(normal(rng));
  for (auto& v : gT) v = acc_t(normal(rng));
  std::vector<double> w(4 * n);
  for (auto& v : w) v = normal(rng);
  std::vector<acc_t> gI0 = gI, gT0 = gT;
  launch(dim3(3), kRowThreads, &mix_backward_kernel<in_t, acc_t>, dM.data(), a.data(), b.data(),
         w.data(), g_pair.data(), n, D, gI.data(), gT.data());
  for (int64_t p = 0; p < n; ++p) {
    double da = 0, db = 0;
    for (int64_t j = 0; j < D; ++j) {
      da += double(dM[p * D + j]) * double(a[p * D + j]);
      db += double(dM[p * D + j]) * double(b[p * D + j]);
    }
    const double k = da * w[2 * n + p] + db * w[3 * n + p];
    for (int64_t j = 0; j < D; ++j) {
      const int64_t o = p * D + j;
      const double ri = double(gI0[o]) + double(g_pair[p]) * double(b[o]) + w[p] * double(dM[o]) +
                        k * double(b[o]);
      const double rt = double(gT0[o]) + double(g_pair[p]) * double(a[o]) +
                        w[n + p] * double(dM[o]) + k * double(a[o]);
      RFT_CHECK_MSG(std::fabs(double(gI[o]) - ri) <= tol * (1 + std::fabs(ri)) &&
                        std::fabs(double(gT[o]) - rt) <= tol * (1 + std::fabs(rt)),
                    "mix backward row ", p, " entry ", j);
    }
  }
}

// dive_sums_kernel's block partials, added in block order as the launcher adds them, against
// the host's double sums; twice, in two CTA orders, with bitwise the same partials.
template <typename in_t, typename acc_t>
void check_dive_sums(int64_t B, int64_t D, double tol) {
  std::mt19937_64 rng(B * 3 + D);
  std::normal_distribution<double> normal;
  std::vector<in_t> fi(B * D), ft(B * D), pi(B * D), pt(B * D);
  for (auto* v : {&fi, &ft, &pi, &pt})
    for (auto& x : *v) x = in_t(normal(rng));
  std::vector<acc_t> center(D);
  for (auto& x : center) x = acc_t(0.1 * normal(rng));
  const int64_t blocks = (B + kDiveRows - 1) / kDiveRows;
  std::vector<double> part[2], col[2];
  for (int run = 0; run < 2; ++run) {
    part[run].assign(2 * blocks, 1e300);
    col[run].assign(blocks * D, 1e300);
    launch(dim3(unsigned(blocks)), kRowThreads, &dive_sums_kernel<in_t, acc_t>, fi.data(),
           ft.data(), pi.data(), pt.data(), center.data(), B, D, part[run].data(),
           col[run].data());
  }
  RFT_CHECK_MSG(part[0] == part[1] && col[0] == col[1],
                "dive_sums partials depend on the order of the CTAs");
  double avl = 0, pvl = 0, ref_avl = 0, ref_pvl = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    avl += part[0][2 * k];
    pvl += part[0][2 * k + 1];
  }
  std::vector<double> mean(D, 0.0), ref_mean(D, 0.0);
  for (int64_t k = 0; k < blocks; ++k)
    for (int64_t e = 0; e < D; ++e) mean[e] += col[0][k * D + e];
  for (int64_t j = 0; j < B; ++j) {
    for (int64_t e = 0; e < D; ++e) {
      const int64_t o = j * D + e;
      const acc_t u = acc_t(fi[o]) - acc_t(pi[o]), v = acc_t(ft[o]) - acc_t(pt[o]);
      ref_avl += double(robustft::maths::dive_avl_entry(u, v, center[e]));
      ref_pvl += double(robustft::maths::dive_pvl_entry(u, v));
      ref_mean[e] += double(u) + double(v);
    }
  }
  check_err(cat("dive_sums avl B=", B), std::fabs(avl - ref_avl) / ref_avl, tol);
  check_err(cat("dive_sums pvl B=", B), std::fabs(pvl - ref_pvl) / ref_pvl, tol);
  check_err(cat("dive_sums mean B=", B), rel_err(ref_mean, mean), tol);
}

// dive_grads_kernel: maths::dive_entry_grads entry by entry (bitwise).
template <typename in_t, typename acc_t>
void check_dive_grads(int64_t B, int64_t D) {
  std::mt19937_64 rng(B + 5 * D);
  std::normal_distribution<double> normal;
  std::vector<in_t> fi(B * D), ft(B * D), pi(B * D), pt(B * D);
  for (auto* v : {&fi, &ft, &pi, &pt})
    for (auto& x : *v) x = in_t(normal(rng));
  std::vector<acc_t> center(D), gi(B * D, acc_t(1e30f)), gt(B * D, acc_t(1e30f));
  for (auto& x : center) x = acc_t(0.1 * normal(rng));
  const acc_t w_a = acc_t(0.37), w_p = acc_t(-1.25);
  launch(dim3(2), kRowThreads, &dive_grads_kernel<in_t, acc_t>, fi.data(), ft.data(), pi.data(),
         pt.data(), center.data(), &w_a, &w_p, B, D, gi.data(), gt.data());
  for (int64_t o = 0; o < B * D; ++o) {
    const acc_t u = acc_t(fi[o]) - acc_t(pi[o]), v = acc_t(ft[o]) - acc_t(pt[o]);
    acc_t ri, rt;
    robustft::maths::dive_entry_grads(u, v, center[o % D], w_a, w_p, &ri, &rt);
    RFT_CHECK_MSG(gi[o] == ri && gt[o] == rt, "dive gradient entry ", o, " differs");
  }
}

void add_row_cases() {
  using c10::BFloat16;
  using c10::Half;
  // 37 rows over 16 warps (2 blocks) and D = 70: a warp takes several rows, lanes a partial
  // last stride.
  rft_test::add_case("step_rows/mix_double", [] { check_mix_rows<double, double>(37, 70, 1e-15, true); });
  rft_test::add_case("step_rows/mix_float", [] { check_mix_rows<float, float>(37, 70, 1e-6, true); });
  rft_test::add_case("step_rows/mix_bf16", [] { check_mix_rows<BFloat16, BFloat16>(37, 70, 8e-3, true); });
  rft_test::add_case("step_rows/mix_f16_to_float", [] { check_mix_rows<Half, float>(37, 70, 1e-6, true); });
  rft_test::add_case("step_rows/mix_weights_only", [] { check_mix_rows<BFloat16, BFloat16>(21, 9, 0, false); });
  rft_test::add_case("step_rows/mix_backward_double", [] { check_mix_backward<double, double>(37, 70, 1e-13); });
  rft_test::add_case("step_rows/mix_backward_bf16", [] { check_mix_backward<BFloat16, float>(50, 33, 1e-5); });
  rft_test::add_case("step_rows/dive_sums_double", [] { check_dive_sums<double, double>(150, 40, 1e-13); });
  rft_test::add_case("step_rows/dive_sums_bf16", [] { check_dive_sums<BFloat16, float>(65, 300, 1e-12); });
  rft_test::add_case("step_rows/dive_grads_float", [] { check_dive_grads<float, float>(19, 37); });
  rft_test::add_case("step_rows/dive_grads_half", [] { check_dive_grads<Half, float>(7, 300); });
}

RFT_CASES(step_emulated) {
  // FMA engine: 64 x 64 (float) / 32 x 32 (double) tiles.
  add_engine<FfmaFloat>("step_ffma_float", 65, 17, {1, 1 << 20});
  add_engine<FfmaFloat>("step_ffma_float", 3, 5, {1 << 20});
  add_engine<FfmaDouble>("step_ffma_double", 70, 9, {2});
  // Tensor-core engine: 128 x 64 tiles; n = 200 leaves partial row and column tiles and a
  // second row chunk; D = 136 bf16 runs three K blocks, D = 72 tf32 three.
  add_engine<MmaBf16>("step_mma_bf16", 200, 136, {1, 1 << 20});
  add_engine<MmaBf16>("step_mma_bf16", 1, 8, {1 << 20});
  add_engine<MmaF16>("step_mma_f16", 130, 24, {2});
  add_engine<MmaBf16Small>("step_mma_bf16_small", 130, 136, {1, 1 << 20});
  add_engine<MmaTf32>("step_mma_tf32", 150, 72, {1});
  add_row_cases();
}

}  // namespace
