// Vectorised float loops of the CPU kernels: the per-entry maths of robustft_maths.h over
// whole tiles and row chunks, with the branch-free exp / log1p of cpu_vec_math.h.
//
// cpu_vec_kernels.cpp compiles every loop once per instruction set (AVX-512, AVX2 + FMA
// and the baseline of the build, e.g. SSE2 on x86-64 or NEON on aarch64) and kernels()
// hands out the best set the running CPU supports, chosen once: the extension is built
// with generic flags and runs on any CPU of its architecture. Double inputs do not come
// here: their kernels keep std::exp (robustft_maths.h).
//
// Sums over a row run in SIMD lanes, so their rounding order depends on the instruction
// set, never on the number of threads. Within a set, results are deterministic.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/gram_rows.h"

namespace robustft {
namespace cpu {
namespace vec {

// How a row's special entry (q == p + offset) is formed by the dlogit loops.
enum class Special : int {
  kNone = 0,      // no special entry
  kSubtract = 1,  // CLIP positive pair: dS - w_pos
  kZero = 2,      // m^2 true pair, whose gradient the op body takes: 0
};

// One chunk of CLIP-style dlogit rows (maths::clip_dlogit): rows [p0, p0 + rows) of the
// problem, d [rows, m] holding dot products on entry and
//   dS_pq = w_row exp(S_pq - row_lse[p - p0]) + w_col exp(S_pq - col_lse[q]) (- w_pos or 0
//           at the special entry),  S_pq = scale d_pq + bias
// on exit. A null row_lse / col_lse switches its term off. stat_dot[r] / stat_sum[r] (when
// non-null) get the row's sum of dS_pq d_pq / of dS_pq.
struct ClipDlogitArgs {
  float scale = 1.0f, bias = 0.0f;
  float w_row = 0.0f, w_col = 0.0f, w_pos = 0.0f;
  const float* row_lse = nullptr;  // [rows]
  const float* col_lse = nullptr;  // [m]
  Special special = Special::kNone;
  int64_t offset = 0;              // the special entry of row p is q = p + offset
  // With row_factor and col_factor (and both terms on), an entry's two terms from one exp
  // (maths::kSharedShiftSpread): dS_pq = exp(S_pq - shift) (row_factor[p - p0] +
  // col_factor[q]), the factors maths::shift_factor(w, shift, lse). The special entry keeps
  // the two exps.
  const float* row_factor = nullptr;  // [rows]
  const float* col_factor = nullptr;  // [m]
  float shift = 0.0f;
};

struct Kernels {
  const char* isa;  // "avx512", "avx2" or "baseline"

  // The tile loops take a rows x cols tile t whose row r starts at t + r * ld.
  // logits_max: t holds dot products on entry, logits scale t + bias on exit;
  // row_max[r] = max of row r's logits; col_max[c] (when non-null) = max(col_max[c],
  // max of column c's logits).
  void (*logits_max)(float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                     float bias, float* row_max, float* col_max);
  // row_sum[r] = sum_c exp(t[r, c] - row_max[r]) when row_max and row_sum are non-null;
  // col_sum[c] += sum_r exp(t[r, c] - col_max[c]) when col_max and col_sum are.
  void (*exp_sums)(const float* t, int64_t rows, int64_t cols, int64_t ld,
                   const float* row_max, float* row_sum, const float* col_max, float* col_sum);
  // dot_logit_max / dot_exp_sums: the same over a tile of dot products t that stays as it is
  // (the forward that keeps them for its backward), the logits scale t + bias formed on
  // the fly.
  void (*dot_logit_max)(const float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                        float bias, float* row_max, float* col_max);
  void (*dot_exp_sums)(const float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                       float bias, const float* row_max, float* row_sum, const float* col_max,
                       float* col_sum);
  // Both sums from one exp per entry with one shift (maths::kSharedShiftSpread):
  // row_sum[r] = sum_c exp(S[r, c] - shift), col_sum[c] += sum_r exp(S[r, c] - shift),
  // S = scale t + bias.
  void (*dot_exp_sums_shared)(const float* t, int64_t rows, int64_t cols, int64_t ld,
                              float scale, float bias, float shift, float* row_sum,
                              float* col_sum);
  // row_sum[r] = sum_c softplus(scale t[r, c] + bias).
  void (*softplus_sums)(const float* t, int64_t rows, int64_t cols, int64_t ld, float scale,
                        float bias, float* row_sum);
  // The CLIP dlogits of rows [p0, p0 + rows), in place (ClipDlogitArgs).
  void (*clip_dlogits)(float* d, int64_t rows, int64_t m, int64_t p0, const ClipDlogitArgs& a,
                       float* stat_dot, float* stat_sum);
  // SigLIP dlogits w (sigmoid(S) - [q == p + offset]) (maths::siglip_dlogit) of rows
  // [p0, p0 + rows), in place, with their statistics as clip_dlogits.
  void (*siglip_dlogits)(float* d, int64_t rows, int64_t m, int64_t p0, float scale,
                         float bias, float w, bool has_positives, int64_t offset,
                         float* stat_dot, float* stat_sum);
  // The Gram formulation (gram_rows.h): a tile of mixed logits with its maxima, and rows
  // [rb, re) of a backward strip with their scale sums (added to stats[0], stats[1]) and
  // column sums (added to u [2, n]).
  void (*gram_logits_max)(float* out, int64_t rows, int64_t cols, int64_t ld,
                          const gram::MixArgs<float>& a, float* row_max, float* col_max);
  void (*gram_strip_rows)(const gram::StripArgs<float>& a, int64_t rb, int64_t re,
                          double* stats, float* u);
  // Elementwise y = f(x) over n floats (for the unit tests of the vectorised maths).
  void (*exp_n)(const float* x, float* y, int64_t n);
  void (*log1p_n)(const float* x, float* y, int64_t n);
  void (*softplus_n)(const float* x, float* y, int64_t n);
  void (*sigmoid_n)(const float* x, float* y, int64_t n);
};

// The best kernel set for the running CPU (chosen on the first call).
const Kernels& kernels();

// Every set compiled into this build that the running CPU can execute, best first.
std::vector<const Kernels*> supported_kernels();

}  // namespace vec
}  // namespace cpu
}  // namespace robustft
