// What the fused kernels do with a logit tile once a tile engine has computed it, written
// once against tile_layout.cuh's layouts (so for both the CUDA-core and the tensor-core
// engine): the streaming row log-sum-exp, the column log-sum-exp merged across CTAs with a
// packed atomic, CTA sums, the dlogit stores into the workspace, and the small kernels that
// combine per-CTA partial results.
//
// Padded rows / columns (row_ok / col_ok false) are never pushed into any state; a NaN
// logit propagates (NaN-aware max), as lse_push does on the CPU.
#pragma once

#include <cstdint>

#include "cuda/tile_layout.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

// ---- Row log-sum-exp ------------------------------------------------------------------
// The online LSE state of each of the thread's rows over the columns seen so far. Within a
// warp the lanes that share a row hold identical states; warps that share rows (kRowWarps
// > 1) hold partial states over their own columns until finish() merges them.
template <class L>
struct RowLse {
  using acc_t = typename L::acc_t;
  using State = maths::LseState<acc_t>;
  State st[L::kRows];

  __device__ void init() {
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) st[r] = maths::lse_empty<acc_t>();
  }

  // Folds the tile's valid entries of each row in. Every thread must call it (shuffles).
  __device__ void push(const acc_t (&s)[L::kRows][L::kCols], const bool (&col_ok)[L::kCols]) {
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
      acc_t mx = neg_inf<acc_t>();
#pragma unroll
      for (int c = 0; c < L::kCols; ++c)
        if (col_ok[c]) mx = nan_max(mx, s[r][c]);
      mx = L::row_lanes(mx, MaxOp{});
      acc_t sum = acc_t(0);
      if (mx != neg_inf<acc_t>()) {  // all -inf (or no valid column): adds nothing
#pragma unroll
        for (int c = 0; c < L::kCols; ++c)
          if (col_ok[c]) sum += std::exp(s[r][c] - mx);
      }
      sum = L::row_lanes(sum, SumOp{});
      st[r] = maths::lse_push_block(st[r], mx, sum);  // sum == 0: no-op
    }
  }

  // Merges the states of the warps that share rows, through red ([kRowWarps][BM] states in
  // shared memory); afterwards the row leaders of row_warp() 0 hold the CTA's states. Every
  // thread must call it (it synchronises).
  __device__ void finish(State (*red)[L::BM]) {
    if constexpr (L::kRowWarps > 1) {
      __syncthreads();  // red may alias storage read before (the callers' smem)
      if (L::row_leader()) {
#pragma unroll
        for (int r = 0; r < L::kRows; ++r) red[L::row_warp()][L::row(r)] = st[r];
      }
      __syncthreads();  // every warp's partial row states are in red
      if (L::row_warp() == 0 && L::row_leader()) {
#pragma unroll
        for (int r = 0; r < L::kRows; ++r)
#pragma unroll
          for (int w = 1; w < L::kRowWarps; ++w) st[r] = maths::lse_merge(st[r], red[w][L::row(r)]);
      }
    }
  }

  // out[p] = (m, l) for the block's valid rows p = row0 + L::row(r) (after finish()).
  __device__ void write(acc_t* out, int64_t row0, int64_t n) const {
    if (L::row_warp() != 0 || !L::row_leader()) return;
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
      const int64_t p = row0 + L::row(r);
      if (p >= n) continue;
      out[2 * p] = st[r].m;
      out[2 * p + 1] = st[r].l;
    }
  }
};

// ---- Column log-sum-exp: a packed (float m, float l) state per column, merged atomically --
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

// Merges each valid column's state over the tile's valid rows into col_state[col0 + c]:
// the thread's rows, then the lanes that share its columns, then the warps (through red,
// [kColWarps][BN] states in shared memory). Every thread must call it (shuffles, one
// barrier). red is read after that barrier, so the caller must pass another barrier before
// calling again (the one that opens the next tile does).
template <class L>
__device__ void merge_tile_cols(const float (&s)[L::kRows][L::kCols], const bool (&row_ok)[L::kRows],
                                int64_t col0, int64_t m, maths::LseState<float> (*red)[L::BN],
                                unsigned long long* col_state) {
  using State = maths::LseState<float>;
#pragma unroll
  for (int c = 0; c < L::kCols; ++c) {
    float mx = neg_inf<float>();
#pragma unroll
    for (int r = 0; r < L::kRows; ++r)
      if (row_ok[r]) mx = nan_max(mx, s[r][c]);
    float sum = 0.f;
    if (mx != neg_inf<float>()) {
#pragma unroll
      for (int r = 0; r < L::kRows; ++r)
        if (row_ok[r]) sum += std::exp(s[r][c] - mx);
    }
    State st = L::col_lanes(State{mx, sum}, LseMergeOp{});
    if (L::col_leader()) red[L::col_warp()][L::col(c)] = st;
  }
  __syncthreads();  // every warp's column states are in red
  for (int c = threadIdx.x; c < L::BN; c += L::kThreads) {
    State st = red[0][c];
#pragma unroll
    for (int w = 1; w < L::kColWarps; ++w) st = maths::lse_merge(st, red[w][c]);
    if (col0 + c < m && st.l != 0.f) atomic_lse_merge(&col_state[col0 + c], st);
  }
}

// ---- CTA sums ---------------------------------------------------------------------------
// Sum over the CTA; the result is valid in thread 0. `red` holds kWarps doubles. Every
// thread must call it (it synchronises); `red` may be reused afterwards.
template <class L>
__device__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  __syncthreads();  // red is free (an earlier block_sum's reads are done)
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();  // every warp's sum is in red
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) total += red[w];
  }
  return total;
}

// ---- Dlogit stores ---------------------------------------------------------------------
// ds[(row_base + L::row(r)) * ld + col0 + L::col(c)] = d[r][c] rounded to ws_t, for the
// valid entries. In both layouts a thread's columns 2j and 2j + 1 are adjacent, so a 16-bit
// workspace with an even row length takes them as one 32-bit store (half the store
// instructions); odd row lengths and edge columns store single values.
template <class L, typename ws_t, typename acc_t>
__device__ void store_tile(ws_t* ds, int64_t ld, int64_t row_base, int64_t col0,
                           const acc_t (&d)[L::kRows][L::kCols], const bool (&row_ok)[L::kRows],
                           const bool (&col_ok)[L::kCols]) {
  static_assert(L::kCols % 2 == 0, "columns come in adjacent pairs");
  constexpr bool kPairs = sizeof(ws_t) == 2;
  const bool paired = kPairs && ld % 2 == 0 && col0 % 2 == 0;
#pragma unroll
  for (int r = 0; r < L::kRows; ++r) {
    if (!row_ok[r]) continue;
    ws_t* row = ds + (row_base + L::row(r)) * ld + col0;
#pragma unroll
    for (int c = 0; c < L::kCols; c += 2) {
      // Only 16-bit types have the paired store (a 4-byte pair), so it is not compiled for
      // wider ones.
      if constexpr (kPairs) {
        if (paired && col_ok[c + 1]) {
          struct alignas(4) Pair {
            ws_t v[2];
          };
          *reinterpret_cast<Pair*>(row + L::col(c)) =
              Pair{{static_cast<ws_t>(d[r][c]), static_cast<ws_t>(d[r][c + 1])}};
          continue;
        }
      }
      if (col_ok[c]) row[L::col(c)] = static_cast<ws_t>(d[r][c]);
      if (col_ok[c + 1]) row[L::col(c + 1)] = static_cast<ws_t>(d[r][c + 1]);
    }
  }
}

// ---- Across CTAs ------------------------------------------------------------------------
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

}  // namespace cuda_tiles
}  // namespace robustft
