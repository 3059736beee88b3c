// The CUDA kernels of csrc/cuda/contrastive_device.cuh, compiled by the host C++ compiler
// and run on the CPU emulation of emu.h (no nvcc, no CUDA toolkit, no GPU): the same
// kernel source the GPU build compiles, launched the way the launchers of
// csrc/cuda/contrastive_cuda.cu compose them, and compared with double-precision
// references computed here from the (rounded) inputs. See emu.h for what the emulation
// covers and what it cannot check (no memory model, CTAs one at a time, ...).
//
// What is checked, per dtype (float, double, c10::Half, c10::BFloat16) and shape:
//   * clip_lse_kernel + merge_row_states_kernel: row LSE; the column LSE through
//     init / packed atomic merge / finalize_col_states_kernel (float accumulation) or a
//     second, transposed pass (double), as launch_clip_lse does;
//   * softplus_sum_kernel: the sum of softplus over all logits (SigLIP forward);
//   * grad_rows_kernel: grad_P with the scalar-gradient sums (stats), then grad_Q from the
//     transposed spec, as contrastive_ops.h composes contrastive_grad_rows_cuda; the split partials are summed as
//     at::sum_out does. Specs: CLIP rows with a positive offset (a shard of a gathered
//     batch), symmetric CLIP, SigLIP with positives, SigLIP negatives only. The split
//     buffers start with garbage (every entry must be written), and one grad_P launch per
//     case gets an extra, empty column split (its slice must be written with zeros).
// Every statistic is run for several column splits (tiles_per_split), including one
// split holding every column tile, and shapes at tile edges (n, m in {1, 3, 65, 129}
// and D in {1, 5, 17, 130}; tiles are 64 x 64 for float accumulation, 32 x 32 for double).
//
// Usage: robustft_cuda_emulated_tests [--list | GROUP...] (harness.h); groups are
// emu_float, emu_double, emu_half, emu_bf16.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/contrastive_device.cuh"
#include "harness.h"

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

// One problem: P [n, D], Q [m, D] of scalar_t, S = scale * P Q^T + bias.
template <typename scalar_t>
struct Problem {
  using acc_t = acc_of_t<scalar_t>;
  int64_t n, m, D;
  std::vector<scalar_t> P, Q;
  std::vector<double> Pd, Qd;  // the inputs as stored (rounded to scalar_t), in double
  acc_t scale, bias;
  std::vector<double> S;  // n x m logits, in double

  Problem(int64_t n_, int64_t m_, int64_t D_, double scale_, double bias_, std::mt19937& rng)
      : n(n_), m(m_), D(D_), scale(static_cast<acc_t>(scale_)), bias(static_cast<acc_t>(bias_)) {
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(static_cast<double>(D)));
    for (int64_t i = 0; i < n * D; ++i) P.push_back(static_cast<scalar_t>(nd(rng)));
    for (int64_t i = 0; i < m * D; ++i) Q.push_back(static_cast<scalar_t>(nd(rng)));
    Pd = to_double(P);
    Qd = to_double(Q);
    S.resize(n * m);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) S[i * m + j] = double(scale) * dot(i, j) + double(bias);
  }
  double dot(int64_t i, int64_t j) const {
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += Pd[i * D + k] * Qd[j * D + k];
    return s;
  }
  // LSE over the rows (cols == false: over j for each i) or over the columns.
  std::vector<double> lse(bool over_rows) const {
    const int64_t outer = over_rows ? m : n, inner = over_rows ? n : m;
    std::vector<double> out(outer);
    for (int64_t a = 0; a < outer; ++a) {
      auto s = [&](int64_t b) { return over_rows ? S[b * m + a] : S[a * m + b]; };
      double mx = -INFINITY, sum = 0;
      for (int64_t b = 0; b < inner; ++b) mx = std::max(mx, s(b));
      for (int64_t b = 0; b < inner; ++b) sum += std::exp(s(b) - mx);
      out[a] = mx + std::log(sum);
    }
    return out;
  }
};

// The column split of the launchers: `tiles_per_split` consecutive column tiles per CTA
// (capped by the tile count), every split non-empty.
struct Split {
  int64_t tiles_per_split, splits;
};
Split split_of(int64_t cols, int BN, int64_t tps) {
  const int64_t tiles = (cols + BN - 1) / BN;
  const int64_t t = std::min(tps, tiles);
  return Split{t, (tiles + t - 1) / t};
}

// Row LSE of A [na, D] against B [nb, D] (run_row_lse); with col_state, also merges the
// packed column states.
template <typename scalar_t, bool kColStats>
std::vector<double> run_row_lse(const Problem<scalar_t>& pr, const std::vector<scalar_t>& A,
                                const std::vector<scalar_t>& B, int64_t na, int64_t nb,
                                int64_t tps, unsigned long long* col_state) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  const Split sp = split_of(nb, T::BN, tps);
  std::vector<acc_t> part(sp.splits * na * 2, acc_t(12345));  // garbage: must be written
  const dim3 grid(static_cast<unsigned>((na + T::BM - 1) / T::BM), static_cast<unsigned>(sp.splits));
  launch(grid, kThreads, &clip_lse_kernel<scalar_t, acc_t, kColStats>, A.data(), B.data(), na, nb,
         pr.D, &pr.scale, &pr.bias, sp.tiles_per_split, part.data(), col_state);
  std::vector<acc_t> out(na, acc_t(777));
  // elementwise_blocks(na) blocks of 256 in the launcher; fewer, smaller blocks here so
  // the grid-stride loop wraps.
  launch(dim3(2), 64, &merge_row_states_kernel<acc_t>, static_cast<const acc_t*>(part.data()),
         sp.splits, na, out.data());
  return to_double(out);
}

template <typename scalar_t>
void check_lse(const Problem<scalar_t>& pr, int64_t tps, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const auto rref = pr.lse(false), cref = pr.lse(true);
  const double tol = tol_of<acc_t>();
  // Row LSE only.
  check_err(tag + " row_lse (rows only)",
            rel_err(rref, run_row_lse<scalar_t, false>(pr, pr.P, pr.Q, pr.n, pr.m, tps, nullptr)), tol);
  // Row and column LSE, as launch_clip_lse composes them.
  std::vector<double> rows, cols;
  if constexpr (std::is_same<acc_t, float>::value) {
    // (The elementwise kernels get fewer and smaller blocks than elementwise_blocks(m) x
    // 256, so that their grid-stride loops wrap.)
    std::vector<unsigned long long> state(pr.m, 0x5555555555555555ull);  // garbage
    launch(dim3(1), 32, &init_col_states_kernel, state.data(), pr.m);
    rows = run_row_lse<scalar_t, true>(pr, pr.P, pr.Q, pr.n, pr.m, tps, state.data());
    std::vector<float> out(pr.m, 555.f);
    launch(dim3(3), 32, &finalize_col_states_kernel,
           static_cast<const unsigned long long*>(state.data()), pr.m, out.data());
    cols = to_double(out);
  } else {
    rows = run_row_lse<scalar_t, false>(pr, pr.P, pr.Q, pr.n, pr.m, tps, nullptr);
    cols = run_row_lse<scalar_t, false>(pr, pr.Q, pr.P, pr.m, pr.n, tps, nullptr);
  }
  check_err(tag + " row_lse (with columns)", rel_err(rref, rows), tol);
  check_err(tag + " col_lse", rel_err(cref, cols), tol);
}

template <typename scalar_t>
void check_softplus(const Problem<scalar_t>& pr, int64_t tps, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  double ref = 0, mag = 0;
  for (const double s : pr.S) {
    ref += std::max(s, 0.0) + std::log1p(std::exp(-std::fabs(s)));
    mag += std::fabs(s) + 1.0;
  }
  const Split sp = split_of(pr.m, T::BN, tps);
  const dim3 grid(static_cast<unsigned>((pr.n + T::BM - 1) / T::BM), static_cast<unsigned>(sp.splits));
  std::vector<double> partial(size_t(grid.x) * grid.y, 1e300);  // garbage: must be written
  launch(grid, kThreads, &softplus_sum_kernel<scalar_t, acc_t>, pr.P.data(), pr.Q.data(), pr.n,
         pr.m, pr.D, &pr.scale, &pr.bias, sp.tiles_per_split, partial.data());
  double got = 0;
  for (const double v : partial) got += v;
  check_err(tag + " softplus_sum", std::fabs(got - ref) / mag, tol_of<acc_t>());
}

// A DlogitSpec (contrastive_kernels.h) without tensors.
struct Spec {
  const char* name;
  bool siglip;
  double w_row, w_col, w_pos;
  bool has_positives;
  long long pos_offset;
  Spec transposed() const {
    Spec t = *this;
    if (!siglip) std::swap(t.w_row, t.w_col);
    t.pos_offset = -pos_offset;
    return t;
  }
};

// dS_pq of the untransposed problem, in double.
double ref_dlogit(const Spec& sp, double s, double r, double c, int64_t p, int64_t q) {
  const bool pos = sp.has_positives && q - p == sp.pos_offset;
  if (sp.siglip) return sp.w_row * (1.0 / (1.0 + std::exp(-s)) - (pos ? 1.0 : 0.0));
  double d = 0;
  if (sp.w_row != 0) d += sp.w_row * std::exp(s - r);
  if (sp.w_col != 0) d += sp.w_col * std::exp(s - c);
  return pos ? d - sp.w_pos : d;
}

// One contrastive_grad_rows launch: rows of A [na, D] against B [nb, D]. Returns the
// gradient summed over the splits; stats (if not null) receives the two scalar sums.
template <typename scalar_t>
std::vector<double> run_grad_rows(const Problem<scalar_t>& pr, const Spec& sp,
                                  const std::vector<scalar_t>& A, const std::vector<scalar_t>& B,
                                  int64_t na, int64_t nb, const std::vector<double>& row_lse,
                                  const std::vector<double>& col_lse, double g, int64_t tps,
                                  int extra_splits, double* stats) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  const int64_t D = pr.D;
  std::vector<acc_t> rl(row_lse.begin(), row_lse.end()), cl(col_lse.begin(), col_lse.end());
  DlogitParams<acc_t> prm;
  prm.w_row = static_cast<acc_t>(sp.w_row);
  prm.w_col = sp.siglip ? acc_t(0) : static_cast<acc_t>(sp.w_col);
  prm.w_pos = sp.siglip ? acc_t(0) : static_cast<acc_t>(sp.w_pos);
  prm.row_lse = (!sp.siglip && prm.w_row != acc_t(0)) ? rl.data() : nullptr;
  prm.col_lse = (!sp.siglip && prm.w_col != acc_t(0)) ? cl.data() : nullptr;
  prm.has_positives = sp.has_positives;
  prm.pos_offset = sp.pos_offset;
  const acc_t gg = static_cast<acc_t>(g);

  const Split split = split_of(nb, T::BN, tps);
  const int64_t splits = split.splits + extra_splits;  // extra splits hold no column tile
  const dim3 grid(static_cast<unsigned>((na + T::BM - 1) / T::BM), static_cast<unsigned>(splits));
  std::vector<acc_t> target(splits * na * D, acc_t(1e6));  // garbage: must be written
  std::vector<double> stats_part(size_t(grid.x) * grid.y * 2, 1e300);
  auto kernel = sp.siglip ? &grad_rows_kernel<scalar_t, acc_t, true>
                          : &grad_rows_kernel<scalar_t, acc_t, false>;
  launch(grid, kThreads, kernel, A.data(), B.data(), na, nb, D, &pr.scale, &pr.bias,
         static_cast<const acc_t*>(&gg), prm, split.tiles_per_split, target.data(),
         stats != nullptr ? stats_part.data() : static_cast<double*>(nullptr));
  std::vector<double> grad(na * D, 0.0);
  for (int64_t s = 0; s < splits; ++s)
    for (int64_t e = 0; e < na * D; ++e) grad[e] += static_cast<double>(target[s * na * D + e]);
  if (stats != nullptr) {
    stats[0] = stats[1] = 0;
    for (size_t b = 0; b < size_t(grid.x) * grid.y; ++b) {
      stats[0] += stats_part[2 * b];
      stats[1] += stats_part[2 * b + 1];
    }
  }
  return grad;
}

// As contrastive_ops.h runs contrastive_grad_rows_cuda: grad_P with stats, then grad_Q with the transposed spec.
template <typename scalar_t>
void check_grad(const Problem<scalar_t>& pr, const Spec& sp, double g, int64_t tps,
                int extra_splits, const std::string& tag) {
  using acc_t = acc_of_t<scalar_t>;
  const int64_t n = pr.n, m = pr.m, D = pr.D;
  const auto r = pr.lse(false), c = pr.lse(true);
  // References: dS in double, each gradient with the sum of the magnitudes of its terms
  // (the errors are relative to those; a gradient may cancel to about 0).
  std::vector<double> gP(n * D, 0), gP_mag(n * D, 0), gQ(m * D, 0), gQ_mag(m * D, 0);
  double st_dot = 0, st_sum = 0, st_dot_mag = 0, st_sum_mag = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const double s = pr.S[i * m + j];
      const double d = g * ref_dlogit(sp, s, r[i], c[j], i, j);
      // A bound of |dS| from its terms.
      const double d_mag = std::fabs(g) * (sp.siglip ? std::fabs(sp.w_row) * 2
                                                     : std::fabs(sp.w_row) * std::exp(s - r[i]) +
                                                           std::fabs(sp.w_col) * std::exp(s - c[j]) +
                                                           std::fabs(sp.w_pos));
      const double dt = pr.dot(i, j);
      st_dot += d * dt;
      st_sum += d;
      st_dot_mag += d_mag * std::fabs(dt);
      st_sum_mag += d_mag;
      const double sc = double(pr.scale);
      for (int64_t k = 0; k < D; ++k) {
        gP[i * D + k] += sc * d * pr.Qd[j * D + k];
        gP_mag[i * D + k] += std::fabs(sc * d_mag * pr.Qd[j * D + k]);
        gQ[j * D + k] += sc * d * pr.Pd[i * D + k];
        gQ_mag[j * D + k] += std::fabs(sc * d_mag * pr.Pd[i * D + k]);
      }
    }
  auto err_vs = [](const std::vector<double>& ref, const std::vector<double>& mag,
                   const std::vector<double>& got) {
    double err = 0, m = 1e-300;
    for (size_t e = 0; e < ref.size(); ++e) {
      err = std::max(err, std::fabs(got[e] - ref[e]));
      m = std::max(m, mag[e]);
    }
    return std::isnan(err) ? INFINITY : err / m;
  };
  const double tol = tol_of<acc_t>();
  const std::string t = tag + " " + sp.name;
  double stats[2];
  const auto got_P = run_grad_rows(pr, sp, pr.P, pr.Q, n, m, r, c, g, tps, extra_splits, stats);
  check_err(t + " grad_P", err_vs(gP, gP_mag, got_P), tol);
  check_err(t + " stats[0] (sum dS * dot)", std::fabs(stats[0] - st_dot) / std::max(st_dot_mag, 1e-300), tol);
  check_err(t + " stats[1] (sum dS)", std::fabs(stats[1] - st_sum) / std::max(st_sum_mag, 1e-300), tol);
  const auto got_Q = run_grad_rows(pr, sp.transposed(), pr.Q, pr.P, m, n, c, r, g, tps, 0, nullptr);
  check_err(t + " grad_Q", err_vs(gQ, gQ_mag, got_Q), tol);
}

struct Shape {
  int64_t n, m, D;
  double scale, bias;
  std::vector<int64_t> tps;  // tiles per split to run; 1 << 20: one split for all tiles
};
constexpr int64_t kAll = int64_t(1) << 20;

template <typename scalar_t>
void run_case(const Shape& sh) {
  g_worst_ratio = 0;
  std::mt19937 rng(static_cast<unsigned>(sh.n * 1000003 + sh.m * 1009 + sh.D));
  const Problem<scalar_t> pr(sh.n, sh.m, sh.D, sh.scale, sh.bias, rng);
  const double n = static_cast<double>(sh.n);
  // A shard of rows whose positives sit at an offset (clip_rows_loss); its transposed
  // pass is the column term of that shard.
  const long long off = sh.m > sh.n ? (sh.m - sh.n) / 2 : 0;
  const Spec specs[] = {
      {"clip_rows_offset", false, 1 / n, 0, 1 / n, true, off},
      {"clip_symmetric", false, 0.5 / n, 0.5 / n, 1 / n, true, 0},
      {"siglip", true, 1 / n, 0, 0, true, 0},
      {"siglip_negative_only", true, 1 / n, 0, 0, false, 0},
  };
  for (size_t k = 0; k < sh.tps.size(); ++k) {
    const int64_t tps = sh.tps[k];
    const std::string tag = tps == kAll ? "[one split]" : cat("[tiles_per_split=", tps, "]");
    check_lse(pr, tps, tag);
    check_softplus(pr, tps, tag);
    for (size_t s = 0; s < std::size(specs); ++s) {
      // The first tiles_per_split of the case adds an empty split to one spec's grad_P.
      const int extra = (k == 0 && s == (sh.n + sh.m) % std::size(specs)) ? 1 : 0;
      check_grad(pr, specs[s], s % 2 == 0 ? 0.7 : -1.3, tps, extra,
                 extra ? tag + "[+empty split]" : tag);
    }
  }
  rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
}

template <typename scalar_t>
void add_cases(const char* group, const std::vector<Shape>& shapes) {
  for (const Shape& sh : shapes) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s/n=%lld,m=%lld,D=%lld,scale=%g,bias=%g,tps=", group,
                  static_cast<long long>(sh.n), static_cast<long long>(sh.m),
                  static_cast<long long>(sh.D), sh.scale, sh.bias);
    std::string name = buf;
    for (size_t k = 0; k < sh.tps.size(); ++k)
      name += (k ? "|" : "") + (sh.tps[k] == kAll ? std::string("all") : std::to_string(sh.tps[k]));
    rft_test::add_case(name, [sh] { run_case<scalar_t>(sh); });
  }
}

RFT_CASES(cuda_emulated) {
  // float accumulation: 64 x 64 tiles, so 65 and 129 leave a 1-wide last tile and
  // tiles_per_split = 2 over 3 column tiles leaves an uneven last split.
  add_cases<float>("emu_float", {
      {1, 1, 1, 14.3, -2.5, {kAll}},
      {1, 129, 5, 14.3, -2.5, {1}},
      {3, 65, 5, 14.3, -2.5, {1, kAll}},
      {65, 3, 130, -3.0, 1.0, {kAll}},
      {129, 129, 17, 14.3, -2.5, {1, 2}},
      {129, 65, 130, 14.3, -2.5, {1}},
      {65, 129, 1, 0.0, 0.0, {1, kAll}},  // all logits equal: ties everywhere
  });
  // double accumulation: 32 x 32 tiles.
  add_cases<double>("emu_double", {
      {3, 129, 17, 14.3, -2.5, {1, 2, kAll}},
      {65, 1, 5, -3.0, 1.0, {kAll}},
      {129, 65, 130, 14.3, -2.5, {2}},
  });
  add_cases<c10::Half>("emu_half", {{65, 129, 17, 14.3, -2.5, {2}}});
  add_cases<c10::BFloat16>("emu_bf16", {{129, 3, 130, 14.3, -2.5, {1}}});
}

}  // namespace
