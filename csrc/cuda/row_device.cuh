// The __global__ kernels of a step's O(n D) row passes (step_kernels.h: mix_rows,
// mix_backward, dive_sums, dive_grads), one pass over the rows each, with the per-entry maths
// of robustft_maths.h. step_cuda.cu sizes and starts them; this header holds no host (ATen)
// code, so the kernels also compile for the CPU emulation of the tests.
//
// A warp owns a row at a time (lanes stride over D, so the loads coalesce) and reduces its
// dot products in double with shuffles: the slerp weights need c = <I_p, T_p> exact near
// c = -1 (docs/maths.md, section 3). Each entry is rounded as the CPU's one-pass loops round
// it (cpu/step_cpu.cpp), so the devices differ only in the order of the row sums.
#pragma once

#include <cstdint>

#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_layout.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace cuda_tiles {

constexpr int kRowThreads = 256, kRowWarps = kRowThreads / 32;

struct RowLayout {  // block_sum's view of a row kernel's block
  static constexpr int kWarps = kRowWarps;
};

// The rows of warp `warp` of this block, in a grid-stride loop.
struct WarpRows {
  int64_t first, stride;
};

__device__ __forceinline__ WarpRows warp_rows() {
  const int warp = threadIdx.x / 32;
  return {static_cast<int64_t>(blockIdx.x) * kRowWarps + warp,
          static_cast<int64_t>(gridDim.x) * kRowWarps};
}

// weights[4][p] = (w_a, w_b, dw_a/dc, dw_b/dc) of maths::slerp_weights(<I_p, T_p>, lam) and,
// when M is not null, M_p = w_a I_p + w_b T_p rounded once from double.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kRowThreads)
    mix_rows_kernel(const in_t* __restrict__ I, const in_t* __restrict__ T,
                    const double* __restrict__ lam_p, int64_t n, int64_t D,
                    out_t* __restrict__ M, double* __restrict__ w) {
  const int lane = threadIdx.x % 32;
  const double lam = *lam_p;
  const WarpRows rows = warp_rows();
  for (int64_t p = rows.first; p < n; p += rows.stride) {
    const in_t* a = I + p * D;
    const in_t* b = T + p * D;
    double c = 0.0;
    for (int64_t j = lane; j < D; j += 32) c += double(a[j]) * double(b[j]);
    c = warp_sum(c);
    const auto sw = maths::slerp_weights<double>(c, lam);
    if (lane == 0) {
      w[p] = sw.wa;
      w[n + p] = sw.wb;
      w[2 * n + p] = sw.dwa_dc;
      w[3 * n + p] = sw.dwb_dc;
    }
    if (M == nullptr) continue;
    out_t* m = M + p * D;
    for (int64_t j = lane; j < D; j += 32) m[j] = out_t(sw.wa * double(a[j]) + sw.wb * double(b[j]));
  }
}

// grad_I += g_pair[p] T_p + (w_a dM_p + k T_p), grad_T += g_pair[p] I_p + (w_b dM_p + k I_p),
// k = <dM_p, I_p> dw_a/dc + <dM_p, T_p> dw_b/dc (the true-pair product in acc_t, the slerp
// backward in double).
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    mix_backward_kernel(const acc_t* __restrict__ dM, const in_t* __restrict__ I,
                        const in_t* __restrict__ T, const double* __restrict__ w,
                        const acc_t* __restrict__ g_pair, int64_t n, int64_t D,
                        acc_t* __restrict__ grad_I, acc_t* __restrict__ grad_T) {
  const int lane = threadIdx.x % 32;
  const WarpRows rows = warp_rows();
  for (int64_t p = rows.first; p < n; p += rows.stride) {
    const acc_t* d = dM + p * D;
    const in_t* a = I + p * D;
    const in_t* b = T + p * D;
    double da = 0.0, db = 0.0;
    for (int64_t j = lane; j < D; j += 32) {
      da += double(d[j]) * double(a[j]);
      db += double(d[j]) * double(b[j]);
    }
    da = warp_sum(da);
    db = warp_sum(db);
    const double wa = w[p], wb = w[n + p];
    const double k = da * w[2 * n + p] + db * w[3 * n + p];
    const acc_t g = g_pair[p];
    acc_t* oi = grad_I + p * D;
    acc_t* ot = grad_T + p * D;
    for (int64_t j = lane; j < D; j += 32) {
      const double dj = d[j], aj = double(a[j]), bj = double(b[j]);
      oi[j] = (oi[j] + g * acc_t(b[j])) + acc_t(wa * dj + k * bj);
      ot[j] = (ot[j] + g * acc_t(a[j])) + acc_t(wb * dj + k * aj);
    }
  }
}

// DiVE's sums over rows [b R, (b + 1) R) of the reference batch, one block per b:
// part[b] = (sum |u - m|^2 + |v - m|^2, sum |u - v|^2) and col[b][e] = sum_j (u_je + v_je),
// all in double. The launcher adds the blocks' partials in block order: a fixed order, so
// the sums do not depend on how the blocks were scheduled.
constexpr int kDiveRows = 64;

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    dive_sums_kernel(const in_t* __restrict__ fi, const in_t* __restrict__ ft,
                     const in_t* __restrict__ pi, const in_t* __restrict__ pt,
                     const acc_t* __restrict__ center, int64_t B, int64_t D,
                     double* __restrict__ part, double* __restrict__ col) {
  __shared__ double red[kRowWarps];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kDiveRows;
  const int64_t j1 = j0 + kDiveRows < B ? j0 + kDiveRows : B;
  double avl = 0.0, pvl = 0.0;
  for (int64_t e = threadIdx.x; e < D; e += kRowThreads) {
    double sum = 0.0;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = j * D + e;
      const acc_t u = acc_t(fi[o]) - acc_t(pi[o]), v = acc_t(ft[o]) - acc_t(pt[o]);
      avl += double(maths::dive_avl_entry(u, v, center[e]));
      pvl += double(maths::dive_pvl_entry(u, v));
      sum += double(u) + double(v);
    }
    col[blockIdx.x * D + e] = sum;
  }
  avl = block_sum<RowLayout>(avl, red);
  pvl = block_sum<RowLayout>(pvl, red);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = avl;
    part[2 * blockIdx.x + 1] = pvl;
  }
}

// The gradients of w_a AVL_sum + w_p PVL_sum, entry by entry (maths::dive_entry_grads).
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    dive_grads_kernel(const in_t* __restrict__ fi, const in_t* __restrict__ ft,
                      const in_t* __restrict__ pi, const in_t* __restrict__ pt,
                      const acc_t* __restrict__ center, const acc_t* __restrict__ w_a_p,
                      const acc_t* __restrict__ w_p_p, int64_t B, int64_t D,
                      acc_t* __restrict__ grad_fi, acc_t* __restrict__ grad_ft) {
  const acc_t w_a = *w_a_p, w_p = *w_p_p;
  const int64_t count = B * D;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x; o < count;
       o += static_cast<int64_t>(gridDim.x) * kRowThreads) {
    const acc_t u = acc_t(fi[o]) - acc_t(pi[o]), v = acc_t(ft[o]) - acc_t(pt[o]);
    maths::dive_entry_grads(u, v, center[o % D], w_a, w_p, grad_fi + o, grad_ft + o);
  }
}

}  // namespace cuda_tiles
}  // namespace robustft
