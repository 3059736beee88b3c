// The step CUDA kernels of csrc/cuda/step_device.cuh (CLIP, m^2-mix, Lipsum-FT, DiVE in
// one pass), compiled by the host C++ compiler and run on the CPU emulation of emu.h (no
// nvcc, no CUDA toolkit, no GPU): the same kernel source the GPU build compiles, launched
// the way the launchers of csrc/cuda/step_cuda.cu compose them, and compared with
// double-precision references written here as plain loops over the full matrices A, B, C
// (n x n) and V (n x K) of step_kernels.h, from the (rounded) inputs. See emu.h for what
// the emulation covers and cannot check.
//
// What is checked, per dtype (float, double, c10::Half, c10::BFloat16), shape, column
// split (tiles_per_split, including one split for every tile) and every combination of
// the terms (m^2, CLIP, Lipsum, DiVE; 15 in all, DiVE alone with no training batch):
//   * step_fwd_kernel + merge_row_states_kernel: lse[0..2] (row LSEs of A, B, C, the true
//     pair substituted on the diagonal of A and B); lse[3] (column LSE of C) through init /
//     packed atomic merge / finalize_col_states_kernel (float accumulation) or the second,
//     transposed clip_lse_kernel pass (double), as launch_fwd does; sums [3] (Lipsum sum of
//     squares, AVL and PVL sums) and diff_mean from the per-CTA partials;
//   * step_grad_kernel, row view: grad_I (with the Lipsum gradient), grad_T (zeros
//     without m^2), both stats sums (exactly 0 for an absent term), grad_fi, grad_ft;
//     column view: grad_M and grad_Tc for the terms that are on;
//   * absent terms never enter: their lse rows and upstream gradients are NaN, their
//     scales and inputs null pointers;
//   * every output buffer starts with garbage (every entry must be written), and the first
//     split setting of a case adds an empty column split to the backward passes (its
//     slices must be written with zeros);
//   * slerp_weights_kernel against maths::slerp_weights on the host (bitwise).
// Shapes sit at tile edges: n in {1, 3, 65, 130}, K in {1, 7, 80}, B' in {1, 5, 70},
// D in {1, 17, 70} (tiles are 64 x 64 for float accumulation, 32 x 32 for double; BK = 16;
// 16 DiVE rows per CTA).
//
// Usage: robustft_step_emulated_tests [--list | GROUP...] (harness.h); groups are
// step_emu_float, step_emu_double, step_emu_half, step_emu_bf16, step_emu_slerp.
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

#include "cuda/step_device.cuh"
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

// Which terms a step has.
struct Terms {
  bool m2, clip, lip, dive;
  bool tiles() const { return m2 || clip; }
  bool batch() const { return m2 || clip || lip; }
  std::string name() const {
    std::string s;
    for (auto [on, what] : {std::pair<bool, const char*>{m2, "m2"}, {clip, "clip"},
                            {lip, "lipsum"}, {dive, "dive"}})
      if (on) s += (s.empty() ? "" : "+") + std::string(what);
    return "[" + s + "]";
  }
};

// One step problem: I, T [n, D] unit rows, M = slerp(I, T; lam) (made in double with
// maths::slerp_weights, then rounded like the op body's buffer), diag = s_m <I_p, T_p>;
// Lipsum: P [n, D] near I, G [K, D] unit rows; DiVE: B' reference rows, fine-tuned
// features near the pre-trained ones, a small centre.
template <typename scalar_t>
struct Problem {
  using acc_t = acc_of_t<scalar_t>;
  int64_t n, D, K, nr;
  std::vector<scalar_t> I, T, M, P, G, fi, ft, pi, pt;
  std::vector<double> Id, Td, Md, Pd, Gd, fid, ftd, pid, ptd;  // as stored, in double
  acc_t s_m, s_c, s_l;
  std::vector<acc_t> diag, center;
  std::vector<double> A, B, C, V;  // n x n logits, n x K Lipsum entries, in double

  Problem(int64_t n_, int64_t D_, int64_t K_, int64_t nr_, double lam, std::mt19937& rng)
      : n(n_), D(D_), K(K_), nr(nr_), s_m(static_cast<acc_t>(1.0 / 0.07)),
        s_c(static_cast<acc_t>(100.0)), s_l(static_cast<acc_t>(1.0 / 0.07)) {
    std::normal_distribution<double> nd(0.0, 1.0);
    auto unit_rows = [&](int64_t rows, std::vector<double>& out) {
      out.assign(rows * D, 0.0);
      for (int64_t p = 0; p < rows; ++p) {
        double nn = 0;
        for (int64_t k = 0; k < D; ++k) nn += (out[p * D + k] = nd(rng)) * out[p * D + k];
        for (int64_t k = 0; k < D; ++k) out[p * D + k] /= std::sqrt(nn);
      }
    };
    auto store = [](const std::vector<double>& x, std::vector<scalar_t>& s, std::vector<double>& d) {
      s.clear();
      for (double v : x) s.push_back(static_cast<scalar_t>(v));
      d = to_double(s);
    };
    std::vector<double> i0, t0, g0, p0(n * D), a0, b0, fi0(nr * D), ft0(nr * D);
    unit_rows(n, i0);
    unit_rows(n, t0);
    for (int64_t p = 0; p < n; ++p)  // captions near their image (and one pair identical)
      for (int64_t k = 0; k < D; ++k)
        t0[p * D + k] = p == 1 ? i0[p * D + k] : 0.6 * i0[p * D + k] + 0.8 * t0[p * D + k];
    for (int64_t p = 0; p < n; ++p) {
      double nt = 0;
      for (int64_t k = 0; k < D; ++k) nt += t0[p * D + k] * t0[p * D + k];
      for (int64_t k = 0; k < D; ++k) t0[p * D + k] /= std::sqrt(nt);
    }
    store(i0, I, Id);
    store(t0, T, Td);
    // Pre-trained features close to the fine-tuned ones (the regime of the losses).
    for (int64_t e = 0; e < n * D; ++e) p0[e] = i0[e] + 0.05 * nd(rng) / std::sqrt(double(D));
    store(p0, P, Pd);
    unit_rows(K, g0);
    store(g0, G, Gd);
    unit_rows(nr, a0);
    unit_rows(nr, b0);
    for (int64_t e = 0; e < nr * D; ++e) {
      fi0[e] = a0[e] + 0.1 * nd(rng) / std::sqrt(double(D));
      ft0[e] = b0[e] + 0.1 * nd(rng) / std::sqrt(double(D));
    }
    store(fi0, fi, fid);
    store(a0, pi, pid);
    store(ft0, ft, ftd);
    store(b0, pt, ptd);
    for (int64_t k = 0; k < D; ++k) center.push_back(static_cast<acc_t>(0.02 * nd(rng)));
    std::vector<double> m0;
    for (int64_t p = 0; p < n; ++p) {
      const auto w = robustft::maths::slerp_weights<double>(dot(Id, p, Td, p), lam);
      for (int64_t k = 0; k < D; ++k) m0.push_back(w.wa * Id[p * D + k] + w.wb * Td[p * D + k]);
    }
    store(m0, M, Md);
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
    V.resize(n * K);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += (Id[p * D + d] - Pd[p * D + d]) * Gd[k * D + d];
        V[p * K + k] = s;  // <I_p - P_p, G_k> (without s_l)
      }
  }
  double dot(const std::vector<double>& X, int64_t p, const std::vector<double>& Y,
             int64_t q) const {
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += X[p * D + k] * Y[q * D + k];
    return s;
  }
  // LSE over each row (over_rows false: over q for each p) or each column of L.
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
  // lse [4, n] as step_kernels.h defines it; rows of absent terms NaN.
  std::vector<double> ref_lse(const Terms& f) const {
    std::vector<double> out(4 * n, NAN);
    auto put = [&](int r, const std::vector<double>& v) {
      std::copy(v.begin(), v.end(), out.begin() + r * n);
    };
    if (f.m2) {
      put(0, lse(A, false));
      put(1, lse(B, false));
    }
    if (f.clip) {
      put(2, lse(C, false));
      put(3, lse(C, true));
    }
    return out;
  }
  // The kernels' view (step_dev of step_cuda.cu); the plan is set by the caller.
  StepDev<scalar_t, acc_t> dev(const Terms& f) const {
    StepDev<scalar_t, acc_t> a{};
    a.n = f.batch() ? n : 0;
    a.D = D;
    if (f.batch()) a.I = I.data();
    if (f.tiles()) a.T = T.data();
    if (f.m2) {
      a.M = M.data();
      a.diag = diag.data();
      a.m2_scale = &s_m;
    }
    if (f.clip) a.clip_scale = &s_c;
    if (f.lip) {
      a.P = P.data();
      a.G = G.data();
      a.K = K;
      a.lip_scale = &s_l;
    }
    if (f.dive) {
      a.fi = fi.data();
      a.ft = ft.data();
      a.pi = pi.data();
      a.pt = pt.data();
      a.center = center.data();
      a.n_ref = nr;
    }
    return a;
  }
};

// tiles_per_split consecutive tiles per CTA (capped by the tile count), every split
// non-empty, as plan_column_split makes it; without tiles one CTA per row block.
ColumnSplit split_of(int64_t n, int BM, int BN, int64_t tps, bool tiles) {
  ColumnSplit s;
  s.row_blocks = (n + BM - 1) / BM;
  if (!tiles) {
    s.col_tiles = s.tiles_per_split = 0;
    s.splits = 1;
    return s;
  }
  s.col_tiles = (n + BN - 1) / BN;
  s.tiles_per_split = std::min(tps, s.col_tiles);
  s.splits = (s.col_tiles + s.tiles_per_split - 1) / s.tiles_per_split;
  return s;
}

template <typename D>
void set_plan(D& a, const ColumnSplit& s, int64_t extra_splits = 0) {
  a.row_blocks = s.row_blocks;
  a.splits = s.splits + extra_splits;
  a.tiles_per_split = s.tiles_per_split;
}

int64_t dive_ctas(const Terms& f, int64_t nr) { return f.dive ? (nr + kDiveRows - 1) / kDiveRows : 0; }

struct FwdOut {
  std::vector<double> lse, sums, diff_mean;
};

// launch_fwd of step_cuda.cu.
template <typename scalar_t>
FwdOut run_fwd(const Problem<scalar_t>& pr, const Terms& f, int64_t tps) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  constexpr bool kFloatAcc = std::is_same<acc_t, float>::value;
  auto a = pr.dev(f);
  const int64_t n = a.n, D = pr.D;
  const ColumnSplit sp = split_of(n, Tl::BM, Tl::BN, tps, f.tiles());
  set_plan(a, sp);
  const int64_t train = sp.row_blocks * sp.splits, extra = dive_ctas(f, pr.nr);
  const int64_t R = (f.m2 ? 2 : 0) + (f.clip ? 1 : 0);
  std::vector<acc_t> part(R * sp.splits * n * 2, acc_t(12345));  // garbage: must be written
  std::vector<acc_t> lse(4 * n, acc_t(NAN));
  std::vector<unsigned long long> state(n, 0x5555555555555555ull);  // garbage
  std::vector<double> sums_part((train + extra) * 3, 1e300);
  std::vector<acc_t> mean_part(extra * D, acc_t(-777));
  if (f.clip && kFloatAcc && n > 0) launch(dim3(1), 32, &init_col_states_kernel, state.data(), n);
  auto run = [&](auto kernel) {
    launch(dim3(static_cast<unsigned>(train + extra)), kThreads, kernel, a,
           R > 0 ? part.data() : static_cast<acc_t*>(nullptr),
           f.clip && kFloatAcc ? state.data() : static_cast<unsigned long long*>(nullptr),
           sums_part.data(), extra > 0 ? mean_part.data() : static_cast<acc_t*>(nullptr));
  };
  if (f.m2 && f.clip) {
    if constexpr (kFloatAcc) run(&step_fwd_kernel<scalar_t, acc_t, true, true, true>);
    else run(&step_fwd_kernel<scalar_t, acc_t, true, true, false>);
  } else if (f.m2) {
    run(&step_fwd_kernel<scalar_t, acc_t, true, false, false>);
  } else if (f.clip) {
    if constexpr (kFloatAcc) run(&step_fwd_kernel<scalar_t, acc_t, false, true, true>);
    else run(&step_fwd_kernel<scalar_t, acc_t, false, true, false>);
  } else {
    run(&step_fwd_kernel<scalar_t, acc_t, false, false, false>);
  }
  // (The elementwise kernels get fewer and smaller blocks than the launcher's, so that
  // their grid-stride loops wrap.)
  if (R > 0)
    launch(dim3(2), 64, &merge_row_states_kernel<acc_t>, static_cast<const acc_t*>(part.data()),
           sp.splits, R * n, lse.data() + (f.m2 ? 0 : 2) * n);
  if (f.clip) {
    if constexpr (kFloatAcc) {
      launch(dim3(3), 32, &finalize_col_states_kernel,
             static_cast<const unsigned long long*>(state.data()), n, lse.data() + 3 * n);
    } else {
      const acc_t zero = 0;
      std::vector<acc_t> part_t(sp.splits * n * 2, acc_t(12345));
      launch(dim3(static_cast<unsigned>(sp.row_blocks), static_cast<unsigned>(sp.splits)),
             kThreads, &clip_lse_kernel<scalar_t, acc_t, false>, pr.T.data(), pr.I.data(), n,
             n, D, &pr.s_c, &zero, sp.tiles_per_split, part_t.data(),
             static_cast<unsigned long long*>(nullptr));
      launch(dim3(2), 64, &merge_row_states_kernel<acc_t>,
             static_cast<const acc_t*>(part_t.data()), sp.splits, n, lse.data() + 3 * n);
    }
  }
  FwdOut out;
  out.lse = to_double(lse);
  out.sums.assign(3, 0.0);
  for (int64_t c = 0; c < train + extra; ++c)
    for (int k = 0; k < 3; ++k) out.sums[k] += sums_part[3 * c + k];
  if (f.dive) {
    out.diff_mean.assign(D, 0.0);
    for (int64_t b = 0; b < extra; ++b)
      for (int64_t d = 0; d < D; ++d) out.diff_mean[d] += double(mean_part[b * D + d]);
    for (auto& v : out.diff_mean) v /= double(pr.nr);
  }
  return out;
}

template <typename scalar_t>
void check_fwd(const Problem<scalar_t>& pr, const Terms& f, int64_t tps, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const double tol = tol_of<acc_t>();
  const int64_t n = f.batch() ? pr.n : 0, D = pr.D;
  const auto got = run_fwd(pr, f, tps);
  if (f.tiles()) {
    const auto ref = pr.ref_lse(f);
    const char* names[] = {"lse[0] (rows of A)", "lse[1] (rows of B)", "lse[2] (rows of C)",
                           "lse[3] (columns of C)"};
    for (int k = 0; k < 4; ++k) {
      if (k < 2 ? !f.m2 : !f.clip) continue;
      const std::vector<double> r(ref.begin() + k * n, ref.begin() + (k + 1) * n);
      const std::vector<double> g(got.lse.begin() + k * n, got.lse.begin() + (k + 1) * n);
      check_err(tag + " " + names[k], rel_err(r, g), tol);
    }
  }
  // sums[0]: Lipsum; [1], [2]: AVL, PVL (exactly 0 when absent).
  double lip = 0;
  if (f.lip)
    for (double v : pr.V) lip += (double(pr.s_l) * v) * (double(pr.s_l) * v);
  double avl = 0, pvl = 0;
  std::vector<double> mean(D, 0.0);
  if (f.dive) {
    for (int64_t j = 0; j < pr.nr; ++j)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t e = j * D + d;
        const double u = pr.fid[e] - pr.pid[e], v = pr.ftd[e] - pr.ptd[e], m = pr.center[d];
        avl += (u - m) * (u - m) + (v - m) * (v - m);
        pvl += (u - v) * (u - v);
        mean[d] += (u + v) / 2 / double(pr.nr);
      }
  }
  const double want[3] = {lip, avl, pvl};
  const char* sum_names[3] = {"sums[0] (Lipsum)", "sums[1] (AVL)", "sums[2] (PVL)"};
  for (int k = 0; k < 3; ++k) {
    const bool on = k == 0 ? f.lip : f.dive;
    if (on) {
      check_err(tag + " " + sum_names[k], std::fabs(got.sums[k] - want[k]) / std::max(want[k], 1e-300), tol);
    } else {
      RFT_CHECK_MSG(got.sums[k] == 0.0, tag, " ", sum_names[k], " of an absent term: ", got.sums[k]);
    }
  }
  if (f.dive) {
    double mag = 1e-300;  // the mean's terms are O(|u|), so relative to the largest |u|, |v|
    for (int64_t e = 0; e < pr.nr * D; ++e)
      mag = std::max({mag, std::fabs(pr.fid[e] - pr.pid[e]), std::fabs(pr.ftd[e] - pr.ptd[e])});
    double err = 0;
    for (int64_t d = 0; d < D; ++d) err = std::max(err, std::fabs(got.diff_mean[d] - mean[d]));
    check_err(tag + " diff_mean", std::isnan(err) ? INFINITY : err / mag, tol);
  }
}

struct RowsOut {
  std::vector<double> gI, gT, gfi, gft;
  double stats[2];
};

// The upstream gradients [5] in StepTerm order; NaN for absent terms (must not be read).
template <typename acc_t>
std::vector<acc_t> grads_of(const Terms& f) {
  return {f.clip ? acc_t(-1.3) : acc_t(NAN), f.m2 ? acc_t(0.7) : acc_t(NAN),
          f.lip ? acc_t(0.9) : acc_t(NAN), f.dive ? acc_t(1.7) : acc_t(NAN),
          f.dive ? acc_t(-0.6) : acc_t(NAN)};
}

// launch_grad<kTransposed = false> of step_cuda.cu, outputs summed over the splits.
template <typename scalar_t>
RowsOut run_rows(const Problem<scalar_t>& pr, const Terms& f, const std::vector<double>& lse_d,
                 int64_t tps, int extra_splits) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  auto a = pr.dev(f);
  const int64_t n = a.n, D = pr.D;
  const std::vector<acc_t> lse(lse_d.begin(), lse_d.end());
  const auto grads = grads_of<acc_t>(f);
  const ColumnSplit sp = split_of(n, Tl::BM, Tl::BN, tps, f.tiles());
  set_plan(a, sp, extra_splits);  // extra splits hold no tile
  const int64_t splits = a.splits, train = sp.row_blocks * splits, extra = dive_ctas(f, pr.nr);
  std::vector<acc_t> t0(splits * n * D, acc_t(1e6)), t1((f.m2 ? splits : 1) * n * D, acc_t(-1e6));
  std::vector<double> stats_part(train * 2, 1e300);
  std::vector<acc_t> gfi(pr.nr * D, acc_t(3e5)), gft(pr.nr * D, acc_t(-3e5));
  auto run = [&](auto kernel) {
    launch(dim3(static_cast<unsigned>(train + extra)), kThreads, kernel, a,
           static_cast<const acc_t*>(grads.data()), static_cast<const acc_t*>(lse.data()),
           n > 0 ? t0.data() : static_cast<acc_t*>(nullptr),
           n > 0 ? t1.data() : static_cast<acc_t*>(nullptr), f.m2 ? n * D : int64_t(0),
           train > 0 ? stats_part.data() : static_cast<double*>(nullptr),
           extra > 0 ? gfi.data() : static_cast<acc_t*>(nullptr),
           extra > 0 ? gft.data() : static_cast<acc_t*>(nullptr));
  };
  if (f.m2 && f.clip) run(&step_grad_kernel<scalar_t, acc_t, true, true, false>);
  else if (f.m2) run(&step_grad_kernel<scalar_t, acc_t, true, false, false>);
  else if (f.clip) run(&step_grad_kernel<scalar_t, acc_t, false, true, false>);
  else run(&step_grad_kernel<scalar_t, acc_t, false, false, false>);
  RowsOut out;
  out.gI.assign(n * D, 0.0);
  out.gT.assign(n * D, 0.0);
  for (int64_t s = 0; s < splits; ++s)
    for (int64_t e = 0; e < n * D; ++e) {
      out.gI[e] += double(t0[s * n * D + e]);
      if (f.m2 || s == 0) out.gT[e] += double(t1[s * n * D + e]);
    }
  out.stats[0] = out.stats[1] = 0;
  for (int64_t c = 0; c < train; ++c) {
    out.stats[0] += stats_part[2 * c];
    out.stats[1] += stats_part[2 * c + 1];
  }
  if (f.dive) {
    out.gfi = to_double(gfi);
    out.gft = to_double(gft);
  }
  return out;
}

// launch_grad<kTransposed = true>: (grad_M, grad_Tc), each empty when its term is off.
template <typename scalar_t>
std::pair<std::vector<double>, std::vector<double>> run_cols(const Problem<scalar_t>& pr,
                                                             const Terms& f,
                                                             const std::vector<double>& lse_d,
                                                             int64_t tps, int extra_splits) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  auto a = pr.dev(f);
  a.G = nullptr;  // Lipsum is the row view's
  const int64_t n = a.n, D = pr.D;
  const std::vector<acc_t> lse(lse_d.begin(), lse_d.end());
  const auto grads = grads_of<acc_t>(f);
  const ColumnSplit sp = split_of(n, Tl::BM, Tl::BN, tps, true);
  set_plan(a, sp, extra_splits);
  const int64_t splits = a.splits, train = sp.row_blocks * splits;
  std::vector<acc_t> t0(f.m2 ? splits * n * D : 0, acc_t(1e6)),
      t1(f.clip ? splits * n * D : 0, acc_t(-1e6));
  auto run = [&](auto kernel) {
    launch(dim3(static_cast<unsigned>(train)), kThreads, kernel, a,
           static_cast<const acc_t*>(grads.data()), static_cast<const acc_t*>(lse.data()),
           f.m2 ? t0.data() : static_cast<acc_t*>(nullptr),
           f.clip ? t1.data() : static_cast<acc_t*>(nullptr), n * D,
           static_cast<double*>(nullptr), static_cast<acc_t*>(nullptr),
           static_cast<acc_t*>(nullptr));
  };
  if (f.m2 && f.clip) run(&step_grad_kernel<scalar_t, acc_t, true, true, true>);
  else if (f.m2) run(&step_grad_kernel<scalar_t, acc_t, true, false, true>);
  else run(&step_grad_kernel<scalar_t, acc_t, false, true, true>);
  auto reduce = [&](const std::vector<acc_t>& t) {
    std::vector<double> out(t.empty() ? 0 : n * D, 0.0);
    for (int64_t s = 0; s < (t.empty() ? 0 : splits); ++s)
      for (int64_t e = 0; e < n * D; ++e) out[e] += static_cast<double>(t[s * n * D + e]);
    return out;
  };
  return {reduce(t0), reduce(t1)};
}

template <typename scalar_t>
void check_grad(const Problem<scalar_t>& pr, const Terms& f, int64_t tps, int extra_splits,
                const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const int64_t n = f.batch() ? pr.n : 0, D = pr.D, K = pr.K;
  const auto lse = pr.ref_lse(f);  // absent rows NaN: must not be read
  const double* l0 = &lse[0];
  const double* l1 = &lse[n];
  const double* l2 = &lse[2 * n];
  const double* l3 = &lse[3 * n];
  const auto g = grads_of<double>(f);
  const double sm = double(pr.s_m), sc = double(pr.s_c), sl = double(pr.s_l);
  const double wm = f.m2 ? g[kGradM2] / (2.0 * n) : 0.0, wc = f.clip ? g[kGradClip] / (2.0 * n) : 0.0;
  // References with, per output, the sum of the magnitudes of its terms (the errors are
  // relative to those; a gradient may cancel to about 0).
  std::vector<double> gI(n * D, 0), gI_mag(n * D, 0), gT(n * D, 0), gT_mag(n * D, 0),
      gM(n * D, 0), gM_mag(n * D, 0), gTc(n * D, 0), gTc_mag(n * D, 0);
  double st0 = 0, st1 = 0, st0_mag = 0, st1_mag = 0;
  if (f.tiles()) {
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) {
        const double da = !f.m2 || p == q ? 0.0 : wm * std::exp(pr.A[p * n + q] - l0[p]);
        const double db = !f.m2 || p == q ? 0.0 : wm * std::exp(pr.B[p * n + q] - l1[p]);
        double dc = 0, dc_mag = 0;
        if (f.clip) {
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
  }
  if (f.lip) {  // grad_I[p] += g / (K n) s_l^2 sum_k <I_p - P_p, G_k> G_k
    const double w = g[kGradLipsum] / double(K * n) * sl * sl;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t d = 0; d < D; ++d) {
          const double t = w * pr.V[p * K + k] * pr.Gd[k * D + d];
          gI[p * D + d] += t;
          gI_mag[p * D + d] += std::fabs(t);
        }
  }
  const double tol = tol_of<acc_t>();
  const std::string t = tag + f.name();
  const auto rows = run_rows(pr, f, lse, tps, extra_splits);
  if (n > 0) {
    check_err(t + " grad_I", err_vs(gI, gI_mag, rows.gI), tol);
    if (f.m2) {
      check_err(t + " grad_T", err_vs(gT, gT_mag, rows.gT), tol);
    } else {
      for (double v : rows.gT) RFT_CHECK_MSG(v == 0.0, t, " grad_T without m^2: ", v);
    }
  }
  if (f.m2) {
    check_err(t + " stats[0]", std::fabs(rows.stats[0] - st0) / std::max(st0_mag, 1e-300), tol);
  } else {
    RFT_CHECK_MSG(rows.stats[0] == 0.0, t, " stats[0] without m^2: ", rows.stats[0]);
  }
  if (f.clip) {
    check_err(t + " stats[1]", std::fabs(rows.stats[1] - st1) / std::max(st1_mag, 1e-300), tol);
  } else {
    RFT_CHECK_MSG(rows.stats[1] == 0.0, t, " stats[1] without clip: ", rows.stats[1]);
  }
  if (f.dive) {
    const double inv = 1.0 / double(pr.nr), wa = g[kGradAvl] * inv, wp = g[kGradPvl] * inv;
    std::vector<double> rfi(pr.nr * D), rft(pr.nr * D), mag(pr.nr * D);
    for (int64_t e = 0; e < pr.nr * D; ++e) {
      const double u = pr.fid[e] - pr.pid[e], v = pr.ftd[e] - pr.ptd[e], m = pr.center[e % D];
      rfi[e] = 2 * (wa * (u - m) + wp * (u - v));
      rft[e] = 2 * (wa * (v - m) - wp * (u - v));
      mag[e] = 2 * (std::fabs(wa) * (std::fabs(u) + std::fabs(m) + std::fabs(v)) +
                    std::fabs(wp) * (std::fabs(u) + std::fabs(v)));
    }
    check_err(t + " grad_fi", err_vs(rfi, mag, rows.gfi), tol);
    check_err(t + " grad_ft", err_vs(rft, mag, rows.gft), tol);
  }
  if (f.tiles()) {
    const auto cols = run_cols(pr, f, lse, tps, extra_splits);
    if (f.m2) check_err(t + " grad_M", err_vs(gM, gM_mag, cols.first), tol);
    if (f.clip) check_err(t + " grad_Tc", err_vs(gTc, gTc_mag, cols.second), tol);
  }
}

struct Shape {
  int64_t n, D, K, nr;
  std::vector<int64_t> tps;  // tiles per split to run; kAll: one split for all tiles
};
constexpr int64_t kAll = int64_t(1) << 20;

template <typename scalar_t>
void run_case(const Shape& sh) {
  g_worst_ratio = 0;
  std::mt19937 rng(static_cast<unsigned>(sh.n * 1009 + sh.D * 31 + sh.K * 7 + sh.nr));
  const Problem<scalar_t> pr(sh.n, sh.D, sh.K, sh.nr, 0.3, rng);
  for (size_t k = 0; k < sh.tps.size(); ++k) {
    const int64_t tps = sh.tps[k];
    const std::string tag = tps == kAll ? "[one split]" : cat("[tiles_per_split=", tps, "]");
    for (int mask = 1; mask < 16; ++mask) {
      const Terms f{(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0, (mask & 8) != 0};
      // Without tiles the split setting changes nothing: run those once.
      if (!f.tiles() && k > 0) continue;
      check_fwd(pr, f, tps, tag + f.name());
      // The first split setting adds an empty split to every other combination.
      const int extra = (k == 0 && mask % 2 == 1) ? 1 : 0;
      check_grad(pr, f, tps, extra, extra ? tag + "[+empty split]" : tag);
    }
  }
  rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
}

template <typename scalar_t>
void add_cases(const char* group, const std::vector<Shape>& shapes) {
  for (const Shape& sh : shapes) {
    std::string name = cat(group, "/n=", sh.n, ",D=", sh.D, ",K=", sh.K, ",B'=", sh.nr, ",tps=");
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

RFT_CASES(step_emulated) {
  // float accumulation: 64 x 64 tiles, so 65 and 130 leave a 1- and 2-wide last tile, and
  // tiles_per_split = 2 over 3 tiles leaves an uneven last split; K = 80: two Lipsum tiles;
  // B' = 70: five DiVE CTAs, the last one partial.
  add_cases<float>("step_emu_float", {
      {1, 1, 1, 1, {kAll}},
      {3, 17, 7, 5, {1}},
      {65, 70, 80, 70, {1, kAll}},
      {130, 17, 7, 1, {2, 1}},
      {130, 1, 80, 5, {kAll}},
  });
  // double accumulation: 32 x 32 tiles (65: 3 tiles, 130: 5; K = 80: 3 Lipsum tiles).
  add_cases<double>("step_emu_double", {
      {1, 17, 80, 5, {kAll}},
      {3, 1, 1, 70, {1}},
      {65, 70, 7, 1, {2, kAll}},
      {130, 17, 80, 70, {2}},
  });
  add_cases<c10::Half>("step_emu_half", {{65, 17, 80, 5, {1}}, {3, 70, 7, 70, {kAll}}});
  add_cases<c10::BFloat16>("step_emu_bf16", {{3, 70, 1, 1, {kAll}}, {65, 17, 80, 70, {1}}});
  rft_test::add_case("step_emu_slerp/float", [] { check_slerp<float>(); });
  rft_test::add_case("step_emu_slerp/double", [] { check_slerp<double>(); });
}

}  // namespace
