// Which entries of a BM x BN logit tile each thread of a CTA holds, and the lane shuffles
// that combine values along a tile row or column. The epilogues (tile_epilogue.cuh) are
// written once against this interface and serve both tile engines:
//   * GridLayout (ffma_tile.cuh, CUDA-core FMA tiles for float "highest" and double): 256
//     threads as a 16 x 16 grid, tx = threadIdx.x % 16 along columns, ty = threadIdx.x / 16
//     along rows; thread (ty, tx) holds rows ty*kRows + r and columns tx*kCols + c.
//   * MmaLayout (mma_tile.cuh, tensor-core tiles): WARPS_M x WARPS_N warps, warp w at
//     (w / WARPS_N, w % WARPS_N) owns a WM x WN warp tile made of 16 x 8 mma atoms; lane L
//     holds, per atom, rows g and g + 8 and columns 2t, 2t + 1 (g = L / 4, t = L % 4: the
//     accumulator layout of mma.m16n8k*, cuda/mma_ptx.cuh).
// Either way a thread's entries are the product of its kRows rows and its kCols columns,
// acc[r][c] = entry (row(r), col(c)).
//
// Members of a layout L:
//   acc_t, BM, BN, kThreads, kWarps, kRows, kCols
//   row(r), col(c)                  tile-local coordinates of the thread's entries
//   row_lanes(v, op)                op-combine v over the lanes that share the thread's rows
//   kRowWarps, row_warp()           how many warps share a tile row, and this warp's index
//   row_leader()                    one lane per row group of a warp (writes shared state)
//   col_lanes(v, op), kColWarps, col_warp(), col_leader()   the same along columns
#pragma once

#include <cstdint>
#include <limits>

#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max(a, b) that propagates NaN: a NaN logit must poison its LSE (as lse_push does).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}

template <typename T>
__device__ __forceinline__ maths::LseState<T> shfl_xor(maths::LseState<T> v, int lane_mask) {
  return maths::LseState<T>{__shfl_xor_sync(kFullMask, v.m, lane_mask),
                            __shfl_xor_sync(kFullMask, v.l, lane_mask)};
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return nan_max(a, b);
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct LseMergeOp {
  template <typename T>
  __device__ __forceinline__ maths::LseState<T> operator()(maths::LseState<T> a,
                                                           maths::LseState<T> b) const {
    return maths::lse_merge(a, b);
  }
};

// ---- CUDA-core FMA tiles: a 16 x 16 thread grid ------------------------------------------
template <int BM_, int BN_, typename acc_t_>
struct GridLayout {
  using acc_t = acc_t_;
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kGrid = 16;
  static constexpr int kThreads = kGrid * kGrid, kWarps = kThreads / 32;
  static constexpr int kRows = BM / kGrid, kCols = BN / kGrid;
  static_assert(BM % kGrid == 0 && BN % kGrid == 0, "tiles must split over the 16 x 16 grid");

  __device__ static int tx() { return threadIdx.x % kGrid; }
  __device__ static int ty() { return threadIdx.x / kGrid; }
  __device__ static int row(int r) { return ty() * kRows + r; }
  __device__ static int col(int c) { return tx() * kCols + c; }

  // A warp holds two values of ty (lanes 0-15 and 16-31) and all 16 of tx.
  template <typename T, typename Op>
  __device__ static T row_lanes(T v, Op op) {
#pragma unroll
    for (int o = kGrid / 2; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    return v;
  }
  static constexpr int kRowWarps = 1;
  __device__ static int row_warp() { return 0; }
  __device__ static bool row_leader() { return tx() == 0; }

  template <typename T, typename Op>
  __device__ static T col_lanes(T v, Op op) {
    return op(v, shfl_xor(v, 16));
  }
  static constexpr int kColWarps = kWarps;
  __device__ static int col_warp() { return threadIdx.x / 32; }
  __device__ static bool col_leader() { return threadIdx.x % 32 < 16; }
};

// ---- Tensor-core tiles: warps of mma atoms ----------------------------------------------
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct MmaLayout {
  using acc_t = float;
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int kWarps = WARPS_M * WARPS_N, kThreads = 32 * kWarps;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // the warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;             // its mma atoms
  static constexpr int kRows = 2 * MI, kCols = 2 * NI;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are made of 16 x 16 atom pairs");

  __device__ static int lane() { return threadIdx.x % 32; }
  __device__ static int warp_m() { return (threadIdx.x / 32) / WARPS_N; }
  __device__ static int warp_n() { return (threadIdx.x / 32) % WARPS_N; }
  // Row r = 2 i + h of the thread: atom row i, half h (rows g and g + 8).
  __device__ static int row(int r) { return warp_m() * WM + (r / 2) * 16 + (lane() >> 2) + 8 * (r % 2); }
  // Column c = 2 j + e: atom column j, element e of the pair 2t, 2t + 1.
  __device__ static int col(int c) { return warp_n() * WN + (c / 2) * 8 + 2 * (lane() & 3) + (c % 2); }

  // The 4 lanes of a quad (same g) share rows.
  template <typename T, typename Op>
  __device__ static T row_lanes(T v, Op op) {
    v = op(v, shfl_xor(v, 1));
    return op(v, shfl_xor(v, 2));
  }
  static constexpr int kRowWarps = WARPS_N;
  __device__ static int row_warp() { return warp_n(); }
  __device__ static bool row_leader() { return (lane() & 3) == 0; }

  // The 8 lanes of equal t share columns.
  template <typename T, typename Op>
  __device__ static T col_lanes(T v, Op op) {
    v = op(v, shfl_xor(v, 4));
    v = op(v, shfl_xor(v, 8));
    return op(v, shfl_xor(v, 16));
  }
  static constexpr int kColWarps = WARPS_M;
  __device__ static int col_warp() { return warp_m(); }
  __device__ static bool col_leader() { return lane() < 4; }
};

// The operands of a CTA's tile products: row operands X_r ([n, D], r < kRows of the
// engine's Pairs) against column operands Y_c ([m, D]), row stride ld elements.
template <typename in_t>
struct TileOperands {
  const in_t* x[2];
  const in_t* y[2];
  int64_t n, m, D, ld;
};

// The one pair (X_0, Y_0).
struct OneDotPair {
  static constexpr int kRows = 1, kCols = 1, kPairs = 1;
  __host__ __device__ static constexpr int row(int) { return 0; }
  __host__ __device__ static constexpr int col(int) { return 0; }
};

}  // namespace cuda_tiles
}  // namespace robustft
