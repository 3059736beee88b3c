// The __global__ kernels of the fused m^2-mix loss (METHODS.md section 3); the launchers
// that size and start them are in m2mix_cuda.cu (see the design notes there). Like
// contrastive_device.cuh this header holds no host (ATen) code, so the kernels can also
// be compiled for the CPU emulation in tests.
//
// The problem (m2mix_kernels.h): for the batch of n pairs (I_p, T_p) and the mixed rows
// M_q (an [n, D] buffer made by the op body),
//   A_pq = s_m <I_p, M_q> (q != p), A_pp = diag[p];  B_pq = s_m <T_p, M_q> (q != p),
//   B_pp = diag[p];  C_pq = s_c <I_p, T_q> (the CLIP logits, "with clip" only).
// The forward computes the A and B tiles of one step from one K loop (tile_dots_multi:
// the slabs of I, T and M are loaded once for both).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/contrastive_device.cuh"
#include "cuda/contrastive_tiles.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// The operand pairs of one step, for tile_dots_multi. Pair 0 is A, 1 is B, 2 is C.
//  * Row view (kTransposed false: the CTA owns rows p, streams columns q):
//      X = {I, T}, Y = {M, T};  A = (X0, Y0), B = (X1, Y0), C = (X0, Y1).
//  * Column view (kTransposed true: the CTA owns columns q, streams rows p):
//      X = {M, T}, Y = {I, T};  A^T = (X0, Y0), B^T = (X0, Y1), C^T = (X1, Y0).
// Without clip the unused operand (row view Y1, column view X1) is dropped.
// In both views the gradient of pair k flows to X_row(k) as dS_k @ Y_col(k).
template <bool kClip, bool kTransposed>
struct M2Pairs {
  static constexpr int kPairs = kClip ? 3 : 2;
  static constexpr int kRows = (kTransposed && !kClip) ? 1 : 2;
  static constexpr int kCols = (!kTransposed && !kClip) ? 1 : 2;
  __host__ __device__ static constexpr int row(int k) {
    return kTransposed ? (k == 2 ? 1 : 0) : (k == 1 ? 1 : 0);
  }
  __host__ __device__ static constexpr int col(int k) {
    return kTransposed ? (k == 1 ? 1 : 0) : (k == 2 ? 1 : 0);
  }
  // Is pair k the first (in pair order) whose gradient flows to X_row(k)?
  __host__ __device__ static constexpr bool first_into_row(int k) {
    return k == 0 || (k == 1 ? row(1) != row(0) : (row(2) != row(0) && row(2) != row(1)));
  }
};

// ---------------------------------------------------------------------------------
// Forward: the row log-sum-exps of A, B (and C) and, with kColStats, the column
// log-sum-exp of C, in one pass over the tiles. Per step, the A and B tiles come from one
// K loop over the slabs of I, T and M (tile_dots_multi); with clip, the C tile from a
// second K loop over I and T (three live dot tiles beside the row states would exceed
// the 128 registers of two CTAs per SM).
// grid = (row blocks, column splits). For each valid row p of this block and each
// streamed matrix k (A, B, C), writes row_part[k][split][p] = (m, l), the online LSE
// state of row p over this split's columns. kColStats (with clip, float accumulation
// only): also merges each column's state of C over this block's rows into
// col_state[q] (packed, see atomic_lse_merge). Inputs I, Tx, M are [n, D].
template <typename scalar_t, typename acc_t, bool kClip, bool kColStats>
__global__ void __launch_bounds__(kThreads, 2)
    m2mix_lse_kernel(const scalar_t* __restrict__ I, const scalar_t* __restrict__ Tx,
                     const scalar_t* __restrict__ M, int64_t n, int64_t D,
                     const acc_t* __restrict__ diag, const acc_t* __restrict__ m2_scale_p,
                     const acc_t* __restrict__ clip_scale_p, int64_t tiles_per_split,
                     acc_t* __restrict__ row_part, unsigned long long* __restrict__ col_state) {
  static_assert(!kColStats || (kClip && std::is_same<acc_t, float>::value),
                "the packed column state holds two floats, and only C has one");
  using T = Tile<acc_t>;
  using AB = M2Pairs<false, false>;  // A = (I, M), B = (T, M) from one K loop
  using State = maths::LseState<acc_t>;
  constexpr int K = kClip ? 3 : 2;
  __shared__ __align__(16) acc_t Xs[AB::kRows][T::BK][T::LDM];  // I, T
  __shared__ __align__(16) acc_t Ys[AB::kCols][T::BK][T::LDN];  // M (C: T)
  __shared__ State col_red[kColStats ? kWarps : 1][T::BN];       // kColStats only

  const int tx = thread_tx(), ty = thread_ty();
  const CtaTiles cta = cta_tiles<T>(n, tiles_per_split);
  const int64_t row0 = cta.row0;
  const acc_t s_m = *m2_scale_p;
  const acc_t s_c = kClip ? *clip_scale_p : acc_t(0);
  const scalar_t* const xs[2] = {I, Tx};
  const scalar_t* const ys[1] = {M};

  bool row_ok[T::TM];
  acc_t diag_r[T::TM];
  State rows[K][T::TM];  // identical in the 16 lanes of a row group
#pragma unroll
  for (int i = 0; i < T::TM; ++i) {
    const int64_t p = row0 + ty * T::TM + i;
    row_ok[i] = p < n;
    diag_r[i] = row_ok[i] ? diag[p] : acc_t(0);
#pragma unroll
    for (int k = 0; k < K; ++k) rows[k][i] = maths::lse_empty<acc_t>();
  }

  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * T::BN;
    bool col_ok[T::TN];
#pragma unroll
    for (int j = 0; j < T::TN; ++j) col_ok[j] = col0 + tx * T::TN + j < n;
    {
      acc_t s[2][T::TM][T::TN];
      tile_dots_multi<AB, scalar_t, acc_t>(xs, n, ys, n, D, row0, col0, Xs, Ys, s);
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
      // C from its own K loop (the slabs of I and T are reloaded): three live dot tiles
      // beside the nine row states would exceed the 128 registers of two CTAs per SM.
      acc_t c[T::TM][T::TN];
      tile_dots<scalar_t, acc_t>(I, Tx, n, n, D, row0, col0, Xs[0], Ys[0], c);
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
#pragma unroll
        for (int j = 0; j < T::TN; ++j) c[i][j] = maths::logit(c[i][j], s_c, acc_t(0));
      push_tile_rows(rows[2], c, col_ok);
      if constexpr (kColStats) {
        // col_red is rewritten only after the __syncthreads() that opens the next
        // tile_dots_multi, so its reads here are safe.
        merge_tile_col_states<T::BN>(c, row_ok, col0, n, col_red, col_state);
      }
    }
  }

  if (tx == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t* out = row_part + (static_cast<int64_t>(k) * gridDim.y + blockIdx.y) * n * 2;
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

// ---------------------------------------------------------------------------------
// Backward: one row-streaming gradient pass, in the row view (kTransposed false) or the
// column view (true); see M2Pairs. With dlogits (m2mix_kernels.h, maths::clip_dlogit)
//   dA_pq = g_m/(2n) exp(A_pq - lse[0][p]), dB_pq likewise with lse[1] (0 for p == q),
//   dC_pq = g_c/(2n) [exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])] - (g_c/n)[p == q],
// the CTA accumulates, for its owner rows x and this split's streamed tiles,
//   out_r[x, :] (+)= sum over the pairs k with row(k) == r of scale_k dS_k[x, :] @ Y_col(k)
// (scale_k = s_m for A, B and s_c for C):
//   row view:    out0 = grad_I = s_m dA @ M + s_c dC @ T,   out1 = grad_T = s_m dB @ M;
//   column view: out0 = grad_M = s_m (dA^T @ I + dB^T @ T), out1 = grad_Tc = s_c dC^T @ I.
// Each split writes its own slice out_r + split * n * D ([splits, n, D] buffers, summed
// by the launcher; no float atomics). Row view only, if stats_part is not null:
// stats_part[2 cta] = sum dA <I_p, M_q> + dB <T_p, M_q> (off the diagonal), and
// stats_part[2 cta + 1] = sum dC <I_p, T_q>, over the CTA's entries.
//
// Pair after pair (A, B, then C), each a streaming loop over this split's tiles: the dot
// tile (tile_dots) -> its dlogits in registers (padded and A / B diagonal entries 0) ->
// the dS tile to shared memory (transposed) -> the GEMM into out_row(k)
// (accumulate_dS_rows). The pairs do not share one K loop as in the forward: the GEMM
// needs its 4 x 4 output accumulators live, and other pairs' dot or dS tiles held in
// registers meanwhile spill (the contrastive grad_rows_kernel already uses ~128
// registers). The slabs of the dot tile and the Y chunk of the GEMM are never live
// together, so they share shared memory.
template <typename acc_t>
union M2GradSmem {
  struct {
    acc_t xs[Tile<acc_t>::BK][Tile<acc_t>::LDM];
    acc_t ys[Tile<acc_t>::BK][Tile<acc_t>::LDN];
  } slabs;                                          // tile_dots
  acc_t ychunk[Tile<acc_t>::BN][Tile<acc_t>::LDD];  // accumulate_dS_rows
};

template <typename scalar_t, typename acc_t, bool kClip, bool kTransposed>
__global__ void __launch_bounds__(kThreads, 2)
    m2mix_grad_kernel(const scalar_t* __restrict__ I, const scalar_t* __restrict__ Tx,
                      const scalar_t* __restrict__ M, int64_t n, int64_t D,
                      const acc_t* __restrict__ grads, const acc_t* __restrict__ m2_scale_p,
                      const acc_t* __restrict__ clip_scale_p, const acc_t* __restrict__ lse,
                      int64_t tiles_per_split, acc_t* __restrict__ out0,
                      acc_t* __restrict__ out1, double* __restrict__ stats_part) {
  using T = Tile<acc_t>;
  using Pairs = M2Pairs<kClip, kTransposed>;
  static_assert(T::BM == T::BN, "owner and streamed blocks must align on the diagonal");
  __shared__ __align__(16) M2GradSmem<acc_t> sm;
  __shared__ __align__(16) acc_t dSs[T::BN][T::LDM];  // one dS tile, transposed: [col][row]
  __shared__ double red[kWarps];
  // Register pressure: the kernel sits at the 128 registers of two CTAs per SM, so the
  // per-CTA constants and each thread's scalar-gradient sums live in shared memory (read
  // or updated once per pair and tile) rather than in registers across the GEMMs.
  __shared__ acc_t consts[4];  // s_m, s_c, g_m / (2n), g_c / (2n)
  __shared__ acc_t own_lse[T::BM];  // the owner rows' LSE of the running pair
  __shared__ double stat_acc[kTransposed ? 1 : 2][kTransposed ? 1 : kThreads];

  const int tx = thread_tx(), ty = thread_ty();
  const CtaTiles cta = cta_tiles<T>(n, tiles_per_split);
  const int64_t row0 = cta.row0;
  if (threadIdx.x == 0) {
    consts[0] = *m2_scale_p;
    consts[1] = kClip ? *clip_scale_p : acc_t(0);
    consts[2] = grads[0] / static_cast<acc_t>(2 * n);
    consts[3] = kClip ? grads[1] / static_cast<acc_t>(2 * n) : acc_t(0);
  }
  if constexpr (!kTransposed) stat_acc[0][threadIdx.x] = stat_acc[1][threadIdx.x] = 0.0;
  // (consts is first read after the barriers of tile_dots.)
  const scalar_t* const x0 = kTransposed ? M : I;  // the operands X_0, X_1, Y_0, Y_1
  const scalar_t* const y0 = kTransposed ? I : M;

  bool row_ok[T::TM];
#pragma unroll
  for (int i = 0; i < T::TM; ++i) row_ok[i] = row0 + ty * T::TM + i < n;

  // Pairs outside, tiles inside: K streaming loops one after the other, each shaped like
  // the contrastive grad_rows_kernel. Register pressure decided this layout: the kernel
  // sits at the 128 registers of two CTAs per SM, and with the pairs interleaved inside
  // one tile loop, or this loop unrolled, ptxas kept values live across pairs and spilled.
#pragma unroll 1
  for (int k = 0; k < Pairs::kPairs; ++k) {
    const scalar_t* const X = Pairs::row(k) == 0 ? x0 : Tx;
    const scalar_t* const Y = Pairs::col(k) == 0 ? y0 : Tx;
    // The first tile of the first pair into an output writes it, everything else adds.
    bool first = Pairs::first_into_row(k);
    acc_t* const out = (Pairs::row(k) == 0 ? out0 : out1) +
                       static_cast<int64_t>(blockIdx.y) * n * D;  // this split's slice
    // The LSEs of this pair: by p (row LSE of A, B or C) and, for C, by q (column LSE).
    const acc_t* const lse_p = lse + k * n;
    const acc_t* const lse_q = kClip ? lse + 3 * n : lse;  // read for C only
    // The owner rows' LSE (row view: by p; column view: C's by q), staged in shared
    // memory. Every reader of the previous pair's values passed the barriers of its last
    // GEMM; the barriers of the next tile_dots publish these writes.
    if (threadIdx.x < T::BM) {
      const int64_t x = row0 + threadIdx.x;
      own_lse[threadIdx.x] = x >= n ? acc_t(0) : !kTransposed ? lse_p[x] : k == 2 ? lse_q[x] : acc_t(0);
    }
    for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
      const int64_t col0 = t * T::BN;
      // (tile_dots opens with __syncthreads(): every thread is done with the previous
      // tile's GEMM, i.e. with dSs and the Y chunk.)
      acc_t d[T::TM][T::TN];
      tile_dots<scalar_t, acc_t>(X, Y, n, n, D, row0, col0, sm.slabs.xs, sm.slabs.ys, d);
      const acc_t scale = consts[k == 2 ? 1 : 0], w_m = consts[2], w_c = consts[3];
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
        l_y[j] = !col_ok[j] ? acc_t(0) : kTransposed ? lse_p[y] : k == 2 ? lse_q[y] : acc_t(0);
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
            if (k < 2) {  // A or B: the true pair on the diagonal is the op body's
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
      if constexpr (!kTransposed) stat_acc[k == 2 ? 1 : 0][threadIdx.x] += tile_stat;

      // out_row(k) (+)= scale_k * dS_k @ Y_col(k). (Tuning, on a GPU: the row view's two
      // pairs into grad_I could share one sweep over D, saving a read-modify-write.)
      accumulate_dS_rows<scalar_t, acc_t>(dSs, Y, n, D, col0, scale,
                                          out, row0, row_ok,
                                          !first, sm.ychunk);
      first = false;
    }
  }

  if (cta.t_begin >= cta.t_end) {  // no streamed tile in this split (the host plan avoids it): write zeros
    const int64_t slice = static_cast<int64_t>(blockIdx.y) * n * D;  // this split's slice
    zero_rows<acc_t>(out0 + slice, row0, D, row_ok);
    if (Pairs::kRows > 1) zero_rows<acc_t>(out1 + slice, row0, D, row_ok);
  }

  if (!kTransposed && stats_part != nullptr) {  // uniform over the CTA: barriers are safe
    const double sum_m = block_sum(stat_acc[0][threadIdx.x], red);
    const double sum_c = block_sum(stat_acc[1][threadIdx.x], red);
    if (threadIdx.x == 0) {
      const int64_t c = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
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
