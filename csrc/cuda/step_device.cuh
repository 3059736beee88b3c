// The __global__ kernels of a robust fine-tuning step's tile work (step_kernels.h: CLIP and
// m^2-mix from one pass over the logit tiles), each written once over a tile engine E
// (ffma_tile.cuh or mma_tile.cuh, as in contrastive_device.cuh). step_cuda.cu sizes and
// starts them; this header holds no host (ATen) code, so the kernels also compile for the
// CPU emulation of the tests.
//
// Operands: row operands x = {I, T}, column operands y = {M, T} with m^2 (and CLIP); x = {I},
// y = {T} for CLIP alone. One engine call per tile computes every product the step needs
// from shared slabs (StepPairs): A = I M^T, B = T M^T, C = I T^T.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/contrastive_device.cuh"
#include "cuda/mma_ptx.cuh"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_layout.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// The tile products of a step: pair kA = (I, M), kB = (T, M), kC = (I, T); -1 when absent.
template <bool kM2, bool kClip>
struct StepPairs;
template <>
struct StepPairs<true, true> {
  static constexpr int kRows = 2, kCols = 2, kPairs = 3, kA = 0, kB = 1, kC = 2;
  __host__ __device__ static constexpr int row(int k) { return k == 1 ? 1 : 0; }
  __host__ __device__ static constexpr int col(int k) { return k == 2 ? 1 : 0; }
};
template <>
struct StepPairs<true, false> {
  static constexpr int kRows = 2, kCols = 1, kPairs = 2, kA = 0, kB = 1, kC = -1;
  __host__ __device__ static constexpr int row(int k) { return k; }
  __host__ __device__ static constexpr int col(int) { return 0; }
};
template <>
struct StepPairs<false, true> {
  static constexpr int kRows = 1, kCols = 1, kPairs = 1, kA = -1, kB = -1, kC = 0;
  __host__ __device__ static constexpr int row(int) { return 0; }
  __host__ __device__ static constexpr int col(int) { return 0; }
};

// The scalars of a step, read on the device (no host synchronisation).
template <typename acc_t>
struct StepScalars {
  const acc_t* m2_scale;    // with m^2
  const acc_t* clip_scale;  // with CLIP
  const acc_t* diag;        // [n] s_m <I_p, T_p> (with m^2)
};

// Row log-sum-exp of A, B and C (step_kernels.h), over the column tiles of this split:
// row_part[term][split][p] = (m, l) for the terms A (0), B (1), C (2) that are on; the
// diagonal of A and B holds the true pair's logit diag[p]. kColStats (float accumulation
// only): also the column states of C, merged into col_state (atomic_lse_merge).
template <class E, typename in_t, bool kM2, bool kClip, bool kColStats>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    step_lse_kernel(const TileOperands<in_t> ops, const StepScalars<typename E::acc_t> sc,
                    int64_t tiles_per_split, typename E::acc_t* __restrict__ row_part,
                    unsigned long long* __restrict__ col_state) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  using Pairs = StepPairs<kM2, kClip>;
  static_assert(!kColStats || (kClip && std::is_same<acc_t, float>::value),
                "the packed column state holds two floats");
  __shared__ maths::LseState<acc_t> row_red[L::kRowWarps][L::BM];
  __shared__ maths::LseState<float> col_red[L::kColWarps][L::BN];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();

  const int64_t n = ops.n;
  const CtaTiles cta = cta_tiles<E::BM, E::BN>(0, n, tiles_per_split);
  const acc_t s_m = kM2 ? *sc.m2_scale : acc_t(0), s_c = kClip ? *sc.clip_scale : acc_t(0);
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, n);
  acc_t diag[L::kRows];
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) {
    const int64_t p = cta.row0 + L::row(r);
    diag[r] = (kM2 && row_ok[r]) ? sc.diag[p] : acc_t(0);
  }
  RowLse<L> rows[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) rows[k].init();

  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * E::BN;
    acc_t s[Pairs::kPairs][L::kRows][L::kCols];
    E::template tile<Pairs>(ops, cta.row0, col0, smem, s);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, n);
    if constexpr (kM2) {
#pragma unroll
      for (int k = Pairs::kA; k <= Pairs::kB; ++k) {
#pragma unroll
        for (int r = 0; r < L::kRows; ++r)
#pragma unroll
          for (int c = 0; c < L::kCols; ++c)
            s[k][r][c] = cta.row0 + L::row(r) == col0 + L::col(c)
                             ? diag[r]
                             : maths::logit(s[k][r][c], s_m, acc_t(0));
        rows[k].push(s[k], col_ok);
      }
    }
    if constexpr (kClip) {
      to_logits<L>(s[Pairs::kC], s_c, acc_t(0));
      rows[2].push(s[Pairs::kC], col_ok);
      if constexpr (kColStats) merge_tile_cols<L>(s[Pairs::kC], row_ok, col0, n, col_red, col_state);
    }
  }
  const int64_t splits = gridDim.y;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if ((k < 2 && !kM2) || (k == 2 && !kClip)) continue;
    rows[k].finish(row_red);
    rows[k].write(row_part + (k * splits + blockIdx.y) * n * 2, cta.row0, n);
  }
}

// One row chunk of a step's dlogits (step_kernels.h): rows p in [r0, r0 + rows) against all
// n columns q, into dA, dB, dC ([rows, n], ws_t) of the terms that are on;
// stats_part[2 cta + {0, 1}] = the CTA's sums of dA <I_p, M_q> + dB <T_p, M_q> and of
// dC <I_p, T_q> (in double).
template <class E, typename in_t, typename ws_t, bool kM2, bool kClip>
__global__ void __launch_bounds__(E::kThreads, E::kMinBlocks)
    step_dlogits_kernel(const TileOperands<in_t> ops, const StepScalars<typename E::acc_t> sc,
                        const typename E::acc_t* __restrict__ lse, int64_t r0, int64_t rows,
                        int64_t tiles_per_split, ws_t* __restrict__ dA, ws_t* __restrict__ dB,
                        ws_t* __restrict__ dC, double* __restrict__ stats_part) {
  using L = typename E::L;
  using acc_t = typename E::acc_t;
  using Pairs = StepPairs<kM2, kClip>;
  __shared__ double red[L::kWarps];
  unsigned char* smem = ptx::dynamic_smem<unsigned char>();

  const int64_t n = ops.n;
  const CtaTiles cta = cta_tiles<E::BM, E::BN>(r0, n, tiles_per_split);
  const acc_t s_m = kM2 ? *sc.m2_scale : acc_t(0), s_c = kClip ? *sc.clip_scale : acc_t(0);
  bool row_ok[L::kRows];
  valid_rows<L>(row_ok, cta.row0, r0 + rows);
  acc_t lse_a[L::kRows], lse_b[L::kRows], lse_r[L::kRows];
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) {
    const int64_t p = row_ok[r] ? cta.row0 + L::row(r) : 0;
    lse_a[r] = kM2 ? lse[p] : acc_t(0);
    lse_b[r] = kM2 ? lse[n + p] : acc_t(0);
    lse_r[r] = kClip ? lse[2 * n + p] : acc_t(0);
  }

  double stat_m = 0.0, stat_c = 0.0;
  for (int64_t t = cta.t_begin; t < cta.t_end; ++t) {
    const int64_t col0 = t * E::BN;
    acc_t d[Pairs::kPairs][L::kRows][L::kCols];
    E::template tile<Pairs>(ops, cta.row0, col0, smem, d);
    bool col_ok[L::kCols];
    valid_cols<L>(col_ok, col0, n);
    acc_t tile_m = acc_t(0), tile_c = acc_t(0);
#pragma unroll
    for (int c = 0; c < L::kCols; ++c) {
      const int64_t q = col0 + L::col(c);
      const acc_t lse_c = (kClip && col_ok[c]) ? lse[3 * n + q] : acc_t(0);
#pragma unroll
      for (int r = 0; r < L::kRows; ++r) {
        const int64_t p = cta.row0 + L::row(r);
        const bool ok = row_ok[r] && col_ok[c];
        if constexpr (kM2) {
          // exp(A_pq - lse[0][p]) off the diagonal; the true pair's gradient is the op body's.
#pragma unroll
          for (int k = Pairs::kA; k <= Pairs::kB; ++k) {
            const acc_t dot = d[k][r][c];
            const acc_t l = k == Pairs::kA ? lse_a[r] : lse_b[r];
            acc_t g = acc_t(0);
            if (ok && p != q) {
              g = maths::clip_dlogit(maths::logit(dot, s_m, acc_t(0)), l, acc_t(0), acc_t(1),
                                     acc_t(0), acc_t(0), false);
              tile_m += g * dot;
            }
            d[k][r][c] = g;
          }
        }
        if constexpr (kClip) {
          const acc_t dot = d[Pairs::kC][r][c];
          acc_t g = acc_t(0);
          if (ok) {
            g = maths::clip_dlogit(maths::logit(dot, s_c, acc_t(0)), lse_r[r], lse_c,
                                   acc_t(0.5), acc_t(0.5), acc_t(1), p == q);
            tile_c += g * dot;
          }
          d[Pairs::kC][r][c] = g;
        }
      }
    }
    stat_m += static_cast<double>(tile_m);
    stat_c += static_cast<double>(tile_c);
    const int64_t row_base = cta.row0 - r0;
    if constexpr (kM2) {
      store_tile<L>(dA, n, row_base, col0, d[Pairs::kA], row_ok, col_ok);
      store_tile<L>(dB, n, row_base, col0, d[Pairs::kB], row_ok, col_ok);
    }
    if constexpr (kClip) store_tile<L>(dC, n, row_base, col0, d[Pairs::kC], row_ok, col_ok);
  }

  const double sm = block_sum<L>(stat_m, red);
  const double scl = block_sum<L>(stat_c, red);
  if (threadIdx.x == 0) {
    stats_part[2 * cta_index()] = sm;
    stats_part[2 * cta_index() + 1] = scl;
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
