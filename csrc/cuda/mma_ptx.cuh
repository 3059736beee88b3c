// Warp-level tensor-core primitives of sm_80+ (also fast on sm_90): ldmatrix, mma.sync
// (bf16 / f16 m16n8k16, tf32 m16n8k8) and cp.async, as thin device wrappers over inline PTX,
// in namespace robustft::ptx.
//
// Under nvcc these are the PTX instructions. Compiled against the CPU emulation of
// csrc/tests/cuda_emulation (whose emu.h defines RFT_CUDA_EMULATION and includes emu_mma.h),
// the same names are the emulator's, which computes the instructions from the fragment
// layouts below, so the kernels written against this header run, unchanged, in the C++ tests.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
// and "... for mma.m16n8k8"). lane = %laneid, g = lane >> 2 (groupID), t = lane % 4
// (threadID_in_group). A 32-bit register holding two 16-bit elements holds the first (lower
// column / k index) in its low half.
//   mma.m16n8k16 .bf16/.f16, A (16 x 16, row-major: A[m][k]), a[4] (elements a0..a7):
//     a[0] = A[g    ][2t, 2t+1]    a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]  a[3] = A[g + 8][2t+8, 2t+9]
//   B (16 x 8, K x N, "col": B[k][n]), b[2]:
//     b[0] = B[2t, 2t+1][g]        b[1] = B[2t+8, 2t+9][g]
//   C / D (16 x 8, float), c[4]:
//     c[0], c[1] = C[g][2t], C[g][2t+1]      c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//   mma.m16n8k8 .tf32, A (16 x 8), a[4] (one tf32 each):
//     a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//   B (8 x 8): b[0] = B[t][g]  b[1] = B[t+4][g];  C / D as for m16n8k16.
//   ldmatrix .m8n8 .b16: matrix i (i < 1, 2, 4 for .x1, .x2, .x4) has its 8 rows of 16 bytes
//     at the addresses given by lanes 8i .. 8i+7 (row r by lane 8i + r); r[i] of lane L holds
//     row L/4, elements 2(L%4) and 2(L%4)+1; with .trans, elements 2(L%4) and 2(L%4)+1 of
//     column L/4 (the transposed matrix's row L/4). So ldmatrix_x4 with lane L addressing
//     row (L % 16), column 8 (L / 16) of a row-major 16 x 16 A tile gives exactly a[0..3].
//
// Requirements (the hardware faults or is undefined otherwise; the emulator aborts on the
// alignment ones): ldmatrix row addresses and cp.async addresses 16-byte aligned, ldmatrix
// and cp.async destinations in shared memory, every lane of the warp executing the same
// ldmatrix / mma (no divergence), cp.async groups committed and waited for before the
// kernel exits, and a __syncthreads() after cp_async_wait before other threads read the
// copied data.
#pragma once

#include <cstdint>

#if defined(RFT_CUDA_EMULATION)

// The CPU emulation defines every function of this header (same names and signatures).
#if !defined(RFT_EMU_MMA_H)
#error "RFT_CUDA_EMULATION is set but emu_mma.h is missing: include cuda_emulation/emu.h first"
#endif

#else  // the GPU build

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "cuda/mma_ptx.cuh needs sm_80 or newer (mma.sync m16n8k16 bf16, cp.async)"
#endif

#include <cuda_runtime.h>

namespace robustft {
namespace ptx {

// The 32-bit shared-window address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The dynamic shared memory of the launch (kernel<<<grid, block, bytes>>>), 128-byte
// aligned. Kernels use this instead of their own `extern __shared__` array, so that the CPU
// emulation can supply it.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char rft_dynamic_smem[];
  return reinterpret_cast<T*>(rft_dynamic_smem);
}

// ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 ------------------------
// smem_row: this lane's row address (lanes 0-7: matrix 0, 8-15: matrix 1, ...; lanes past
// the last matrix are ignored but must pass a valid pointer).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// ---- mma.sync -----------------------------------------------------------------------------
// d = a * b + c over a 16 x 8 x 16 tile, float accumulation; d may alias c.
template <bool kBf16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}

// d = a * b + c over a 16 x 8 x 8 tile of tf32 operands (from to_tf32), float accumulation.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// x rounded to tf32 (10-bit mantissa), to nearest with ties away from zero (cvt.rna).
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// Two floats rounded to nearest even and packed as a bf16x2 / f16x2 fragment register:
// lo in the low half (the lower column / k index), hi in the high half.
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// ---- cp.async -----------------------------------------------------------------------------
// Starts copying 16 bytes from global to shared memory, of which the first src_bytes
// (0..16) are read from gmem and the rest zero-filled (src_bytes 0: gmem is not read). The
// data is visible only after a cp_async_wait covering its group (and, to other threads,
// after a __syncthreads() that follows that wait).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
// Closes the group of this thread's cp.async issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups (the newest) are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ptx
}  // namespace robustft

#endif  // RFT_CUDA_EMULATION
