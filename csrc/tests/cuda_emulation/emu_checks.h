// What the emulated kernel tests (test_cuda_kernels_emulated.cpp, test_step_kernels_emulated.cpp)
// share: the tile engines under test with their tolerances, and the error measures. Include
// after emu.h and the kernel headers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/ffma_tile.cuh"
#include "cuda/mma_tile.cuh"
#include "harness.h"

namespace rft_emu_test {

using namespace robustft::cuda_tiles;

// ---- The engines under test --------------------------------------------------------------
// tol: error of the logits and sums (relative to their magnitude) against a double reference
// of the values the engine multiplies; ws_tol: of the dlogits stored in the workspace dtype.
struct FfmaFloat {
  using E = FfmaEngine<float>;
  using in_t = float;
  using ws_t = float;
  static constexpr bool kTf32 = false, kMma = false;
  static constexpr double tol = 2e-5, ws_tol = 2e-5;
};
struct FfmaDouble {
  using E = FfmaEngine<double>;
  using in_t = double;
  using ws_t = double;
  static constexpr bool kTf32 = false, kMma = false;
  static constexpr double tol = 1e-11, ws_tol = 1e-11;
};
// The tensor-core engine with a launcher's tile shape (tile_shapes.cuh).
template <class Shape>
struct MmaBf16 {
  using E = MmaEngine<Shape, Bf16Mma>;
  using in_t = c10::BFloat16;
  using ws_t = c10::BFloat16;
  static constexpr bool kTf32 = false, kMma = true;
  static constexpr double tol = 2e-5, ws_tol = 8e-3;
};
template <class Shape>
struct MmaF16 {
  using E = MmaEngine<Shape, F16Mma>;
  using in_t = c10::Half;
  using ws_t = c10::Half;
  static constexpr bool kTf32 = false, kMma = true;
  static constexpr double tol = 2e-5, ws_tol = 1e-3;
};
template <class Shape>
struct MmaTf32 {
  using E = MmaEngine<Shape, Tf32Mma>;
  using in_t = float;
  using ws_t = float;
  static constexpr bool kTf32 = true, kMma = true;
  static constexpr double tol = 2e-5, ws_tol = 2e-5;
};

// ---- Error measures ------------------------------------------------------------------------
// x rounded to tf32 as cvt.rna does it: to nearest, ties away from zero (finite x).
inline double round_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u + 0x1000u) & ~0x1fffu;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// max |ref - got| / max |ref| (matching infinities count as equal).
inline double rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double err = 0, mag = 1e-300;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i]) && ref[i] == got[i]) continue;
    err = std::max(err, std::fabs(ref[i] - got[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  return std::isnan(err) ? INFINITY : err / mag;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
  return out;
}

inline double g_worst_ratio = 0;  // largest error / tolerance of the running case
inline std::string g_worst_what;

// Fails the case when err > tol; keeps the worst ratio for the case's note.
inline void check_err(const std::string& what, double err, double tol) {
  RFT_CHECK_MSG(err <= tol, what, ": error ", err, " > tolerance ", tol);
  if (!(err / tol <= g_worst_ratio)) {
    g_worst_ratio = err / tol;
    g_worst_what = what;
  }
}

}  // namespace rft_emu_test
