// Sums in double over a row, in independent lanes, for the CPU's O(n D) loops.
//
// A single running double sum is one dependent add per entry: four cycles each on the cores
// this was measured on, whatever the vector width, so a D = 512 row dot product took ~2000
// cycles. kLanes partial sums, each taking every kLanes-th entry, are independent chains
// that the compiler vectorises, and they are added in one fixed order: the result depends
// on D alone, not on threads or alignment.
#pragma once

#include <cstdint>

namespace robustft {
namespace cpu {

constexpr int64_t kSumLanes = 16;

// Lane k of `lanes` holds the sum of the terms of the entries j = k mod kSumLanes.
struct DoubleLanes {
  double lanes[kSumLanes] = {};

  // The lanes added pairwise, in a fixed tree.
  double total() const {
    double s[kSumLanes];
    for (int64_t k = 0; k < kSumLanes; ++k) s[k] = lanes[k];
    for (int64_t w = kSumLanes / 2; w > 0; w /= 2) {
      for (int64_t k = 0; k < w; ++k) s[k] += s[k + w];
    }
    return s[0];
  }
};

// sum_j term(j) for j in [0, n), in double, by lanes.
template <typename Term>
inline double lane_sum(int64_t n, const Term& term) {
  DoubleLanes acc;
  const int64_t whole = n - n % kSumLanes;
  for (int64_t j = 0; j < whole; j += kSumLanes) {
    for (int64_t k = 0; k < kSumLanes; ++k) acc.lanes[k] += term(j + k);
  }
  for (int64_t j = whole; j < n; ++j) acc.lanes[j - whole] += term(j);
  return acc.total();
}

// <a, b> over n entries, each product formed in double.
template <typename A, typename B>
inline double dot_double(const A* a, const B* b, int64_t n) {
  return lane_sum(n, [&](int64_t j) { return double(a[j]) * double(b[j]); });
}

}  // namespace cpu
}  // namespace robustft
