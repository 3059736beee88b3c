// The factors that let the CPU's float loops take CLIP's two dlogit terms of an entry from one
// exp (maths::shift_factor, robustft_maths.h): the contrastive dlogits (contrastive_cpu.cpp)
// and the Gram strips (gram_cpu.cpp) both form them here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "robustft_maths.h"

namespace robustft {
namespace cpu {

namespace mx = ::robustft::maths;

// For log-sum-exps row_lse [n] and col_lse [m]: shift = the largest of them and, where every
// one lies within maths::kSharedShiftSpread of it (on), row_f[i] = w_row exp(shift -
// row_lse[row0 + i]) for i < rows and col_f[j] = w_col exp(shift - col_lse[col0 + j]) for
// j < cols. Off, and empty, for a wider spread, NaN or infinities.
struct ShiftFactors {
  std::vector<float> row_f, col_f;
  float shift = 0.0f;
  bool on = false;
};

inline ShiftFactors shift_factors(const float* row_lse, int64_t n, const float* col_lse,
                                  int64_t m, float w_row, float w_col, int64_t row0,
                                  int64_t rows, int64_t col0, int64_t cols) {
  ShiftFactors f;
  const auto [r_lo, r_hi] = std::minmax_element(row_lse, row_lse + n);
  const auto [c_lo, c_hi] = std::minmax_element(col_lse, col_lse + m);
  const float shift = std::max(*r_hi, *c_hi);
  if (!mx::shares_shift(std::min(*r_lo, *c_lo), shift)) return f;
  f.shift = shift;
  f.on = true;
  f.row_f.resize(rows);
  f.col_f.resize(cols);
  for (int64_t i = 0; i < rows; ++i) f.row_f[i] = mx::shift_factor(w_row, shift, row_lse[row0 + i]);
  for (int64_t j = 0; j < cols; ++j) f.col_f[j] = mx::shift_factor(w_col, shift, col_lse[col0 + j]);
  return f;
}

}  // namespace cpu
}  // namespace robustft
