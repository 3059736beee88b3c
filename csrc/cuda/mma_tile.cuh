// The tensor-core tile engine: logit tiles from mma.sync (bf16 / f16 m16n8k16, or tf32
// m16n8k8 for float inputs where torch's float32 matmul precision allows TF32), fed by
// ldmatrix from a cp.async multistage shared-memory pipeline, accumulating in float. The
// primitives are cuda/mma_ptx.cuh's, which the CPU emulation of the tests replaces
// (csrc/tests/cuda_emulation), so this exact source runs in the C++ tests.
//
// Shapes (MmaShape): a CTA of WARPS_M x WARPS_N warps computes BM x BN tiles; each warp a
// WM x WN warp tile of 16 x 8 atoms (tile_layout.cuh, MmaLayout). K is streamed in blocks
// of 128 bytes (64 bf16 / f16 or 32 float) per operand row, STAGES blocks in flight.
//
// Shared memory: a stage holds, for each row operand, BM rows of 128 bytes, then for each
// column operand BN rows. A row's eight 16-byte chunks are stored XOR-swizzled (chunk c of
// row r at chunk c ^ (r % 8)), so the eight row addresses of an ldmatrix phase (eight
// consecutive rows, one logical chunk) and the cp.async writes of a row hit eight distinct
// 16-byte bank groups: no bank conflicts.
//
// Fragments (cuda/mma_ptx.cuh gives the PTX ISA layouts). With 16-byte chunks as the unit,
// the bf16 / f16 and the tf32 instructions read the same chunks: one mma k-step spans 32
// bytes of K (two chunks: 16 bf16 or 8 tf32), and
//   A (16 rows x 2 chunks): ldmatrix_x4, lane L addresses row L % 16, chunk L / 16;
//   B (two 8-column atoms x 2 chunks): ldmatrix_x4, lane L addresses row (L % 8) + 8 (L / 16),
//     chunk (L / 8) % 2, giving b[0..1] of the first atom and b[2..3] of the second.
// For tf32 the fragments are rounded with cvt.rna (to_tf32) before the mma.
//
// Requirements (the host pads or copies inputs that miss them): every operand's rows are
// 16-byte aligned (base pointer and row stride) and D * sizeof(in_t) is a multiple of 16.
// Rows beyond n or m and chunks beyond D are zero-filled by cp.async.
#pragma once

#include <cstdint>

#include "cuda/mma_ptx.cuh"
#include "cuda/tile_layout.cuh"

namespace robustft {
namespace cuda_tiles {

// The element types of the tensor-core tiles.
struct Bf16Mma {
  static constexpr bool kTf32 = false;
  __device__ __forceinline__ static void prepare(uint32_t (&)[4]) {}
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16<true>(d, a, b, d);
  }
};
struct F16Mma {
  static constexpr bool kTf32 = false;
  __device__ __forceinline__ static void prepare(uint32_t (&)[4]) {}
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16<false>(d, a, b, d);
  }
};
struct Tf32Mma {
  static constexpr bool kTf32 = true;
  // Round the raw float bits that ldmatrix loaded to tf32 (nearest, ties away).
  __device__ __forceinline__ static void prepare(uint32_t (&r)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = ptx::to_tf32(__uint_as_float(r[i]));
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    ptx::mma_m16n8k8_tf32(d, a, b, d);
  }
};

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_ = 1>
struct MmaShape {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
};

template <class Shape, class Elt>
struct MmaEngine {
  using acc_t = float;
  using L = MmaLayout<Shape::BM, Shape::BN, Shape::WARPS_M, Shape::WARPS_N>;
  static constexpr int BM = Shape::BM, BN = Shape::BN, STAGES = Shape::STAGES;
  static constexpr int kThreads = L::kThreads;
  static constexpr int kMinBlocks = Shape::MIN_BLOCKS;  // CTAs per SM (launch bounds)
  static constexpr int kRowBytes = 128, kChunks = kRowBytes / 16;  // one K block of a row
  static_assert(STAGES >= 2, "the pipeline needs two stages at least");

  template <class Pairs>
  static constexpr int stage_bytes() {
    return (Pairs::kRows * BM + Pairs::kCols * BN) * kRowBytes;
  }
  template <class Pairs>
  static constexpr int smem_bytes() {
    return STAGES * stage_bytes<Pairs>();
  }

  // Byte offset of (row, chunk) in a slab.
  __device__ __forceinline__ static int slab_offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  }

  // R rows of X (rows r0.., K block kb) into a slab, by cp.async; rows >= rows_valid and
  // chunks >= k_chunks are zero-filled (their source is not read).
  template <int R>
  __device__ static void load_slab(const unsigned char* X, int64_t rows_valid, int64_t row_bytes,
                                   int64_t k_chunks, int64_t r0, int64_t kb, unsigned char* slab) {
#pragma unroll
    for (int e = threadIdx.x; e < R * kChunks; e += kThreads) {
      const int row = e / kChunks, chunk = e % kChunks;
      const int64_t grow = r0 + row, gchunk = kb * kChunks + chunk;
      const bool ok = grow < rows_valid && gchunk < k_chunks;
      const unsigned char* src = ok ? X + grow * row_bytes + gchunk * 16 : X;
      ptx::cp_async_16(slab + slab_offset(row, chunk), src, ok ? 16 : 0);
    }
  }

  template <class Pairs, typename in_t>
  __device__ static void load_stage(const TileOperands<in_t>& ops, int64_t row0, int64_t col0,
                                    int64_t kb, unsigned char* stage) {
    const int64_t row_bytes = ops.ld * int64_t(sizeof(in_t));
    const int64_t k_chunks = ops.D * int64_t(sizeof(in_t)) / 16;
#pragma unroll
    for (int r = 0; r < Pairs::kRows; ++r)
      load_slab<BM>(reinterpret_cast<const unsigned char*>(ops.x[r]), ops.n, row_bytes, k_chunks,
                    row0, kb, stage + r * BM * kRowBytes);
#pragma unroll
    for (int c = 0; c < Pairs::kCols; ++c)
      load_slab<BN>(reinterpret_cast<const unsigned char*>(ops.y[c]), ops.m, row_bytes, k_chunks,
                    col0, kb, stage + (Pairs::kRows * BM + c * BN) * kRowBytes);
  }

  // The mma work of one K block held in `stage`.
  template <class Pairs>
  __device__ static void compute_stage(const unsigned char* stage,
                                       float (&acc)[Pairs::kPairs][L::kRows][L::kCols]) {
    const int lane = L::lane();
    const int a_row = L::warp_m() * L::WM + (lane & 15), a_chunk = lane >> 4;
    const int b_row = L::warp_n() * L::WN + (lane & 7) + ((lane >> 4) << 3);
    const int b_chunk = (lane >> 3) & 1;
#pragma unroll
    for (int ks = 0; ks < kChunks / 2; ++ks) {
      uint32_t a[Pairs::kRows][L::MI][4];
#pragma unroll
      for (int r = 0; r < Pairs::kRows; ++r) {
        const unsigned char* slab = stage + r * BM * kRowBytes;
#pragma unroll
        for (int i = 0; i < L::MI; ++i) {
          ptx::ldmatrix_x4(a[r][i], slab + slab_offset(a_row + i * 16, 2 * ks + a_chunk));
          Elt::prepare(a[r][i]);
        }
      }
#pragma unroll
      for (int j = 0; j < L::NI; j += 2) {
        uint32_t b[Pairs::kCols][4];
#pragma unroll
        for (int c = 0; c < Pairs::kCols; ++c) {
          const unsigned char* slab = stage + (Pairs::kRows * BM + c * BN) * kRowBytes;
          ptx::ldmatrix_x4(b[c], slab + slab_offset(b_row + j * 8, 2 * ks + b_chunk));
          Elt::prepare(b[c]);
        }
#pragma unroll
        for (int k = 0; k < Pairs::kPairs; ++k) {
#pragma unroll
          for (int i = 0; i < L::MI; ++i) {
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int r = 2 * i, c = 2 * (j + jj);
              float d[4] = {acc[k][r][c], acc[k][r][c + 1], acc[k][r + 1][c], acc[k][r + 1][c + 1]};
              const uint32_t bb[2] = {b[Pairs::col(k)][2 * jj], b[Pairs::col(k)][2 * jj + 1]};
              Elt::mma(d, a[Pairs::row(k)][i], bb);
              acc[k][r][c] = d[0];
              acc[k][r][c + 1] = d[1];
              acc[k][r + 1][c] = d[2];
              acc[k][r + 1][c + 1] = d[3];
            }
          }
        }
      }
    }
  }

  // acc[k][r][c] = <X_{row(k)}[row0 + L::row(r)], Y_{col(k)}[col0 + L::col(c)]> for the
  // pairs k of Pairs. Opens with __syncthreads(), so it also fences shared memory that the
  // caller (or the previous tile) read; returns with no copy in flight.
  template <class Pairs, typename in_t>
  __device__ static void tile(const TileOperands<in_t>& ops, int64_t row0, int64_t col0,
                              unsigned char* smem,
                              float (&acc)[Pairs::kPairs][L::kRows][L::kCols]) {
    constexpr int kStage = stage_bytes<Pairs>();
#pragma unroll
    for (int k = 0; k < Pairs::kPairs; ++k)
#pragma unroll
      for (int r = 0; r < L::kRows; ++r)
#pragma unroll
        for (int c = 0; c < L::kCols; ++c) acc[k][r][c] = 0.f;
    const int64_t k_blocks = (ops.D * int64_t(sizeof(in_t)) + kRowBytes - 1) / kRowBytes;

    __syncthreads();  // no thread still reads the stages (previous tile) or the epilogue's smem
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_blocks) load_stage<Pairs>(ops, row0, col0, s, smem + s * kStage);
      ptx::cp_async_commit();
    }
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      // Block kb's group is complete once at most STAGES - 2 newer groups are pending; the
      // barrier publishes it to every warp and retires the reads of stage (kb - 1) % STAGES,
      // which the next load refills.
      ptx::cp_async_wait<STAGES - 2>();
      __syncthreads();  // block kb visible to every warp; stage (kb - 1) % STAGES free
      const int64_t next = kb + STAGES - 1;
      if (next < k_blocks) load_stage<Pairs>(ops, row0, col0, next, smem + (next % STAGES) * kStage);
      ptx::cp_async_commit();
      compute_stage<Pairs>(smem + (kb % STAGES) * kStage, acc);
    }
    ptx::cp_async_wait<0>();  // only empty groups remain; none may outlive the kernel
  }
};

}  // namespace cuda_tiles
}  // namespace robustft
