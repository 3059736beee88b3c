// The m^2-mix CUDA kernels of csrc/cuda/m2mix_device.cuh, compiled by the host C++
// compiler and run on the CPU emulation of emu.h (no nvcc, no CUDA toolkit, no GPU): the
// same kernel source the GPU build compiles, launched the way the launchers of
// csrc/cuda/m2mix_cuda.cu compose them, and compared with double-precision references
// written here as plain loops over the full n x n matrices A, B, C of m2mix_kernels.h,
// from the (rounded) inputs. See emu.h for what the emulation covers and cannot check.
//
// What is checked, per dtype (float, double, c10::Half, c10::BFloat16), shape and column
// split (tiles_per_split, including one split for every tile), with and without clip:
//   * m2mix_lse_kernel + merge_row_states_kernel: lse[0..2] (row LSEs of A, B, C, with the
//     true pair substituted on the diagonal of A and B); lse[3] (column LSE of C) through
//     init / packed atomic merge / finalize_col_states_kernel (float accumulation) or the
//     second, transposed clip_lse_kernel pass (double), as launch_lse does;
//   * m2mix_grad_kernel, row view: grad_I, grad_T and both stats sums; column view:
//     grad_M and (with clip) grad_Tc. Split buffers start with garbage (every entry must
//     be written) and the first split setting of a case adds an empty split (its slices
//     must be written with zeros);
//   * slerp_weights_kernel against maths::slerp_weights on the host (bitwise: the
//     emulation evaluates the same function with the same libm), over cosines at and
//     beyond the clamps and around the small-angle threshold.
// Shapes sit at tile edges: n in {1, 3, 65, 130}, D in {1, 17, 70} (tiles are 64 x 64 for
// float accumulation, 32 x 32 for double; BK = 16).
//
// Usage: robustft_m2mix_emulated_tests [--list | GROUP...] (harness.h); groups are
// m2mix_emu_float, m2mix_emu_double, m2mix_emu_half, m2mix_emu_bf16, m2mix_emu_slerp.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/m2mix_device.cuh"
#include "harness.h"
#include "robustft_maths.h"

namespace {

using namespace robustft::cuda_tiles;
using cuda_emu::launch;
using rft_test::cat;

template <typename acc_t>
constexpr double tol_of() {
  return std::is_same<acc_t, double>::value ? 1e-11 : 2e-5;
}

// max |ref - got| / max |ref| (matching infinities count as equal).
double rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double err = 0, mag = 1e-300;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i]) && ref[i] == got[i]) continue;
    err = std::max(err, std::fabs(ref[i] - got[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  return std::isnan(err) ? INFINITY : err / mag;
}

// max |ref - got| / max mag (mag: the sum of the magnitudes of ref's terms).
double err_vs(const std::vector<double>& ref, const std::vector<double>& mag,
              const std::vector<double>& got) {
  double err = 0, m = 1e-300;
  for (size_t e = 0; e < ref.size(); ++e) {
    err = std::max(err, std::fabs(got[e] - ref[e]));
    m = std::max(m, mag[e]);
  }
  return std::isnan(err) ? INFINITY : err / m;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
  return out;
}

double g_worst_ratio = 0;  // largest error / tolerance of the running case
std::string g_worst_what;

void check_err(const std::string& what, double err, double tol) {
  RFT_CHECK_MSG(err <= tol, what, ": error ", err, " > tolerance ", tol);
  if (!(err / tol <= g_worst_ratio)) {
    g_worst_ratio = err / tol;
    g_worst_what = what;
  }
}

// One m^2-mix problem: I, T [n, D] unit rows, M = slerp(I, T; lam) (made in double with
// maths::slerp_weights, then rounded like the op body's buffer), diag = s_m <I_p, T_p>.
template <typename scalar_t>
struct Problem {
  using acc_t = acc_of_t<scalar_t>;
  int64_t n, D;
  std::vector<scalar_t> I, T, M;
  std::vector<double> Id, Td, Md;  // as stored (rounded to scalar_t), in double
  acc_t s_m, s_c;
  std::vector<acc_t> diag;
  std::vector<double> A, B, C;  // n x n logits, in double

  Problem(int64_t n_, int64_t D_, double s_m_, double s_c_, double lam, std::mt19937& rng)
      : n(n_), D(D_), s_m(static_cast<acc_t>(s_m_)), s_c(static_cast<acc_t>(s_c_)) {
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> i0(n * D), t0(n * D);
    for (int64_t p = 0; p < n; ++p) {
      double ni = 0, nt = 0;
      for (int64_t k = 0; k < D; ++k) {
        i0[p * D + k] = nd(rng);
        // Captions near their image, as after training (and one pair identical).
        t0[p * D + k] = p == 1 ? i0[p * D + k] : 0.6 * i0[p * D + k] + nd(rng);
        ni += i0[p * D + k] * i0[p * D + k];
        nt += t0[p * D + k] * t0[p * D + k];
      }
      for (int64_t k = 0; k < D; ++k) {
        I.push_back(static_cast<scalar_t>(i0[p * D + k] / std::sqrt(ni)));
        T.push_back(static_cast<scalar_t>(t0[p * D + k] / std::sqrt(nt)));
      }
    }
    Id = to_double(I);
    Td = to_double(T);
    for (int64_t p = 0; p < n; ++p) {
      const auto w = robustft::maths::slerp_weights<double>(dot(Id, p, Td, p), lam);
      for (int64_t k = 0; k < D; ++k)
        M.push_back(static_cast<scalar_t>(w.wa * Id[p * D + k] + w.wb * Td[p * D + k]));
    }
    Md = to_double(M);
    for (int64_t p = 0; p < n; ++p) diag.push_back(static_cast<acc_t>(s_m * dot(Id, p, Td, p)));
    A.resize(n * n);
    B.resize(n * n);
    C.resize(n * n);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) {
        A[p * n + q] = p == q ? double(diag[p]) : double(s_m) * dot(Id, p, Md, q);
        B[p * n + q] = p == q ? double(diag[p]) : double(s_m) * dot(Td, p, Md, q);
        C[p * n + q] = double(s_c) * dot(Id, p, Td, q);
      }
  }
  double dot(const std::vector<double>& X, int64_t p, const std::vector<double>& Y,
             int64_t q) const {
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += X[p * D + k] * Y[q * D + k];
    return s;
  }
  // LSE over each row (over_cols false: over q for each p) or each column of L.
  std::vector<double> lse(const std::vector<double>& L, bool over_rows) const {
    std::vector<double> out(n);
    for (int64_t a = 0; a < n; ++a) {
      auto s = [&](int64_t b) { return over_rows ? L[b * n + a] : L[a * n + b]; };
      double mx = -INFINITY, sum = 0;
      for (int64_t b = 0; b < n; ++b) mx = std::max(mx, s(b));
      for (int64_t b = 0; b < n; ++b) sum += std::exp(s(b) - mx);
      out[a] = mx + std::log(sum);
    }
    return out;
  }
  // lse [4, n] (rows 2-3 for clip), as m2mix_kernels.h defines it.
  std::vector<double> ref_lse() const {
    std::vector<double> out;
    for (const auto& v : {lse(A, false), lse(B, false), lse(C, false), lse(C, true)})
      out.insert(out.end(), v.begin(), v.end());
    return out;
  }
};

// tiles_per_split consecutive tiles per CTA (capped by the tile count), every split
// non-empty, as plan_column_split makes it.
ColumnSplit split_of(int64_t n, int BM, int BN, int64_t tps) {
  ColumnSplit s;
  s.row_blocks = (n + BM - 1) / BM;
  s.col_tiles = (n + BN - 1) / BN;
  s.tiles_per_split = std::min(tps, s.col_tiles);
  s.splits = (s.col_tiles + s.tiles_per_split - 1) / s.tiles_per_split;
  return s;
}

dim3 grid_of(const ColumnSplit& s, int64_t extra_splits = 0) {
  return dim3(static_cast<unsigned>(s.row_blocks), static_cast<unsigned>(s.splits + extra_splits));
}

// launch_lse of m2mix_cuda.cu: lse [K + clip, n] flattened.
template <typename scalar_t>
std::vector<double> run_lse(const Problem<scalar_t>& pr, bool clip, int64_t tps) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  constexpr bool kFloatAcc = std::is_same<acc_t, float>::value;
  const int64_t n = pr.n, D = pr.D, K = clip ? 3 : 2;
  const ColumnSplit sp = split_of(n, Tl::BM, Tl::BN, tps);
  std::vector<acc_t> part(K * sp.splits * n * 2, acc_t(12345));  // garbage: must be written
  std::vector<acc_t> lse((clip ? 4 : 2) * n, acc_t(777));
  std::vector<unsigned long long> state(n, 0x5555555555555555ull);  // garbage
  if (clip && kFloatAcc) launch(dim3(1), 32, &init_col_states_kernel, state.data(), n);
  auto run = [&](auto kernel) {
    launch(grid_of(sp), kThreads, kernel, pr.I.data(), pr.T.data(), pr.M.data(), n, D,
           pr.diag.data(), &pr.s_m, &pr.s_c, sp.tiles_per_split, part.data(),
           clip && kFloatAcc ? state.data() : static_cast<unsigned long long*>(nullptr));
  };
  if (!clip) {
    run(&m2mix_lse_kernel<scalar_t, acc_t, false, false>);
  } else if constexpr (kFloatAcc) {
    run(&m2mix_lse_kernel<scalar_t, acc_t, true, true>);
  } else {
    run(&m2mix_lse_kernel<scalar_t, acc_t, true, false>);
  }
  // (The elementwise kernels get fewer and smaller blocks than the launcher's, so that
  // their grid-stride loops wrap.)
  for (int64_t k = 0; k < K; ++k)
    launch(dim3(2), 64, &merge_row_states_kernel<acc_t>,
           static_cast<const acc_t*>(part.data() + k * sp.splits * n * 2), sp.splits, n,
           lse.data() + k * n);
  if (clip) {
    if constexpr (kFloatAcc) {
      launch(dim3(3), 32, &finalize_col_states_kernel,
             static_cast<const unsigned long long*>(state.data()), n, lse.data() + 3 * n);
    } else {
      const acc_t zero = 0;
      std::vector<acc_t> part_t(sp.splits * n * 2, acc_t(12345));
      launch(grid_of(sp), kThreads, &clip_lse_kernel<scalar_t, acc_t, false>, pr.T.data(),
             pr.I.data(), n, n, D, &pr.s_c, &zero, sp.tiles_per_split, part_t.data(),
             static_cast<unsigned long long*>(nullptr));
      launch(dim3(2), 64, &merge_row_states_kernel<acc_t>,
             static_cast<const acc_t*>(part_t.data()), sp.splits, n, lse.data() + 3 * n);
    }
  }
  return to_double(lse);
}

template <typename scalar_t>
void check_lse(const Problem<scalar_t>& pr, bool clip, int64_t tps, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const int64_t n = pr.n;
  const auto ref = pr.ref_lse();
  const auto got = run_lse(pr, clip, tps);
  const char* names[] = {"lse[0] (rows of A)", "lse[1] (rows of B)", "lse[2] (rows of C)",
                         "lse[3] (columns of C)"};
  for (int k = 0; k < (clip ? 4 : 2); ++k) {
    const std::vector<double> r(ref.begin() + k * n, ref.begin() + (k + 1) * n);
    const std::vector<double> g(got.begin() + k * n, got.begin() + (k + 1) * n);
    check_err(tag + " " + names[k], rel_err(r, g), tol_of<acc_t>());
  }
}

// One m2mix_grad_kernel view (launch_grad of m2mix_cuda.cu): the outputs summed over the
// splits. out1 (empty: not requested) and stats (null: not requested).
template <typename scalar_t, bool kTransposed>
void run_grad(const Problem<scalar_t>& pr, bool clip, const std::vector<double>& lse_d,
              double g_m, double g_c, int64_t tps, int extra_splits, std::vector<double>& out0,
              std::vector<double>* out1, double* stats) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  const int64_t n = pr.n, D = pr.D;
  const std::vector<acc_t> lse(lse_d.begin(), lse_d.begin() + (clip ? 4 : 2) * n);
  const acc_t grads[2] = {static_cast<acc_t>(g_m), static_cast<acc_t>(g_c)};
  const ColumnSplit sp = split_of(n, Tl::BM, Tl::BN, tps);
  const dim3 grid = grid_of(sp, extra_splits);  // extra splits hold no tile
  const int64_t splits = grid.y;
  std::vector<acc_t> t0(splits * n * D, acc_t(1e6)), t1;  // garbage: must be written
  if (out1 != nullptr) t1.assign(splits * n * D, acc_t(-1e6));
  std::vector<double> stats_part(size_t(grid.x) * grid.y * 2, 1e300);
  auto kernel = clip ? &m2mix_grad_kernel<scalar_t, acc_t, true, kTransposed>
                     : &m2mix_grad_kernel<scalar_t, acc_t, false, kTransposed>;
  launch(grid, kThreads, kernel, pr.I.data(), pr.T.data(), pr.M.data(), n, D,
         static_cast<const acc_t*>(grads), &pr.s_m, &pr.s_c, lse.data(), sp.tiles_per_split,
         t0.data(), out1 != nullptr ? t1.data() : static_cast<acc_t*>(nullptr),
         stats != nullptr ? stats_part.data() : static_cast<double*>(nullptr));
  auto reduce = [&](const std::vector<acc_t>& t, std::vector<double>& out) {
    out.assign(n * D, 0.0);
    for (int64_t s = 0; s < splits; ++s)
      for (int64_t e = 0; e < n * D; ++e) out[e] += static_cast<double>(t[s * n * D + e]);
  };
  reduce(t0, out0);
  if (out1 != nullptr) reduce(t1, *out1);
  if (stats != nullptr) {
    stats[0] = stats[1] = 0;
    for (size_t b = 0; b < size_t(grid.x) * grid.y; ++b) {
      stats[0] += stats_part[2 * b];
      stats[1] += stats_part[2 * b + 1];
    }
  }
}

template <typename scalar_t>
void check_grad(const Problem<scalar_t>& pr, bool clip, double g_m, double g_c, int64_t tps,
                int extra_splits, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const int64_t n = pr.n, D = pr.D;
  const auto lse = pr.ref_lse();
  const double* l0 = &lse[0];
  const double* l1 = &lse[n];
  const double* l2 = &lse[2 * n];
  const double* l3 = &lse[3 * n];
  const double sm = double(pr.s_m), sc = double(pr.s_c), wm = g_m / (2.0 * n),
               wc = clip ? g_c / (2.0 * n) : 0.0;
  // References with, per output, the sum of the magnitudes of its terms (the errors are
  // relative to those; a gradient may cancel to about 0).
  std::vector<double> gI(n * D, 0), gI_mag(n * D, 0), gT(n * D, 0), gT_mag(n * D, 0),
      gM(n * D, 0), gM_mag(n * D, 0), gTc(n * D, 0), gTc_mag(n * D, 0);
  double st0 = 0, st1 = 0, st0_mag = 0, st1_mag = 0;
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = 0; q < n; ++q) {
      const double da = p == q ? 0.0 : wm * std::exp(pr.A[p * n + q] - l0[p]);
      const double db = p == q ? 0.0 : wm * std::exp(pr.B[p * n + q] - l1[p]);
      double dc = 0, dc_mag = 0;
      if (clip) {
        const double e = std::exp(pr.C[p * n + q] - l2[p]) + std::exp(pr.C[p * n + q] - l3[q]);
        dc = wc * e - (p == q ? 2.0 * wc : 0.0);
        dc_mag = std::fabs(wc) * (e + (p == q ? 2.0 : 0.0));
      }
      const double dIM = pr.dot(pr.Id, p, pr.Md, q), dTM = pr.dot(pr.Td, p, pr.Md, q),
                   dIT = pr.dot(pr.Id, p, pr.Td, q);
      st0 += da * dIM + db * dTM;
      st0_mag += std::fabs(da * dIM) + std::fabs(db * dTM);
      st1 += dc * dIT;
      st1_mag += dc_mag * std::fabs(dIT);
      for (int64_t k = 0; k < D; ++k) {
        const double Ip = pr.Id[p * D + k], Tp = pr.Td[p * D + k], Mq = pr.Md[q * D + k],
                     Tq = pr.Td[q * D + k];
        gI[p * D + k] += sm * da * Mq + sc * dc * Tq;
        gI_mag[p * D + k] += std::fabs(sm * da * Mq) + std::fabs(sc * dc_mag * Tq);
        gT[p * D + k] += sm * db * Mq;
        gT_mag[p * D + k] += std::fabs(sm * db * Mq);
        gM[q * D + k] += sm * (da * Ip + db * Tp);
        gM_mag[q * D + k] += std::fabs(sm * da * Ip) + std::fabs(sm * db * Tp);
        gTc[q * D + k] += sc * dc * Ip;
        gTc_mag[q * D + k] += std::fabs(sc * dc_mag * Ip);
      }
    }
  const double tol = tol_of<acc_t>();
  const std::string t = tag + (clip ? " [clip]" : " [no clip]");
  std::vector<double> got_I, got_T, got_M, got_Tc;
  double stats[2];
  run_grad<scalar_t, false>(pr, clip, lse, g_m, g_c, tps, extra_splits, got_I, &got_T, stats);
  check_err(t + " grad_I", err_vs(gI, gI_mag, got_I), tol);
  check_err(t + " grad_T", err_vs(gT, gT_mag, got_T), tol);
  check_err(t + " stats[0]", std::fabs(stats[0] - st0) / std::max(st0_mag, 1e-300), tol);
  if (clip) {
    check_err(t + " stats[1]", std::fabs(stats[1] - st1) / std::max(st1_mag, 1e-300), tol);
  } else {
    RFT_CHECK_MSG(stats[1] == 0.0, t, " stats[1] without clip: ", stats[1]);
  }
  run_grad<scalar_t, true>(pr, clip, lse, g_m, g_c, tps, extra_splits, got_M,
                           clip ? &got_Tc : nullptr, nullptr);
  check_err(t + " grad_M", err_vs(gM, gM_mag, got_M), tol);
  if (clip) check_err(t + " grad_Tc", err_vs(gTc, gTc_mag, got_Tc), tol);
}

struct Shape {
  int64_t n, D;
  std::vector<int64_t> tps;  // tiles per split to run; kAll: one split for all tiles
};
constexpr int64_t kAll = int64_t(1) << 20;

template <typename scalar_t>
void run_case(const Shape& sh) {
  g_worst_ratio = 0;
  std::mt19937 rng(static_cast<unsigned>(sh.n * 1009 + sh.D));
  // The paper's scales: s_m = 1/0.07 for the mix term, 100 for CLIP.
  const Problem<scalar_t> pr(sh.n, sh.D, 1.0 / 0.07, 100.0, 0.3, rng);
  for (size_t k = 0; k < sh.tps.size(); ++k) {
    const int64_t tps = sh.tps[k];
    const std::string tag = tps == kAll ? "[one split]" : cat("[tiles_per_split=", tps, "]");
    for (const bool clip : {false, true}) {
      check_lse(pr, clip, tps, tag);
      // The first split setting adds an empty split to one of the clip modes.
      const int extra = (k == 0 && clip == (sh.n % 2 == 1)) ? 1 : 0;
      check_grad(pr, clip, 0.7, -1.3, tps, extra, extra ? tag + "[+empty split]" : tag);
    }
  }
  rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
}

template <typename scalar_t>
void add_cases(const char* group, const std::vector<Shape>& shapes) {
  for (const Shape& sh : shapes) {
    std::string name = cat(group, "/n=", sh.n, ",D=", sh.D, ",tps=");
    for (size_t k = 0; k < sh.tps.size(); ++k)
      name += (k ? "|" : "") + (sh.tps[k] == kAll ? std::string("all") : std::to_string(sh.tps[k]));
    rft_test::add_case(name, [sh] { run_case<scalar_t>(sh); });
  }
}

// slerp_weights_kernel against maths::slerp_weights evaluated on the host.
template <typename acc_t>
void check_slerp() {
  std::vector<acc_t> cos = {acc_t(-1.5), acc_t(-1), acc_t(-1 + 1e-7), acc_t(-1 + 1e-5),
                            acc_t(-0.5), acc_t(0), acc_t(0.3), acc_t(0.9),
                            acc_t(0.99), acc_t(0.997), acc_t(0.9975), acc_t(0.999),
                            acc_t(1 - 1e-6), acc_t(1 - 1e-9), acc_t(1), acc_t(1.0000001),
                            acc_t(1.5)};
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> ud(-1.0, 1.0);
  for (int i = 0; i < 300; ++i) cos.push_back(static_cast<acc_t>(ud(rng)));
  const int64_t n = static_cast<int64_t>(cos.size());
  for (const double lam_d : {0.0, 0.3, 0.5, 1.0}) {
    const acc_t lam = static_cast<acc_t>(lam_d);
    std::vector<acc_t> out(4 * n, acc_t(-999));
    launch(dim3(2), 64, &slerp_weights_kernel<acc_t>, static_cast<const acc_t*>(cos.data()),
           static_cast<const acc_t*>(&lam), n, out.data());
    for (int64_t p = 0; p < n; ++p) {
      const auto w = robustft::maths::slerp_weights<acc_t>(cos[p], lam);
      const acc_t want[4] = {w.wa, w.wb, w.dwa_dc, w.dwb_dc};
      for (int k = 0; k < 4; ++k) {
        const acc_t got = out[k * n + p];
        RFT_CHECK_MSG(got == want[k] || (std::isnan(got) && std::isnan(want[k])),
                      "slerp_weights(cos = ", cos[p], ", lam = ", lam, ")[", k, "] = ", got,
                      ", want ", want[k]);
        RFT_CHECK_MSG(std::isfinite(got), "slerp_weights(cos = ", cos[p], ", lam = ", lam,
                      ")[", k, "] is not finite: ", got);
      }
    }
  }
}

RFT_CASES(m2mix_emulated) {
  // float accumulation: 64 x 64 tiles, so 65 and 130 leave a 1- and 2-wide last tile, and
  // tiles_per_split = 2 over 3 tiles leaves an uneven last split.
  add_cases<float>("m2mix_emu_float", {
      {1, 1, {kAll}},
      {3, 17, {1}},
      {65, 70, {1, kAll}},
      {130, 17, {2, 1}},
      {130, 1, {kAll}},
  });
  // double accumulation: 32 x 32 tiles (65: 3 tiles, 130: 5).
  add_cases<double>("m2mix_emu_double", {
      {1, 17, {kAll}},
      {3, 1, {1}},
      {65, 70, {2, kAll}},
      {130, 17, {2}},
  });
  add_cases<c10::Half>("m2mix_emu_half", {{65, 17, {1}}, {130, 70, {kAll}}});
  add_cases<c10::BFloat16>("m2mix_emu_bf16", {{3, 70, {kAll}}, {130, 17, {2}}});
  rft_test::add_case("m2mix_emu_slerp/float", [] { check_slerp<float>(); });
  rft_test::add_case("m2mix_emu_slerp/double", [] { check_slerp<double>(); });
}

}  // namespace
