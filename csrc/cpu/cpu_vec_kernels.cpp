// The vectorised float loops of cpu_vec_kernels.h, compiled once per instruction set.
//
// Each loop body below is written once (always inlined) and instantiated in one namespace
// per instruction set by RFT_DEFINE_VEC_KERNELS, whose functions carry the target
// attribute of their set; kernels() picks a set at run time from the CPU's features.
// The loops are plain contiguous loops that the compiler vectorises: cpu_vec_math.h's
// functions have no branches or library calls, row sums and maxima are `omp simd`
// reductions (compiled with -fopenmp, as the extension and the C++ tests are; without it
// they stay scalar and correct), and the special entry of a dlogit row (a positive pair,
// an m^2 true pair) splits the row's loop in two instead of being tested in it.

// Vectorising the selects of cpu_vec_math.h needs the compiler to know that comparisons
// may not trap (GCC's default -ftrapping-math keeps them as branches); nothing here reads
// floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "cpu/cpu_vec_kernels.h"

#include <limits>

#include "cpu/cpu_stream.h"
#include "cpu/cpu_vec_math.h"

#if defined(__GNUC__) || defined(__clang__)
#define RFT_VEC_BODY static inline __attribute__((always_inline))
#else
#define RFT_VEC_BODY static inline
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RFT_VEC_X86 1
#else
#define RFT_VEC_X86 0
#endif

namespace robustft {
namespace cpu {
namespace vec {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row maxima (and, with col_max, running column maxima) of the logits scale t + bias of a
// tile; kWrite stores the logits over t, otherwise t (dot products kept for a backward) is
// left as it is.
template <bool kWrite>
RFT_VEC_BODY void logit_max_rows(float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                                 float bias, float* row_max, float* col_max) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = t + r * ld;
    const float* ahead = next_row(row, r, rows, ld);
    float m = kNegInf;
    for (int64_t b = 0, e; b < cols; b = e) {
      e = stream_block(b, cols, ahead);
      if (col_max != nullptr) {
#pragma omp simd reduction(max : m)
        for (int64_t c = b; c < e; ++c) {
          const float s = scale * row[c] + bias;
          if (kWrite) row[c] = s;
          m = s > m ? s : m;
          col_max[c] = s > col_max[c] ? s : col_max[c];
        }
      } else {
#pragma omp simd reduction(max : m)
        for (int64_t c = b; c < e; ++c) {
          const float s = scale * row[c] + bias;
          if (kWrite) row[c] = s;
          m = s > m ? s : m;
        }
      }
    }
    row_max[r] = m;
  }
}

RFT_VEC_BODY void logits_max_body(float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                                  float bias, float* row_max, float* col_max) {
  logit_max_rows<true>(t, rows, cols, ld, scale, bias, row_max, col_max);
}

RFT_VEC_BODY void dot_logit_max_body(const float* t, int64_t rows, int64_t cols, int64_t ld,
                                     float scale, float bias, float* row_max, float* col_max) {
  // Never written through: logit_max_rows<false> only reads t.
  logit_max_rows<false>(const_cast<float*>(t), rows, cols, ld, scale, bias, row_max, col_max);
}

// Row sums exp(S - row_max[r]) (and, with col_sum, column sums exp(S - col_max[c])) of a
// tile whose logits are S = t (kAffine false) or S = scale t + bias (kAffine true).
template <bool kAffine>
RFT_VEC_BODY void exp_sum_rows(const float* t, int64_t rows, int64_t cols, int64_t ld,
                               float scale, float bias, const float* row_max, float* row_sum,
                               const float* col_max, float* col_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = t + r * ld;
    const float* ahead = next_row(row, r, rows, ld);
    const float mr = row_sum != nullptr ? row_max[r] : 0.0f;
    float sum = 0.0f;
    for (int64_t b = 0, e; b < cols; b = e) {
      e = stream_block(b, cols, ahead);
      if (row_sum == nullptr) {
#pragma omp simd
        for (int64_t c = b; c < e; ++c) {
          const float s = kAffine ? scale * row[c] + bias : row[c];
          col_sum[c] += exp_f(s - col_max[c]);
        }
      } else if (col_sum != nullptr) {
#pragma omp simd reduction(+ : sum)
        for (int64_t c = b; c < e; ++c) {
          const float s = kAffine ? scale * row[c] + bias : row[c];
          sum += exp_f(s - mr);
          col_sum[c] += exp_f(s - col_max[c]);
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t c = b; c < e; ++c) {
          const float s = kAffine ? scale * row[c] + bias : row[c];
          sum += exp_f(s - mr);
        }
      }
    }
    if (row_sum != nullptr) row_sum[r] = sum;
  }
}

RFT_VEC_BODY void exp_sums_body(const float* t, int64_t rows, int64_t cols, int64_t ld,
                                const float* row_max, float* row_sum, const float* col_max,
                                float* col_sum) {
  exp_sum_rows<false>(t, rows, cols, ld, 1.0f, 0.0f, row_max, row_sum, col_max, col_sum);
}

RFT_VEC_BODY void dot_exp_sums_body(const float* t, int64_t rows, int64_t cols, int64_t ld,
                                    float scale, float bias, const float* row_max,
                                    float* row_sum, const float* col_max, float* col_sum) {
  exp_sum_rows<true>(t, rows, cols, ld, scale, bias, row_max, row_sum, col_max, col_sum);
}

RFT_VEC_BODY void dot_exp_sums_shared_body(const float* t, int64_t rows, int64_t cols,
                                           int64_t ld, float scale, float bias, float shift,
                                           float* row_sum, float* col_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = t + r * ld;
    const float* ahead = next_row(row, r, rows, ld);
    float sum = 0.0f;
    for (int64_t b = 0, e; b < cols; b = e) {
      e = stream_block(b, cols, ahead);
#pragma omp simd reduction(+ : sum)
      for (int64_t c = b; c < e; ++c) {
        const float x = exp_f(scale * row[c] + bias - shift);
        sum += x;
        col_sum[c] += x;
      }
    }
    row_sum[r] = sum;
  }
}

RFT_VEC_BODY void softplus_sums_body(const float* t, int64_t rows, int64_t cols, int64_t ld,
                                     float scale, float bias, float* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = t + r * ld;
    const float* ahead = next_row(row, r, rows, ld);
    float sum = 0.0f;
    for (int64_t b = 0, e; b < cols; b = e) {
      e = stream_block(b, cols, ahead);
#pragma omp simd reduction(+ : sum)
      for (int64_t c = b; c < e; ++c) sum += softplus_f(scale * row[c] + bias);
    }
    row_sum[r] = sum;
  }
}

// CLIP dlogits of entries [0, n) of a row (col_lse aligned with them), without a special
// entry; their sums of dS * dot and of dS are added to sd and ss. `ahead`: the same entries
// of the next row, prefetched (or nullptr).
template <bool kRow, bool kCol>
RFT_VEC_BODY void clip_dlogit_span(float* row, int64_t n, const float* ahead, float scale,
                                   float bias, float w_row, float r_lse, float w_col,
                                   const float* col_lse, float& sd, float& ss) {
  float acc_dot = 0.0f, acc_sum = 0.0f;
  for (int64_t b = 0, e; b < n; b = e) {
    e = stream_block(b, n, ahead);
#pragma omp simd reduction(+ : acc_dot, acc_sum)
    for (int64_t q = b; q < e; ++q) {
      const float dot = row[q];
      const float s = scale * dot + bias;
      float g = 0.0f;
      if (kRow) g += w_row * exp_f(s - r_lse);
      if (kCol) g += w_col * exp_f(s - col_lse[q]);
      g = flush_subnormal(g);
      row[q] = g;
      acc_dot += g * dot;
      acc_sum += g;
    }
  }
  sd += acc_dot;
  ss += acc_sum;
}

// clip_dlogit_span with both terms from one exp (ClipDlogitArgs' factors): row_f the row's
// factor, col_f the entries' column factors.
RFT_VEC_BODY void clip_dlogit_span_shared(float* row, int64_t n, const float* ahead, float scale,
                                          float bias, float shift, float row_f,
                                          const float* col_f, float& sd, float& ss) {
  float acc_dot = 0.0f, acc_sum = 0.0f;
  for (int64_t b = 0, e; b < n; b = e) {
    e = stream_block(b, n, ahead);
#pragma omp simd reduction(+ : acc_dot, acc_sum)
    for (int64_t q = b; q < e; ++q) {
      const float dot = row[q];
      const float g = flush_subnormal(exp_f(scale * dot + bias - shift) * (row_f + col_f[q]));
      row[q] = g;
      acc_dot += g * dot;
      acc_sum += g;
    }
  }
  sd += acc_dot;
  ss += acc_sum;
}

// The rows' special entries (positives, m^2 true pairs) are left out of the SIMD loops:
// each row runs as the span before its special entry, the entry itself, and the span
// after it, so that no sum has to take the entry's term back out (which cancels when it
// dominates the row, as an m^2 true pair's recomputed logit can).
template <bool kRow, bool kCol>
RFT_VEC_BODY void clip_dlogits_rows(float* d, int64_t rows, int64_t m, int64_t p0,
                                    const ClipDlogitArgs& a, float* stat_dot, float* stat_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = d + r * m;
    const float* ahead = next_row(row, r, rows, m);
    const float r_lse = kRow ? a.row_lse[r] : 0.0f;
    const int64_t qs = p0 + r + a.offset;
    const bool special = a.special != Special::kNone && qs >= 0 && qs < m;
    float sd = 0.0f, ss = 0.0f;
    // (Both terms from one exp where the caller gave the factors.)
    const bool shared = kRow && kCol && a.row_factor != nullptr;
    const float row_f = shared ? a.row_factor[r] : 0.0f;
    if (!special && shared) {
      clip_dlogit_span_shared(row, m, ahead, a.scale, a.bias, a.shift, row_f, a.col_factor, sd,
                              ss);
    } else if (!special) {
      clip_dlogit_span<kRow, kCol>(row, m, ahead, a.scale, a.bias, a.w_row, r_lse, a.w_col,
                                   a.col_lse, sd, ss);
    } else {
      if (shared) {
        clip_dlogit_span_shared(row, qs, ahead, a.scale, a.bias, a.shift, row_f, a.col_factor,
                                sd, ss);
      } else {
        clip_dlogit_span<kRow, kCol>(row, qs, ahead, a.scale, a.bias, a.w_row, r_lse, a.w_col,
                                     a.col_lse, sd, ss);
      }
      const float dot = row[qs];
      float g = 0.0f;
      if (a.special == Special::kSubtract) {
        const float s = a.scale * dot + a.bias;
        if (kRow) g += a.w_row * exp_f(s - r_lse);
        if (kCol) g += a.w_col * exp_f(s - a.col_lse[qs]);
        g -= a.w_pos;
      }
      g = flush_subnormal(g);
      row[qs] = g;
      sd += g * dot;
      ss += g;
      if (shared) {
        clip_dlogit_span_shared(row + qs + 1, m - qs - 1, ahead ? ahead + qs + 1 : nullptr,
                                a.scale, a.bias, a.shift, row_f, a.col_factor + qs + 1, sd, ss);
      } else {
        clip_dlogit_span<kRow, kCol>(row + qs + 1, m - qs - 1,
                                     ahead ? ahead + qs + 1 : nullptr, a.scale, a.bias, a.w_row,
                                     r_lse, a.w_col, kCol ? a.col_lse + qs + 1 : nullptr, sd, ss);
      }
    }
    if (stat_dot != nullptr) stat_dot[r] = sd;
    if (stat_sum != nullptr) stat_sum[r] = ss;
  }
}

RFT_VEC_BODY void clip_dlogits_body(float* d, int64_t rows, int64_t m, int64_t p0,
                                    const ClipDlogitArgs& a, float* stat_dot, float* stat_sum) {
  const bool row = a.row_lse != nullptr, col = a.col_lse != nullptr;
  if (row && col) {
    clip_dlogits_rows<true, true>(d, rows, m, p0, a, stat_dot, stat_sum);
  } else if (row) {
    clip_dlogits_rows<true, false>(d, rows, m, p0, a, stat_dot, stat_sum);
  } else if (col) {
    clip_dlogits_rows<false, true>(d, rows, m, p0, a, stat_dot, stat_sum);
  } else {
    clip_dlogits_rows<false, false>(d, rows, m, p0, a, stat_dot, stat_sum);
  }
}

// SigLIP dlogits w sigmoid(S) of entries [0, n) of a row; sums added to sd and ss.
RFT_VEC_BODY void siglip_dlogit_span(float* row, int64_t n, const float* ahead, float scale,
                                     float bias, float w, float& sd, float& ss) {
  float acc_dot = 0.0f, acc_sum = 0.0f;
  for (int64_t b = 0, e; b < n; b = e) {
    e = stream_block(b, n, ahead);
#pragma omp simd reduction(+ : acc_dot, acc_sum)
    for (int64_t q = b; q < e; ++q) {
      const float dot = row[q];
      const float g = flush_subnormal(w * sigmoid_f(scale * dot + bias));
      row[q] = g;
      acc_dot += g * dot;
      acc_sum += g;
    }
  }
  sd += acc_dot;
  ss += acc_sum;
}

RFT_VEC_BODY void siglip_dlogits_body(float* d, int64_t rows, int64_t m, int64_t p0, float scale,
                                      float bias, float w, bool has_positives, int64_t offset,
                                      float* stat_dot, float* stat_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = d + r * m;
    const float* ahead = next_row(row, r, rows, m);
    const int64_t qs = p0 + r + offset;
    float sd = 0.0f, ss = 0.0f;
    if (!(has_positives && qs >= 0 && qs < m)) {
      siglip_dlogit_span(row, m, ahead, scale, bias, w, sd, ss);
    } else {
      siglip_dlogit_span(row, qs, ahead, scale, bias, w, sd, ss);
      const float dot = row[qs];
      const float g = flush_subnormal(w * (sigmoid_f(scale * dot + bias) - 1.0f));
      row[qs] = g;
      sd += g * dot;
      ss += g;
      siglip_dlogit_span(row + qs + 1, m - qs - 1, ahead ? ahead + qs + 1 : nullptr, scale, bias,
                         w, sd, ss);
    }
    if (stat_dot != nullptr) stat_dot[r] = sd;
    if (stat_sum != nullptr) stat_sum[r] = ss;
  }
}

// exp_f as the value a gram_rows.h loop takes.
struct ExpF {
  RFT_VEC_INLINE float operator()(float x) const { return exp_f(x); }
};

RFT_VEC_BODY void gram_logits_max_body(float* out, int64_t rows, int64_t cols, int64_t ld,
                                       const gram::MixArgs<float>& a, float* row_max,
                                       float* col_max) {
  gram::mixed_logits_max(out, rows, cols, ld, a, row_max, col_max);
}

RFT_VEC_BODY void gram_strip_rows_body(const gram::StripArgs<float>& a, int64_t rb, int64_t re,
                                       double* stats, float* u) {
  gram::strip_rows(a, rb, re, stats, u, ExpF{});
}

RFT_VEC_BODY void exp_n_body(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_f(x[i]);
}
RFT_VEC_BODY void log1p_n_body(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = log1p_f(x[i]);
}
RFT_VEC_BODY void softplus_n_body(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = softplus_f(x[i]);
}
RFT_VEC_BODY void sigmoid_n_body(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = sigmoid_f(x[i]);
}

}  // namespace

// One kernel set: the bodies above compiled with the function attribute ATTR.
#define RFT_DEFINE_VEC_KERNELS(NS, ATTR, NAME)                                              \
  namespace NS {                                                                            \
  ATTR void logits_max(float* t, int64_t rows, int64_t cols, int64_t ld, float scale,       \
                       float bias, float* row_max, float* col_max) {                        \
    logits_max_body(t, rows, cols, ld, scale, bias, row_max, col_max);                      \
  }                                                                                         \
  ATTR void exp_sums(const float* t, int64_t rows, int64_t cols, int64_t ld,                \
                     const float* row_max, float* row_sum, const float* col_max,            \
                     float* col_sum) {                                                      \
    exp_sums_body(t, rows, cols, ld, row_max, row_sum, col_max, col_sum);                   \
  }                                                                                         \
  ATTR void dot_logit_max(const float* t, int64_t rows, int64_t cols, int64_t ld,          \
                          float scale, float bias, float* row_max, float* col_max) {        \
    dot_logit_max_body(t, rows, cols, ld, scale, bias, row_max, col_max);                   \
  }                                                                                         \
  ATTR void dot_exp_sums(const float* t, int64_t rows, int64_t cols, int64_t ld,            \
                         float scale, float bias, const float* row_max, float* row_sum,     \
                         const float* col_max, float* col_sum) {                            \
    dot_exp_sums_body(t, rows, cols, ld, scale, bias, row_max, row_sum, col_max, col_sum);  \
  }                                                                                         \
  ATTR void dot_exp_sums_shared(const float* t, int64_t rows, int64_t cols, int64_t ld,     \
                                float scale, float bias, float shift, float* row_sum,       \
                                float* col_sum) {                                           \
    dot_exp_sums_shared_body(t, rows, cols, ld, scale, bias, shift, row_sum, col_sum);      \
  }                                                                                         \
  ATTR void softplus_sums(const float* t, int64_t rows, int64_t cols, int64_t ld,           \
                          float scale, float bias, float* row_sum) {                        \
    softplus_sums_body(t, rows, cols, ld, scale, bias, row_sum);                            \
  }                                                                                         \
  ATTR void clip_dlogits(float* d, int64_t rows, int64_t m, int64_t p0,                     \
                         const ClipDlogitArgs& a, float* stat_dot, float* stat_sum) {       \
    clip_dlogits_body(d, rows, m, p0, a, stat_dot, stat_sum);                               \
  }                                                                                         \
  ATTR void siglip_dlogits(float* d, int64_t rows, int64_t m, int64_t p0, float scale,      \
                           float bias, float w, bool has_positives, int64_t offset,         \
                           float* stat_dot, float* stat_sum) {                              \
    siglip_dlogits_body(d, rows, m, p0, scale, bias, w, has_positives, offset, stat_dot,    \
                        stat_sum);                                                          \
  }                                                                                         \
  ATTR void gram_logits_max(float* out, int64_t rows, int64_t cols, int64_t ld,             \
                            const gram::MixArgs<float>& a, float* row_max, float* col_max) {  \
    gram_logits_max_body(out, rows, cols, ld, a, row_max, col_max);                         \
  }                                                                                         \
  ATTR void gram_strip_rows(const gram::StripArgs<float>& a, int64_t rb, int64_t re,        \
                            double* stats, float* u) {                                      \
    gram_strip_rows_body(a, rb, re, stats, u);                                              \
  }                                                                                         \
  ATTR void exp_n(const float* x, float* y, int64_t n) { exp_n_body(x, y, n); }             \
  ATTR void log1p_n(const float* x, float* y, int64_t n) { log1p_n_body(x, y, n); }         \
  ATTR void softplus_n(const float* x, float* y, int64_t n) { softplus_n_body(x, y, n); }   \
  ATTR void sigmoid_n(const float* x, float* y, int64_t n) { sigmoid_n_body(x, y, n); }     \
  const Kernels kSet{NAME,           &logits_max,     &exp_sums, &dot_logit_max,         \
                     &dot_exp_sums,  &dot_exp_sums_shared, &softplus_sums, &clip_dlogits, \
                     &siglip_dlogits,                                                      \
                     &gram_logits_max, &gram_strip_rows,                                  \
                     &exp_n,         &log1p_n,        &softplus_n,   &sigmoid_n};         \
  }

#if RFT_VEC_X86
#if defined(__clang__)
#define RFT_VEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
// GCC's generic tuning would split AVX-512 loops into 256-bit halves.
#define RFT_VEC_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#endif
#define RFT_VEC_AVX2 __attribute__((target("avx2,fma")))
RFT_DEFINE_VEC_KERNELS(avx512, RFT_VEC_AVX512, "avx512")
RFT_DEFINE_VEC_KERNELS(avx2, RFT_VEC_AVX2, "avx2")
#endif
RFT_DEFINE_VEC_KERNELS(baseline, , "baseline")

std::vector<const Kernels*> supported_kernels() {
  std::vector<const Kernels*> sets;
#if RFT_VEC_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    sets.push_back(&avx512::kSet);
  }
  if (avx2) sets.push_back(&avx2::kSet);
#endif
  sets.push_back(&baseline::kSet);
  return sets;
}

const Kernels& kernels() {
  static const Kernels* best = supported_kernels().front();
  return *best;
}

}  // namespace vec
}  // namespace cpu
}  // namespace robustft
