// Shared host/device maths of the fused contrastive losses.
//
// Every formula that both the C++ CPU kernels and the CUDA kernels evaluate per
// similarity entry lives here, once, as an inline function callable from host and
// device code. The CPU build (and the C++ unit tests) therefore exercise exactly
// the expressions the GPU runs. Notation follows shared/METHODS.md sections 1-2:
// S = scale * <p, q> + bias is one logit, r / c the row / column log-sum-exp.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RFT_HD __host__ __device__ __forceinline__
#else
#define RFT_HD inline
#endif

namespace robustft {
namespace maths {

// Online log-sum-exp state: the running maximum m and the sum l of exp(x - m).
// An empty state is m = -inf, l = 0; its value is -inf.
template <typename T>
struct LseState {
  T m;
  T l;
};

template <typename T>
RFT_HD LseState<T> lse_empty() {
  return LseState<T>{-std::numeric_limits<T>::infinity(), T(0)};
}

// Merge two partial states (associative and commutative up to rounding).
template <typename T>
RFT_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (b.l == T(0)) return a;
  if (a.l == T(0)) return b;
  if (a.m >= b.m) {
    return LseState<T>{a.m, a.l + b.l * std::exp(b.m - a.m)};
  }
  return LseState<T>{b.m, b.l + a.l * std::exp(a.m - b.m)};
}

// Add one finite element x to the state.
template <typename T>
RFT_HD LseState<T> lse_push(LseState<T> a, T x) {
  return lse_merge(a, LseState<T>{x, T(1)});
}

// A block of values whose maximum is `block_max` and whose sum of
// exp(x - block_max) is `block_sum`, merged into the state.
template <typename T>
RFT_HD LseState<T> lse_push_block(LseState<T> a, T block_max, T block_sum) {
  return lse_merge(a, LseState<T>{block_max, block_sum});
}

template <typename T>
RFT_HD T lse_value(LseState<T> a) {
  if (a.l == T(0)) return -std::numeric_limits<T>::infinity();
  return a.m + std::log(a.l);
}

// One logit from a dot product.
template <typename T>
RFT_HD T logit(T dot, T scale, T bias) {
  return scale * dot + bias;
}

// softplus(x) = log(1 + exp(x)), stable for large |x|.
template <typename T>
RFT_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// sigmoid(x) = 1 / (1 + exp(-x)), stable for large |x|.
template <typename T>
RFT_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// SigLIP per-entry loss: -log sigmoid(z * s) with z = +1 on positives, -1 else.
template <typename T>
RFT_HD T siglip_term(T s, bool positive) {
  return positive ? softplus(-s) : softplus(s);
}

// Derivative of the CLIP loss with respect to one logit (METHODS.md section 1):
//   dS = w_row * exp(s - r) + w_col * exp(s - c) - (positive ? w_pos : 0).
// A zero weight switches its term off (so an unused c may hold anything).
template <typename T>
RFT_HD T clip_dlogit(T s, T row_lse, T col_lse, T w_row, T w_col, T w_pos,
                     bool positive) {
  T d = T(0);
  if (w_row != T(0)) d += w_row * std::exp(s - row_lse);
  if (w_col != T(0)) d += w_col * std::exp(s - col_lse);
  if (positive) d -= w_pos;
  return d;
}

// Derivative of the SigLIP loss with respect to one logit (METHODS.md section 2):
//   dS = w * (sigmoid(s) - [positive]).
template <typename T>
RFT_HD T siglip_dlogit(T s, T w, bool positive) {
  return w * (sigmoid(s) - (positive ? T(1) : T(0)));
}

// Is entry (p, q) a positive pair? Positives sit where q == p + offset.
RFT_HD bool is_positive(long long p, long long q, bool has_positives,
                        long long offset) {
  return has_positives && (q - p == offset);
}

}  // namespace maths
}  // namespace robustft
