// Small CUDA kernels exercising every primitive of cuda/mma_ptx.cuh. The same source is
// compiled two ways: by the host compiler against the CPU emulation (emu.h first), run by
// test_mma_emulated.cpp against independent references; and by nvcc for sm_80 / sm_90
// (csrc/tests/check_ptx_sass.sh), to show the instructions the wrappers become.
//
// The GEMM kernel is also the subject of csrc/tests/mutation_check.sh: the lines tagged
// "MUT:" are the ones its mutants change (keep the tags when editing those lines).
#pragma once

#include <cstdint>

#include "cuda/mma_ptx.cuh"

namespace rft_mma_test {

using namespace robustft::ptx;

// ---- ldmatrix -----------------------------------------------------------------------------
// One warp. src: kRows x kStride 16-bit elements copied to shared memory; lane L passes the
// row address &smem[row_of_lane[L] * kStride + col_of_lane[L]] to ldmatrix (.x1, .x2, .x4,
// with .trans when kTrans); out[L * kNum + i] = r[i] of lane L.
constexpr int kLdmRows = 40, kLdmStride = 24;
template <int kNum, bool kTrans>
__global__ void ldmatrix_probe_kernel(const uint16_t* src, const int* row_of_lane,
                                      const int* col_of_lane, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[kLdmRows * kLdmStride];
  const int lane = threadIdx.x;
  for (int i = lane; i < kLdmRows * kLdmStride; i += 32) tile[i] = src[i];
  __syncthreads();
  const void* row = &tile[row_of_lane[lane] * kLdmStride + col_of_lane[lane]];
  uint32_t r[kNum];
  if constexpr (kNum == 1) {
    static_assert(!kTrans, "ldmatrix .x1 .trans is not wrapped");
    ldmatrix_x1(r, row);
  } else if constexpr (kNum == 2) {
    if constexpr (kTrans) ldmatrix_x2_trans(r, row); else ldmatrix_x2(r, row);
  } else {
    if constexpr (kTrans) ldmatrix_x4_trans(r, row); else ldmatrix_x4(r, row);
  }
  for (int i = 0; i < kNum; ++i) out[lane * kNum + i] = r[i];
}

// ---- mma ----------------------------------------------------------------------------------
// Bits of two 16-bit elements as one fragment register, lo in the low half.
__device__ __forceinline__ uint32_t pair(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// One warp: D = A B + C with A [16][16], B [16][8] (B[k][n]), C, D [16][8] row-major, the
// fragments built from global memory by the PTX ISA layouts. alias != 0: the call passes the
// accumulator as both c and d.
template <bool kBf16>
__global__ void mma16_probe_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D,
                                   int alias) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  a[0] = pair(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pair(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pair(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pair(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  b[0] = pair(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  b[1] = pair(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  if (alias) {
    mma_m16n8k16<kBf16>(c, a, b, c);
    for (int i = 0; i < 4; ++i) d[i] = c[i];
  } else {
    mma_m16n8k16<kBf16>(d, a, b, c);
  }
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// One warp: D = tf32(A) tf32(B) + C with A [16][8], B [8][8] (B[k][n]), C, D [16][8].
__global__ void mma_tf32_probe_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const uint32_t a[4] = {to_tf32(A[g * 8 + t]), to_tf32(A[(g + 8) * 8 + t]),
                         to_tf32(A[g * 8 + t + 4]), to_tf32(A[(g + 8) * 8 + t + 4])};
  const uint32_t b[2] = {to_tf32(B[t * 8 + g]), to_tf32(B[(t + 4) * 8 + g])};
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                      C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  mma_m16n8k8_tf32(d, a, b, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Every thread: out[i] = to_tf32(x[i]) and packed[i] = pack2<kBf16>(x[2i], x[2i+1]).
template <bool kBf16>
__global__ void convert_kernel(const float* x, int n, uint32_t* tf32, uint32_t* packed) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) tf32[i] = to_tf32(x[i]);
  if (2 * i + 1 < n) packed[i] = pack2<kBf16>(x[2 * i], x[2 * i + 1]);
}

// ---- A tile GEMM: cp.async pipeline + ldmatrix + mma --------------------------------------
// D [64][64] (float) = A [64][K] B^T, with B stored [64][K] (kTransB false: B[n][k]) or
// [K][64] (kTransB true: B[k][n], read with ldmatrix .trans). K a multiple of 16. 128
// threads: 4 warps of 32 x 32. K goes in chunks of 16 through a 2-stage cp.async pipeline
// in dynamic shared memory (gemm_smem_bytes).
constexpr int kGemmThreads = 128, kTile = 64, kBK = 16, kStages = 2;
constexpr int kLdA = kBK + 8;                         // A and B[n][k] rows: 48 bytes
constexpr int kLdBt = kTile + 8;                      // B[k][n] rows: 144 bytes
constexpr int kStageA = kTile * kLdA;                 // elements per stage
constexpr int kStageB = kTile * kLdA > kBK * kLdBt ? kTile * kLdA : kBK * kLdBt;
constexpr size_t gemm_smem_bytes() { return size_t(kStages) * (kStageA + kStageB) * 2; }

template <bool kBf16, bool kTransB>
__global__ void gemm_tile_kernel(const uint16_t* A, const uint16_t* B, float* D, int K) {
  uint16_t* As = dynamic_smem<uint16_t>();
  uint16_t* Bs = As + kStages * kStageA;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;

  // Stage s <- chunk k0: A 64 rows x 32 bytes; B likewise or 16 rows x 128 bytes. One
  // 16-byte piece of each per thread.
  auto load = [&](int s, int k0) {
    const int ar = tid >> 1, ap = tid & 1;
    cp_async_16(&As[s * kStageA + ar * kLdA + ap * 8], A + ar * K + k0 + ap * 8, 16);
    if (kTransB) {
      const int br = tid >> 3, bp = tid & 7;
      cp_async_16(&Bs[s * kStageB + br * kLdBt + bp * 8], B + (k0 + br) * kTile + bp * 8, 16);
    } else {
      cp_async_16(&Bs[s * kStageB + ar * kLdA + ap * 8], B + ar * K + k0 + ap * 8, 16);
    }
  };

  float acc[2][4][4];
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  const int chunks = K / kBK;
  load(0, 0);
  cp_async_commit();
  for (int kc = 0; kc < chunks; ++kc) {
    if (kc + 1 < chunks) load((kc + 1) % kStages, (kc + 1) * kBK);
    cp_async_commit();  // possibly empty: one group per iteration
    cp_async_wait<1>();  // MUT:wait
    __syncthreads();  // MUT:sync_after_wait
    const int s = kc % kStages;
    uint32_t af[2][4], bf[4][2];
    for (int mi = 0; mi < 2; ++mi) {
      const int row = wm * 32 + mi * 16 + (lane & 15);  // MUT:a_row
      ldmatrix_x4(af[mi], &As[s * kStageA + row * kLdA + (lane >> 4) * 8]);
    }
    for (int p = 0; p < 2; ++p) {
      uint32_t r[4];
      const int m = lane >> 3, rr = lane & 7;
      // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) of B:
      if (kTransB) {
        const int k = (m & 1) * 8 + rr, n = wn * 32 + p * 16 + (m >> 1) * 8;
        ldmatrix_x4_trans(r, &Bs[s * kStageB + k * kLdBt + n]);
      } else {  // stored as B[n][k]
        const int n = wn * 32 + p * 16 + (m >> 1) * 8 + rr, k = (m & 1) * 8;
        ldmatrix_x4(r, &Bs[s * kStageB + n * kLdA + k]);
      }
      bf[2 * p][0] = r[0];
      bf[2 * p][1] = r[1];  // MUT:b_frag
      bf[2 * p + 1][0] = r[2];
      bf[2 * p + 1][1] = r[3];
    }
    for (int mi = 0; mi < 2; ++mi)
      for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<kBf16>(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    __syncthreads();  // MUT:sync_before_refill
  }
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int h = 0; h < 2; ++h) {
        const int row = wm * 32 + mi * 16 + g + 8 * h, col = wn * 32 + ni * 8 + 2 * t;
        D[row * kTile + col] = acc[mi][ni][2 * h];
        D[row * kTile + col + 1] = acc[mi][ni][2 * h + 1];  // MUT:c_frag
      }
}

// ---- Chained products: O = round16(A B^T) V, the accumulator re-used as an A operand ---------
// One warp. A, B [16][16] (B[n][k]), V [16][8] (V[k][n], read with ldmatrix .x2 .trans).
// S = A B^T (two n8 tiles) is rounded with pack2 and fed back as the A fragment of the
// second product, as an attention-style kernel does.
template <bool kBf16>
__global__ void chain_kernel(const uint16_t* A, const uint16_t* B, const uint16_t* V, float* O) {
  __shared__ __align__(16) uint16_t sA[16 * 16], sB[16 * 16], sV[16 * 8];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) {
    sA[i] = A[i];
    sB[i] = B[i];
  }
  for (int i = lane; i < 128; i += 32) sV[i] = V[i];
  __syncthreads();
  uint32_t a[4], b0[2], b1[2], v[2];
  ldmatrix_x4(a, &sA[(lane & 15) * 16 + (lane >> 4) * 8]);
  uint32_t rb[4];
  // B[n][k] blocks: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  ldmatrix_x4(rb, &sB[((lane >> 4) * 8 + (lane & 7)) * 16 + ((lane >> 3) & 1) * 8]);
  b0[0] = rb[0];
  b0[1] = rb[1];
  b1[0] = rb[2];
  b1[1] = rb[3];
  ldmatrix_x2_trans(v, &sV[(lane & 15) * 8]);  // lanes 0-7: k 0-7, lanes 8-15: k 8-15
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  float s0[4], s1[4], o[4];
  mma_m16n8k16<kBf16>(s0, a, b0, zero);
  mma_m16n8k16<kBf16>(s1, a, b1, zero);
  const uint32_t p[4] = {pack2<kBf16>(s0[0], s0[1]), pack2<kBf16>(s0[2], s0[3]),
                         pack2<kBf16>(s1[0], s1[1]), pack2<kBf16>(s1[2], s1[3])};
  mma_m16n8k16<kBf16>(o, p, v, zero);
  O[g * 8 + 2 * t] = o[0];
  O[g * 8 + 2 * t + 1] = o[1];
  O[(g + 8) * 8 + 2 * t] = o[2];
  O[(g + 8) * 8 + 2 * t + 1] = o[3];
}

// ---- cp.async ---------------------------------------------------------------------------
// 32 threads; thread i copies 16 bytes from src + 16 i (src_bytes = sizes[i]; sizes[i] == 0
// passes a null source) into a shared buffer that starts as `fill`, and records the 16 bytes
// it sees before the wait (before[i]) and after it (after[i]). Then two groups: a copy of
// src2 committed first, one of src3 committed second; wait<1> must show the first only
// (mid2, mid3), wait<0> both (end2, end3); a copy issued without a commit is not waited for
// by wait<0> (uncommitted), until it is committed and waited for.
struct Bytes16 {
  uint32_t w[4];
};
__global__ void cp_async_probe_kernel(const Bytes16* src, const int* sizes, const Bytes16* src2,
                                      const Bytes16* src3, Bytes16 fill, Bytes16* before,
                                      Bytes16* after, Bytes16* mid2, Bytes16* mid3, Bytes16* end2,
                                      Bytes16* end3, Bytes16* uncommitted, Bytes16* final4) {
  __shared__ __align__(16) Bytes16 buf[4][32];
  const int i = threadIdx.x;
  for (int j = 0; j < 4; ++j) buf[j][i] = fill;
  cp_async_16(&buf[0][i], sizes[i] > 0 ? static_cast<const void*>(src + i) : nullptr, sizes[i]);
  before[i] = buf[0][i];
  cp_async_commit();
  cp_async_wait<0>();
  after[i] = buf[0][i];

  cp_async_16(&buf[1][i], src2 + i, 16);
  cp_async_commit();
  cp_async_16(&buf[2][i], src3 + i, 16);
  cp_async_commit();
  cp_async_wait<1>();
  mid2[i] = buf[1][i];
  mid3[i] = buf[2][i];
  cp_async_wait<0>();
  end2[i] = buf[1][i];
  end3[i] = buf[2][i];

  cp_async_16(&buf[3][i], src2 + i, 16);
  cp_async_wait<0>();
  uncommitted[i] = buf[3][i];
  cp_async_commit();
  cp_async_wait<0>();
  final4[i] = buf[3][i];
}

// ---- Dynamic shared memory ----------------------------------------------------------------
// `words` 32-bit words of dynamic shared memory: first[k] = the word as the CTA finds it
// (k < blockDim.x), then every thread writes words tid, tid + blockDim.x, ... and, after a
// barrier, reads its neighbour's: out[w] = word w as written by thread (w % blockDim.x).
__global__ void dynamic_smem_kernel(int words, uint32_t* first, uint32_t* out, uintptr_t* base) {
  uint32_t* sm = dynamic_smem<uint32_t>();
  const int tid = threadIdx.x, nt = blockDim.x;
  if (tid == 0) *base = reinterpret_cast<uintptr_t>(sm);
  first[tid] = sm[tid];
  __syncthreads();
  for (int w = tid; w < words; w += nt) sm[w] = 0x9e3779b9u * uint32_t(w + 1);
  __syncthreads();
  const int nb = (tid + 1) % nt;
  for (int w = nb; w < words; w += nt) out[w] = sm[w];
}

}  // namespace rft_mma_test
