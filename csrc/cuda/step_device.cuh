// The __global__ kernels of a robust fine-tuning step (CLIP, m^2-mix, Lipsum-FT, DiVE;
// docs/maths.md, sections 1, 3, 4, 5): the launchers that size and start them are in
// step_cuda.cu (see the design notes there). Like contrastive_device.cuh this header holds
// no host (ATen) code, so the kernels also compile for the CPU emulation in tests.
//
// The problem (step_kernels.h): for the batch of n pairs (I_p, T_p), the mixed rows M_q
// (an [n, D] buffer made by the op body), the pre-trained image features P [n, D] and the
// Lipsum random-text features G [K, D],
//   A_pq = s_m <I_p, M_q> (q != p), A_pp = diag[p];  B_pq = s_m <T_p, M_q> (q != p),
//   B_pp = diag[p];  C_pq = s_c <I_p, T_q>;  V_pk = s_l <I_p - P_p, G_k>;
// and DiVE's reference batch of B' rows: u_j = fi_j - pi_j, v_j = ft_j - pt_j, centre m.
//
// Grid of a step launch (1-D): CTAs 0 .. row_blocks * splits - 1 own a block of BM
// training rows and one column split of its tiles (CTA c: row block c % row_blocks, split
// c / row_blocks); the CTAs after them (forward and row pass only) each own kDiveRows rows
// of DiVE's reference batch. Every branch below is uniform over a CTA, so the barriers
// inside are safe.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/contrastive_device.cuh"
#include "cuda/contrastive_tiles.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// The order of the upstream gradients grads[5] (step_kernels.h's StepTerm).
constexpr int kGradClip = 0, kGradM2 = 1, kGradLipsum = 2, kGradAvl = 3, kGradPvl = 4;

// Reference rows of DiVE per CTA (the DiVE work is O(B' D) and elementwise).
constexpr int kDiveRows = 16;

// Everything a step kernel reads, passed by value. Pointers of absent terms are null and
// never read: M, diag, m2_scale (without m^2), clip_scale (without CLIP), P, G, lip_scale
// (without Lipsum), fi, ft, pi, pt, center (without DiVE).
template <typename scalar_t, typename acc_t>
struct StepDev {
  const scalar_t* I;   // [n, D]
  const scalar_t* T;   // [n, D] (with m^2 or CLIP)
  const scalar_t* M;   // [n, D]
  const scalar_t* P;   // [n, D]
  const scalar_t* G;   // [K, D]
  const scalar_t *fi, *ft, *pi, *pt;  // [n_ref, D]
  const acc_t* center;                // [D]
  const acc_t* diag;                  // [n]
  const acc_t *m2_scale, *clip_scale, *lip_scale;  // one element each
  int64_t n, D, K, n_ref;
  // The training CTAs: row_blocks * splits, each streaming tiles_per_split column tiles
  // (0 without m^2 and CLIP: no tiles).
  int64_t row_blocks, splits, tiles_per_split;
};

// The training CTA of linear index c: its row block's first row and its range of column
// tiles.
struct StepCta {
  int64_t row0, t_begin, t_end;
  unsigned split;
};

template <typename Tl, typename scalar_t, typename acc_t>
__device__ __forceinline__ StepCta step_cta(const StepDev<scalar_t, acc_t>& a, unsigned c) {
  // (32-bit: the launcher keeps the grid below 2^31 CTAs.)
  const unsigned blocks = static_cast<unsigned>(a.row_blocks);
  const unsigned rb = c % blocks, split = c / blocks;
  const int64_t num_tiles = a.tiles_per_split > 0 ? (a.n + Tl::BN - 1) / Tl::BN : 0;
  const int64_t t_begin = static_cast<int64_t>(split) * a.tiles_per_split;
  return StepCta{static_cast<int64_t>(rb) * Tl::BM, t_begin,
                 min(num_tiles, t_begin + a.tiles_per_split), split};
}

// ---------------------------------------------------------------------------------
// Lipsum dot tile: acc[i][j] = <I_p - P_p, G_k> for p = row0 + ty*TM + i,
// k = col0 + tx*TN + j, the difference formed in acc_t before the product (fine-tuned and
// pre-trained features are close: I G^T - P G^T would cancel). Rows beyond n, columns
// beyond K and features beyond D load as 0. Opens with __syncthreads(), like tile_dots.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void lipsum_tile_dots(
    const scalar_t* __restrict__ I, const scalar_t* __restrict__ P,
    const scalar_t* __restrict__ G, int64_t n, int64_t K, int64_t D, int64_t row0,
    int64_t col0, acc_t (*Xs)[Tile<acc_t>::LDM], acc_t (*Ys)[Tile<acc_t>::LDN],
    acc_t (&acc)[Tile<acc_t>::TM][Tile<acc_t>::TN]) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
#pragma unroll
  for (int i = 0; i < T::TM; ++i)
#pragma unroll
    for (int j = 0; j < T::TN; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = 0; k0 < D; k0 += T::BK) {
    __syncthreads();
#pragma unroll
    for (int it = 0; it < T::BM * T::BK / kThreads; ++it) {
      const int e = threadIdx.x + it * kThreads;
      const int r = e / T::BK, k = e % T::BK;
      const int64_t gr = row0 + r, gk = k0 + k;
      acc_t v = acc_t(0);
      if (gr < n && gk < D)
        v = static_cast<acc_t>(I[gr * D + gk]) - static_cast<acc_t>(P[gr * D + gk]);
      Xs[k][r] = v;
    }
    load_slab_transposed<T::BN, T::BK, T::LDN>(G, K, D, col0, k0, Ys);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T::BK; ++k) {
      const Vec<acc_t, T::TM> x = load_vec<T::TM>(&Xs[k][ty * T::TM]);
      const Vec<acc_t, T::TN> y = load_vec<T::TN>(&Ys[k][tx * T::TN]);
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
#pragma unroll
        for (int j = 0; j < T::TN; ++j) acc[i][j] += x.v[i] * y.v[j];
    }
  }
}

// sum over the block's rows p < n and all k < K of V_pk^2 (maths::lipsum_term), in
// thread 0 (every thread must call it: barriers).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ double lipsum_block_sum(const StepDev<scalar_t, acc_t>& a,
                                                   int64_t row0,
                                                   acc_t (*Xs)[Tile<acc_t>::LDM],
                                                   acc_t (*Ys)[Tile<acc_t>::LDN],
                                                   double* red) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
  const acc_t s_l = *a.lip_scale;
  double total = 0.0;
  for (int64_t col0 = 0; col0 < a.K; col0 += T::BN) {
    acc_t d[T::TM][T::TN];
    lipsum_tile_dots<scalar_t, acc_t>(a.I, a.P, a.G, a.n, a.K, a.D, row0, col0, Xs, Ys, d);
    acc_t tile_sum = acc_t(0);
#pragma unroll
    for (int i = 0; i < T::TM; ++i)
#pragma unroll
      for (int j = 0; j < T::TN; ++j)
        if (row0 + ty * T::TM + i < a.n && col0 + tx * T::TN + j < a.K)
          tile_sum += maths::lipsum_term(d[i][j], s_l);
    total += static_cast<double>(tile_sum);
  }
  return block_sum(total, red);
}

// DiVE forward of reference block b: sums3 = (0, sum AVL terms, sum PVL terms) over its
// rows, mean_row[d] = sum over its rows of (u + v) / 2. Every thread must call it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dive_fwd_block(const StepDev<scalar_t, acc_t>& a, int64_t b,
                                               double* __restrict__ sums3,
                                               acc_t* __restrict__ mean_row, double* red) {
  const int64_t j0 = b * kDiveRows, j1 = min(a.n_ref, j0 + kDiveRows), D = a.D;
  acc_t avl = acc_t(0), pvl = acc_t(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t m = a.center[d];
    acc_t mean = acc_t(0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t e = j * D + d;
      const acc_t u = static_cast<acc_t>(a.fi[e]) - static_cast<acc_t>(a.pi[e]);
      const acc_t v = static_cast<acc_t>(a.ft[e]) - static_cast<acc_t>(a.pt[e]);
      avl += maths::dive_avl_term(u, v, m);
      pvl += maths::dive_pvl_term(u, v);
      mean += (u + v) / acc_t(2);
    }
    mean_row[d] = mean;
  }
  const double s_avl = block_sum(static_cast<double>(avl), red);
  const double s_pvl = block_sum(static_cast<double>(pvl), red);
  if (threadIdx.x == 0) {
    sums3[0] = 0.0;
    sums3[1] = s_avl;
    sums3[2] = s_pvl;
  }
}

// DiVE gradients of reference block b (maths::dive_grads, elementwise).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dive_grad_block(const StepDev<scalar_t, acc_t>& a, int64_t b,
                                                const acc_t* __restrict__ grads,
                                                acc_t* __restrict__ grad_fi,
                                                acc_t* __restrict__ grad_ft) {
  const int64_t j0 = b * kDiveRows, j1 = min(a.n_ref, j0 + kDiveRows), D = a.D;
  const acc_t inv = acc_t(1) / static_cast<acc_t>(a.n_ref);
  const acc_t w_a = grads[kGradAvl] * inv, w_p = grads[kGradPvl] * inv;
  for (int64_t e = j0 * D + threadIdx.x; e < j1 * D; e += kThreads) {
    const acc_t u = static_cast<acc_t>(a.fi[e]) - static_cast<acc_t>(a.pi[e]);
    const acc_t v = static_cast<acc_t>(a.ft[e]) - static_cast<acc_t>(a.pt[e]);
    maths::dive_grads(u, v, a.center[e % D], w_a, w_p, grad_fi + e, grad_ft + e);
  }
}

// The m^2 pairs of the forward, for tile_dots_multi: A = (X0, Y0), B = (X1, Y0) with
// X = {I, T}, Y = {M}.
struct ABPairs {
  static constexpr int kRows = 2, kCols = 1, kPairs = 2;
  __host__ __device__ static constexpr int row(int k) { return k; }
  __host__ __device__ static constexpr int col(int) { return 0; }
};

// ---------------------------------------------------------------------------------
// Forward, one launch for every term. A training CTA (row block, split):
//  * with m^2 / CLIP: streams its split's column tiles. Per step, the A and B dot tiles
//    come from one K loop over the slabs of I, T and M (tile_dots_multi); with CLIP the C
//    tile from a second K loop over I and T (three live dot tiles beside the row states
//    would exceed the 128 registers of two CTAs per SM). The true pair diag[p] replaces
//    A_pp and B_pp; the row LSE states are streamed (push_tile_rows) and written as
//    row_part[split][r][p] = (m, l) for the kRowStats streamed matrices r (A, B, C; only
//    those present, in that order: one merge over the splits then gives lse[0..2] or
//    lse[2] as rows r * n + p). kColStats (CLIP, float accumulation only): merges
//    each column's state of C over this block's rows into col_state[q] (packed,
//    atomic_lse_merge).
//  * with Lipsum (split 0 only): sum_{p in block, k} V_pk^2 over the K columns of G.
//  * writes sums_part[c] = (Lipsum sum or 0, 0, 0).
// A DiVE CTA b writes sums_part[c] = (0, AVL sum, PVL sum) of its rows and
// mean_part[b][d] = sum over its rows of (u_j + v_j) / 2.
template <typename scalar_t, typename acc_t, bool kM2, bool kClip, bool kColStats>
__global__ void __launch_bounds__(kThreads, 2)
    step_fwd_kernel(const StepDev<scalar_t, acc_t> a, acc_t* __restrict__ row_part,
                    unsigned long long* __restrict__ col_state, double* __restrict__ sums_part,
                    acc_t* __restrict__ mean_part) {
  static_assert(!kColStats || (kClip && std::is_same<acc_t, float>::value),
                "the packed column state holds two floats, and only C has one");
  using T = Tile<acc_t>;
  using AB = ABPairs;  // A = (I, M), B = (T, M) from one K loop
  using State = maths::LseState<acc_t>;
  constexpr int kRowStats = (kM2 ? 2 : 0) + (kClip ? 1 : 0);
  __shared__ __align__(16) acc_t Xs[kM2 ? 2 : 1][T::BK][T::LDM];  // I, T (Lipsum: I - P)
  __shared__ __align__(16) acc_t Ys[1][T::BK][T::LDN];              // M (C: T; Lipsum: G)
  __shared__ State col_red[kColStats ? kWarps : 1][T::BN];          // kColStats only
  __shared__ double red[kWarps];

  const int64_t c = blockIdx.x, train = a.row_blocks * a.splits;
  if (c >= train) {
    const int64_t b = c - train;
    dive_fwd_block(a, b, sums_part + 3 * c, mean_part + b * a.D, red);
    return;
  }
  const StepCta cta = step_cta<T>(a, blockIdx.x);
  const int64_t row0 = cta.row0, n = a.n;

  if constexpr (kRowStats > 0) {
    const int tx = thread_tx(), ty = thread_ty();
    const acc_t s_m = kM2 ? *a.m2_scale : acc_t(0);
    const acc_t s_c = kClip ? *a.clip_scale : acc_t(0);
    bool row_ok[T::TM];
    acc_t diag_r[T::TM];
    State rows[kRowStats][T::TM];  // identical in the 16 lanes of a row group
#pragma unroll
    for (int i = 0; i < T::TM; ++i) {
      const int64_t p = row0 + ty * T::TM + i;
      row_ok[i] = p < n;
      diag_r[i] = (kM2 && row_ok[i]) ? a.diag[p] : acc_t(0);
#pragma unroll
      for (int k = 0; k < kRowStats; ++k) rows[k][i] = maths::lse_empty<acc_t>();
    }

    for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
      const int64_t col0 = t * T::BN;
      bool col_ok[T::TN];
#pragma unroll
      for (int j = 0; j < T::TN; ++j) col_ok[j] = col0 + tx * T::TN + j < n;
      if constexpr (kM2) {
        const scalar_t* const xs[2] = {a.I, a.T};
        const scalar_t* const ys[1] = {a.M};
        acc_t s[2][T::TM][T::TN];
        tile_dots_multi<AB, scalar_t, acc_t>(xs, n, ys, n, a.D, row0, col0, Xs, Ys, s);
        // Logits; the true pair replaces the mixed negative on the diagonal.
#pragma unroll
        for (int i = 0; i < T::TM; ++i)
#pragma unroll
          for (int j = 0; j < T::TN; ++j) {
            const bool on_diag = row0 + ty * T::TM + i == col0 + tx * T::TN + j;
            s[0][i][j] = on_diag ? diag_r[i] : maths::logit(s[0][i][j], s_m, acc_t(0));
            s[1][i][j] = on_diag ? diag_r[i] : maths::logit(s[1][i][j], s_m, acc_t(0));
          }
        push_tile_rows(rows[0], s[0], col_ok);
        push_tile_rows(rows[1], s[1], col_ok);
      }
      if constexpr (kClip) {
        acc_t cc[T::TM][T::TN];
        tile_dots<scalar_t, acc_t>(a.I, a.T, n, n, a.D, row0, col0, Xs[0], Ys[0], cc);
#pragma unroll
        for (int i = 0; i < T::TM; ++i)
#pragma unroll
          for (int j = 0; j < T::TN; ++j) cc[i][j] = maths::logit(cc[i][j], s_c, acc_t(0));
        push_tile_rows(rows[kRowStats - 1], cc, col_ok);
        if constexpr (kColStats) {
          // col_red is rewritten only after the __syncthreads() that opens the next
          // tile_dots, so its reads here are safe.
          merge_tile_col_states<T::BN>(cc, row_ok, col0, n, col_red, col_state);
        }
      }
    }

    if (tx == 0) {
#pragma unroll
      for (int k = 0; k < kRowStats; ++k) {
        acc_t* out = row_part + (static_cast<int64_t>(cta.split) * kRowStats + k) * n * 2;
#pragma unroll
        for (int i = 0; i < T::TM; ++i) {
          if (!row_ok[i]) continue;
          const int64_t p = row0 + ty * T::TM + i;
          out[2 * p] = rows[k][i].m;
          out[2 * p + 1] = rows[k][i].l;
        }
      }
    }
  }

  // Lipsum: the K columns of G for this block's rows, once per row block (split 0).
  double lip = 0.0;
  if (a.G != nullptr && cta.split == 0) lip = lipsum_block_sum(a, row0, Xs[0], Ys[0], red);
  if (threadIdx.x == 0) {
    sums_part[3 * c] = lip;
    sums_part[3 * c + 1] = 0.0;
    sums_part[3 * c + 2] = 0.0;
  }
}

// ---------------------------------------------------------------------------------
// Backward: one gradient pass, in the row view (kTransposed false: the CTA owns rows p
// and streams columns q) or the column view (true: owns columns q, streams rows p). With
// the dlogits of step_kernels.h (maths::clip_dlogit; g = grads[5] in StepTerm order)
//   dA_pq = g_m2/(2n) exp(A_pq - lse[0][p]), dB_pq likewise with lse[1] (0 for p == q),
//   dC_pq = g_clip/(2n) [exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])] - (g_clip/n)[p == q],
// the CTA accumulates, for its owner rows and this split's streamed tiles, pair by pair:
//   row view:    out0 = grad_I = s_m dA @ M + s_c dC @ T (+ Lipsum),  out1 = grad_T = s_m dB @ M;
//   column view: out0 = grad_M = s_m (dA^T @ I + dB^T @ T),  out1 = grad_Tc = s_c dC^T @ I.
// Pair operands (X owner rows, Y streamed rows, output):
//   row view:    A (I, M, out0), B (T, M, out1), C (I, T, out0);
//   column view: A (M, I, out0), B (M, T, out0), C (T, I, out1).
// Each split writes its own slice out + split * stride (strides n D, or 0 for an out1
// that only split 0 writes: the row view's grad_T without m^2, which is all zeros); the
// launcher sums the slices. Row view, Lipsum, split 0 only:
//   grad_I[p] += sum_k lipsum_dgrad(<I_p - P_p, G_k>, s_l, g_lipsum / (K n)) G_k.
// Outputs of this CTA that no pair wrote are written with zeros (an empty split; grad_T
// without m^2). Row view: stats_part[2 c] = sum dA <I_p, M_q> + dB <T_p, M_q> (off the
// diagonal), stats_part[2 c + 1] = sum dC <I_p, T_q>, over the CTA's entries (double).
// DiVE CTAs (row view): grad_fi, grad_ft of their rows (maths::dive_grads).
//
// Pair after pair, each a streaming loop over this split's tiles: the dot tile
// (tile_dots) -> its dlogits in registers (padded and A / B diagonal entries 0) -> the dS
// tile to shared memory (transposed) -> the GEMM into the pair's output
// (accumulate_dS_rows). The pairs do not share one K loop as in the forward: the GEMM
// needs its 4 x 4 output accumulators live, and other pairs' dot or dS tiles held in
// registers meanwhile spill. The slabs of the dot tile and the Y chunk of the GEMM are
// never live together, so they share shared memory.
template <typename acc_t>
union StepGradSmem {
  struct {
    acc_t xs[Tile<acc_t>::BK][Tile<acc_t>::LDM];
    acc_t ys[Tile<acc_t>::BK][Tile<acc_t>::LDN];
  } slabs;                                          // tile_dots
  acc_t ychunk[Tile<acc_t>::BN][Tile<acc_t>::LDD];  // accumulate_dS_rows
};

template <typename scalar_t, typename acc_t, bool kM2, bool kClip, bool kTransposed>
__global__ void __launch_bounds__(kThreads, 2)
    step_grad_kernel(const StepDev<scalar_t, acc_t> a, const acc_t* __restrict__ grads,
                     const acc_t* __restrict__ lse, acc_t* __restrict__ out0,
                     acc_t* __restrict__ out1, int64_t out1_stride,
                     double* __restrict__ stats_part, acc_t* __restrict__ grad_fi,
                     acc_t* __restrict__ grad_ft) {
  using T = Tile<acc_t>;
  static_assert(T::BM == T::BN, "owner and streamed blocks must align on the diagonal");
  constexpr int kPairs = (kM2 ? 2 : 0) + (kClip ? 1 : 0);
  __shared__ __align__(16) StepGradSmem<acc_t> sm;
  __shared__ __align__(16) acc_t dSs[T::BN][T::LDM];  // one dS tile, transposed: [col][row]
  __shared__ double red[kWarps];
  // Register pressure: the kernel sits at the 128 registers of two CTAs per SM, so the
  // per-CTA constants and each thread's scalar-gradient sums live in shared memory (read
  // or updated once per pair and tile) rather than in registers across the GEMMs.
  __shared__ acc_t consts[4];       // s_m, s_c, g_m2 / (2n), g_clip / (2n)
  __shared__ acc_t own_lse[T::BM];  // the owner rows' LSE of the running pair
  __shared__ double stat_acc[kTransposed ? 1 : 2][kTransposed ? 1 : kThreads];

  const int64_t c = blockIdx.x, train = a.row_blocks * a.splits;
  if (c >= train) {  // a DiVE block (row view only)
    if (!kTransposed) dive_grad_block(a, c - train, grads, grad_fi, grad_ft);
    return;
  }
  const int tx = thread_tx(), ty = thread_ty();
  const StepCta cta = step_cta<T>(a, blockIdx.x);
  const int64_t row0 = cta.row0, n = a.n, D = a.D;
  if (threadIdx.x == 0) {
    consts[0] = kM2 ? *a.m2_scale : acc_t(0);
    consts[1] = kClip ? *a.clip_scale : acc_t(0);
    consts[2] = kM2 ? grads[kGradM2] / static_cast<acc_t>(2 * n) : acc_t(0);
    consts[3] = kClip ? grads[kGradClip] / static_cast<acc_t>(2 * n) : acc_t(0);
  }
  if constexpr (!kTransposed) stat_acc[0][threadIdx.x] = stat_acc[1][threadIdx.x] = 0.0;
  __syncthreads();  // consts (a pass may have no tile_dots to publish them)

  bool row_ok[T::TM];
#pragma unroll
  for (int i = 0; i < T::TM; ++i) row_ok[i] = row0 + ty * T::TM + i < n;

  // Pairs outside, tiles inside: streaming loops one after the other, each shaped like the
  // contrastive grad_rows_kernel (with the pairs interleaved inside one tile loop, or this
  // loop unrolled, ptxas kept values live across pairs and spilled).
#pragma unroll 1
  for (int k = 0; k < kPairs; ++k) {
    const int kind = kM2 ? k : 2;  // 0: A, 1: B, 2: C
    const scalar_t* const X =
        kTransposed ? (kind == 2 ? a.T : a.M) : (kind == 1 ? a.T : a.I);
    const scalar_t* const Y =
        kTransposed ? (kind == 1 ? a.T : a.I) : (kind == 2 ? a.T : a.M);
    const bool to1 = kTransposed ? (kClip && kind == 2) : (kM2 && kind == 1);
    acc_t* const out = to1 ? out1 + int64_t(cta.split) * out1_stride : out0 + int64_t(cta.split) * n * D;
    // The first tile of the first pair into an output writes it, everything else adds
    // (row view: A, B write, C adds after A; column view: A writes, B adds, C writes).
    bool accumulate = kTransposed ? kind == 1 : (kind == 2 && kM2);
    // The LSEs of this pair: by p (row LSE of A, B or C) and, for C, by q (column LSE).
    const acc_t* const lse_p = lse + kind * n;
    const acc_t* const lse_q = lse + 3 * n;  // read for C only
    // The owner rows' LSE (row view: by p; column view: C's by q), staged in shared
    // memory. Every reader of the previous pair's values passed the barriers of its last
    // GEMM; the barriers of the next tile_dots publish these writes.
    if (threadIdx.x < T::BM) {
      const int64_t x = row0 + threadIdx.x;
      own_lse[threadIdx.x] =
          x >= n ? acc_t(0) : !kTransposed ? lse_p[x] : kind == 2 ? lse_q[x] : acc_t(0);
    }
    for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
      const int64_t col0 = t * T::BN;
      // (tile_dots opens with __syncthreads(): every thread is done with the previous
      // tile's GEMM, i.e. with dSs and the Y chunk.)
      acc_t d[T::TM][T::TN];
      tile_dots<scalar_t, acc_t>(X, Y, n, n, D, row0, col0, sm.slabs.xs, sm.slabs.ys, d);
      const acc_t scale = consts[kind == 2 ? 1 : 0], w_m = consts[2], w_c = consts[3];
      // Owner and streamed blocks start at multiples of BM == BN, so the diagonal x == y
      // only crosses the tile with row0 == col0, at local row == local column.
      const bool diag_tile = row0 == col0;
      bool col_ok[T::TN];
      acc_t l_x[T::TM], l_y[T::TN];
#pragma unroll
      for (int i = 0; i < T::TM; ++i) l_x[i] = own_lse[ty * T::TM + i];
#pragma unroll
      for (int j = 0; j < T::TN; ++j) {
        const int64_t y = col0 + tx * T::TN + j;
        col_ok[j] = y < n;
        l_y[j] = !col_ok[j] ? acc_t(0) : kTransposed ? lse_p[y] : kind == 2 ? lse_q[y] : acc_t(0);
      }
      acc_t tile_stat = acc_t(0);
#pragma unroll
      for (int i = 0; i < T::TM; ++i) {
#pragma unroll
        for (int j = 0; j < T::TN; ++j) {
          const bool on_diag = diag_tile && ty * T::TM + i == tx * T::TN + j;
          const acc_t lp = kTransposed ? l_y[j] : l_x[i], lq = kTransposed ? l_x[i] : l_y[j];
          acc_t ds = acc_t(0);
          if (row_ok[i] && col_ok[j]) {
            const acc_t logit = maths::logit(d[i][j], scale, acc_t(0));
            if (kind < 2) {  // A or B: the true pair on the diagonal is the op body's
              if (!on_diag)
                ds = maths::clip_dlogit(logit, lp, acc_t(0), w_m, acc_t(0), acc_t(0), false);
            } else {  // C, with its positive on the diagonal
              ds = maths::clip_dlogit(logit, lp, lq, w_c, w_c, acc_t(2) * w_c, on_diag);
            }
            tile_stat += ds * d[i][j];
          }
          dSs[tx * T::TN + j][ty * T::TM + i] = ds;
        }
      }
      if constexpr (!kTransposed) stat_acc[kind == 2 ? 1 : 0][threadIdx.x] += tile_stat;
      accumulate_dS_rows<scalar_t, acc_t>(dSs, Y, n, D, col0, scale, out, row0, row_ok,
                                          accumulate, sm.ychunk);
      accumulate = true;
    }
  }
  // Which outputs the pairs wrote (uniform over the CTA).
  const bool has_tiles = cta.t_begin < cta.t_end;
  bool wrote0 = has_tiles && (kTransposed ? kM2 : kPairs > 0);
  const bool wrote1 = has_tiles && (kTransposed ? kClip : kM2);
  acc_t* const slice0 = out0 == nullptr ? nullptr : out0 + int64_t(cta.split) * n * D;
  acc_t* const slice1 = out1 == nullptr ? nullptr : out1 + int64_t(cta.split) * out1_stride;

  if (!kTransposed && a.G != nullptr && cta.split == 0) {
    // Lipsum into grad_I: dS_pk = g_lipsum / (K n) s_l^2 <I_p - P_p, G_k>, then dS @ G.
    const acc_t s_l = *a.lip_scale;
    const acc_t w_lip = grads[kGradLipsum] / static_cast<acc_t>(a.K * n);
    for (int64_t col0 = 0; col0 < a.K; col0 += T::BN) {
      acc_t d[T::TM][T::TN];
      lipsum_tile_dots<scalar_t, acc_t>(a.I, a.P, a.G, n, a.K, D, row0, col0, sm.slabs.xs,
                                        sm.slabs.ys, d);
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
#pragma unroll
        for (int j = 0; j < T::TN; ++j) {
          const bool ok = row_ok[i] && col0 + tx * T::TN + j < a.K;
          dSs[tx * T::TN + j][ty * T::TM + i] =
              ok ? maths::lipsum_dgrad(d[i][j], s_l, w_lip) : acc_t(0);
        }
      accumulate_dS_rows<scalar_t, acc_t>(dSs, a.G, a.K, D, col0, acc_t(1), slice0, row0,
                                          row_ok, wrote0, sm.ychunk);
      wrote0 = true;
    }
  }

  // Outputs no pair wrote: zeros (an empty split's slice; grad_T without m^2, split 0).
  // Same element-to-thread map as accumulate_dS_rows, so no barrier is needed.
  if (!wrote0 && slice0 != nullptr) zero_rows<acc_t>(slice0, row0, D, row_ok);
  if (!wrote1 && slice1 != nullptr && (out1_stride != 0 || cta.split == 0))
    zero_rows<acc_t>(slice1, row0, D, row_ok);

  if (!kTransposed && stats_part != nullptr) {  // uniform over the CTA: barriers are safe
    const double sum_m = block_sum(stat_acc[0][threadIdx.x], red);
    const double sum_c = block_sum(stat_acc[1][threadIdx.x], red);
    if (threadIdx.x == 0) {
      stats_part[2 * c] = sum_m;
      stats_part[2 * c + 1] = sum_c;
    }
  }
}

// ---------------------------------------------------------------------------------
// out [4, n] = (w_a, w_b, dw_a/dc, dw_b/dc) of maths::slerp_weights(cos[p], *lam).
template <typename acc_t>
__global__ void slerp_weights_kernel(const acc_t* __restrict__ cos, const acc_t* __restrict__ lam_p,
                                     int64_t n, acc_t* __restrict__ out) {
  const acc_t lam = *lam_p;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const maths::SlerpWeights<acc_t> w = maths::slerp_weights<acc_t>(cos[p], lam);
    out[p] = w.wa;
    out[n + p] = w.wb;
    out[2 * n + p] = w.dwa_dc;
    out[3 * n + p] = w.dwb_dc;
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
