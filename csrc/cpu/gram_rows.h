// The per-row loops of the CPU's Gram formulation (docs/maths.md, section 9.4), written once
// over the value type and its exp: cpu_vec_kernels.cpp instantiates them for float with the
// branch-free exp of each instruction set (so they vectorise), gram_cpu.cpp for double with
// std::exp. The per-entry maths is robustft_maths.h's (gram_mixed_dot, gram_grads).
//
// Rows of a tile or strip are plain contiguous loops: `omp simd` reductions for the sums and
// maxima, and a row's special entry (an m^2 true pair, whose logit and dlogits differ) split
// out of the loop rather than tested in it. A strip's S entries, the backward products'
// operand, are written without subnormals (vec::flush_subnormal).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/cpu_stream.h"
#include "cpu/cpu_vec_math.h"
#include "robustft_maths.h"

#if defined(__GNUC__) || defined(__clang__)
#define RFT_ROW_BODY inline __attribute__((always_inline))
#else
#define RFT_ROW_BODY inline
#endif

namespace robustft {
namespace cpu {
namespace gram {

// A tile of mixed logits scale * gram_mixed_dot(w_a, g_a, w_b, g_b) from two Gram blocks
// g_a, g_b (row stride ld_g), the slerp weights taken per column (the direct orientation:
// the column is the mixed row) or per row (the transposed one). With special, the entry
// (r, r + offset) that lies in the tile is special[r] (the true pair's logit) instead.
template <typename T>
struct MixArgs {
  const T* g_a = nullptr;
  const T* g_b = nullptr;
  int64_t ld_g = 0;
  const T* w_a = nullptr;  // [cols] per column, [rows] per row
  const T* w_b = nullptr;
  bool per_row = false;
  T scale = T(1);
  const T* special = nullptr;  // [rows]
  int64_t offset = 0;
};

// out [rows, cols] (row stride ld) = the mixed logits; row_max[r] = the maximum of row r and
// col_max[c] = max(col_max[c], the maximum of column c), each when non-null.
template <typename T>
RFT_ROW_BODY void mixed_logits_max(T* out, int64_t rows, int64_t cols, int64_t ld,
                                   const MixArgs<T>& a, T* row_max, T* col_max) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const T* ga = a.g_a + r * a.ld_g;
    const T* gb = a.g_b + r * a.ld_g;
    const T* ga_next = next_row(ga, r, rows, a.ld_g);
    T* o = out + r * ld;
    for (int64_t b = 0, e; b < cols; b = e) {
      e = stream_block(b, cols, ga_next);
      if (ga_next != nullptr) prefetch_lines(gb + a.ld_g + b, e - b);
      if (a.per_row) {
        const T wa = a.w_a[r], wb = a.w_b[r];
#pragma omp simd
        for (int64_t c = b; c < e; ++c) {
          o[c] = maths::logit(maths::gram_mixed_dot(wa, ga[c], wb, gb[c]), a.scale, T(0));
        }
      } else {
#pragma omp simd
        for (int64_t c = b; c < e; ++c) {
          o[c] = maths::logit(maths::gram_mixed_dot(a.w_a[c], ga[c], a.w_b[c], gb[c]), a.scale,
                              T(0));
        }
      }
    }
    const int64_t cs = r + a.offset;
    if (a.special != nullptr && cs >= 0 && cs < cols) o[cs] = a.special[r];
    T m = kNegInf;
    if (col_max != nullptr) {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) {
        m = o[c] > m ? o[c] : m;
        col_max[c] = o[c] > col_max[c] ? o[c] : col_max[c];
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) m = o[c] > m ? o[c] : m;
    }
    if (row_max != nullptr) row_max[r] = m;
  }
}

// Where a strip's four blocks lie in its buffer (step_kernels.h's GramLayout): [4, rows,
// width] one block after another, or interleaved [2 rows, 2 width] (the rows of I, then those
// of T; the columns in blocks of `rows`, each block's columns of I then of T). The strip's
// column c of block II in row r of I is at r ld() + col(c); its IT entry it_off(c) further,
// its TI entry ti_off() further and its TT entry ti_off() + it_off(c). Column blocks:
// [0, rows) (the strip's own rows) and the ones from block_end on, each contiguous.
struct StripLayout {
  int64_t rows = 0, width = 0;
  bool interleaved = false;
  int64_t ld() const { return interleaved ? 2 * width : width; }
  int64_t ti_off() const { return 2 * rows * width; }
  int64_t col(int64_t c) const { return interleaved ? c + c / rows * rows : c; }
  int64_t it_off(int64_t c) const {
    return interleaved ? std::min(rows, width - c / rows * rows) : rows * width;
  }
  // The end of the column block that holds c.
  int64_t block_end(int64_t c) const {
    return interleaved ? std::min(width, (c / rows + 1) * rows) : (c < rows ? rows : width);
  }
};

// A backward strip: rows [r0, r0 + rows) against the columns [r0, n) (width n - r0), its
// four blocks G_II, G_IT, G_TI, G_TT at s (in the layout of `interleaved`) on entry and
// S_II, S_IT, S_TI, S_TT on exit.
template <typename T>
struct StripArgs {
  T* s = nullptr;
  int64_t rows = 0, width = 0, r0 = 0, n = 0;
  const T* w_a = nullptr;  // [n]
  const T* w_b = nullptr;
  const T* lse = nullptr;  // [4, n]: A, B and C rows, C columns
  T m2_scale = T(0), clip_scale = T(0), f_m = T(0), f_c = T(0);
  bool with_clip = false;
  bool interleaved = false;
  // With CLIP, its two terms of an entry from one exp where given (maths::kSharedShiftSpread):
  // 0.5 exp(clip_shift - lse) of the C rows' and the C columns' log-sum-exps of the strip's
  // entities, [n - r0] each (entity r0 + i at i).
  const T* clip_row_f = nullptr;
  const T* clip_col_f = nullptr;
  T clip_shift = T(0);
  StripLayout layout() const { return StripLayout{rows, width, interleaved}; }
};

// The sums a row of a strip adds: the two scale sums (logit / scale times dlogit over m^2's
// and CLIP's entries) and the row's own u_I, u_T.
template <typename T>
struct RowSums {
  T m2 = T(0), clip = T(0), u_i = T(0), u_t = T(0);
};

// Entries [c0, c1) of row r (not its true pair), within one column block. kBoth: the
// entries serve both orientations (columns past the strip's rows), so they add their
// transposed terms to the scale sums and their direct ones to the columns' u (u_i, u_t
// indexed by column).
template <typename T, typename Exp, bool kClip, bool kShared, bool kBoth>
RFT_ROW_BODY void strip_span(const StripArgs<T>& a, int64_t r, int64_t c0, int64_t c1,
                             T* u_i, T* u_t, RowSums<T>& sums, Exp exp) {
  const int64_t n = a.n, p = a.r0 + r;
  const StripLayout L = a.layout();
  // Indexed by the strip's column c: the block's entries are contiguous.
  T* sii = a.s + r * L.ld() + (L.col(c0) - c0);
  T* sit = sii + L.it_off(c0);
  T* sti = sii + L.ti_off();
  T* stt = sti + L.it_off(c0);
  const T* wa = a.w_a + a.r0;  // by column
  const T* wb = a.w_b + a.r0;
  const T* l_a = a.lse + a.r0;
  const T* l_b = l_a + n;
  const T* l_c = l_b + n;
  const T* l_ccol = l_c + n;
  const T wa_p = a.w_a[p], wb_p = a.w_b[p];
  const T la_p = a.lse[p], lb_p = a.lse[n + p], lc_p = a.lse[2 * n + p],
          lccol_p = a.lse[3 * n + p];
  const T sm = a.m2_scale, sc = a.clip_scale;
  const T* rf = kShared ? a.clip_row_f : nullptr;  // by column
  const T* cf = kShared ? a.clip_col_f : nullptr;
  const T rf_p = kShared ? a.clip_row_f[r] : T(0), cf_p = kShared ? a.clip_col_f[r] : T(0);
  // The next row's entries of the four blocks are prefetched block by block (cpu_stream.h).
  const bool ahead = r + 1 < a.rows;
  T s_m2 = T(0), s_clip = T(0), s_ui = T(0), s_ut = T(0);
  for (int64_t b = c0, e; b < c1; b = e) {
    e = b + kStreamBlock < c1 ? b + kStreamBlock : c1;
    if (ahead) {
      prefetch_lines(sii + L.ld() + b, e - b);
      prefetch_lines(sit + L.ld() + b, e - b);
      prefetch_lines(sti + L.ld() + b, e - b);
      prefetch_lines(stt + L.ld() + b, e - b);
    }
#pragma omp simd reduction(+ : s_m2, s_clip, s_ui, s_ut)
    for (int64_t c = b; c < e; ++c) {
      const T gii = sii[c], git = sit[c], gti = sti[c], gtt = stt[c];
      const T wa_q = wa[c], wb_q = wb[c];
      const T a_pq = maths::gram_mixed_dot(wa_q, gii, wb_q, git);
      const T a_qp = maths::gram_mixed_dot(wa_p, gii, wb_p, gti);
      const T b_pq = maths::gram_mixed_dot(wa_q, gti, wb_q, gtt);
      const T b_qp = maths::gram_mixed_dot(wa_p, git, wb_p, gtt);
      const T dA_pq = exp(sm * a_pq - la_p), dA_qp = exp(sm * a_qp - l_a[c]);
      const T dB_pq = exp(sm * b_pq - lb_p), dB_qp = exp(sm * b_qp - l_b[c]);
      T dC_pq = T(0), dC_qp = T(0);
      if (kClip && kShared) {
        dC_pq = exp(sc * git - a.clip_shift) * (rf_p + cf[c]);
        dC_qp = exp(sc * gti - a.clip_shift) * (rf[c] + cf_p);
      } else if (kClip) {
        dC_pq = T(0.5) * (exp(sc * git - lc_p) + exp(sc * git - l_ccol[c]));
        dC_qp = T(0.5) * (exp(sc * gti - l_c[c]) + exp(sc * gti - lccol_p));
      }
      const maths::GramGrads<T> g =
          maths::gram_grads(a.f_m, a.f_c, dA_pq, dA_qp, dB_pq, dB_qp, dC_pq, dC_qp, wa_p, wb_p,
                            wa_q, wb_q);
      sii[c] = vec::flush_subnormal(g.ii);
      sit[c] = vec::flush_subnormal(g.it);
      sti[c] = vec::flush_subnormal(g.ti);
      stt[c] = vec::flush_subnormal(g.tt);
      s_m2 += dA_pq * a_pq + dB_pq * b_pq;
      s_clip += dC_pq * git;
      s_ui += maths::gram_mixed_dot(dA_qp, gii, dB_qp, git);
      s_ut += maths::gram_mixed_dot(dA_qp, gti, dB_qp, gtt);
      if (kBoth) {
        s_m2 += dA_qp * a_qp + dB_qp * b_qp;
        s_clip += dC_qp * gti;
        u_i[c] += maths::gram_mixed_dot(dA_pq, gii, dB_pq, gti);
        u_t[c] += maths::gram_mixed_dot(dA_pq, git, dB_pq, gtt);
      }
    }
  }
  sums.m2 += s_m2;
  sums.clip += s_clip;
  sums.u_i += s_ui;
  sums.u_t += s_ut;
}

// The true pair (p, p) of row r: no m^2 dlogits (the op body takes its gradient), CLIP's
// positive.
template <typename T, typename Exp>
RFT_ROW_BODY void strip_pair(const StripArgs<T>& a, int64_t r, RowSums<T>& sums, Exp exp) {
  const int64_t n = a.n, p = a.r0 + r;
  const StripLayout L = a.layout();
  T* sii = a.s + r * L.ld() + L.col(r);
  T* sit = sii + L.it_off(r);
  T* sti = sii + L.ti_off();
  T* stt = sti + L.it_off(r);
  T dC_pq = T(0), dC_qp = T(0);
  if (a.with_clip) {
    const T* l = a.lse;
    const T git = *sit, gti = *sti, sc = a.clip_scale;
    dC_pq = T(0.5) * (exp(sc * git - l[2 * n + p]) + exp(sc * git - l[3 * n + p])) - T(1);
    dC_qp = T(0.5) * (exp(sc * gti - l[2 * n + p]) + exp(sc * gti - l[3 * n + p])) - T(1);
    sums.clip += dC_pq * git;
  }
  const T wa = a.w_a[p], wb = a.w_b[p];
  const maths::GramGrads<T> g = maths::gram_grads(a.f_m, a.f_c, T(0), T(0), T(0), T(0), dC_pq,
                                                  dC_qp, wa, wb, wa, wb);
  *sii = vec::flush_subnormal(g.ii);
  *sit = vec::flush_subnormal(g.it);
  *sti = vec::flush_subnormal(g.ti);
  *stt = vec::flush_subnormal(g.tt);
}

// Rows [rb, re) of a strip into S, their scale sums into stats[0] (m^2) and stats[1]
// (CLIP), their u into u [2, n] (u_I then u_T).
template <typename T, typename Exp, bool kClip, bool kShared>
RFT_ROW_BODY void strip_rows_of(const StripArgs<T>& a, int64_t rb, int64_t re, double* stats,
                                T* u, Exp exp) {
  T* u_i = u + a.r0;
  T* u_t = u + a.n + a.r0;
  for (int64_t r = rb; r < re; ++r) {
    RowSums<T> sums;
    strip_span<T, Exp, kClip, kShared, false>(a, r, 0, r, u_i, u_t, sums, exp);
    strip_pair<T, Exp>(a, r, sums, exp);
    strip_span<T, Exp, kClip, kShared, false>(a, r, r + 1, a.rows, u_i, u_t, sums, exp);
    for (int64_t c = a.rows; c < a.width; c = a.layout().block_end(c)) {
      strip_span<T, Exp, kClip, kShared, true>(a, r, c, a.layout().block_end(c), u_i, u_t, sums,
                                               exp);
    }
    stats[0] += double(sums.m2);
    stats[1] += double(sums.clip);
    u_i[r] += sums.u_i;
    u_t[r] += sums.u_t;
  }
}

template <typename T, typename Exp>
RFT_ROW_BODY void strip_rows(const StripArgs<T>& a, int64_t rb, int64_t re, double* stats, T* u,
                             Exp exp) {
  if (a.with_clip && a.clip_row_f != nullptr) {
    strip_rows_of<T, Exp, true, true>(a, rb, re, stats, u, exp);
  } else if (a.with_clip) {
    strip_rows_of<T, Exp, true, false>(a, rb, re, stats, u, exp);
  } else {
    strip_rows_of<T, Exp, false, false>(a, rb, re, stats, u, exp);
  }
}

}  // namespace gram
}  // namespace cpu
}  // namespace robustft
