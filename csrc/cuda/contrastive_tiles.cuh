// Device building blocks of the fused contrastive kernels (contrastive_cuda.cu):
// tile shapes, the shared-memory tiled dot-product tile, the warp / block
// reductions and the packed atomic log-sum-exp merge.
//
// Thread layout, used by every kernel: 256 threads form a 16 x 16 grid,
//   tx = threadIdx.x % 16 (column direction), ty = threadIdx.x / 16 (row direction).
// A warp therefore holds two values of ty (lanes 0-15: ty even, lanes 16-31: ty odd)
// and all 16 values of tx, so
//   * a reduction over tx (across a tile row) is a 16-lane shuffle (xor 8, 4, 2, 1);
//   * a reduction over ty (down a tile column) is a shuffle (xor 16) followed by a
//     shared-memory pass over the 8 warps.
// Thread (ty, tx) owns the TM x TN register micro-tile of rows ty*TM + i and columns
// tx*TN + j of the BM x BN logit tile; contiguous micro-tiles let the inner K loop read
// its TM (TN) operands with one 16-byte shared-memory load each.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

constexpr int kGrid = 16;                // the thread grid is kGrid x kGrid
constexpr int kThreads = kGrid * kGrid;  // 256 threads per CTA
constexpr int kWarps = kThreads / 32;    // 8 warps
constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation dtype: double for double inputs, float otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of_t = typename AccOf<T>::type;

// Tile shapes per accumulation dtype. BM x BN is the logit tile of one CTA, BK the
// depth of one shared-memory slab of the K loop over D, BD the width of one feature
// chunk of the gradient GEMM (dS @ Q). PAD keeps shared rows 16-byte aligned while
// spreading them over banks. Double uses 32 x 32 tiles so every kernel stays under
// 48 KB of static shared memory.
template <typename acc_t>
struct TileCfg;
template <>
struct TileCfg<float> {
  static constexpr int BM = 64, BN = 64, BK = 16, BD = 64, PAD = 4;
};
template <>
struct TileCfg<double> {
  static constexpr int BM = 32, BN = 32, BK = 16, BD = 32, PAD = 2;
};

template <typename acc_t>
struct Tile : TileCfg<acc_t> {
  using C = TileCfg<acc_t>;
  static constexpr int TM = C::BM / kGrid;  // rows per thread
  static constexpr int TN = C::BN / kGrid;  // columns per thread
  static constexpr int TD = C::BD / kGrid;  // feature columns per thread (grad GEMM)
  static constexpr int LDM = C::BM + C::PAD;  // leading dims of the shared tiles
  static constexpr int LDN = C::BN + C::PAD;
  static constexpr int LDD = C::BD + C::PAD;
  static_assert(C::BM % kGrid == 0 && C::BN % kGrid == 0 && C::BD % kGrid == 0,
                "tiles must split over the 16 x 16 thread grid");
  static_assert(TM * sizeof(acc_t) == 16 && TN * sizeof(acc_t) == 16,
                "micro-tile rows are read with one 16-byte load");
  static_assert((LDM * sizeof(acc_t)) % 16 == 0 && (LDN * sizeof(acc_t)) % 16 == 0,
                "shared rows must stay 16-byte aligned");
};

// TM (or TN) consecutive accumulators, read from shared memory in one 16-byte load.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

__device__ __forceinline__ int thread_tx() { return threadIdx.x % kGrid; }
__device__ __forceinline__ int thread_ty() { return threadIdx.x / kGrid; }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max(a, b) that propagates NaN: a NaN logit must poison its LSE (as lse_push does).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// ---------------------------------------------------------------------------------
// Reductions.

// Max / sum over the 16 lanes sharing one ty (all 16 get the result).
template <typename T>
__device__ __forceinline__ T row_group_max(T v) {
#pragma unroll
  for (int o = kGrid / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T row_group_sum(T v) {
#pragma unroll
  for (int o = kGrid / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the CTA; the result is valid in thread 0. `red` holds kWarps entries.
// Every thread must call it (it synchronises); `red` may be reused afterwards.
__device__ __forceinline__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w];
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------
// The logit tile: acc[i][j] = <P[row0 + ty*TM + i], Q[col0 + tx*TN + j]>, in acc_t.
// Rows of P beyond n, rows of Q beyond m and features beyond D load as zero, so
// padded entries hold 0 (callers mask them). Starts with __syncthreads(), so it also
// fences any shared memory the caller read in its previous tile.

// S[k][r] = X[r0 + r][k0 + k] (0 outside the matrix) for r < R, k < BK: a transposed
// copy, so the K loop reads rows of S. Consecutive threads take consecutive k, which
// keeps the global reads of one row of X contiguous.
template <int R, int BK, int LD, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_slab_transposed(const scalar_t* __restrict__ X,
                                                     int64_t rows, int64_t D, int64_t r0,
                                                     int64_t k0, acc_t (*S)[LD]) {
  static_assert((R * BK) % kThreads == 0, "slab must split evenly over the CTA");
#pragma unroll
  for (int it = 0; it < R * BK / kThreads; ++it) {
    const int e = threadIdx.x + it * kThreads;
    const int r = e / BK, k = e % BK;
    const int64_t gr = r0 + r, gk = k0 + k;
    acc_t v = acc_t(0);
    if (gr < rows && gk < D) v = static_cast<acc_t>(X[gr * D + gk]);
    S[k][r] = v;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_dots(
    const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q, int64_t n, int64_t m,
    int64_t D, int64_t row0, int64_t col0,
    acc_t (*As)[Tile<acc_t>::LDM], acc_t (*Bs)[Tile<acc_t>::LDN],
    acc_t (&acc)[Tile<acc_t>::TM][Tile<acc_t>::TN]) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
#pragma unroll
  for (int i = 0; i < T::TM; ++i)
#pragma unroll
    for (int j = 0; j < T::TN; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < D; k0 += T::BK) {
    __syncthreads();  // everyone is done reading the previous slab (or tile)
    load_slab_transposed<T::BM, T::BK, T::LDM>(P, n, D, row0, k0, As);
    load_slab_transposed<T::BN, T::BK, T::LDN>(Q, m, D, col0, k0, Bs);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T::BK; ++k) {
      const Vec<acc_t, T::TM> a = load_vec<T::TM>(&As[k][ty * T::TM]);
      const Vec<acc_t, T::TN> b = load_vec<T::TN>(&Bs[k][tx * T::TN]);
#pragma unroll
      for (int i = 0; i < T::TM; ++i)
#pragma unroll
        for (int j = 0; j < T::TN; ++j) acc[i][j] += a.v[i] * b.v[j];
    }
  }
}

// ---------------------------------------------------------------------------------
// Packed (float m, float l) log-sum-exp state in one 64-bit word, merged atomically.
// Low half: m, high half: l. The empty state is (-inf, 0).

__device__ __forceinline__ unsigned long long pack_lse(maths::LseState<float> s) {
  return (static_cast<unsigned long long>(__float_as_uint(s.l)) << 32) |
         static_cast<unsigned long long>(__float_as_uint(s.m));
}

__device__ __forceinline__ maths::LseState<float> unpack_lse(unsigned long long v) {
  return maths::LseState<float>{__uint_as_float(static_cast<unsigned>(v & 0xffffffffull)),
                                __uint_as_float(static_cast<unsigned>(v >> 32))};
}

// *state = lse_merge(*state, s), atomically (compare-and-swap loop). lse_merge is
// commutative and associative up to rounding, so the order in which CTAs arrive only
// changes the last bits. Merging an empty s is a no-op, so callers skip it.
__device__ __forceinline__ void atomic_lse_merge(unsigned long long* state,
                                                 maths::LseState<float> s) {
  unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(state);
  while (true) {
    const unsigned long long want = pack_lse(maths::lse_merge(unpack_lse(seen), s));
    if (want == seen) return;  // nothing to change
    const unsigned long long prev = atomicCAS(state, seen, want);
    if (prev == seen) return;  // swapped in
    seen = prev;               // somebody merged first: retry on their result
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
