// The CPU emulation of cuda/mma_ptx.cuh: the same functions (namespace robustft::ptx, same
// signatures) for kernels compiled by the host compiler against emu.h, which includes this
// header at its end and defines RFT_CUDA_EMULATION, so that cuda/mma_ptx.cuh compiles to
// nothing and the kernels call these.
//
// What is emulated:
//   * ldmatrix_x1/_x2/_x4 and _x2_trans/_x4_trans (ldmatrix.sync.aligned.m8n8.b16): a
//     warp-collective instruction (emu.h, warp_collective): every lane publishes its row
//     address; when the last lane of the warp arrives, the 8, 16 or 32 rows are read from
//     memory at once and each lane's registers are formed by the PTX ISA layout (r[i] of lane
//     L: row L/4, elements 2(L%4), 2(L%4)+1 of matrix i; .trans: column L/4); then the lanes
//     go on. The addresses of the lanes past the last matrix are ignored. A row address that
//     is not 16-byte aligned aborts, as the hardware faults;
//   * mma_m16n8k16<kBf16> (bf16 or f16 inputs, float accumulation) and mma_m16n8k8_tf32:
//     warp-collective likewise; the A, B and C tiles are assembled from the 32 lanes'
//     fragments by the PTX ISA layouts (see cuda/mma_ptx.cuh), D = A B + C is computed and
//     scattered back. Products of bf16, f16 and tf32 inputs are exact in float; the sum is
//     formed in float, c first, then the products in increasing k. The hardware's order and
//     internal precision of the accumulation are unspecified, so results agree with a GPU to
//     a tolerance, not bitwise. Subnormal inputs are kept (not flushed). The tf32 mma ignores
//     the low 13 bits of its operands (truncation); kernels round them with to_tf32;
//   * to_tf32: cvt.rna.tf32.f32 as its SASS computes it (finite x: add 0x1000 to the bits,
//     then clear the low 13; infinities and NaN: clear the low 13 bits);
//   * pack2<kBf16>: cvt.rn.{bf16x2,f16x2}.f32, round to nearest even (overflow to infinity,
//     f16 subnormals rounded correctly), NaN to the canonical NaN 0x7fff;
//   * cp_async_16 / cp_async_commit / cp_async_wait<N>: a cp.async is NOT performed when
//     issued: it is queued in the calling thread's current group, and its 16 destination
//     bytes are set to 0xff (NaN in float, half and bfloat16) at once; commit closes the
//     group; wait<N> performs (copies src_bytes, zero-fills the rest of the 16 bytes) every
//     copy of the committed groups but the newest N, in issue order. Between issue and wait
//     the destination is undefined on a GPU (old data, new data, or part of each): here it
//     holds neither, so both races show up as wrong values: a read of copied data before the
//     wait (or by another thread before a __syncthreads() that follows the wait: the fiber
//     schedule of emu.h lets warps drift as far as the CTA barriers allow), and a refill of
//     a buffer that other warps still read (a missing __syncthreads() before the next
//     cp.async into it). Copies not yet committed are not waited for, as in PTX. Misaligned
//     (not 16-byte) addresses and src_bytes outside 0..16 abort; a thread that exits with
//     copies it never committed or never waited for aborts;
//   * smem_addr: the low 32 bits of the address (differences and alignment of the values
//     are meaningful, the values themselves are not a shared-window address);
//   * dynamic_smem<T>(): the launch's dynamic shared memory (emu.h).
//
// Not emulated (not checked):
//   * that ldmatrix / cp.async destinations lie in shared memory and cp.async sources in
//     global memory (any host memory works here);
//   * shared-memory bank conflicts, the latency of the copies, the cache hint (.cg);
//   * a write by the kernel to a cp.async destination before the copy is waited for (the
//     copy overwrites it at the wait; on a GPU the order is undefined);
//   * the rounding of the hardware's accumulation (see above), and the operand values the
//     tf32 mma sees for inputs not rounded to tf32 (truncation is assumed here).
#pragma once
#define RFT_EMU_MMA_H 1

#ifndef RFT_CUDA_EMULATION
#error "emu_mma.h is part of the CUDA emulation: include emu.h"
#endif

#include <cstdint>
#include <cstring>

namespace cuda_emu {
namespace mma {

// Identifies the collective instruction of each lane (0 is "none").
enum Op : unsigned {
  kLdmX1 = 1, kLdmX2, kLdmX4, kLdmX1T, kLdmX2T, kLdmX4T,
  kMmaBf16, kMmaF16, kMmaTf32,
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// 16-bit floating formats <-> float (exact widening; rounding narrowing to nearest even).
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = float(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline uint16_t float_to_f16(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fff;                    // NaN
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: rounds to infinity
  if (x >= 0x38800000u) {                                // >= 2^-14: a normal half
    const uint32_t m = x + 0xfffu + ((x >> 13) & 1u);
    return uint16_t(sign | ((m - 0x38000000u) >> 13));
  }
  if (x <= 0x33000000u) return sign;  // <= 2^-25: rounds to zero (the tie to even too)
  // A subnormal half: the value in units of 2^-24, rounded to nearest even.
  const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
  const unsigned shift = 126u - (x >> 23);  // 14 .. 24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
}

// cvt.rna.tf32.f32, as the SASS of sm_80 computes it.
inline uint32_t round_tf32(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) < 0x7f800000u) x += 0x1000u;
  return x & 0xffffe000u;
}

inline uint16_t lo16(uint32_t r) { return uint16_t(r & 0xffffu); }
inline uint16_t hi16(uint32_t r) { return uint16_t(r >> 16); }

// ---- ldmatrix ----------------------------------------------------------------------------
template <unsigned kNum, bool kTrans>
void ldmatrix_fn(LaneIo* lanes) {
  constexpr unsigned op = kNum == 1 ? (kTrans ? kLdmX1T : kLdmX1)
                          : kNum == 2 ? (kTrans ? kLdmX2T : kLdmX2)
                                      : (kTrans ? kLdmX4T : kLdmX4);
  check_converged(lanes, op, "ldmatrix");
  uint16_t rows[4][8][8];  // [matrix][row][element], read now: one instruction's reads
  for (unsigned m = 0; m < kNum; ++m) {
    for (unsigned r = 0; r < 8; ++r) {
      const unsigned lane = 8 * m + r;
      const void* p;
      std::memcpy(&p, lanes[lane].in, sizeof p);
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr,
                     "cuda_emu: ldmatrix: lane %u passes row address %p, not 16-byte aligned\n",
                     lane, p);
        die("ldmatrix: misaligned row address");
      }
      std::memcpy(rows[m][r], p, 16);
    }
  }
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    uint32_t out[4] = {0, 0, 0, 0};
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned m = 0; m < kNum; ++m) {
      const uint16_t lo = kTrans ? rows[m][2 * t][g] : rows[m][g][2 * t];
      const uint16_t hi = kTrans ? rows[m][2 * t + 1][g] : rows[m][g][2 * t + 1];
      out[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    std::memcpy(lanes[lane].out, out, sizeof out);
  }
}

template <unsigned kNum, bool kTrans>
void ldmatrix(uint32_t (&r)[kNum], const void* smem_row) {
  constexpr unsigned op = kNum == 1 ? (kTrans ? kLdmX1T : kLdmX1)
                          : kNum == 2 ? (kTrans ? kLdmX2T : kLdmX2)
                                      : (kTrans ? kLdmX4T : kLdmX4);
  warp_collective(op, &smem_row, sizeof smem_row, r, sizeof r, &ldmatrix_fn<kNum, kTrans>);
}

// ---- mma ---------------------------------------------------------------------------------
struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

// The PTX ISA layouts, element by element (g = groupID, t = threadID_in_group).
// m16n8k16 .bf16/.f16 A: element i (0..7) of a lane; register i / 2, half i % 2.
inline void a16_coord(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
  const unsigned g = lane >> 2, t = lane % 4;
  row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  col = t * 2 + (i & 1u) + (i >= 4 ? 8 : 0);
}
// m16n8k16 .bf16/.f16 B: element i (0..3); row is k, col is n.
inline void b16_coord(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
  const unsigned g = lane >> 2, t = lane % 4;
  row = t * 2 + (i & 1u) + (i >= 2 ? 8 : 0);
  col = g;
}
// C / D of both shapes: element i (0..3).
inline void c_coord(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
  const unsigned g = lane >> 2, t = lane % 4;
  row = i < 2 ? g : g + 8;
  col = t * 2 + (i & 1u);
}
// m16n8k8 .tf32 A: element (= register) i (0..3).
inline void a_tf32_coord(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
  const unsigned g = lane >> 2, t = lane % 4;
  row = (i == 0 || i == 2) ? g : g + 8;
  col = i < 2 ? t : t + 4;
}
// m16n8k8 .tf32 B: element i (0..1); row is k, col is n.
inline void b_tf32_coord(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
  const unsigned g = lane >> 2, t = lane % 4;
  row = i == 0 ? t : t + 4;
  col = g;
}

// D = A B + C in float: c first, then the (exact) products in increasing k.
template <unsigned K>
void mma_compute(LaneIo* lanes, const float (&A)[16][K], const float (&B)[K][8],
                 const float (&C)[16][8]) {
  float D[16][8];
  for (unsigned m = 0; m < 16; ++m) {
    for (unsigned n = 0; n < 8; ++n) {
      float acc = C[m][n];
      for (unsigned k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
      D[m][n] = acc;
    }
  }
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    float d[4];
    for (unsigned i = 0; i < 4; ++i) {
      unsigned row, col;
      c_coord(lane, i, row, col);
      d[i] = D[row][col];
    }
    std::memcpy(lanes[lane].out, d, sizeof d);
  }
}

inline void gather_c(const LaneIo* lanes, float (&C)[16][8]) {
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    MmaIn in;
    std::memcpy(&in, lanes[lane].in, sizeof in);
    for (unsigned i = 0; i < 4; ++i) {
      unsigned row, col;
      c_coord(lane, i, row, col);
      C[row][col] = in.c[i];
    }
  }
}

template <bool kBf16>
void mma16_fn(LaneIo* lanes) {
  check_converged(lanes, kBf16 ? kMmaBf16 : kMmaF16, "mma.m16n8k16");
  float A[16][16], B[16][8], C[16][8];
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    MmaIn in;
    std::memcpy(&in, lanes[lane].in, sizeof in);
    auto widen = [](uint16_t h) { return kBf16 ? bf16_to_float(h) : f16_to_float(h); };
    for (unsigned i = 0; i < 8; ++i) {
      unsigned row, col;
      a16_coord(lane, i, row, col);
      const uint32_t reg = in.a[i / 2];
      A[row][col] = widen(i % 2 ? hi16(reg) : lo16(reg));
    }
    for (unsigned i = 0; i < 4; ++i) {
      unsigned row, col;
      b16_coord(lane, i, row, col);
      const uint32_t reg = in.b[i / 2];
      B[row][col] = widen(i % 2 ? hi16(reg) : lo16(reg));
    }
  }
  gather_c(lanes, C);
  mma_compute<16>(lanes, A, B, C);
}

inline void mma_tf32_fn(LaneIo* lanes) {
  check_converged(lanes, kMmaTf32, "mma.m16n8k8.tf32");
  float A[16][8], B[8][8], C[16][8];
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    MmaIn in;
    std::memcpy(&in, lanes[lane].in, sizeof in);
    for (unsigned i = 0; i < 4; ++i) {
      unsigned row, col;
      a_tf32_coord(lane, i, row, col);
      A[row][col] = bits_to_float(in.a[i] & 0xffffe000u);
    }
    for (unsigned i = 0; i < 2; ++i) {
      unsigned row, col;
      b_tf32_coord(lane, i, row, col);
      B[row][col] = bits_to_float(in.b[i] & 0xffffe000u);
    }
  }
  gather_c(lanes, C);
  mma_compute<8>(lanes, A, B, C);
}

inline void mma_call(unsigned op, CollectiveFn fn, float (&d)[4], const uint32_t (&a)[4],
                     const uint32_t (&b)[2], const float (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);  // before d is written: d may alias c
  warp_collective(op, &in, sizeof in, d, sizeof d, fn);
}

// ---- cp.async ----------------------------------------------------------------------------
inline void perform(const AsyncCopy& cp) {
  if (cp.src_bytes > 0) std::memcpy(cp.dst, cp.src, cp.src_bytes);
  if (cp.bytes > cp.src_bytes)
    std::memset(static_cast<unsigned char*>(cp.dst) + cp.src_bytes, 0, cp.bytes - cp.src_bytes);
}

inline void wait_groups(unsigned pending_allowed) {
  ThreadState& s = self();
  const size_t groups = s.async_groups.size();
  if (groups <= pending_allowed) return;
  const size_t done_groups = groups - pending_allowed;
  const size_t done_copies = s.async_groups[done_groups - 1];
  for (size_t i = 0; i < done_copies; ++i) perform(s.async_copies[i]);
  s.async_copies.erase(s.async_copies.begin(), s.async_copies.begin() + done_copies);
  s.async_groups.erase(s.async_groups.begin(), s.async_groups.begin() + done_groups);
  for (size_t& end : s.async_groups) end -= done_copies;
}

}  // namespace mma
}  // namespace cuda_emu

namespace robustft {
namespace ptx {

inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));
}

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(::cuda_emu::dynamic_smem());
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  ::cuda_emu::mma::ldmatrix<1, false>(r, smem_row);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  ::cuda_emu::mma::ldmatrix<2, false>(r, smem_row);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  ::cuda_emu::mma::ldmatrix<4, false>(r, smem_row);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  ::cuda_emu::mma::ldmatrix<2, true>(r, smem_row);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  ::cuda_emu::mma::ldmatrix<4, true>(r, smem_row);
}

template <bool kBf16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  using namespace ::cuda_emu::mma;
  mma_call(kBf16 ? kMmaBf16 : kMmaF16, &mma16_fn<kBf16>, d, a, b, c);
}

inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  using namespace ::cuda_emu::mma;
  mma_call(kMmaTf32, &mma_tf32_fn, d, a, b, c);
}

inline uint32_t to_tf32(float x) { return ::cuda_emu::mma::round_tf32(x); }

template <bool kBf16>
inline uint32_t pack2(float lo, float hi) {
  using namespace ::cuda_emu::mma;
  const uint16_t l = kBf16 ? float_to_bf16(lo) : float_to_f16(lo);
  const uint16_t h = kBf16 ? float_to_bf16(hi) : float_to_f16(hi);
  return uint32_t(l) | (uint32_t(h) << 16);
}

inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  using ::cuda_emu::die;
  if (src_bytes < 0 || src_bytes > 16) die("cp.async: src_bytes outside 0..16");
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0)
    die("cp.async: shared-memory address not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    die("cp.async: global-memory address not 16-byte aligned");
  std::memset(smem, 0xff, 16);  // undefined until the wait: neither old nor new data
  ::cuda_emu::self().async_copies.push_back(
      ::cuda_emu::AsyncCopy{smem, src_bytes > 0 ? gmem : nullptr, unsigned(src_bytes), 16u});
}

inline void cp_async_commit() {
  ::cuda_emu::ThreadState& s = ::cuda_emu::self();
  s.async_groups.push_back(s.async_copies.size());
}

template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group N needs N >= 0");
  ::cuda_emu::mma::wait_groups(unsigned(N));
}

}  // namespace ptx
}  // namespace robustft
