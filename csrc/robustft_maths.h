// Shared host/device maths of the fused contrastive losses.
//
// Every formula that both the C++ CPU kernels and the CUDA kernels evaluate per
// similarity entry lives here, once, as an inline function callable from host and
// device code. The CPU build (and the C++ unit tests) therefore exercise exactly
// the expressions the GPU runs. Notation follows docs/maths.md, sections 1-3:
// S = scale * <p, q> + bias is one logit, r / c the row / column log-sum-exp.
// (Lipsum-FT and DiVE have no per-entry tile maths: step_ops.h computes them with ATen.)
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

// Derivative of the CLIP loss with respect to one logit (docs/maths.md, section 1):
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

// One exp for the two softmax terms of a logit (the CPU's float loops): for any shift M,
//   w_a exp(s - a) + w_b exp(s - b) = exp(s - M) (w_a exp(M - a) + w_b exp(M - b)),
// the bracket a sum of a row's and a column's factor, each formed once. With M the largest
// of the log-sum-exps a and b range over, exp(s - M) <= 1 (a logit is at most its
// log-sum-exp); with every one of them within kSharedShiftSpread of M, every factor is a
// normal float (>= w e^-50), and exp(s - M) is 0 only where the exact term is below
// e^(-87.3 + 50) (6e-17, against a softmax row that sums to 1). Wider spreads take the two
// exps. The same holds for a tile's row and column sums with M the tile's largest logit.
constexpr double kSharedShiftSpread = 50.0;

// Whether one shift serves log-sum-exps (or maxima) ranging over [lo, hi]: false for a
// wider spread, NaN or infinities (their difference is NaN or infinite).
template <typename T>
RFT_HD bool shares_shift(T lo, T hi) {
  return hi - lo <= T(kSharedShiftSpread);
}

template <typename T>
RFT_HD T shift_factor(T w, T shift, T lse) {
  return w * std::exp(shift - lse);
}

// Derivative of the SigLIP loss with respect to one logit (docs/maths.md, section 2):
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

// ---------------------------------------------------------------------------------
// Geodesic mixing (slerp) of two unit vectors a, b (docs/maths.md, section 3):
//   slerp(a, b; lam) = w_a a + w_b b,  w_a = sin(lam theta) / sin theta,
//   w_b = sin((1 - lam) theta) / sin theta,  theta = arccos <a, b>.
// slerp_weights gives both weights and their derivatives with respect to c = <a, b>,
// so the backward of the mix is dA += w_a dM + k b, dB += w_b dM + k a with
// k = <dM, a> dw_a/dc + <dM, b> dw_b/dc. The kernels evaluate it in double (the prologue
// is O(n)); T = float is kept for the unit tests of the float-precision behaviour.
//
// Our stabilisation (the paper's code divides by sin theta and returns NaN for
// identical vectors):
//  * c is clamped to [-1 + kSlerpCosEps, 1]. Below -1 + eps (antipodal pair, where the
//    geodesic is undefined) the weights are those at the clamp and dc carries no
//    gradient (slerp_grad_passes false). Above 1 (rounding of identical rows) c = 1.
//  * sin theta = sqrt((1 - c)(1 + c)): both factors are exact near c = +-1.
//  * dw/dc = -N(l, theta) / sin^3 theta with N = l cos(l theta) sin theta -
//    sin(l theta) cos theta. For l -> 1 the two products of N cancel (both tend to
//    sin theta cos theta), catastrophically so near theta = pi where sin^3 theta is tiny
//    and the true derivative of w_a at lam = 1 is exactly 0. The identity
//    N = sin((1 - l) theta) - (1 - l) cos(l theta) sin theta has no cancellation there
//    (both terms vanish with 1 - l), so it is used for l > 1/2; the first form is exact
//    as l -> 0 (both terms vanish with l).
//  * For theta below slerp_small_angle<T>() the weights and their c-derivatives come
//    from their Taylor series in theta (w_a is analytic in c at c = 1, so the
//    derivative is finite there, -lam (1 - lam^2) / 3 at theta = 0): no division by a
//    vanishing sin theta, and no cancellation of N, which is O(theta^3). The threshold
//    eps_mach^(1/6) balances the series' truncation error (theta^4) against that
//    cancellation (eps_mach / theta^2).
constexpr double kSlerpCosEps = 1e-6;

template <typename T>
struct SlerpWeights {
  T wa;      // weight of a
  T wb;      // weight of b
  T dwa_dc;  // d w_a / d c
  T dwb_dc;  // d w_b / d c
};

template <typename T>
RFT_HD T slerp_small_angle() {
  // eps_mach^(1/6): 0.0703 for float, 0.00245 for double.
  return sizeof(T) >= 8 ? T(2.4566e-3) : T(7.0297e-2);
}

// sin(l theta) / sin theta and its derivative in c = cos theta.
template <typename T>
RFT_HD void slerp_weight(T l, T theta, T sin_t, T cos_t, bool small, T* w, T* dw_dc) {
  if (small) {
    const T t2 = theta * theta, one_m = T(1) - l * l;
    *w = l * (T(1) + one_m * t2 / T(6) + one_m * (T(7) - T(3) * l * l) * t2 * t2 / T(360));
    *dw_dc = -l * one_m * (T(1) / T(3) + (T(4) - l * l) * t2 / T(30));
    return;
  }
  const T s = std::sin(l * theta);
  *w = s / sin_t;
  // dw/dtheta = N / sin^2 theta, dtheta/dc = -1 / sin theta.
  const T num = l > T(0.5) ? std::sin((T(1) - l) * theta) - (T(1) - l) * std::cos(l * theta) * sin_t
                           : l * std::cos(l * theta) * sin_t - s * cos_t;
  *dw_dc = -num / (sin_t * sin_t * sin_t);
}

// Does the gradient of c pass through the clamp?
template <typename T>
RFT_HD bool slerp_grad_passes(T c) {
  return c > T(-1) + T(kSlerpCosEps);
}

template <typename T>
RFT_HD SlerpWeights<T> slerp_weights(T c, T lam) {
  const T lo = T(-1) + T(kSlerpCosEps);
  const T ch = c < lo ? lo : (c > T(1) ? T(1) : c);
  const T theta = std::acos(ch);
  const T sin_t = std::sqrt((T(1) - ch) * (T(1) + ch));
  const bool small = theta < slerp_small_angle<T>();
  SlerpWeights<T> out;
  slerp_weight(lam, theta, sin_t, ch, small, &out.wa, &out.dwa_dc);
  slerp_weight(T(1) - lam, theta, sin_t, ch, small, &out.wb, &out.dwb_dc);
  if (!slerp_grad_passes(c)) {
    out.dwa_dc = T(0);
    out.dwb_dc = T(0);
  }
  return out;
}

// The Gram formulation of CLIP + m^2 (docs/maths.md, section 9.4). A mixed logit is its
// scale times a combination of two Gram entries of its row with the mixed pair's endpoints,
//   A_pq = s_m dot(w_a[q], G_II, w_b[q], G_IT),   B_pq = s_m dot(w_a[q], G_TI, w_b[q], G_TT),
// and the same tile read transposed gives
//   A_qp = s_m dot(w_a[p], G_II, w_b[p], G_TI),   B_qp = s_m dot(w_a[p], G_IT, w_b[p], G_TT);
// the backward's column sums u take the same combination with softmax weights in place of
// the slerp weights.
template <typename T>
RFT_HD T gram_mixed_dot(T w_a, T g_a, T w_b, T g_b) {
  return w_a * g_a + w_b * g_b;
}

// The backward's four S entries at (p, q) of a strip, from the dlogits dA', dB', dC' of both
// orientations: each Gram entry collects every logit that reads it. f_m and f_c are the
// factors a_m and a_c of maths.md (times the strip's workspace scale).
template <typename T>
struct GramGrads {
  T ii, it, ti, tt;
};

template <typename T>
RFT_HD GramGrads<T> gram_grads(T f_m, T f_c, T dA_pq, T dA_qp, T dB_pq, T dB_qp, T dC_pq,
                               T dC_qp, T wa_p, T wb_p, T wa_q, T wb_q) {
  return {f_m * (dA_pq * wa_q + dA_qp * wa_p), f_m * (dA_pq * wb_q + dB_qp * wa_p) + f_c * dC_pq,
          f_m * (dB_pq * wa_q + dA_qp * wb_p) + f_c * dC_qp, f_m * (dB_pq * wb_q + dB_qp * wb_p)};
}

// DiVE (docs/maths.md, section 4) at one entry of a reference pair's difference vectors
// u = fi - pi and v = ft - pt, against the centre's entry m: its terms of |u - m|^2 + |v - m|^2
// (AVL) and |u - v|^2 (PVL), and the gradients of w_a AVL + w_p PVL,
//   du = 2 [w_a (u - m) + w_p (u - v)],   dv = 2 [w_a (v - m) - w_p (u - v)].
template <typename T>
RFT_HD T dive_avl_entry(T u, T v, T m) {
  return (u - m) * (u - m) + (v - m) * (v - m);
}

template <typename T>
RFT_HD T dive_pvl_entry(T u, T v) {
  return (u - v) * (u - v);
}

template <typename T>
RFT_HD void dive_entry_grads(T u, T v, T m, T w_a, T w_p, T* du, T* dv) {
  *du = T(2) * (w_a * (u - m) + w_p * (u - v));
  *dv = T(2) * (w_a * (v - m) - w_p * (u - v));
}

}  // namespace maths
}  // namespace robustft
