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

#include <algorithm>
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

// Several dot-product tiles from one K loop, sharing the shared-memory slabs of their
// operands: acc[k][i][j] = <X_{row(k)}[row0 + ty*TM + i], Y_{col(k)}[col0 + tx*TN + j]>
// for the kPairs pairs k of `Pairs`, a type with
//   static constexpr int kRows, kCols, kPairs;        // operand and pair counts
//   static constexpr int row(int k), col(int k);      // the operands of pair k
// X_r = xs[r] ([n, D], r < kRows) and Y_c = ys[c] ([m, D], c < kCols). Every operand's
// slab is loaded once per K step, however many pairs read it (m^2-mix reads I, T and M
// in three pairs from four slabs). Xs / Ys: kRows / kCols slabs in shared memory.
template <typename Pairs, typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_dots_multi(
    const scalar_t* const* xs, int64_t n, const scalar_t* const* ys, int64_t m, int64_t D,
    int64_t row0, int64_t col0, acc_t (*Xs)[Tile<acc_t>::BK][Tile<acc_t>::LDM],
    acc_t (*Ys)[Tile<acc_t>::BK][Tile<acc_t>::LDN],
    acc_t (&acc)[Pairs::kPairs][Tile<acc_t>::TM][Tile<acc_t>::TN]) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
#pragma unroll
  for (int k = 0; k < Pairs::kPairs; ++k)
#pragma unroll
    for (int i = 0; i < T::TM; ++i)
#pragma unroll
      for (int j = 0; j < T::TN; ++j) acc[k][i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < D; k0 += T::BK) {
    __syncthreads();  // everyone is done reading the previous slab (or tile)
#pragma unroll
    for (int r = 0; r < Pairs::kRows; ++r)
      load_slab_transposed<T::BM, T::BK, T::LDM>(xs[r], n, D, row0, k0, Xs[r]);
#pragma unroll
    for (int c = 0; c < Pairs::kCols; ++c)
      load_slab_transposed<T::BN, T::BK, T::LDN>(ys[c], m, D, col0, k0, Ys[c]);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T::BK; ++k) {
      Vec<acc_t, T::TM> a[Pairs::kRows];
      Vec<acc_t, T::TN> b[Pairs::kCols];
#pragma unroll
      for (int r = 0; r < Pairs::kRows; ++r) a[r] = load_vec<T::TM>(&Xs[r][k][ty * T::TM]);
#pragma unroll
      for (int c = 0; c < Pairs::kCols; ++c) b[c] = load_vec<T::TN>(&Ys[c][k][tx * T::TN]);
#pragma unroll
      for (int pr = 0; pr < Pairs::kPairs; ++pr)
#pragma unroll
        for (int i = 0; i < T::TM; ++i)
#pragma unroll
          for (int j = 0; j < T::TN; ++j)
            acc[pr][i][j] += a[Pairs::row(pr)].v[i] * b[Pairs::col(pr)].v[j];
    }
  }
}

// The one pair (X_0, Y_0).
struct OneDotPair {
  static constexpr int kRows = 1, kCols = 1, kPairs = 1;
  __host__ __device__ static constexpr int row(int) { return 0; }
  __host__ __device__ static constexpr int col(int) { return 0; }
};

// One tile: acc[i][j] = <P[row0 + ty*TM + i], Q[col0 + tx*TN + j]>; As / Bs are one
// [BK][LD] slab each.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_dots(
    const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q, int64_t n, int64_t m,
    int64_t D, int64_t row0, int64_t col0,
    acc_t (*As)[Tile<acc_t>::LDM], acc_t (*Bs)[Tile<acc_t>::LDN],
    acc_t (&acc)[Tile<acc_t>::TM][Tile<acc_t>::TN]) {
  using T = Tile<acc_t>;
  const scalar_t* xs[1] = {P};
  const scalar_t* ys[1] = {Q};
  acc_t one[1][T::TM][T::TN];
  tile_dots_multi<OneDotPair, scalar_t, acc_t>(
      xs, n, ys, m, D, row0, col0, reinterpret_cast<acc_t(*)[T::BK][T::LDM]>(As),
      reinterpret_cast<acc_t(*)[T::BK][T::LDN]>(Bs), one);
#pragma unroll
  for (int i = 0; i < T::TM; ++i)
#pragma unroll
    for (int j = 0; j < T::TN; ++j) acc[i][j] = one[0][i][j];
}

// ---------------------------------------------------------------------------------
// Streaming log-sum-exp over the logit tile s (thread (ty, tx) holds its TM x TN
// micro-tile). Padded rows / columns (row_ok / col_ok false) are never pushed; a NaN
// logit propagates (NaN-aware max), as lse_push does on the CPU.

// rows[i] = merge(rows[i], state of row ty*TM + i over the tile's valid columns),
// identical in the 16 lanes of a row group. Every thread must call it (shuffles). A
// tile always holds at least one valid column, so the group max is over real entries.
template <typename acc_t, int TM, int TN>
__device__ __forceinline__ void push_tile_rows(maths::LseState<acc_t> (&rows)[TM],
                                               const acc_t (&s)[TM][TN],
                                               const bool (&col_ok)[TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    acc_t mx = neg_inf<acc_t>();
#pragma unroll
    for (int j = 0; j < TN; ++j)
      if (col_ok[j]) mx = nan_max(mx, s[i][j]);
    mx = row_group_max(mx);
    acc_t sum = acc_t(0);
    if (mx != neg_inf<acc_t>()) {  // all -inf: adds nothing (exp(-inf + inf) is nan)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        if (col_ok[j]) sum += std::exp(s[i][j] - mx);
    }
    sum = row_group_sum(sum);
    rows[i] = maths::lse_push_block(rows[i], mx, sum);  // sum == 0: no-op
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


// Merges each valid column's state over the tile's valid rows into col_state[col0 + c]
// (packed, atomic_lse_merge): the state over this thread's rows, merged with the other
// ty of the warp (lane ^ 16), then over the 8 warps through col_red ([kWarps][BN]).
// Every thread must call it (shuffles, one __syncthreads()). col_red is read after that
// barrier, so the caller must pass another barrier before calling again (the one that
// opens tile_dots does).
template <int BN, int TM, int TN>
__device__ __forceinline__ void merge_tile_col_states(const float (&s)[TM][TN],
                                                      const bool (&row_ok)[TM], int64_t col0,
                                                      int64_t m,
                                                      maths::LseState<float> (*col_red)[BN],
                                                      unsigned long long* col_state) {
  using State = maths::LseState<float>;
  const int tx = thread_tx(), lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    float mx = neg_inf<float>();
#pragma unroll
    for (int i = 0; i < TM; ++i)
      if (row_ok[i]) mx = nan_max(mx, s[i][j]);
    float sum = 0.f;
    if (mx != neg_inf<float>()) {
#pragma unroll
      for (int i = 0; i < TM; ++i)
        if (row_ok[i]) sum += std::exp(s[i][j] - mx);
    }
    State st{mx, sum};
    const State other{__shfl_xor_sync(kFullMask, st.m, 16), __shfl_xor_sync(kFullMask, st.l, 16)};
    st = maths::lse_merge(st, other);
    if (lane < 16) col_red[warp][tx * TN + j] = st;
  }
  __syncthreads();
  if (threadIdx.x < BN) {
    const int c = threadIdx.x;
    State st = col_red[0][c];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) st = maths::lse_merge(st, col_red[w][c]);
    if (col0 + c < m && st.l != 0.f) atomic_lse_merge(&col_state[col0 + c], st);
  }
}

// ---------------------------------------------------------------------------------
// The gradient GEMM of a row-streaming backward pass:
//   out[row0 + r, :] (+)= scale * sum_c dSs[c][r] * Y[col0 + c, :]
// for the BM rows r of the block with row_ok, over all D features in BD-wide chunks
// staged through Qs ([BN][LDD]); rows of Y beyond m load as zero. `accumulate` false
// writes, true adds. Thread (ty, tx) owns output rows ty*TM + i and features
// d0 + tx + 16 j, so repeated calls update each output element from the same thread:
// the read-modify-write in global memory needs no synchronisation. Each chunk opens
// with __syncthreads() (dSs complete; the previous chunk's Qs no longer read); nothing
// synchronises at the end, so a caller rewriting dSs must pass a barrier first.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate_dS_rows(
    const acc_t (*dSs)[Tile<acc_t>::LDM], const scalar_t* __restrict__ Y, int64_t m,
    int64_t D, int64_t col0, acc_t scale, acc_t* __restrict__ out, int64_t row0,
    const bool (&row_ok)[Tile<acc_t>::TM], bool accumulate, acc_t (*Qs)[Tile<acc_t>::LDD]) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
  for (int64_t d0 = 0; d0 < D; d0 += T::BD) {
    __syncthreads();
#pragma unroll
    for (int it = 0; it < T::BN * T::BD / kThreads; ++it) {
      const int e = threadIdx.x + it * kThreads;
      const int c = e / T::BD, dd = e % T::BD;
      const int64_t q = col0 + c, f = d0 + dd;
      Qs[c][dd] = (q < m && f < D) ? static_cast<acc_t>(Y[q * D + f]) : acc_t(0);
    }
    __syncthreads();
    acc_t o[T::TM][T::TD];
#pragma unroll
    for (int i = 0; i < T::TM; ++i)
#pragma unroll
      for (int j = 0; j < T::TD; ++j) o[i][j] = acc_t(0);
#pragma unroll 16
    for (int c = 0; c < T::BN; ++c) {
      const Vec<acc_t, T::TM> a = load_vec<T::TM>(&dSs[c][ty * T::TM]);
#pragma unroll
      for (int j = 0; j < T::TD; ++j) {
        const acc_t b = Qs[c][tx + kGrid * j];
#pragma unroll
        for (int i = 0; i < T::TM; ++i) o[i][j] += a.v[i] * b;
      }
    }
#pragma unroll
    for (int i = 0; i < T::TM; ++i) {
      if (!row_ok[i]) continue;
      acc_t* orow = out + (row0 + ty * T::TM + i) * D;
#pragma unroll
      for (int j = 0; j < T::TD; ++j) {
        const int64_t f = d0 + tx + kGrid * j;
        if (f < D) orow[f] = accumulate ? orow[f] + scale * o[i][j] : scale * o[i][j];
      }
    }
  }
}

// out[row0 + r, :] = 0 for the block's valid rows (a split with no column tile).
template <typename acc_t>
__device__ __forceinline__ void zero_rows(acc_t* __restrict__ out, int64_t row0, int64_t D,
                                          const bool (&row_ok)[Tile<acc_t>::TM]) {
  using T = Tile<acc_t>;
  const int tx = thread_tx(), ty = thread_ty();
  for (int i = 0; i < T::TM; ++i) {
    if (!row_ok[i]) continue;
    acc_t* orow = out + (row0 + ty * T::TM + i) * D;
    for (int64_t f = tx; f < D; f += kGrid) orow[f] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------
// Host side: how the column tiles of an n x m problem are split over CTAs (gridDim.y),
// aiming at about target_ctas CTAs in all; never more splits than column tiles or
// max_splits, and every split holds at least one tile.
struct ColumnSplit {
  int64_t row_blocks;       // gridDim.x = ceil(n / BM)
  int64_t col_tiles;        // ceil(m / BN)
  int64_t tiles_per_split;  // consecutive column tiles per CTA
  int64_t splits;           // gridDim.y
};

inline ColumnSplit plan_column_split(int64_t n, int64_t m, int BM, int BN, int64_t max_splits,
                                     int64_t target_ctas) {
  ColumnSplit s;
  s.row_blocks = (n + BM - 1) / BM;
  s.col_tiles = (m + BN - 1) / BN;
  int64_t splits = (target_ctas + s.row_blocks - 1) / s.row_blocks;
  splits = std::min(std::min(splits, s.col_tiles), std::min(max_splits, int64_t(65535)));
  splits = std::max<int64_t>(splits, 1);
  s.tiles_per_split = (s.col_tiles + splits - 1) / splits;
  s.splits = (s.col_tiles + s.tiles_per_split - 1) / s.tiles_per_split;  // no empty split
  return s;
}

}  // namespace cuda_tiles
}  // namespace robustft
