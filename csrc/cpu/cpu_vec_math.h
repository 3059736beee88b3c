// Branch-free float exp, log1p, softplus and sigmoid for the CPU kernels' inner loops.
//
// std::exp and std::log1p are library calls that GCC cannot vectorise; these are written
// with arithmetic, integer bit operations and selects only, so a loop over contiguous
// floats that inlines them becomes SIMD code (SSE2 in a generic x86-64 build, AVX2 or
// AVX-512 in the clones of cpu_vec_kernels.cpp). Double keeps the library functions of
// robustft_maths.h.
//
// Accuracy over the whole float range, against the library functions evaluated in double
// (measured over all 2^32 inputs for each instruction set; csrc/tests/test_vec_math.cpp
// checks a sweep of a million of them and the special values):
//  * exp_f:      1.01 ulp; 0 below kExpFlushBelow (where exp is under FLT_MIN: no
//                subnormal result, see flush_subnormal), +inf above log(FLT_MAX), NaN for
//                NaN.
//  * log1p_f:    1.41 ulp on (-1, +inf) (the kernels' arguments are exp(-|s|) in (0, 1]),
//                -inf at -1, NaN below -1 or for NaN, +inf at +inf.
//  * softplus_f: 1.69 ulp, sigmoid_f: 2.40 ulp: the formulas of robustft_maths.h
//                (softplus(x) = max(x, 0) + log1p(exp(-|x|)), sigmoid through exp(-|x|))
//                on these functions.
//
// The rounding trick of exp_f ((v + 1.5 * 2^23) - 1.5 * 2^23 is v rounded to an integer)
// relies on IEEE arithmetic being evaluated as written: no -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__FAST_MATH__)
#error "cpu_vec_math.h needs IEEE float semantics: do not build with -ffast-math"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RFT_VEC_INLINE inline __attribute__((always_inline))
#else
#define RFT_VEC_INLINE inline
#endif

namespace robustft {
namespace cpu {
namespace vec {

RFT_VEC_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

RFT_VEC_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// x, or 0 where x is subnormal (|x| below the smallest normal T; NaN and infinities kept).
// The CPU's loops write the operands of their BLAS products (dlogits, the Gram strips' S)
// through it: a dlogit is an exp times weights, which can fall below FLT_MIN even where the
// exp does not, and x86 BLAS kernels slow down by orders of magnitude on subnormal operands
// (MKL's sgemm on an Intel Xeon, 2 threads, a 512 x 4096 by 4096 x 512 product: 3 times
// slower with 0.1% of its first operand's entries subnormal, 6 times with 1%). Such an
// entry adds less than FLT_MIN times a feature to a gradient.
template <typename T>
RFT_VEC_INLINE T flush_subnormal(T x) {
  constexpr T kMin = std::numeric_limits<T>::min();
  return (x < kMin && x > -kMin) ? T(0) : x;
}

// The argument below which exp_f is 0: a float a few ulp above log(FLT_MIN), so that
// exp_f never forms a subnormal (x86 cores take a microcode assist for every multiply that
// produces or reads one, and these loops run one exp per logit).
constexpr float kExpFlushBelow = -87.33654f;

// 2^k for integer k in [-126, 127].
RFT_VEC_INLINE float pow2i(int32_t k) { return bits_to_float((k + 127) << 23); }

// exp(x): x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2 in a part exact in
// k * part and a remainder), exp(r) from Cephes' degree-7 polynomial p, then 2^k applied by
// adding k to p's exponent field: exact wherever the result is normal, which the clamps
// ensure (k = 128 only with r < 0, so p < 1 and the field stays below 255; k = -126 only
// with r > 0, so p >= 1 and the field stays above 0), and one integer add where a multiply
// by a power of two would need two (2^128 is not a float). Above kExpOverflowAbove the
// result is +inf; below kExpFlushBelow it is 0, and the argument is clamped there first so
// that no lane forms a subnormal.
constexpr float kExpOverflowAbove = 88.7228317f;  // the largest float whose exp is finite
RFT_VEC_INLINE float exp_f(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;       // 9 significant bits: k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;    // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;        // 1.5 * 2^23
  // A NaN fails both comparisons and becomes kLo here; the final select returns it.
  constexpr float kLo = kExpFlushBelow, kHi = kExpOverflowAbove;
  float xc = x >= kLo ? x : kLo;
  xc = xc <= kHi ? xc : kHi;
  const float kf = (xc * kLog2e + kRound) - kRound;  // round to nearest
  float r = xc - kf * kLn2Hi;
  r = r - kf * kLn2Lo;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t k = static_cast<int32_t>(kf);  // in [-126, 128]
  const float y = bits_to_float(float_to_bits(p) + k * (int32_t(1) << 23));
  constexpr float kInf = std::numeric_limits<float>::infinity();
  return x >= kLo ? (x <= kHi ? y : kInf) : (x == x ? 0.0f : x);
}

// log1p(x), after musl's log1pf: 1 + x = 2^k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2))
// taken from the bits of u = fl(1 + x), the rounding error c = (1 + x) - u (exact) folded
// into f, so that f = x exactly where k = 0 and small arguments keep their relative
// precision; then log1p(f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f), with musl's
// minimax R.
RFT_VEC_INLINE float log1p_f(float x) {
  constexpr float kLn2Hi = 6.9313812256e-01f;  // 17 significant bits: k * kLn2Hi is exact
  constexpr float kLn2Lo = 9.0580006145e-06f;
  constexpr float kLg1 = 0.66666662693f, kLg2 = 0.40000972152f, kLg3 = 0.28498786688f,
                  kLg4 = 0.24279078841f;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float u = 1.0f + x;
  // Unsigned bit arithmetic: the sign and NaN bit patterns of the arguments that the
  // final selects replace must not overflow a signed integer.
  const uint32_t iu = static_cast<uint32_t>(float_to_bits(u)) + (0x3f800000u - 0x3f3504f3u);
  const int32_t k = static_cast<int32_t>(iu >> 23) - 127;
  // c = (1 + x) - u, exact (Sterbenz); beyond 2^24 it is below f's rounding: 0.
  const float c = k >= 2 ? 1.0f - (u - x) : x - (u - 1.0f);
  const int32_t kc = k < -24 ? -24 : (k > 24 ? 24 : k);
  const float c_scaled = k < 24 ? c * pow2i(-kc) : 0.0f;
  const float m = bits_to_float(static_cast<int32_t>((iu & 0x007fffffu) + 0x3f3504f3u));
  const float f = (m - 1.0f) + c_scaled;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (kLg2 + w * kLg4);
  const float t2 = z * (kLg1 + w * kLg3);
  const float hfsq = 0.5f * f * f;
  const float kf = static_cast<float>(k);
  float y = s * (hfsq + (t1 + t2)) + kf * kLn2Lo - hfsq + f + kf * kLn2Hi;
  y = x == kInf ? x : y;
  y = x == -1.0f ? -kInf : y;
  return x >= -1.0f ? y : std::numeric_limits<float>::quiet_NaN();  // NaN and x < -1
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)).
RFT_VEC_INLINE float softplus_f(float x) {
  const float ax = x >= 0.0f ? x : -x;
  return (x > 0.0f ? x : 0.0f) + log1p_f(exp_f(-ax));
}

// sigmoid(x) = 1 / (1 + exp(-x)) for x >= 0, e / (1 + e) with e = exp(x) below.
RFT_VEC_INLINE float sigmoid_f(float x) {
  const float ax = x >= 0.0f ? x : -x;
  const float e = exp_f(-ax);
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

}  // namespace vec
}  // namespace cpu
}  // namespace robustft
