// The __global__ kernels of the symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md,
// section 9.4; step_kernels.h: gram_lse, gram_strip, pair_backward), the tile kernels written
// once over a tile engine E (ffma_tile.cuh, mma_tile.cuh) as step_device.cuh's are.
// gram_cuda.cu sizes and starts them; this header holds no host (ATen) code, so the kernels
// also compile for the CPU emulation of the tests.
//
// One engine call per tile computes the four Gram blocks of rows P against columns Q from
// shared slabs of [I_P; T_P] and [I_Q; T_Q] (GramPairs): G_II = I_P I_Q^T, G_IT = I_P T_Q^T,
// G_TI = T_P I_Q^T, G_TT = T_P T_Q^T. Entry [p, q] of a tile gives the logits of both
// orientations, with the slerp weights w_a, w_b:
//   direct (row p, column q):     A_pq = s_m (w_a[q] G_II + w_b[q] G_IT),
//                                 B_pq = s_m (w_a[q] G_TI + w_b[q] G_TT),  C_pq = s_c G_IT
//   transposed (row q, column p): A_qp = s_m (w_a[p] G_II + w_b[p] G_TI),
//                                 B_qp = s_m (w_a[p] G_IT + w_b[p] G_TT),  C_qp = s_c G_TI
// and the true pair diag[p] replaces A_pp and B_pp.
//
// Counting each ordered pair once. Forward: the tiles cover the block pairs on and above the
// diagonal; an entry with p < q serves both orientations, p == q the direct one, p > q none
// (a tile that straddles the diagonal holds both [p, q] and [q, p]: the one with p < q
// serves both, which is the rule "diagonal block pairs: direct only" at the entry level, so
// it also holds for the step shapes' 128 x 64 tiles). Backward strip of rows [r0, r1) against
// columns [r0, n): every entry forms its four S entries; the sums (stats, u) take both
// orientations of the entries with q >= r1 and the direct one of the others.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/contrastive_device.cuh"
#include "cuda/mma_ptx.cuh"
#include "cuda/row_device.cuh"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_layout.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// The four Gram products of a tile: row slabs x = {I, T}, column slabs y = {I, T};
// pair k = (x[k / 2], y[k % 2]): kII, kIT, kTI, kTT.
struct GramPairs {
  static constexpr int kRows = 2, kCols = 2, kPairs = 4, kII = 0, kIT = 1, kTI = 2, kTT = 3;
  __host__ __device__ static constexpr int row(int k) { return k / 2; }
  __host__ __device__ static constexpr int col(int k) { return k % 2; }
};

// The scalars of the Gram kernels, read on the device (no host synchronisation); each null
// where its kernel or term does not read it.
template <typename acc_t>
struct GramScalars {
  const acc_t* m2_scale;    // s_m
  const acc_t* clip_scale;  // s_c (with CLIP)
  const acc_t* diag;        // [n] the true pair s_m <I_p, T_p> (forward)
  const acc_t* f_m2;        // the strip's factor of the m^2 terms (a_m / (|a_m| + |a_c|))
  const acc_t* f_clip;      // and of the CLIP term (with CLIP)
};

// ---- The forward's triangle of tiles ----------------------------------------------------
// Row block i (rows [i BM, (i + 1) BM)) takes the column tiles j in [ratio i, col_tiles),
// ratio = BM / BN: the first of them holds column i BM, every earlier one lies wholly below
// the diagonal. The tiles are numbered row block by row block; CTA b takes the numbers
// [b tiles_per_cta, (b + 1) tiles_per_cta), so every CTA but the last has the same count of
// tiles, wherever they lie in the triangle.
struct GramTriangle {
  int64_t n, row_blocks, col_tiles, ratio, tiles;
};

// The number of tiles in the first i row blocks: i col_tiles - ratio i (i - 1) / 2.
__host__ __device__ inline int64_t triangle_prefix(const GramTriangle& g, int64_t i) {
  return i * g.col_tiles - g.ratio * (i * (i - 1) / 2);
}

// Row block i and column tile j of tile number t < g.tiles: the largest i whose prefix is at
// most t (the root of the quadratic prefix, then corrected by whole steps against rounding).
__device__ inline void triangle_tile(const GramTriangle& g, int64_t t, int64_t& i, int64_t& j) {
  const double b = double(g.col_tiles) + 0.5 * double(g.ratio);
  const double disc = b * b - 2.0 * double(g.ratio) * double(t);
  int64_t r = static_cast<int64_t>((b - std::sqrt(disc > 0.0 ? disc : 0.0)) / double(g.ratio));
  r = r < 0 ? 0 : (r > g.row_blocks - 1 ? g.row_blocks - 1 : r);
  while (r > 0 && triangle_prefix(g, r) > t) --r;
  while (r + 1 < g.row_blocks && triangle_prefix(g, r + 1) <= t) ++r;
  i = r;
  j = g.ratio * r + (t - triangle_prefix(g, r));
}

// Which entries of the thread's tile serve which orientation: bit r kCols + c of `in` for the
// direct one (p <= q < n), of `both` for the transposed one too (p < q < n).
template <class L>
struct EntryClass {
  static_assert(L::kRows * L::kCols <= 32, "one bit per entry of the thread");
  uint32_t in = 0, both = 0;
  __device__ EntryClass(int64_t row0, int64_t col0, int64_t n) {
#pragma unroll
    for (int r = 0; r < L::kRows; ++r)
#pragma unroll
      for (int c = 0; c < L::kCols; ++c) {
        const int64_t p = row0 + L::row(r), q = col0 + L::col(c);
        const uint32_t bit = 1u << (r * L::kCols + c);
        if (q < n && p <= q) in |= bit;
        if (q < n && p < q) both |= bit;
      }
  }
  __device__ bool direct(int r, int c) const { return (in >> (r * L::kCols + c)) & 1u; }
  __device__ bool transposed(int r, int c) const { return (both >> (r * L::kCols + c)) & 1u; }
};

// The state of the thread's row r over the tile's columns (value(r, c): the entry's logit,
// -inf where the entry does not serve the statistic), merged over the lanes that share the
// row. Every thread must call it (shuffles).
template <class L, class Value>
__device__ __forceinline__ maths::LseState<float> gram_row_state(int r, const Value& value) {
  float mx = neg_inf<float>();
#pragma unroll
  for (int c = 0; c < L::kCols; ++c) mx = nan_max(mx, value(r, c));
  mx = L::row_lanes(mx, MaxOp{});
  float sum = 0.f;
  if (mx != neg_inf<float>()) {  // no entry serves: the empty state
#pragma unroll
    for (int c = 0; c < L::kCols; ++c) sum += std::exp(value(r, c) - mx);
  }
  return maths::LseState<float>{mx, L::row_lanes(sum, SumOp{})};
}

// The same for the thread's column c over the tile's rows, merged over the lanes that share
// the column. Every thread must call it (shuffles).
template <class L, class Value>
__device__ __forceinline__ maths::LseState<float> gram_column_state(int c, const Value& value) {
  float mx = neg_inf<float>();
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) mx = nan_max(mx, value(r, c));
  mx = L::col_lanes(mx, MaxOp{});
  float sum = 0.f;
  if (mx != neg_inf<float>()) {
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) sum += std::exp(value(r, c) - mx);
  }
  return maths::LseState<float>{mx, L::col_lanes(sum, SumOp{})};
}

// The forward's shared memory: the stages of the tile engine, which the epilogue reuses for
// the tile's partial states, [kStats][kColWarps][BN] of the columns then [kStats][kRowWarps][BM]
// of the rows, then the threads' G_TT entries [kRows kCols][kThreads] (more than the stages
// only for the FMA engine's small slabs).
template <class E, bool kClip>
struct GramLseSmem {
  using L = typename E::L;
  using State = maths::LseState<float>;
  static constexpr int kStats = kClip ? 4 : 2;
  static constexpr int kRowRed = kStats * L::kColWarps * L::BN * int(sizeof(State));
  static constexpr int kStash = kRowRed + kStats * L::kRowWarps * L::BM * int(sizeof(State));
  static constexpr int kScratch = kStash + L::kRows * L::kCols * L::kThreads * int(sizeof(float));
  static constexpr int kStages = E::template smem_bytes<GramPairs>();
  static constexpr int kBytes = kStages > kScratch ? kStages : kScratch;
};

template <class E, bool kClip>
constexpr int gram_lse_smem_bytes() {
  return GramLseSmem<E, kClip>::kBytes;
}

// The forward (step_kernels.h, gram_lse): every log-sum-exp of A, B (and C with kClip) from
// the triangle of tiles, merged into the packed states state[s n + x] (atomic_lse_merge) of
//   s = 0: LSE_y A_xy,  1: LSE_y B_xy,  2: LSE_y C_xy,  3: LSE_y C_yx.
// A tile's entries fold, as the orientations they serve,
//   into the row states of p: A_pq (s = 0), B_pq (1), C_pq (2), C_qp (3),
//   into the row states of q: A_qp (0), B_qp (1), C_qp (2), C_pq (3).
// The tile's partial states (per warp, after the lane shuffles) go through the dynamic
// shared memory, free once every warp has read its last stage, and one thread per row or
// column and statistic merges them: the columns' into `state` at once (an atomic each), the
// rows' into row_state, the CTA's running states of its row block (shared memory, not
// registers, which the four products' accumulators fill), merged into `state` when the CTA
// leaves the row block. G_TT, which only B reads, waits in shared memory while A is folded,
// so that at most three products' accumulators are in registers beside the epilogue's
// temporaries (all four of them made ptxas spill).
template <class E, typename in_t, bool kClip>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    gram_lse_kernel(const TileOperands<in_t> ops, const GramScalars<float> sc,
                    const double* __restrict__ weights, const GramTriangle tri,
                    int64_t tiles_per_cta, unsigned long long* __restrict__ state) {
  using L = typename E::L;
  using State = maths::LseState<float>;
  static_assert(std::is_same<typename E::acc_t, float>::value,
                "the packed states hold two floats");
  constexpr int kStats = kClip ? 4 : 2;
  __shared__ State row_state[kStats][L::BM];
  // The slerp weights of the tile's rows and columns: staged in shared memory for the next
  // tile while the current one merges (the next tile's opening barrier publishes them), read
  // where they are used: held in registers beside the four products they made ptxas spill.
  __shared__ float w_rows[2][L::BM], w_cols[2][L::BN];
  using Smem = GramLseSmem<E, kClip>;
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();
  auto col_red = reinterpret_cast<State(*)[L::kColWarps][L::BN]>(smem);
  auto row_red = reinterpret_cast<State(*)[L::kRowWarps][L::BM]>(smem + Smem::kRowRed);
  auto stash = reinterpret_cast<float(*)[L::kThreads]>(smem + Smem::kStash);

  const int64_t n = tri.n;
  const float s_m = *sc.m2_scale, s_c = kClip ? *sc.clip_scale : 0.f;
  // (32-bit tile counters: the launcher checks the triangle's tiles fit.)
  int t = static_cast<int>(blockIdx.x * tiles_per_cta);
  const int t_end = static_cast<int>(min(tri.tiles, int64_t(t) + tiles_per_cta));
  int block, col_tile;
  {
    int64_t i, j;
    triangle_tile(tri, t, i, j);
    block = static_cast<int>(i);
    col_tile = static_cast<int>(j);
  }
  auto stage_weights = [&](float* out, int64_t first, int count) {
    for (int e = threadIdx.x; e < 2 * count; e += L::kThreads) {
      const int64_t x = first + e % count;
      out[e] = x < n ? float(weights[(e / count) * n + x]) : 0.f;
    }
  };
  stage_weights(&w_rows[0][0], int64_t(block) * E::BM, L::BM);
  stage_weights(&w_cols[0][0], int64_t(col_tile) * E::BN, L::BN);
  // Each entry of row_state is read and written by one thread only (the same e below).
  for (int e = threadIdx.x; e < kStats * L::BM; e += L::kThreads)
    row_state[e / L::BM][e % L::BM] = maths::lse_empty<float>();

  for (; t < t_end; ++t) {
    const int64_t row0 = int64_t(block) * E::BM, col0 = int64_t(col_tile) * E::BN;
    float g[GramPairs::kPairs][L::kRows][L::kCols];
    E::template tile<GramPairs>(ops, row0, col0, smem, g);
    const EntryClass<L> cls(row0, col0, n);
    const float kNone = neg_inf<float>();
    auto g_tt = [&](int r, int c) { return stash[r * L::kCols + c][threadIdx.x]; };
    // The logits for the row states of p (-inf where the entry does not serve them).
    auto for_p = [&](int s, int r, int c) -> float {
      if (!cls.direct(r, c)) return kNone;
      const bool true_pair = !cls.transposed(r, c);  // p == q
      const float wa_q = w_cols[0][L::col(c)], wb_q = w_cols[1][L::col(c)];
      switch (s) {
        case 0:
          return true_pair ? sc.diag[row0 + L::row(r)]
                           : s_m * maths::gram_mixed_dot(wa_q, g[GramPairs::kII][r][c], wb_q,
                                                         g[GramPairs::kIT][r][c]);
        case 1:
          return true_pair ? sc.diag[row0 + L::row(r)]
                           : s_m * maths::gram_mixed_dot(wa_q, g[GramPairs::kTI][r][c], wb_q,
                                                         g_tt(r, c));
        case 2:
          return s_c * g[GramPairs::kIT][r][c];
        default:  // C_qp
          return cls.transposed(r, c) ? s_c * g[GramPairs::kTI][r][c] : kNone;
      }
    };
    // The logits for the row states of q.
    auto for_q = [&](int s, int r, int c) -> float {
      if (s == 3) return cls.direct(r, c) ? s_c * g[GramPairs::kIT][r][c] : kNone;  // C_pq
      if (!cls.transposed(r, c)) return kNone;
      const float wa_p = w_rows[0][L::row(r)], wb_p = w_rows[1][L::row(r)];
      switch (s) {
        case 0:
          return s_m * maths::gram_mixed_dot(wa_p, g[GramPairs::kII][r][c], wb_p,
                                             g[GramPairs::kTI][r][c]);
        case 1:
          return s_m * maths::gram_mixed_dot(wa_p, g[GramPairs::kIT][r][c], wb_p, g_tt(r, c));
        default:  // C_qp
          return s_c * g[GramPairs::kTI][r][c];
      }
    };

    __syncthreads();  // every warp has read its last stage: the scratch may overwrite it
#pragma unroll
    for (int r = 0; r < L::kRows; ++r)
#pragma unroll
      for (int c = 0; c < L::kCols; ++c) stash[r * L::kCols + c][threadIdx.x] = g[GramPairs::kTT][r][c];
    auto columns = [&](int s) {
#pragma unroll
      for (int c = 0; c < L::kCols; ++c) {
        const State st = gram_column_state<L>(c, [&](int r, int cc) { return for_q(s, r, cc); });
        if (L::col_leader()) col_red[s][L::col_warp()][L::col(c)] = st;
      }
    };
    auto rows = [&](int s) {
#pragma unroll
      for (int r = 0; r < L::kRows; ++r) {
        const State st = gram_row_state<L>(r, [&](int rr, int c) { return for_p(s, rr, c); });
        if (L::row_leader()) row_red[s][L::row_warp()][L::row(r)] = st;
      }
    };
    // A and B first: after them G_II and G_TT are dead. Then each C logit's two statistics
    // one after the other.
    columns(0);
    rows(0);
    columns(1);
    rows(1);
    if constexpr (kClip) {
      rows(2);
      columns(3);
      rows(3);
      columns(2);
    }
    __syncthreads();  // every warp's partial states are in the scratch
    for (int e = threadIdx.x; e < kStats * L::BN; e += L::kThreads) {
      const int s = e / L::BN, c = e % L::BN;
      State st = col_red[s][0][c];
#pragma unroll
      for (int w = 1; w < L::kColWarps; ++w) st = maths::lse_merge(st, col_red[s][w][c]);
      if (col0 + c < n && st.l != 0.f) atomic_lse_merge(&state[s * n + col0 + c], st);
    }
    // Leaving the row block (or at the CTA's last tile) the row states go to `state`.
    const bool block_done = col_tile + 1 == tri.col_tiles;
    const bool flush = block_done || t + 1 == t_end;
    for (int e = threadIdx.x; e < kStats * L::BM; e += L::kThreads) {
      const int s = e / L::BM, row = e % L::BM;
      State st = row_state[s][row];
#pragma unroll
      for (int w = 0; w < L::kRowWarps; ++w) st = maths::lse_merge(st, row_red[s][w][row]);
      if (flush) {
        if (row0 + row < n && st.l != 0.f) atomic_lse_merge(&state[s * n + row0 + row], st);
        st = maths::lse_empty<float>();
      }
      row_state[s][row] = st;
    }
    if (t + 1 == t_end) break;
    if (block_done) {
      ++block;
      col_tile = block * static_cast<int>(tri.ratio);
      stage_weights(&w_rows[0][0], int64_t(block) * E::BM, L::BM);
    } else {
      ++col_tile;
    }
    stage_weights(&w_cols[0][0], int64_t(col_tile) * E::BN, L::BN);
    // (the next tile opens with a barrier: it publishes the weights, and no warp refills the
    // stages that held the scratch before every warp has merged)
  }
}

// The backward strip (step_kernels.h, gram_strip): rows p in [r0, r0 + rows) against columns
// q in [r0, n); grid = (row blocks of the strip, column splits), as step_dlogits_kernel. Per
// entry, with dA'_pq = exp(A_pq - lse[0][p]) (0 for q == p), dB' likewise,
// dC'_pq = (exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])) / 2 - [p == q], and f_m, f_c the
// factors:
//   S_II = f_m (dA'_pq w_a[q] + dA'_qp w_a[p])
//   S_IT = f_m (dA'_pq w_b[q] + dB'_qp w_a[p]) + f_c dC'_pq
//   S_TI = f_m (dB'_pq w_a[q] + dA'_qp w_b[p]) + f_c dC'_qp
//   S_TT = f_m (dB'_pq w_b[q] + dB'_qp w_b[p])
// into S [4][rows][n - r0] (ws_t). The sums, each ordered pair once:
//   stats_part[2 cta + {0, 1}] = the CTA's sums of dA' A / s_m + dB' B / s_m and dC' C / s_c
//     (in double);
//   u, the column sums u_I[y] = sum_x dA'_xy <I_y, I_x> + dB'_xy <I_y, T_x> (u_T with T_y):
//     the transposed pairs (q, p) of every entry go to u[p], a row sum:
//       row_part[((split kRowWarps + row warp) 2 + k) rows + p - r0], one per warp that
//       shares the row (every entry of the strip's rows is written);
//     the direct pairs (p, q) of the entries with q >= r1 go to u[q], a column sum merged
//     across the CTA's warps in shared memory:
//       col_part[(row block 2 + k) (n - r1) + q - r1] (every column q >= r1 is written).
//   (Within the rows' own block [r0, r1) the pairs (q, p) of all entries are exactly its
//   ordered pairs, so its direct ones need no column sum.) gram_u_merge_kernel adds them up.
template <class E, typename in_t, typename ws_t, bool kClip>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    gram_strip_kernel(const TileOperands<in_t> ops, const GramScalars<typename E::acc_t> sc,
                      const double* __restrict__ weights, const typename E::acc_t* __restrict__ lse,
                      int64_t r0, int64_t rows, int64_t tiles_per_split, ws_t* __restrict__ S,
                      double* __restrict__ stats_part, typename E::acc_t* __restrict__ row_part,
                      typename E::acc_t* __restrict__ col_part) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  static_assert(2 * L::kColWarps * L::BN * sizeof(acc_t) <=
                    size_t(E::template smem_bytes<GramPairs>()),
                "the column sums fit in the stages' shared memory");
  __shared__ double red[L::kWarps];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();
  auto col_red = reinterpret_cast<acc_t(*)[L::kColWarps][L::BN]>(smem);

  const int64_t n = ops.n, r1 = r0 + rows, width = n - r0;
  const CtaTiles cta = cta_tiles<E::BM, E::BN>(r0, width, tiles_per_split);
  const acc_t s_m = *sc.m2_scale, s_c = kClip ? *sc.clip_scale : acc_t(0);
  const acc_t f_m = *sc.f_m2, f_c = kClip ? *sc.f_clip : acc_t(0);
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, r1);
  // The block's rows' w_a, w_b and lse[0..3], read where they are used: held in registers
  // beside the four products they would leave ptxas no room. (The first tile's opening
  // barrier publishes them.)
  __shared__ acc_t row_vals[6][L::BM];
  for (int e = threadIdx.x; e < 6 * L::BM; e += L::kThreads) {
    const int k = e / L::BM;
    const int64_t p = cta.row0 + e % L::BM;
    acc_t v = acc_t(0);
    if (p < r1 && (kClip || k < 4)) v = k < 2 ? acc_t(weights[k * n + p]) : lse[(k - 2) * n + p];
    row_vals[k][e % L::BM] = v;
  }

  double stat_m = 0.0, stat_c = 0.0;
  acc_t u_row[2][L::kRows];
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) u_row[0][r] = u_row[1][r] = acc_t(0);
  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = r0 + t * E::BN;
    acc_t g[GramPairs::kPairs][L::kRows][L::kCols];
    E::template tile<GramPairs>(ops, cta.row0, col0, smem, g);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, n);
    // Columns past the strip's rows: their direct pairs go to the column sums of u.
    const bool beyond = col0 + E::BN > r1;
    if (beyond) __syncthreads();  // every warp has read its last stage: col_red may overwrite it
    acc_t tile_m = acc_t(0), tile_c = acc_t(0);
#pragma unroll
    for (int c = 0; c < L::kCols; ++c) {
      const int64_t q = col_ok[c] ? col0 + L::col(c) : 0;
      const acc_t wa_q = acc_t(weights[q]), wb_q = acc_t(weights[n + q]);
      const acc_t la_q = lse[q], lb_q = lse[n + q];
      const acc_t lr_q = kClip ? lse[2 * n + q] : acc_t(0), lc_q = kClip ? lse[3 * n + q] : acc_t(0);
      const bool q_beyond = col_ok[c] && q >= r1;
      acc_t u_col[2] = {acc_t(0), acc_t(0)};
#pragma unroll
      for (int r = 0; r < L::kRows; ++r) {
        const int64_t p = cta.row0 + L::row(r);
        const acc_t wa_p = row_vals[0][L::row(r)], wb_p = row_vals[1][L::row(r)];
        const acc_t la_p = row_vals[2][L::row(r)], lb_p = row_vals[3][L::row(r)];
        const acc_t lr_p = row_vals[4][L::row(r)], lc_p = row_vals[5][L::row(r)];
        const acc_t gii = g[GramPairs::kII][r][c], git = g[GramPairs::kIT][r][c];
        const acc_t gti = g[GramPairs::kTI][r][c], gtt = g[GramPairs::kTT][r][c];
        acc_t s_ii = acc_t(0), s_it = acc_t(0), s_ti = acc_t(0), s_tt = acc_t(0);
        if (row_ok[r] && col_ok[c]) {
          const bool pair = p == q;
          const acc_t dot_a = maths::gram_mixed_dot(wa_q, gii, wb_q, git);
          const acc_t dot_at = maths::gram_mixed_dot(wa_p, gii, wb_p, gti);
          const acc_t dot_b = maths::gram_mixed_dot(wa_q, gti, wb_q, gtt);
          const acc_t dot_bt = maths::gram_mixed_dot(wa_p, git, wb_p, gtt);
          auto row_softmax = [&](acc_t dot, acc_t l) {
            return pair ? acc_t(0)
                        : maths::clip_dlogit(maths::logit(dot, s_m, acc_t(0)), l, acc_t(0),
                                             acc_t(1), acc_t(0), acc_t(0), false);
          };
          const acc_t da = row_softmax(dot_a, la_p), da_t = row_softmax(dot_at, la_q);
          const acc_t db = row_softmax(dot_b, lb_p), db_t = row_softmax(dot_bt, lb_q);
          acc_t dc = acc_t(0), dc_t = acc_t(0);
          if constexpr (kClip) {
            dc = maths::clip_dlogit(maths::logit(git, s_c, acc_t(0)), lr_p, lc_q, acc_t(0.5),
                                    acc_t(0.5), acc_t(1), pair);
            dc_t = maths::clip_dlogit(maths::logit(gti, s_c, acc_t(0)), lr_q, lc_p, acc_t(0.5),
                                      acc_t(0.5), acc_t(1), pair);
            tile_c += dc * git;
            if (q_beyond) tile_c += dc_t * gti;
          }
          const maths::GramGrads<acc_t> sg =
              maths::gram_grads(f_m, f_c, da, da_t, db, db_t, dc, dc_t, wa_p, wb_p, wa_q, wb_q);
          s_ii = sg.ii;
          s_it = sg.it;
          s_ti = sg.ti;
          s_tt = sg.tt;
          tile_m += da * dot_a + db * dot_b;
          if (q_beyond) {
            tile_m += da_t * dot_at + db_t * dot_bt;
            u_col[0] += maths::gram_mixed_dot(da, gii, db, gti);
            u_col[1] += maths::gram_mixed_dot(da, git, db, gtt);
          }
          u_row[0][r] += maths::gram_mixed_dot(da_t, gii, db_t, git);
          u_row[1][r] += maths::gram_mixed_dot(da_t, gti, db_t, gtt);
        }
        g[GramPairs::kII][r][c] = s_ii;
        g[GramPairs::kIT][r][c] = s_it;
        g[GramPairs::kTI][r][c] = s_ti;
        g[GramPairs::kTT][r][c] = s_tt;
      }
      if (beyond) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const acc_t v = L::col_lanes(u_col[k], SumOp{});
          if (L::col_leader()) col_red[k][L::col_warp()][L::col(c)] = v;
        }
      }
    }
    stat_m += static_cast<double>(tile_m);
    stat_c += static_cast<double>(tile_c);
    const int64_t row_base = cta.row0 - r0;
#pragma unroll
    for (int k = 0; k < GramPairs::kPairs; ++k)
      store_tile<L>(S + k * rows * width, width, row_base, col0 - r0, g[k], row_ok, col_ok);
    if (beyond) {
      __syncthreads();  // every warp's column sums are in col_red
      for (int e = threadIdx.x; e < 2 * L::BN; e += L::kThreads) {
        const int k = e / L::BN, c = e % L::BN;
        const int64_t q = col0 + c;
        if (q < r1 || q >= n) continue;
        acc_t v = col_red[k][0][c];
#pragma unroll
        for (int w = 1; w < L::kColWarps; ++w) v += col_red[k][w][c];
        col_part[(static_cast<int64_t>(blockIdx.x) * 2 + k) * (n - r1) + q - r1] = v;
      }
      // (the next tile opens with a barrier before it refills the stages that held col_red)
    }
  }

#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
      const acc_t v = L::row_lanes(u_row[k][r], SumOp{});
      if (L::row_leader() && row_ok[r]) {
        const int64_t part = static_cast<int64_t>(blockIdx.y) * L::kRowWarps + L::row_warp();
        row_part[(part * 2 + k) * rows + cta.row0 + L::row(r) - r0] = v;
      }
    }
  const double sm = block_sum<L>(stat_m, red);
  const double scl = block_sum<L>(stat_c, red);
  if (threadIdx.x == 0) {
    stats_part[2 * cta_index()] = sm;
    stats_part[2 * cta_index() + 1] = scl;
  }
}

// u[k][x] += the strip's partial sums of column x in a fixed order (in double): for x in
// [r0, r1) the row parts (row_parts of them), for x in [r1, n) the column parts (col_parts).
template <typename acc_t>
__global__ void gram_u_merge_kernel(const acc_t* __restrict__ row_part, int64_t row_parts,
                                    const acc_t* __restrict__ col_part, int64_t col_parts,
                                    int64_t r0, int64_t rows, int64_t n, acc_t* __restrict__ u) {
  const int64_t r1 = r0 + rows;
  for (int64_t x = r0 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      double sum = 0.0;
      if (x < r1) {
        for (int64_t s = 0; s < row_parts; ++s) sum += double(row_part[(s * 2 + k) * rows + x - r0]);
      } else {
        for (int64_t b = 0; b < col_parts; ++b) sum += double(col_part[(b * 2 + k) * (n - r1) + x - r1]);
      }
      u[k * n + x] += acc_t(sum);
    }
  }
}

// grad_I_p += coef_p T_p, grad_T_p += coef_p I_p (step_kernels.h, pair_backward): a warp per
// row, as row_device.cuh's passes.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    pair_backward_kernel(const acc_t* __restrict__ coef, const in_t* __restrict__ I,
                         const in_t* __restrict__ T, int64_t n, int64_t D,
                         acc_t* __restrict__ grad_I, acc_t* __restrict__ grad_T) {
  const int lane = threadIdx.x % 32;
  const WarpRows rows = warp_rows();
  for (int64_t p = rows.first; p < n; p += rows.stride) {
    const acc_t k = coef[p];
    const in_t* a = I + p * D;
    const in_t* b = T + p * D;
    acc_t* oi = grad_I + p * D;
    acc_t* ot = grad_T + p * D;
    for (int64_t j = lane; j < D; j += 32) {
      oi[j] += k * acc_t(b[j]);
      ot[j] += k * acc_t(a[j]);
    }
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
