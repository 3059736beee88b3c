// The __global__ kernels of the fused contrastive losses; the launchers that size and
// start them are in contrastive_cuda.cu (see the design notes there). This header
// holds no host (ATen) code, so the kernels can also be compiled for a CPU
// emulation in tests.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/contrastive_tiles.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// The rows and column tiles of this CTA: rows [row0, row0 + BM) (blockIdx.x) against
// column tiles [t_begin, t_end) of this split (blockIdx.y).
struct CtaTiles {
  int64_t row0, t_begin, t_end;
};

template <typename T>
__device__ __forceinline__ CtaTiles cta_tiles(int64_t m, int64_t tiles_per_split) {
  const int64_t num_tiles = (m + T::BN - 1) / T::BN;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  return CtaTiles{static_cast<int64_t>(blockIdx.x) * T::BM, t_begin,
                  min(num_tiles, t_begin + tiles_per_split)};
}

// Row (and optionally column) log-sum-exp statistics of S = scale * P Q^T + bias.
// grid = (row blocks, column splits). Writes, for each valid row p of this block,
// row_part[split][p] = (m, l), the online LSE state of row p over this split's
// columns. kColStats (float accumulation only): also merges each column's state over
// this block's rows into col_state[q] (packed, see atomic_lse_merge).
template <typename scalar_t, typename acc_t, bool kColStats>
__global__ void __launch_bounds__(kThreads, 2)
    clip_lse_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q,
                    int64_t n, int64_t m, int64_t D, const acc_t* __restrict__ scale_p,
                    const acc_t* __restrict__ bias_p, int64_t tiles_per_split,
                    acc_t* __restrict__ row_part, unsigned long long* __restrict__ col_state) {
  static_assert(!kColStats || std::is_same<acc_t, float>::value,
                "the packed column state holds two floats");
  using T = Tile<acc_t>;
  using State = maths::LseState<acc_t>;
  __shared__ __align__(16) acc_t As[T::BK][T::LDM];
  __shared__ __align__(16) acc_t Bs[T::BK][T::LDN];
  __shared__ State col_red[kWarps][T::BN];  // per-warp column states (kColStats only)

  const int tx = thread_tx(), ty = thread_ty();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const CtaTiles cta = cta_tiles<T>(m, tiles_per_split);
  const int64_t row0 = cta.row0, t_begin = cta.t_begin, t_end = cta.t_end;
  const acc_t scale = *scale_p, bias = *bias_p;

  bool row_ok[T::TM];
  State rows[T::TM];  // identical in the 16 lanes of a row group
#pragma unroll
  for (int i = 0; i < T::TM; ++i) {
    row_ok[i] = row0 + ty * T::TM + i < n;
    rows[i] = maths::lse_empty<acc_t>();
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * T::BN;
    acc_t s[T::TM][T::TN];
    tile_dots<scalar_t, acc_t>(P, Q, n, m, D, row0, col0, As, Bs, s);
    bool col_ok[T::TN];
#pragma unroll
    for (int j = 0; j < T::TN; ++j) col_ok[j] = col0 + tx * T::TN + j < m;
#pragma unroll
    for (int i = 0; i < T::TM; ++i)
#pragma unroll
      for (int j = 0; j < T::TN; ++j) s[i][j] = maths::logit(s[i][j], scale, bias);

    // Rows: (max, sum exp) over the tile's valid columns, merged into the row state.
    // Every tile has at least one valid column, so the group max is over real entries.
#pragma unroll
    for (int i = 0; i < T::TM; ++i) {
      acc_t mx = neg_inf<acc_t>();
#pragma unroll
      for (int j = 0; j < T::TN; ++j)
        if (col_ok[j]) mx = nan_max(mx, s[i][j]);
      mx = row_group_max(mx);
      acc_t sum = acc_t(0);
      if (mx != neg_inf<acc_t>()) {  // all -inf: adds nothing (exp(-inf + inf) is nan)
#pragma unroll
        for (int j = 0; j < T::TN; ++j)
          if (col_ok[j]) sum += std::exp(s[i][j] - mx);
      }
      sum = row_group_sum(sum);
      rows[i] = maths::lse_push_block(rows[i], mx, sum);  // sum == 0: no-op
    }

    if constexpr (kColStats) {
      // Columns: the state over this thread's valid rows, merged with the other ty
      // of the warp (lane ^ 16), then over the 8 warps in shared memory.
#pragma unroll
      for (int j = 0; j < T::TN; ++j) {
        acc_t mx = neg_inf<acc_t>();
#pragma unroll
        for (int i = 0; i < T::TM; ++i)
          if (row_ok[i]) mx = nan_max(mx, s[i][j]);
        acc_t sum = acc_t(0);
        if (mx != neg_inf<acc_t>()) {
#pragma unroll
          for (int i = 0; i < T::TM; ++i)
            if (row_ok[i]) sum += std::exp(s[i][j] - mx);
        }
        State st{mx, sum};
        const State other{__shfl_xor_sync(kFullMask, st.m, 16),
                          __shfl_xor_sync(kFullMask, st.l, 16)};
        st = maths::lse_merge(st, other);
        if (lane < 16) col_red[warp][tx * T::TN + j] = st;
      }
      __syncthreads();
      if (threadIdx.x < T::BN) {
        const int c = threadIdx.x;
        State st = col_red[0][c];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) st = maths::lse_merge(st, col_red[w][c]);
        if (col0 + c < m && st.l != acc_t(0)) atomic_lse_merge(&col_state[col0 + c], st);
      }
      // col_red is rewritten only after the __syncthreads() that opens the next
      // tile_dots, so these reads are safe.
    }
  }

  if (tx == 0) {
    acc_t* out = row_part + static_cast<int64_t>(blockIdx.y) * n * 2;
#pragma unroll
    for (int i = 0; i < T::TM; ++i) {
      if (!row_ok[i]) continue;
      const int64_t p = row0 + ty * T::TM + i;
      out[2 * p] = rows[i].m;
      out[2 * p + 1] = rows[i].l;
    }
  }
}

// out[r] = lse_value(merge over s of part[s][r]) for r < rows.
template <typename acc_t>
__global__ void merge_row_states_kernel(const acc_t* __restrict__ part, int64_t splits,
                                        int64_t rows, acc_t* __restrict__ out) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    maths::LseState<acc_t> st = maths::lse_empty<acc_t>();
    for (int64_t s = 0; s < splits; ++s) {
      const acc_t* e = part + (s * rows + r) * 2;
      st = maths::lse_merge(st, maths::LseState<acc_t>{e[0], e[1]});
    }
    out[r] = maths::lse_value(st);
  }
}

// state[q] = the empty packed state (-inf, 0).
static __global__ void init_col_states_kernel(unsigned long long* __restrict__ state, int64_t m) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < m;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x)
    state[q] = pack_lse(maths::lse_empty<float>());
}

// out[q] = lse_value(state[q]).
static __global__ void finalize_col_states_kernel(const unsigned long long* __restrict__ state,
                                                  int64_t m, float* __restrict__ out) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < m;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[q] = maths::lse_value(unpack_lse(state[q]));
}

// partial[cta] = sum of softplus(S_pq) over the CTA's valid entries (in double).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    softplus_sum_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q,
                        int64_t n, int64_t m, int64_t D, const acc_t* __restrict__ scale_p,
                        const acc_t* __restrict__ bias_p, int64_t tiles_per_split,
                        double* __restrict__ partial) {
  using T = Tile<acc_t>;
  __shared__ __align__(16) acc_t As[T::BK][T::LDM];
  __shared__ __align__(16) acc_t Bs[T::BK][T::LDN];
  __shared__ double red[kWarps];

  const int tx = thread_tx(), ty = thread_ty();
  const CtaTiles cta = cta_tiles<T>(m, tiles_per_split);
  const int64_t row0 = cta.row0, t_begin = cta.t_begin, t_end = cta.t_end;
  const acc_t scale = *scale_p, bias = *bias_p;

  bool row_ok[T::TM];
#pragma unroll
  for (int i = 0; i < T::TM; ++i) row_ok[i] = row0 + ty * T::TM + i < n;

  double total = 0.0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * T::BN;
    acc_t dots[T::TM][T::TN];
    tile_dots<scalar_t, acc_t>(P, Q, n, m, D, row0, col0, As, Bs, dots);
    acc_t tile_sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < T::TN; ++j) {
      if (col0 + tx * T::TN + j >= m) continue;
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
        if (row_ok[i]) tile_sum += maths::softplus(maths::logit(dots[i][j], scale, bias));
    }
    total += static_cast<double>(tile_sum);
  }
  total = block_sum(total, red);
  if (threadIdx.x == 0)
    partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

// How dS is formed, in the kernel's dtype. A null lse pointer is never read (its
// weight is 0).
template <typename acc_t>
struct DlogitParams {
  acc_t w_row, w_col, w_pos;  // CLIP weights; SigLIP uses w_row only
  const acc_t* row_lse;       // [n] or nullptr
  const acc_t* col_lse;       // [m] or nullptr
  bool has_positives;
  long long pos_offset;
};

// grad[split][p, :] = scale * sum over this split's columns q of dS_pq * Q_q, for the
// BM rows p of this block; dS_pq = g * dlogit(S_pq) per maths::clip_dlogit or
// maths::siglip_dlogit. stats_part (if not null): per-CTA sums of dS * <P_p, Q_q>
// and of dS, at stats_part[2 * cta], stats_part[2 * cta + 1].
template <typename scalar_t, typename acc_t, bool kSiglip>
__global__ void __launch_bounds__(kThreads, 2)
    grad_rows_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q,
                     int64_t n, int64_t m, int64_t D, const acc_t* __restrict__ scale_p,
                     const acc_t* __restrict__ bias_p, const acc_t* __restrict__ g_p,
                     const DlogitParams<acc_t> prm, int64_t tiles_per_split,
                     acc_t* __restrict__ grad, double* __restrict__ stats_part) {
  using T = Tile<acc_t>;
  __shared__ __align__(16) acc_t As[T::BK][T::LDM];
  __shared__ __align__(16) acc_t Bs[T::BK][T::LDN];
  __shared__ __align__(16) acc_t dSs[T::BN][T::LDM];  // dS tile, transposed: [col][row]
  __shared__ __align__(16) acc_t Qs[T::BN][T::LDD];   // Q tile, one feature chunk
  __shared__ double red[kWarps];

  const int tx = thread_tx(), ty = thread_ty();
  const CtaTiles cta = cta_tiles<T>(m, tiles_per_split);
  const int64_t row0 = cta.row0, t_begin = cta.t_begin, t_end = cta.t_end;
  const acc_t scale = *scale_p, bias = *bias_p, g = *g_p;
  // Weights times g; a zero weight stays exactly 0 (even for g = inf / nan) so that
  // clip_dlogit keeps its term off and never looks at the (absent) lse.
  const acc_t w_row = prm.w_row == acc_t(0) ? acc_t(0) : prm.w_row * g;
  const acc_t w_col = prm.w_col == acc_t(0) ? acc_t(0) : prm.w_col * g;
  const acc_t w_pos = prm.w_pos == acc_t(0) ? acc_t(0) : prm.w_pos * g;
  acc_t* out = grad + static_cast<int64_t>(blockIdx.y) * n * D;  // this split's slice

  bool row_ok[T::TM];
  acc_t row_lse[T::TM];
#pragma unroll
  for (int i = 0; i < T::TM; ++i) {
    const int64_t p = row0 + ty * T::TM + i;
    row_ok[i] = p < n;
    row_lse[i] = (!kSiglip && prm.row_lse != nullptr && row_ok[i]) ? prm.row_lse[p] : acc_t(0);
  }

  double stat_dot = 0.0, stat_sum = 0.0;
  bool first = true;  // the first tile writes the output rows, later tiles add
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * T::BN;
    acc_t dots[T::TM][T::TN];
    tile_dots<scalar_t, acc_t>(P, Q, n, m, D, row0, col0, As, Bs, dots);
    // (tile_dots opened with __syncthreads(), so every thread is done with the
    // previous tile's dSs and Qs.)

    // dS for the tile, masked entries 0, stored transposed into shared memory.
    acc_t tile_dot = acc_t(0), tile_sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < T::TN; ++j) {
      const int64_t q = col0 + tx * T::TN + j;
      const bool col_ok = q < m;
      const acc_t col_lse =
          (!kSiglip && prm.col_lse != nullptr && col_ok) ? prm.col_lse[q] : acc_t(0);
#pragma unroll
      for (int i = 0; i < T::TM; ++i) {
        const int64_t p = row0 + ty * T::TM + i;
        acc_t d = acc_t(0);
        if (row_ok[i] && col_ok) {
          const acc_t s = maths::logit(dots[i][j], scale, bias);
          const bool pos = maths::is_positive(p, q, prm.has_positives, prm.pos_offset);
          if constexpr (kSiglip) {
            d = maths::siglip_dlogit(s, w_row, pos);
          } else {
            d = maths::clip_dlogit(s, row_lse[i], col_lse, w_row, w_col, w_pos, pos);
          }
          tile_dot += d * dots[i][j];
          tile_sum += d;
        }
        dSs[tx * T::TN + j][ty * T::TM + i] = d;
      }
    }
    stat_dot += static_cast<double>(tile_dot);
    stat_sum += static_cast<double>(tile_sum);

    // out[rows, :] (+)= scale * dS_tile @ Q[col0:col0+BN, :] (the first tile writes).
    accumulate_dS_rows<scalar_t, acc_t>(dSs, Q, m, D, col0, scale, out, row0, row_ok, !first, Qs);
    first = false;
  }

  // No column tile in this split (the host plan avoids it): write zeros.
  if (first) zero_rows(out, row0, D, row_ok);

  if (stats_part != nullptr) {  // uniform over the CTA, so block_sum's barriers are safe
    const double sd = block_sum(stat_dot, red);
    const double ss = block_sum(stat_sum, red);
    if (threadIdx.x == 0) {
      const int64_t cta = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
      stats_part[2 * cta] = sd;
      stats_part[2 * cta + 1] = ss;
    }
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
