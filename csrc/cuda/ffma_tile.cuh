// The CUDA-core tile engine: logit tiles from shared-memory slabs and FMA register
// micro-tiles, in float ("highest" float32 matmul precision: exact fp32 products) or double.
// The 16-bit and TF32 tile products run on tensor cores instead (mma_tile.cuh); both
// engines fill the same accumulator tiles, laid out as tile_layout.cuh says, so every
// kernel and epilogue is written once for both.
//
// A CTA of 256 threads (a 16 x 16 grid, GridLayout) computes BM x BN tiles in BK-deep slabs
// of D: BM = BN = 64 for float, 32 for double; each thread holds a 4 x 4 (2 x 2) micro-tile
// read from shared memory with one 16-byte load per operand per k. Rows beyond n or m and
// features beyond D load as zero.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/tile_layout.cuh"

namespace robustft {
namespace cuda_tiles {

template <typename acc_t>
struct FfmaCfg;
template <>
struct FfmaCfg<float> {
  static constexpr int BM = 64, BN = 64, BK = 16, PAD = 4;
};
template <>
struct FfmaCfg<double> {
  static constexpr int BM = 32, BN = 32, BK = 16, PAD = 2;
};

// kRows (kCols) consecutive accumulators, read from shared memory in one 16-byte load.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename acc_t_>
struct FfmaEngine {
  using acc_t = acc_t_;
  using Cfg = FfmaCfg<acc_t>;
  using L = GridLayout<Cfg::BM, Cfg::BN, acc_t>;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, kThreads = L::kThreads;
  // CTAs per SM the registers must allow (launch bounds): one, so the three-product step
  // kernels keep their accumulators in registers (two CTAs capped them at 128 and spilled).
  static constexpr int kMinBlocks = 1;
  static constexpr int LDM = BM + Cfg::PAD, LDN = BN + Cfg::PAD;  // 16-byte aligned rows
  static_assert(L::kRows * sizeof(acc_t) == 16 && L::kCols * sizeof(acc_t) == 16,
                "micro-tile rows are read with one 16-byte load");

  template <class Pairs>
  static constexpr int smem_bytes() {
    return (Pairs::kRows * BK * LDM + Pairs::kCols * BK * LDN) * int(sizeof(acc_t));
  }

  // S[k][r] = X[r0 + r][k0 + k] (0 outside the matrix) for r < R, k < BK: a transposed
  // copy, so the K loop reads rows of S. Consecutive threads take consecutive k, which
  // keeps the global reads of one row of X contiguous.
  template <int R, int LD, typename in_t>
  __device__ static void load_slab(const in_t* __restrict__ X, int64_t rows, int64_t D, int64_t ld,
                                   int64_t r0, int64_t k0, acc_t* S) {
    static_assert((R * BK) % kThreads == 0, "slab must split evenly over the CTA");
#pragma unroll
    for (int it = 0; it < R * BK / kThreads; ++it) {
      const int e = threadIdx.x + it * kThreads;
      const int r = e / BK, k = e % BK;
      const int64_t gr = r0 + r, gk = k0 + k;
      acc_t v = acc_t(0);
      if (gr < rows && gk < D) v = static_cast<acc_t>(X[gr * ld + gk]);
      S[k * LD + r] = v;
    }
  }

  // acc[k][r][c] = <X_{row(k)}[row0 + L::row(r)], Y_{col(k)}[col0 + L::col(c)]> for the
  // pairs k of Pairs; every operand's slab is loaded once per K step, however many pairs
  // read it. Opens with __syncthreads(), so it also fences shared memory the caller read
  // in its previous tile.
  template <class Pairs, typename in_t>
  __device__ static void tile(const TileOperands<in_t>& ops, int64_t row0, int64_t col0,
                              unsigned char* smem,
                              acc_t (&acc)[Pairs::kPairs][L::kRows][L::kCols]) {
    acc_t* xs = reinterpret_cast<acc_t*>(smem);
    acc_t* ys = xs + Pairs::kRows * BK * LDM;
    const int tx = L::tx(), ty = L::ty();
#pragma unroll
    for (int k = 0; k < Pairs::kPairs; ++k)
#pragma unroll
      for (int i = 0; i < L::kRows; ++i)
#pragma unroll
        for (int j = 0; j < L::kCols; ++j) acc[k][i][j] = acc_t(0);

    for (int64_t k0 = 0; k0 < ops.D; k0 += BK) {
      __syncthreads();  // everyone is done reading the previous slab (or tile)
#pragma unroll
      for (int r = 0; r < Pairs::kRows; ++r)
        load_slab<BM, LDM>(ops.x[r], ops.n, ops.D, ops.ld, row0, k0, xs + r * BK * LDM);
#pragma unroll
      for (int c = 0; c < Pairs::kCols; ++c)
        load_slab<BN, LDN>(ops.y[c], ops.m, ops.D, ops.ld, col0, k0, ys + c * BK * LDN);
      __syncthreads();  // the slabs are complete
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        Vec<acc_t, L::kRows> a[Pairs::kRows];
        Vec<acc_t, L::kCols> b[Pairs::kCols];
#pragma unroll
        for (int r = 0; r < Pairs::kRows; ++r)
          a[r] = load_vec<L::kRows>(xs + r * BK * LDM + k * LDM + ty * L::kRows);
#pragma unroll
        for (int c = 0; c < Pairs::kCols; ++c)
          b[c] = load_vec<L::kCols>(ys + c * BK * LDN + k * LDN + tx * L::kCols);
#pragma unroll
        for (int pr = 0; pr < Pairs::kPairs; ++pr)
#pragma unroll
          for (int i = 0; i < L::kRows; ++i)
#pragma unroll
            for (int j = 0; j < L::kCols; ++j)
              acc[pr][i][j] += a[Pairs::row(pr)].v[i] * b[Pairs::col(pr)].v[j];
      }
    }
  }
};

}  // namespace cuda_tiles
}  // namespace robustft
