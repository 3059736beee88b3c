// The fused contrastive CUDA kernels (csrc/cuda/contrastive_device.cuh), compiled by the
// host compiler against the CPU emulation of emu.h and emu_mma.h and launched as
// csrc/cuda/contrastive_cuda.cu launches them, against double references. Every kernel runs
// on each tile engine it is instantiated with:
//   * ffma_float / ffma_double: FfmaEngine (64 x 64 and 32 x 32 tiles, CUDA-core FMA);
//   * mma_bf16 / mma_f16 / mma_tf32: MmaEngine with the launchers' ContrastiveMmaShape
//     (128 x 128 tiles, 8 warps, ldmatrix + mma.sync + a 3-stage cp.async pipeline);
//     mma_bf16_small: the 2-stage ContrastiveMmaShapeSmall of 99 KB devices.
// Kernels:
//   * the deterministic column LSE (a transposed pass) is independent of the CTA order;
//   * clip_lse_kernel: row LSE alone, and row and column LSE in one pass (column states
//     merged with the packed atomic; double: a second, transposed pass), as launch_clip_lse;
//   * softplus_sum_kernel: the SigLIP forward sum;
//   * dlogits_kernel: one row chunk of dlogits into a workspace of the engine's dtype, for
//     CLIP rows with a positive offset (a shard of a gathered batch), symmetric CLIP, SigLIP
//     with positives and SigLIP negatives only, with the scale-gradient partials.
// Inputs of the tensor-core engine are zero-padded to whole 16-byte chunks, as the
// launchers' engine_inputs pads them. Every output buffer starts with garbage (each entry
// must be written). Shapes sit at tile edges (n, m in {1, 3, 129, 200, 300}), with K loops of
// one to five 128-byte blocks (the pipeline's ring of three stages wraps), and column splits.
//
// Usage: robustft_cuda_emulated_tests [--list | GROUP...] (harness.h); the groups are the
// engines' names.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/contrastive_device.cuh"
#include "cuda/ffma_tile.cuh"
#include "cuda/mma_tile.cuh"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_shapes.cuh"
#include "emu_checks.h"
#include "harness.h"

namespace {

using namespace robustft::cuda_tiles;
using cuda_emu::launch;
using rft_test::cat;

// The engines under test, with the launchers' tile shapes (emu_checks.h has the tolerances).
using FfmaFloat = rft_emu_test::FfmaFloat;
using FfmaDouble = rft_emu_test::FfmaDouble;
using MmaBf16 = rft_emu_test::MmaBf16<ContrastiveMmaShape>;
using MmaF16 = rft_emu_test::MmaF16<ContrastiveMmaShape>;
using MmaTf32 = rft_emu_test::MmaTf32<ContrastiveMmaShape>;
// The shape of devices with 99 KB of shared memory per block (tile_plan.h).
using MmaBf16Small = rft_emu_test::MmaBf16<ContrastiveMmaShapeSmall>;
using rft_emu_test::check_err;
using rft_emu_test::g_worst_ratio;
using rft_emu_test::g_worst_what;
using rft_emu_test::rel_err;
using rft_emu_test::round_tf32;
using rft_emu_test::to_double;

// One problem: P [n, D], Q [m, D] of in_t (rows padded with zeros to ld elements for the
// tensor-core engine), S = scale * P Q^T + bias.
template <class C>
struct Problem {
  using in_t = typename C::in_t;
  using acc_t = typename C::E::acc_t;
  int64_t n, m, D, ld;
  std::vector<in_t> P, Q;
  std::vector<double> Pd, Qd;  // what the engine multiplies (rounded to in_t, tf32), in double
  acc_t scale, bias;
  std::vector<double> S;  // n x m logits, in double

  Problem(int64_t n_, int64_t m_, int64_t D_, double scale_, double bias_, std::mt19937& rng)
      : n(n_), m(m_), D(D_), scale(static_cast<acc_t>(scale_)), bias(static_cast<acc_t>(bias_)) {
    const int64_t per_chunk = C::kMma ? int64_t(16 / sizeof(in_t)) : 1;
    ld = (D + per_chunk - 1) / per_chunk * per_chunk;
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(static_cast<double>(D)));
    auto fill = [&](std::vector<in_t>& X, std::vector<double>& Xd, int64_t rows) {
      X.assign(rows * ld, in_t(0));
      Xd.assign(rows * D, 0.0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < D; ++k) {
          X[r * ld + k] = static_cast<in_t>(nd(rng));
          const double v = static_cast<double>(X[r * ld + k]);
          Xd[r * D + k] = C::kTf32 ? round_tf32(static_cast<float>(v)) : v;
        }
    };
    fill(P, Pd, n);
    fill(Q, Qd, m);
    S.resize(n * m);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) S[i * m + j] = double(scale) * dot(i, j) + double(bias);
  }
  double dot(int64_t i, int64_t j) const {
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += Pd[i * D + k] * Qd[j * D + k];
    return s;
  }
  // LSE over the rows (over_rows == false: over j for each i) or over the columns.
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
  // The engine's operands: rows of A against rows of B.
  TileOperands<in_t> operands(const std::vector<in_t>& A, int64_t na, const std::vector<in_t>& B,
                              int64_t nb) const {
    TileOperands<in_t> ops{};
    ops.x[0] = A.data();
    ops.y[0] = B.data();
    ops.n = na;
    ops.m = nb;
    ops.D = ld;
    ops.ld = ld;
    return ops;
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

template <class E>
constexpr int smem_of() {
  return E::template smem_bytes<OneDotPair>();
}

// Row LSE of A [na] against B [nb] (run_row_lse); with col_state, also merges the packed
// column states.
template <class C, bool kColStats>
std::vector<double> run_row_lse(const Problem<C>& pr, const std::vector<typename C::in_t>& A,
                                int64_t na, const std::vector<typename C::in_t>& B, int64_t nb,
                                int64_t tps, unsigned long long* col_state) {
  using E = typename C::E;
  using acc_t = typename E::acc_t;
  const Split sp = split_of(nb, E::BN, tps);
  std::vector<acc_t> part(sp.splits * na * 2, acc_t(12345));  // garbage: must be written
  const dim3 grid(static_cast<unsigned>((na + E::BM - 1) / E::BM), static_cast<unsigned>(sp.splits));
  launch(grid, E::kThreads, smem_of<E>(), &clip_lse_kernel<E, typename C::in_t, kColStats>,
         pr.operands(A, na, B, nb), &pr.scale, &pr.bias, sp.tiles_per_split, part.data(),
         col_state);
  std::vector<acc_t> out(na, acc_t(777));
  // elementwise_blocks(na) blocks of 256 in the launcher; fewer, smaller blocks here so
  // the grid-stride loop wraps.
  launch(dim3(2), 64, &merge_row_states_kernel<acc_t>, static_cast<const acc_t*>(part.data()),
         sp.splits, na, out.data());
  return to_double(out);
}

template <class C>
void check_lse(const Problem<C>& pr, int64_t tps, const std::string& tag) {
  using acc_t = typename C::E::acc_t;
  const auto rref = pr.lse(false), cref = pr.lse(true);
  check_err(tag + " row_lse (rows only)",
            rel_err(rref, run_row_lse<C, false>(pr, pr.P, pr.n, pr.Q, pr.m, tps, nullptr)), C::tol);
  std::vector<double> rows, cols;
  if constexpr (std::is_same<acc_t, float>::value) {
    std::vector<unsigned long long> state(pr.m, 0x5555555555555555ull);  // garbage
    launch(dim3(1), 32, &init_col_states_kernel, state.data(), pr.m);
    rows = run_row_lse<C, true>(pr, pr.P, pr.n, pr.Q, pr.m, tps, state.data());
    std::vector<float> out(pr.m, 555.f);
    launch(dim3(3), 32, &finalize_col_states_kernel,
           static_cast<const unsigned long long*>(state.data()), pr.m, out.data());
    cols = to_double(out);
  } else {
    rows = run_row_lse<C, false>(pr, pr.P, pr.n, pr.Q, pr.m, tps, nullptr);
    cols = run_row_lse<C, false>(pr, pr.Q, pr.m, pr.P, pr.n, tps, nullptr);
  }
  check_err(tag + " row_lse (with columns)", rel_err(rref, rows), C::tol);
  check_err(tag + " col_lse", rel_err(cref, cols), C::tol);
}

template <class C>
void check_softplus(const Problem<C>& pr, int64_t tps, const std::string& tag) {
  using E = typename C::E;
  double ref = 0, mag = 0;
  for (const double s : pr.S) {
    ref += std::max(s, 0.0) + std::log1p(std::exp(-std::fabs(s)));
    mag += std::fabs(s) + 1.0;
  }
  const Split sp = split_of(pr.m, E::BN, tps);
  const dim3 grid(static_cast<unsigned>((pr.n + E::BM - 1) / E::BM), static_cast<unsigned>(sp.splits));
  std::vector<double> partial(size_t(grid.x) * grid.y, 1e300);  // garbage: must be written
  launch(grid, E::kThreads, smem_of<E>(), &softplus_sum_kernel<E, typename C::in_t>,
         pr.operands(pr.P, pr.n, pr.Q, pr.m), &pr.scale, &pr.bias, sp.tiles_per_split,
         partial.data());
  double got = 0;
  for (const double v : partial) got += v;
  check_err(tag + " softplus_sum", std::fabs(got - ref) / mag, C::tol);
}

// A DlogitSpec (contrastive_kernels.h) without tensors; O(1) weights, as the ops pass them.
struct Spec {
  const char* name;
  bool siglip;
  double w_row, w_col, w_pos;
  bool has_positives;
  long long pos_offset;
};

// dS_pq in double.
double ref_dlogit(const Spec& sp, double s, double r, double c, int64_t p, int64_t q) {
  const bool pos = sp.has_positives && q - p == sp.pos_offset;
  if (sp.siglip) return sp.w_row * (1.0 / (1.0 + std::exp(-s)) - (pos ? 1.0 : 0.0));
  double d = 0;
  if (sp.w_row != 0) d += sp.w_row * std::exp(s - r);
  if (sp.w_col != 0) d += sp.w_col * std::exp(s - c);
  return pos ? d - sp.w_pos : d;
}

// One dlogits launch over the chunk rows [r0, r0 + rows) (contrastive_dlogits_cuda), checked
// entry by entry against the reference, and its scale-gradient sums.
template <class C>
void check_dlogits(const Problem<C>& pr, const Spec& sp, int64_t r0, int64_t rows, int64_t tps,
                   const std::string& tag) {
  using E = typename C::E;
  using acc_t = typename E::acc_t;
  using ws_t = typename C::ws_t;
  const int64_t m = pr.m;
  const auto r = pr.lse(false), c = pr.lse(true);
  std::vector<acc_t> rl(r.begin(), r.end()), cl(c.begin(), c.end());
  DlogitParams<acc_t> prm;
  prm.w_row = static_cast<acc_t>(sp.w_row);
  prm.w_col = sp.siglip ? acc_t(0) : static_cast<acc_t>(sp.w_col);
  prm.w_pos = sp.siglip ? acc_t(0) : static_cast<acc_t>(sp.w_pos);
  prm.row_lse = (!sp.siglip && prm.w_row != acc_t(0)) ? rl.data() : nullptr;
  prm.col_lse = (!sp.siglip && prm.w_col != acc_t(0)) ? cl.data() : nullptr;
  prm.has_positives = sp.has_positives;
  prm.pos_offset = sp.pos_offset;

  const Split split = split_of(m, E::BN, tps);
  const dim3 grid(static_cast<unsigned>((rows + E::BM - 1) / E::BM),
                  static_cast<unsigned>(split.splits));
  std::vector<ws_t> ds(rows * m, static_cast<ws_t>(1e4f));  // garbage: must be written
  std::vector<double> stats_part(size_t(grid.x) * grid.y * 2, 1e300);
  auto kernel = sp.siglip ? &dlogits_kernel<E, typename C::in_t, ws_t, true>
                          : &dlogits_kernel<E, typename C::in_t, ws_t, false>;
  launch(grid, E::kThreads, smem_of<E>(), kernel, pr.operands(pr.P, pr.n, pr.Q, m), &pr.scale,
         &pr.bias, prm, r0, rows, split.tiles_per_split, ds.data(), stats_part.data());

  std::vector<double> ref(rows * m);
  double st_dot = 0, st_sum = 0, st_dot_mag = 0, st_sum_mag = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const int64_t p = r0 + i;
      const double s = pr.S[p * m + j];
      const double d = ref_dlogit(sp, s, r[p], c[j], p, j);
      const double dt = pr.dot(p, j);
      ref[i * m + j] = d;
      st_dot += d * dt;
      st_sum += d;
      st_dot_mag += std::fabs(d * dt) + 1e-300;
      st_sum_mag += std::fabs(d);
    }
  double got_dot = 0, got_sum = 0;
  for (size_t b = 0; b < size_t(grid.x) * grid.y; ++b) {
    got_dot += stats_part[2 * b];
    got_sum += stats_part[2 * b + 1];
  }
  const std::string t = cat(tag, " ", sp.name, " rows [", r0, ", ", r0 + rows, ")");
  check_err(t + " dS", rel_err(ref, to_double(ds)), C::ws_tol);
  check_err(t + " sum dS * dot", std::fabs(got_dot - st_dot) / std::max(st_dot_mag, 1e-300), C::tol);
  check_err(t + " sum dS", std::fabs(got_sum - st_sum) / std::max(st_sum_mag, 1e-300), C::tol);
}

struct Shape {
  int64_t n, m, D;
  double scale, bias;
  std::vector<int64_t> tps;  // tiles per split to run; kAll: one split for all tiles
};
constexpr int64_t kAll = int64_t(1) << 20;

template <class C>
void run_case(const Shape& sh) {
  using E = typename C::E;
  g_worst_ratio = 0;
  std::mt19937 rng(static_cast<unsigned>(sh.n * 1000003 + sh.m * 1009 + sh.D));
  const Problem<C> pr(sh.n, sh.m, sh.D, sh.scale, sh.bias, rng);
  // A shard of rows whose positives sit at an offset (clip_rows_loss).
  const long long off = sh.m > sh.n ? (sh.m - sh.n) / 2 : 0;
  const Spec specs[] = {
      {"clip_rows_offset", false, 1, 0, 1, true, off},
      {"clip_symmetric", false, 0.5, 0.5, 1, true, 0},
      {"siglip", true, 1, 0, 0, true, 0},
      {"siglip_negative_only", true, 1, 0, 0, false, 0},
  };
  // Chunks of rows as run_grad takes them: all rows, and a later chunk of one row block.
  std::vector<std::pair<int64_t, int64_t>> chunks = {{0, sh.n}};
  if (sh.n > E::BM) chunks.push_back({E::BM, std::min<int64_t>(E::BM, sh.n - E::BM)});
  for (size_t k = 0; k < sh.tps.size(); ++k) {
    const int64_t tps = sh.tps[k];
    const std::string tag = tps == kAll ? "[one split]" : cat("[tiles_per_split=", tps, "]");
    check_lse(pr, tps, tag);
    check_softplus(pr, tps, tag);
    for (const Spec& sp : specs)
      for (const auto& ch : chunks) check_dlogits(pr, sp, ch.first, ch.second, tps, tag);
  }
  rft_test::note(cat("largest error / tolerance: ", g_worst_ratio, " (", g_worst_what, ")"));
}

// The column LSE under torch.use_deterministic_algorithms(True): launch_clip_lse's pass over
// the transposed problem, whose splits merge_row_states_kernel merges in split order, is
// bitwise the same whatever order the CTAs run in (every launch of the emulation shuffles
// them anew). The default one-pass run merges the CTAs' column states with atomics, in the
// order they finish: over a few orders its bits differ somewhere, which shows this check can
// see an order dependence.
template <class C>
void check_col_lse_order(int64_t n, int64_t m, int64_t D, int64_t tps) {
  std::mt19937 rng(11);
  const Problem<C> pr(n, m, D, 14.3, -2.5, rng);
  const auto first = run_row_lse<C, false>(pr, pr.Q, pr.m, pr.P, pr.n, tps, nullptr);
  for (int run = 0; run < 3; ++run) {
    const auto again = run_row_lse<C, false>(pr, pr.Q, pr.m, pr.P, pr.n, tps, nullptr);
    RFT_CHECK_MSG(again == first, "the transposed column LSE depends on the order of the CTAs");
  }
  check_err("deterministic col_lse", rel_err(pr.lse(true), first), C::tol);
  std::vector<std::vector<double>> atomic;
  for (int run = 0; run < 6; ++run) {
    std::vector<unsigned long long> state(pr.m);
    launch(dim3(1), 32, &init_col_states_kernel, state.data(), pr.m);
    run_row_lse<C, true>(pr, pr.P, pr.n, pr.Q, pr.m, tps, state.data());
    std::vector<float> out(pr.m);
    launch(dim3(1), 32, &finalize_col_states_kernel,
           static_cast<const unsigned long long*>(state.data()), pr.m, out.data());
    atomic.push_back(to_double(out));
  }
  bool differs = false;
  for (const auto& a : atomic) differs = differs || a != atomic.front();
  RFT_CHECK_MSG(differs, "the atomic column merge gave the same bits in 6 CTA orders");
}

template <class C>
void add_cases(const char* group, const std::vector<Shape>& shapes) {
  for (const Shape& sh : shapes) {
    std::string name = cat(group, "/n=", sh.n, ",m=", sh.m, ",D=", sh.D, ",scale=", sh.scale,
                           ",bias=", sh.bias, ",tps=");
    for (size_t k = 0; k < sh.tps.size(); ++k)
      name += (k ? "|" : "") + (sh.tps[k] == kAll ? std::string("all") : std::to_string(sh.tps[k]));
    rft_test::add_case(name, [sh] { run_case<C>(sh); });
  }
}

RFT_CASES(cuda_emulated) {
  // FMA engine, float: 64 x 64 tiles, so 65 and 129 leave a 1-wide last tile and
  // tiles_per_split = 2 over 3 column tiles leaves an uneven last split.
  add_cases<FfmaFloat>("ffma_float", {
      {1, 1, 1, 14.3, -2.5, {kAll}},
      {3, 65, 5, 14.3, -2.5, {1, kAll}},
      {129, 129, 17, 14.3, -2.5, {1, 2}},
      {65, 129, 1, 0.0, 0.0, {1}},  // all logits equal: ties everywhere
  });
  // FMA engine, double: 32 x 32 tiles.
  add_cases<FfmaDouble>("ffma_double", {
      {3, 129, 17, 14.3, -2.5, {1, kAll}},
      {65, 1, 5, -3.0, 1.0, {kAll}},
  });
  // Tensor-core engine: 128 x 128 tiles, K blocks of 128 bytes (64 bf16 / f16, 32 float):
  // D = 200 bf16 runs four K blocks (the 3-stage ring wraps), D = 136 tf32 five; D = 5 and
  // 17 are padded to whole 16-byte chunks; 129, 200 and 300 leave partial tiles.
  add_cases<MmaBf16>("mma_bf16", {
      {1, 3, 5, 14.3, -2.5, {kAll}},
      {129, 200, 200, 14.3, -2.5, {1}},
      {300, 131, 72, -3.0, 1.0, {kAll}},
  });
  add_cases<MmaF16>("mma_f16", {
      {200, 129, 17, 14.3, -2.5, {1, kAll}},
  });
  add_cases<MmaTf32>("mma_tf32", {
      {129, 300, 136, 14.3, -2.5, {2}},
      {3, 1, 8, 0.0, 0.0, {kAll}},
  });
  // The two-stage ring wraps every other K block (D = 200: four blocks).
  add_cases<MmaBf16Small>("mma_bf16_small", {
      {129, 200, 200, 14.3, -2.5, {1}},
  });
  // 12 row blocks of 64 rows merge into each column; 2 splits of the transposed problem.
  rft_test::add_case("ffma_float/deterministic_col_lse",
                     [] { check_col_lse_order<FfmaFloat>(768, 130, 7, 1); });
}

}  // namespace
