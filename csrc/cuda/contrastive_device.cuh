// The __global__ kernels of the fused contrastive losses (docs/maths.md, sections 1-2),
// each written once over a tile engine E: FfmaEngine (ffma_tile.cuh: float at "highest"
// matmul precision, double) or MmaEngine (mma_tile.cuh: bf16 / f16, and float as TF32 where
// torch's matmul precision allows it). contrastive_cuda.cu sizes and starts them. This
// header holds no host (ATen) code, so the kernels also compile for the CPU emulation of the
// tests.
//
// Every kernel: grid = (row blocks, column splits); CTA (bx, by) owns the BM rows
// row_base + bx BM and the column tiles [by tps, (by + 1) tps) of this split.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/mma_ptx.cuh"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_layout.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

struct CtaTiles {
  int64_t row0, t_begin, t_end;
};

template <int BM, int BN>
__device__ __forceinline__ CtaTiles cta_tiles(int64_t row_base, int64_t m, int64_t tiles_per_split) {
  const int64_t num_tiles = (m + BN - 1) / BN;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  return CtaTiles{row_base + static_cast<int64_t>(blockIdx.x) * BM, t_begin,
                  min(num_tiles, t_begin + tiles_per_split)};
}

__device__ __forceinline__ int64_t cta_index() {
  return static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
}

// logits s = scale * dot + bias in place, with the tile's row / column validity.
template <class L>
__device__ __forceinline__ void to_logits(typename L::acc_t (&s)[L::kRows][L::kCols],
                                          typename L::acc_t scale, typename L::acc_t bias) {
#pragma unroll
  for (int r = 0; r < L::kRows; ++r)
#pragma unroll
    for (int c = 0; c < L::kCols; ++c) s[r][c] = maths::logit(s[r][c], scale, bias);
}

template <class L>
__device__ __forceinline__ void valid_rows(bool (&ok)[L::kRows], int64_t row0, int64_t row_end) {
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) ok[r] = row0 + L::row(r) < row_end;
}

template <class L>
__device__ __forceinline__ void valid_cols(bool (&ok)[L::kCols], int64_t col0, int64_t m) {
#pragma unroll
  for (int c = 0; c < L::kCols; ++c) ok[c] = col0 + L::col(c) < m;
}

// Row (and optionally column) log-sum-exp statistics of S = scale * P Q^T + bias
// (ops.x[0] = P, ops.y[0] = Q). Writes row_part[split][p] = (m, l), the online LSE state
// of row p over this split's columns. kColStats (float accumulation only): also merges
// each column's state over this block's rows into col_state[q] (atomic_lse_merge).
template <class E, typename in_t, bool kColStats>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    clip_lse_kernel(const TileOperands<in_t> ops, const typename E::acc_t* __restrict__ scale_p,
                    const typename E::acc_t* __restrict__ bias_p, int64_t tiles_per_split,
                    typename E::acc_t* __restrict__ row_part,
                    unsigned long long* __restrict__ col_state) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  static_assert(!kColStats || std::is_same<acc_t, float>::value,
                "the packed column state holds two floats");
  __shared__ maths::LseState<acc_t> row_red[L::kRowWarps][L::BM];
  __shared__ maths::LseState<float> col_red[L::kColWarps][L::BN];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();

  const CtaTiles cta = cta_tiles<E::BM, E::BN>(0, ops.m, tiles_per_split);
  const acc_t scale = *scale_p, bias = *bias_p;
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, ops.n);
  RowLse<L> rows;
  rows.init();

  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * E::BN;
    acc_t s[1][L::kRows][L::kCols];
    E::template tile<OneDotPair>(ops, cta.row0, col0, smem, s);
    to_logits<L>(s[0], scale, bias);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, ops.m);
    rows.push(s[0], col_ok);
    if constexpr (kColStats) merge_tile_cols<L>(s[0], row_ok, col0, ops.m, col_red, col_state);
  }
  rows.finish(row_red);
  rows.write(row_part + static_cast<int64_t>(blockIdx.y) * ops.n * 2, cta.row0, ops.n);
}

// partial[cta] = sum of softplus(S_pq) over the CTA's valid entries (in double).
template <class E, typename in_t>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    softplus_sum_kernel(const TileOperands<in_t> ops, const typename E::acc_t* __restrict__ scale_p,
                        const typename E::acc_t* __restrict__ bias_p, int64_t tiles_per_split,
                        double* __restrict__ partial) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  __shared__ double red[L::kWarps];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();

  const CtaTiles cta = cta_tiles<E::BM, E::BN>(0, ops.m, tiles_per_split);
  const acc_t scale = *scale_p, bias = *bias_p;
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, ops.n);

  double total = 0.0;
  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * E::BN;
    acc_t s[1][L::kRows][L::kCols];
    E::template tile<OneDotPair>(ops, cta.row0, col0, smem, s);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, ops.m);
    acc_t tile_sum = acc_t(0);
#pragma unroll
    for (int r = 0; r < L::kRows; ++r)
#pragma unroll
      for (int c = 0; c < L::kCols; ++c)
        if (row_ok[r] && col_ok[c]) tile_sum += maths::softplus(maths::logit(s[0][r][c], scale, bias));
    total += static_cast<double>(tile_sum);
  }
  total = block_sum<L>(total, red);
  if (threadIdx.x == 0) partial[cta_index()] = total;
}

// How dS is formed (contrastive_kernels.h, DlogitSpec), in the kernel's dtype. A null lse
// pointer is never read (its weight is 0).
template <typename acc_t>
struct DlogitParams {
  acc_t w_row, w_col, w_pos;  // CLIP weights; SigLIP uses w_row only
  const acc_t* row_lse;       // [n] or nullptr
  const acc_t* col_lse;       // [m] or nullptr
  bool has_positives;
  long long pos_offset;
};

// One row chunk of dlogits: for the rows p in [r0, r0 + rows) of P (ops.x[0]) against all m
// rows q of Q (ops.y[0]), ds[(p - r0) * m + q] = dS_pq (maths::clip_dlogit or siglip_dlogit,
// rounded to ws_t), and stats_part[2 cta + {0, 1}] = the CTA's sums of dS_pq <P_p, Q_q> and
// of dS_pq (in double). grid.x covers the chunk's rows.
template <class E, typename in_t, typename ws_t, bool kSiglip>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    dlogits_kernel(const TileOperands<in_t> ops, const typename E::acc_t* __restrict__ scale_p,
                   const typename E::acc_t* __restrict__ bias_p,
                   const DlogitParams<typename E::acc_t> prm, int64_t r0, int64_t rows,
                   int64_t tiles_per_split, ws_t* __restrict__ ds, double* __restrict__ stats_part) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  __shared__ double red[L::kWarps];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();

  const CtaTiles cta = cta_tiles<E::BM, E::BN>(r0, ops.m, tiles_per_split);
  const acc_t scale = *scale_p, bias = *bias_p;
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, r0 + rows);
  acc_t row_lse[L::kRows];
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) {
    const int64_t p = cta.row0 + L::row(r);
    row_lse[r] = (!kSiglip && prm.row_lse != nullptr && row_ok[r]) ? prm.row_lse[p] : acc_t(0);
  }

  double stat_dot = 0.0, stat_sum = 0.0;
  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * E::BN;
    acc_t dots[1][L::kRows][L::kCols];
    E::template tile<OneDotPair>(ops, cta.row0, col0, smem, dots);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, ops.m);
    acc_t tile_dot = acc_t(0), tile_sum = acc_t(0);
#pragma unroll
    for (int c = 0; c < L::kCols; ++c) {
      const int64_t q = col0 + L::col(c);
      const acc_t col_lse =
          (!kSiglip && prm.col_lse != nullptr && col_ok[c]) ? prm.col_lse[q] : acc_t(0);
#pragma unroll
      for (int r = 0; r < L::kRows; ++r) {
        const int64_t p = cta.row0 + L::row(r);
        const acc_t dot = dots[0][r][c];
        acc_t d = acc_t(0);
        if (row_ok[r] && col_ok[c]) {
          const acc_t s = maths::logit(dot, scale, bias);
          const bool pos = maths::is_positive(p, q, prm.has_positives, prm.pos_offset);
          if constexpr (kSiglip) {
            d = maths::siglip_dlogit(s, prm.w_row, pos);
          } else {
            d = maths::clip_dlogit(s, row_lse[r], col_lse, prm.w_row, prm.w_col, prm.w_pos, pos);
          }
          tile_dot += d * dot;
          tile_sum += d;
        }
        dots[0][r][c] = d;
      }
    }
    stat_dot += static_cast<double>(tile_dot);
    stat_sum += static_cast<double>(tile_sum);
    store_tile<L>(ds, ops.m, cta.row0 - r0, col0, dots[0], row_ok, col_ok);
  }

  const double sd = block_sum<L>(stat_dot, red);
  const double ss = block_sum<L>(stat_sum, red);
  if (threadIdx.x == 0) {
    stats_part[2 * cta_index()] = sd;
    stats_part[2 * cta_index() + 1] = ss;
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
