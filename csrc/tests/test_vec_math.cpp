// Unit tests of the CPU kernels' vectorised float maths (csrc/cpu/cpu_vec_math.h) and the
// loops built on it (csrc/cpu/cpu_vec_kernels.h), for every instruction set compiled in
// that this CPU runs:
//  * exp, log1p, softplus and sigmoid against the library functions evaluated in double
//    over a strided sweep of all 2^32 float bit patterns (every sign, exponent and
//    mantissa region, subnormals, infinities and NaNs) plus the edges of their ranges:
//    at most 2 ulp for exp and log1p, 3 for softplus and sigmoid, the exact special
//    values elsewhere, exp's flush to 0 below FLT_MIN (never a subnormal result);
//  * the tile and row loops against the scalar double maths of robustft_maths.h on
//    random tiles whose widths leave SIMD remainders, the Gram loops (cpu/gram_rows.h)
//    against their own double instantiation;
//  * the lane sums of cpu/double_sums.h against a long double sum, at lengths with and
//    without a partial last lane group, and their fixed order (a permutation-free result).
// Cases belong to the "maths" group.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_vec_kernels.h"
#include "cpu/double_sums.h"
#include "cpu/shared_shift.h"
#include "harness.h"
#include "robustft_maths.h"

namespace {

namespace mx = ::robustft::maths;
namespace vec = ::robustft::cpu::vec;
using ::robustft::cpu::shift_factors;
using ::robustft::cpu::ShiftFactors;
using rft_test::add_case;
using rft_test::cat;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// |got - ref| in units of the float spacing at ref (subnormal spacing below FLT_MIN).
// Infinite error for a wrong class: NaN where ref is not, a finite value for an
// infinite ref, or an infinity for a ref that rounds to a finite float.
double ulp_error(float got, double ref) {
  constexpr double kHuge = std::numeric_limits<double>::infinity();
  if (std::isnan(ref)) return std::isnan(got) ? 0.0 : kHuge;
  if (std::isnan(got)) return kHuge;
  const double max_f = std::numeric_limits<float>::max();
  if (std::fabs(ref) > max_f) {
    // Rounds to +-inf unless within half an ulp of FLT_MAX.
    const double rounded = static_cast<double>(static_cast<float>(ref));
    return got == static_cast<float>(rounded) || std::fabs(got) == static_cast<float>(max_f)
               ? 0.0
               : kHuge;
  }
  if (std::isinf(got)) return kHuge;
  int e = 0;
  std::frexp(std::max(std::fabs(ref), double(std::numeric_limits<float>::min())), &e);
  return std::fabs(double(got) - ref) / std::ldexp(1.0, e - 24);
}

// Every stride-th float bit pattern (an odd stride walks every region), and the edges.
std::vector<float> sweep(uint32_t stride) {
  std::vector<float> xs;
  for (uint64_t u = 0; u < (uint64_t(1) << 32); u += stride) xs.push_back(from_bits(uint32_t(u)));
  const float edges[] = {0.0f,        -0.0f,        kInf,         -kInf,       kNaN,
                         -kNaN,       1.0f,         -1.0f,        0.5f,        -0.5f,
                         88.7228394f, 88.7228470f,  88.72f,       89.0f,       -87.3365479f,
                         -88.0f,      -100.0f,      -103.278931f, -103.972f,   -104.0f,
                         -104.5f,     -1e30f,       1e30f,        0.41421356f, -0.29289322f,
                         1e-30f,      -1e-30f,      1e-45f,       -1e-45f,     16777216.0f,
                         std::numeric_limits<float>::max(),  -std::numeric_limits<float>::max(),
                         std::numeric_limits<float>::min(),  std::numeric_limits<float>::denorm_min(),
                         std::nextafter(-1.0f, 0.0f),        std::nextafter(-1.0f, -2.0f)};
  xs.insert(xs.end(), std::begin(edges), std::end(edges));
  return xs;
}

// exp with exp_f's flush: 0 below vec::kExpFlushBelow (where exp is under FLT_MIN).
double ref_exp(double x) { return x < double(vec::kExpFlushBelow) ? 0.0 : std::exp(x); }
double ref_softplus(double x) { return std::max(x, 0.0) + std::log1p(ref_exp(-std::fabs(x))); }
double ref_sigmoid(double x) {
  return x >= 0.0 ? 1.0 / (1.0 + ref_exp(-x)) : ref_exp(x) / (1.0 + ref_exp(x));
}

using ElementwiseFn = void (*)(const float*, float*, int64_t);

// Runs fn over xs (from an offset within a buffer, so that both aligned and unaligned
// SIMD heads are exercised) and checks every result against ref within max_ulp.
void check_elementwise(const char* name, ElementwiseFn fn, double (*ref)(double),
                       const std::vector<float>& xs, double max_ulp) {
  std::vector<float> in(xs.size() + 3), out(xs.size() + 3);
  std::copy(xs.begin(), xs.end(), in.begin() + 3);
  fn(in.data() + 3, out.data() + 3, int64_t(xs.size()));
  double worst = 0;
  float worst_x = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double err = ulp_error(out[i + 3], ref(double(xs[i])));
    if (err > worst || std::isnan(err)) {
      worst = err;
      worst_x = xs[i];
    }
    if (!(err <= max_ulp)) {
      if (bad++ < 5) {
        RFT_CHECK_MSG(false, name, "(", xs[i], ") = ", out[i + 3], ", reference ",
                      ref(double(xs[i])), " (", err, " ulp)");
      }
    }
  }
  RFT_CHECK_MSG(bad == 0, name, ": ", bad, " of ", xs.size(), " arguments beyond ", max_ulp,
                " ulp");
  rft_test::note(cat(name, ": ", xs.size(), " arguments, max error ", worst, " ulp at x = ",
                     worst_x));
}

double ref_log1p(double x) { return std::log1p(x); }

void check_specials(const vec::Kernels& k) {
  // Exact special values (ulp_error compares classes; here the values themselves).
  const std::vector<float> x = {-kInf, kInf, kNaN, -1.0f, -2.0f, 0.0f, -200.0f, 200.0f};
  std::vector<float> e(x.size()), l(x.size()), sp(x.size()), sg(x.size());
  k.exp_n(x.data(), e.data(), int64_t(x.size()));
  k.log1p_n(x.data(), l.data(), int64_t(x.size()));
  k.softplus_n(x.data(), sp.data(), int64_t(x.size()));
  k.sigmoid_n(x.data(), sg.data(), int64_t(x.size()));
  RFT_CHECK(e[0] == 0.0f && e[1] == kInf && std::isnan(e[2]) && e[5] == 1.0f && e[6] == 0.0f &&
            e[7] == kInf);
  RFT_CHECK(std::isnan(l[0]) && l[1] == kInf && std::isnan(l[2]) && l[3] == -kInf &&
            std::isnan(l[4]) && l[5] == 0.0f);
  RFT_CHECK(sp[0] == 0.0f && sp[1] == kInf && std::isnan(sp[2]) && sp[6] == 0.0f &&
            sp[7] == 200.0f);
  RFT_CHECK(sg[0] == 0.0f && sg[1] == 1.0f && std::isnan(sg[2]) && sg[5] == 0.5f &&
            sg[6] == 0.0f && sg[7] == 1.0f);
}

std::vector<float> random_floats(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

bool near(double got, double want, double rtol, double atol) {
  return std::fabs(got - want) <= rtol * std::fabs(want) + atol;
}

// logits_max + exp_sums and softplus_sums on a tile against robustft_maths.h in double,
// compact (ld = cols) and as a slice of wider rows.
void check_tile_loops(const vec::Kernels& k) {
  // (1100 columns: rows streamed in several prefetched blocks, cpu_stream.h.)
  for (const int64_t cols : {1, 7, 16, 33, 130, 1100}) {
    const int64_t rows = 5;
    const float scale = 14.285714f, bias = -3.0f;
    const auto dots = random_floats(size_t(rows * cols), -1.0f, 1.0f, uint32_t(cols));
    std::vector<float> t = dots, row_max(rows), row_sum(rows);
    std::vector<float> col_max(cols, -kInf), col_sum(cols, 0.0f);
    k.logits_max(t.data(), rows, cols, cols, scale, bias, row_max.data(), col_max.data());
    k.exp_sums(t.data(), rows, cols, cols, row_max.data(), row_sum.data(), col_max.data(),
               col_sum.data());
    std::vector<float> sp_sum(rows);
    k.softplus_sums(dots.data(), rows, cols, cols, scale, bias, sp_sum.data());
    for (int64_t r = 0; r < rows; ++r) {
      double want_max = -INFINITY;
      double want_sp = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double s = mx::logit<double>(dots[r * cols + c], scale, bias);
        // One rounding (fused multiply-add) or two, depending on the instruction set.
        const double size = std::fabs(double(scale) * dots[r * cols + c]) + std::fabs(bias);
        RFT_CHECK_MSG(near(t[r * cols + c], s, 0, 1.2e-7 * size), "logit ", t[r * cols + c],
                      " vs ", s);
        want_max = std::max(want_max, double(t[r * cols + c]));
        want_sp += mx::softplus(s);
      }
      double want_sum = 0;
      for (int64_t c = 0; c < cols; ++c) want_sum += std::exp(double(t[r * cols + c]) - want_max);
      RFT_CHECK_MSG(row_max[r] == float(want_max), "row max ", row_max[r], " vs ", want_max);
      RFT_CHECK_MSG(near(row_sum[r], want_sum, 1e-5, 0), "row sum ", row_sum[r], " vs ", want_sum);
      RFT_CHECK_MSG(near(sp_sum[r], want_sp, 1e-5, 0), "softplus sum ", sp_sum[r], " vs ",
                    want_sp);
    }
    // The same tile as a slice of wider rows (ld > cols): same results, padding untouched.
    const int64_t ld = cols + 5;
    std::vector<float> wide(size_t(rows * ld), kNaN), w_max(rows), w_sum(rows), w_sp(rows);
    std::vector<float> w_cmax(cols, -kInf), w_csum(cols, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(dots.begin() + r * cols, dots.begin() + (r + 1) * cols, wide.begin() + r * ld);
    }
    k.softplus_sums(wide.data(), rows, cols, ld, scale, bias, w_sp.data());
    k.logits_max(wide.data(), rows, cols, ld, scale, bias, w_max.data(), w_cmax.data());
    k.exp_sums(wide.data(), rows, cols, ld, w_max.data(), w_sum.data(), w_cmax.data(),
               w_csum.data());
    for (int64_t r = 0; r < rows; ++r) {
      RFT_CHECK(w_max[r] == row_max[r] && w_sum[r] == row_sum[r] && w_sp[r] == sp_sum[r]);
      for (int64_t c = 0; c < cols; ++c) RFT_CHECK(wide[r * ld + c] == t[r * cols + c]);
      for (int64_t c = cols; c < ld; ++c) RFT_CHECK(std::isnan(wide[r * ld + c]));
    }
    for (int64_t c = 0; c < cols; ++c) RFT_CHECK(w_cmax[c] == col_max[c] && w_csum[c] == col_sum[c]);
    for (int64_t c = 0; c < cols; ++c) {
      double want_max = -INFINITY, want_sum = 0;
      for (int64_t r = 0; r < rows; ++r) want_max = std::max(want_max, double(t[r * cols + c]));
      for (int64_t r = 0; r < rows; ++r) want_sum += std::exp(double(t[r * cols + c]) - want_max);
      RFT_CHECK(col_max[c] == float(want_max));
      RFT_CHECK_MSG(near(col_sum[c], want_sum, 1e-5, 0), "col sum ", col_sum[c], " vs ", want_sum);
    }
    // Both orientations' sums with one shift (the tile's largest logit), added to the column
    // sums: the same exp sums, rescaled.
    const float shift = *std::max_element(row_max.begin(), row_max.end());
    std::vector<float> sh_row(rows), sh_col(cols, 0.5f);
    k.dot_exp_sums_shared(dots.data(), rows, cols, cols, scale, bias, shift, sh_row.data(),
                          sh_col.data());
    for (int64_t r = 0; r < rows; ++r) {
      const double want = double(row_sum[r]) * std::exp(double(row_max[r]) - shift);
      RFT_CHECK_MSG(near(sh_row[r], want, 2e-5, 0), "shared row sum ", sh_row[r], " vs ", want);
    }
    for (int64_t c = 0; c < cols; ++c) {
      const double want = 0.5 + double(col_sum[c]) * std::exp(double(col_max[c]) - shift);
      RFT_CHECK_MSG(near(sh_col[c], want, 2e-5, 0), "shared col sum ", sh_col[c], " vs ", want);
    }
  }
}

// clip_dlogits / siglip_dlogits against maths::clip_dlogit / siglip_dlogit in double,
// with the special entry inside, outside and at the edge of the chunk.
void check_dlogit_loops_of(const vec::Kernels& k, int64_t m, bool use_shared);

void check_dlogit_loops(const vec::Kernels& k) {
  // m = 1100: rows streamed in several prefetched blocks (cpu_stream.h), the special entries
  // of the chunk at rows 510..513 straddling the first block's end.
  for (const int64_t m : {int64_t(37), int64_t(1100)}) {
    for (const bool shared : {false, true}) check_dlogit_loops_of(k, m, shared);
  }
}

void check_dlogit_loops_of(const vec::Kernels& k, int64_t m, bool use_shared) {
  const int64_t rows = 4;
  const float scale = 10.0f, bias = -2.0f;
  const auto dots = random_floats(size_t(rows * m), -1.0f, 1.0f, 11u);
  const auto row_lse = random_floats(size_t(rows), 3.0f, 6.0f, 12u);
  const auto col_lse = random_floats(size_t(m), 3.0f, 6.0f, 13u);
  struct Mode {
    bool row, col;
    vec::Special special;
    int64_t p0, offset;
  };
  const Mode modes[] = {{true, true, vec::Special::kSubtract, 0, 0},
                        {true, false, vec::Special::kSubtract, 3, 2},
                        {true, false, vec::Special::kZero, 30, 0},
                        {false, true, vec::Special::kNone, 0, 0},
                        {true, true, vec::Special::kSubtract, 34, 0},  // m = 37: 37 is past m
                        {true, true, vec::Special::kSubtract, 510, 0}};
  for (const Mode& md : modes) {
    vec::ClipDlogitArgs a;
    a.scale = scale;
    a.bias = bias;
    a.w_row = md.row ? 0.5f : 0.0f;
    a.w_col = md.col ? 0.5f : 0.0f;
    a.w_pos = 1.0f;
    a.row_lse = md.row ? row_lse.data() : nullptr;
    a.col_lse = md.col ? col_lse.data() : nullptr;
    a.special = md.special;
    a.offset = md.offset;
    // Both terms on: also from one exp per entry, with the factors of the largest
    // log-sum-exp (the same dlogits within a few ulp).
    std::vector<float> row_f(rows), col_f(m);
    const bool shared = md.row && md.col && use_shared;
    if (shared) {
      const float shift = std::max(*std::max_element(row_lse.begin(), row_lse.end()),
                                   *std::max_element(col_lse.begin(), col_lse.end()));
      for (int64_t r = 0; r < rows; ++r) row_f[r] = mx::shift_factor(a.w_row, shift, row_lse[r]);
      for (int64_t q = 0; q < m; ++q) col_f[q] = mx::shift_factor(a.w_col, shift, col_lse[q]);
      a.row_factor = row_f.data();
      a.col_factor = col_f.data();
      a.shift = shift;
    }
    std::vector<float> d = dots, sd(rows), ss(rows);
    k.clip_dlogits(d.data(), rows, m, md.p0, a, sd.data(), ss.data());
    for (int64_t r = 0; r < rows; ++r) {
      double want_dot = 0, want_sum = 0;
      for (int64_t q = 0; q < m; ++q) {
        const double dot = dots[r * m + q];
        const bool special = md.special != vec::Special::kNone && q == md.p0 + r + md.offset;
        const double s = mx::logit<double>(dot, scale, bias);
        double g = mx::clip_dlogit<double>(s, md.row ? row_lse[r] : 0.0, md.col ? col_lse[q] : 0.0,
                                           a.w_row, a.w_col, a.w_pos,
                                           special && md.special == vec::Special::kSubtract);
        if (special && md.special == vec::Special::kZero) g = 0;
        RFT_CHECK_MSG(near(d[r * m + q], g, 2e-6, 2e-6), "dS(", r, ", ", q, ") = ", d[r * m + q],
                      " vs ", g);
        want_dot += g * dot;
        want_sum += g;
      }
      RFT_CHECK_MSG(near(sd[r], want_dot, 1e-5, 1e-6), "stat_dot ", sd[r], " vs ", want_dot);
      RFT_CHECK_MSG(near(ss[r], want_sum, 1e-5, 1e-6), "stat_sum ", ss[r], " vs ", want_sum);
    }
  }
  {
    // An m^2 true pair whose recomputed logit dominates its row: the row's statistics
    // (without it) are small next to its term and must not lose their precision to it.
    const int64_t p0 = 5;
    std::vector<float> dom = random_floats(size_t(m), -0.3f, 0.3f, 14u);
    dom[p0] = 1.0f;
    const float s_m = 14.0f;
    long double lse = 0;
    for (float x : dom) lse += std::exp(static_cast<long double>(s_m) * x);
    const float r_lse = float(std::log(lse));
    vec::ClipDlogitArgs a;
    a.scale = s_m;
    a.w_row = 1.0f;
    a.row_lse = &r_lse;
    a.special = vec::Special::kZero;
    std::vector<float> d = dom;
    float sd = 0, ss = 0;
    k.clip_dlogits(d.data(), 1, m, p0, a, &sd, &ss);
    double want_dot = 0, want_sum = 0;
    for (int64_t q = 0; q < m; ++q) {
      if (q == p0) continue;
      const double g = std::exp(double(s_m) * dom[q] - double(r_lse));
      want_dot += g * dom[q];
      want_sum += g;
    }
    RFT_CHECK(d[p0] == 0.0f);
    RFT_CHECK_MSG(near(sd, want_dot, 1e-5, 0), "dominant pair: stat_dot ", sd, " vs ", want_dot);
    RFT_CHECK_MSG(near(ss, want_sum, 1e-5, 0), "dominant pair: stat_sum ", ss, " vs ", want_sum);
  }
  {
    // Logits 80 to 110 below the row's log-sum-exp: their dlogits would be subnormal, which
    // slows the BLAS products that read them; the loops write 0 instead, and keep the
    // normal ones.
    const int64_t w = 301;
    std::vector<float> sweep(w);
    for (int64_t q = 0; q < w; ++q) sweep[q] = -0.6f - 0.3f * float(q) / float(w - 1);
    const float r_lse = 20.0f;  // 100 x dot - 20 from -80 to -110 (SigLIP: its bias -20)
    vec::ClipDlogitArgs a;
    a.scale = 100.0f;
    a.w_row = 1.0f;
    a.row_lse = &r_lse;
    std::vector<float> d = sweep;
    float sd = 0, ss = 0;
    k.clip_dlogits(d.data(), 1, w, 0, a, &sd, &ss);
    std::vector<float> g = sweep;
    k.siglip_dlogits(g.data(), 1, w, 0, 100.0f, -20.0f, 1.0f, false, 0, &sd, &ss);
    int64_t kept = 0, flushed = 0;
    for (int64_t q = 0; q < w; ++q) {
      const double want = std::exp(100.0 * double(sweep[q]) - 20.0);
      for (const float got : {d[q], g[q]}) {
        RFT_CHECK_MSG(got == 0.0f || got >= std::numeric_limits<float>::min(),
                      "subnormal dlogit ", got, " at ", q);
        if (want >= 1.001 * double(std::numeric_limits<float>::min())) {
          RFT_CHECK_MSG(near(got, want, 1e-5, 0), "normal dlogit ", got, " vs ", want);
          ++kept;
        } else if (want < 0.999 * double(std::numeric_limits<float>::min())) {
          RFT_CHECK(got == 0.0f);
          ++flushed;
        }
      }
    }
    RFT_CHECK(kept > 0 && flushed > 0);
  }
  for (const bool pos : {true, false}) {
    std::vector<float> d = dots, sd(rows), ss(rows);
    k.siglip_dlogits(d.data(), rows, m, 2, scale, bias, 1.0f, pos, 0, sd.data(), ss.data());
    for (int64_t r = 0; r < rows; ++r) {
      double want_dot = 0, want_sum = 0;
      for (int64_t q = 0; q < m; ++q) {
        const double dot = dots[r * m + q];
        const double g = mx::siglip_dlogit<double>(mx::logit<double>(dot, scale, bias), 1.0,
                                                   pos && q == 2 + r);
        RFT_CHECK_MSG(near(d[r * m + q], g, 2e-6, 2e-6), "siglip dS(", r, ", ", q, ") = ",
                      d[r * m + q], " vs ", g);
        want_dot += g * dot;
        want_sum += g;
      }
      RFT_CHECK_MSG(near(sd[r], want_dot, 1e-5, 1e-6), "siglip stat_dot ", sd[r], " vs ", want_dot);
      RFT_CHECK_MSG(near(ss[r], want_sum, 1e-5, 1e-6), "siglip stat_sum ", ss[r], " vs ", want_sum);
    }
  }
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

struct StdExp {
  double operator()(double x) const { return std::exp(x); }
};

// The Gram loops (cpu/gram_rows.h) against their double instantiation with std::exp on the
// same float inputs: the mixed logits of both orientations with the true pairs' entries and
// their maxima, the column-only exp sums, and a backward strip's S entries, scale sums and
// u, on widths that leave SIMD remainders and a strip whose columns run past its rows, in
// both strip layouts (the interleaved one with a short last column block).
void check_gram_loops(const vec::Kernels& k) {
  namespace gram = ::robustft::cpu::gram;
  for (const int64_t cols : {1, 7, 33, 1100}) {
    const int64_t rows = 6, ld = cols + 3;
    const auto ga = random_floats(size_t(rows * ld), -1.0f, 1.0f, uint32_t(cols));
    const auto gb = random_floats(size_t(rows * ld), -1.0f, 1.0f, uint32_t(cols + 1));
    const auto wa = random_floats(size_t(std::max(rows, cols)), 0.2f, 1.3f, 7);
    const auto wb = random_floats(size_t(std::max(rows, cols)), 0.2f, 1.3f, 8);
    const auto special = random_floats(size_t(rows), 5.0f, 9.0f, 9);
    const auto gad = widen(ga), gbd = widen(gb), wad = widen(wa), wbd = widen(wb),
               spd = widen(special);
    for (const bool per_row : {false, true}) {
      gram::MixArgs<float> a;
      a.g_a = ga.data();
      a.g_b = gb.data();
      a.ld_g = ld;
      a.w_a = wa.data();
      a.w_b = wb.data();
      a.per_row = per_row;
      a.scale = 14.285714f;
      a.special = per_row ? nullptr : special.data();
      a.offset = -2;
      gram::MixArgs<double> d{gad.data(), gbd.data(), ld, wad.data(), wbd.data(), per_row,
                              double(a.scale), per_row ? nullptr : spd.data(), -2};
      std::vector<float> out(size_t(rows * cols)), row_max(rows), col_max(cols, -kInf);
      std::vector<double> want(size_t(rows * cols)), want_row(rows), want_col(cols, -INFINITY);
      k.gram_logits_max(out.data(), rows, cols, cols, a, per_row ? nullptr : row_max.data(),
                        per_row ? col_max.data() : nullptr);
      gram::mixed_logits_max(want.data(), rows, cols, cols, d, want_row.data(), want_col.data());
      for (int64_t i = 0; i < rows * cols; ++i) {
        RFT_CHECK_MSG(near(out[i], want[i], 1e-6, 1e-5), "gram logit ", i, ": ", out[i], " vs ",
                      want[i]);
      }
      for (int64_t r = 0; r < rows && !per_row; ++r) {
        RFT_CHECK_MSG(near(row_max[r], want_row[r], 1e-6, 1e-5), "gram row max ", row_max[r]);
        if (r - 2 >= 0 && r - 2 < cols) RFT_CHECK(out[r * cols + r - 2] == special[r]);
      }
      if (!per_row) continue;
      for (int64_t c = 0; c < cols; ++c) {
        RFT_CHECK_MSG(near(col_max[c], want_col[c], 1e-6, 1e-5), "gram col max ", col_max[c]);
      }
      // Column sums only (no row statistics).
      std::vector<float> col_sum(cols, 1.0f);
      k.exp_sums(out.data(), rows, cols, cols, nullptr, nullptr, col_max.data(), col_sum.data());
      for (int64_t c = 0; c < cols; ++c) {
        double want_sum = 1.0;
        for (int64_t r = 0; r < rows; ++r) want_sum += std::exp(double(out[r * cols + c]) - col_max[c]);
        RFT_CHECK_MSG(near(col_sum[c], want_sum, 1e-5, 0), "column-only sum ", col_sum[c], " vs ",
                      want_sum);
      }
    }
  }
  // (n = 1150: the blocks layout's rows streamed in several prefetched blocks.)
  for (const int64_t n : {int64_t(45), int64_t(1150)})
  for (const bool clip : {false, true}) {
    const int64_t r0 = 4, R = 7, W = n - r0;
    const auto g = random_floats(size_t(4 * R * W), -1.0f, 1.0f, 11);
    const auto wa = random_floats(size_t(n), 0.2f, 1.3f, 12);
    const auto wb = random_floats(size_t(n), 0.2f, 1.3f, 13);
    const auto lse = random_floats(size_t(4 * n), 1.0f, 3.0f, 14);
    std::vector<float> s = g;
    std::vector<double> sd = widen(g);
    const auto wad = widen(wa), wbd = widen(wb), lsed = widen(lse);
    gram::StripArgs<float> a;
    a.s = s.data();
    a.rows = R;
    a.width = W;
    a.r0 = r0;
    a.n = n;
    a.w_a = wa.data();
    a.w_b = wb.data();
    a.lse = lse.data();
    a.m2_scale = 2.5f;
    a.clip_scale = 3.0f;
    a.f_m = 0.3f;
    a.f_c = 0.7f;
    a.with_clip = clip;
    gram::StripArgs<double> d{sd.data(), R, W, r0, n, wad.data(), wbd.data(), lsed.data(),
                              2.5, 3.0, 0.3, 0.7, clip};
    double stats[2] = {0.5, 0.25}, want_stats[2] = {0.5, 0.25};
    std::vector<float> u(size_t(2 * n), 0.125f);
    std::vector<double> want_u(size_t(2 * n), 0.125);
    // In two row ranges, as two tasks would.
    k.gram_strip_rows(a, 0, 3, stats, u.data());
    k.gram_strip_rows(a, 3, R, stats, u.data());
    gram::strip_rows(d, 0, R, want_stats, want_u.data(), StdExp{});
    for (size_t i = 0; i < s.size(); ++i) {
      RFT_CHECK_MSG(near(s[i], sd[i], 2e-5, 1e-6), "gram S ", i, ": ", s[i], " vs ", sd[i]);
    }
    for (int i = 0; i < 2; ++i) {
      RFT_CHECK_MSG(near(stats[i], want_stats[i], 2e-5, 1e-6), "gram stat ", i, ": ", stats[i],
                    " vs ", want_stats[i]);
    }
    for (int64_t i = 0; i < 2 * n; ++i) {
      RFT_CHECK_MSG(near(u[i], want_u[i], 2e-5, 1e-6), "gram u ", i, ": ", u[i], " vs ",
                    want_u[i]);
    }
    // CLIP's two terms of an entry from one exp (the factors of the largest C log-sum-exp):
    // the same S, scale sums and u within a few ulp.
    if (clip) {
      // (The strip's entities r0 on: factor i is entity r0 + i's.)
      const float* l_c = lse.data() + 2 * n;
      const ShiftFactors f = shift_factors(l_c, n, l_c + n, n, 0.5f, 0.5f, r0, W, r0, W);
      RFT_CHECK(f.on && f.shift == *std::max_element(lse.begin() + 2 * n, lse.end()));
      RFT_CHECK(f.row_f[1] == mx::shift_factor(0.5f, f.shift, l_c[r0 + 1]) &&
                f.col_f[2] == mx::shift_factor(0.5f, f.shift, l_c[n + r0 + 2]));
      std::vector<float> s_sh = g, u_sh(size_t(2 * n), 0.125f);
      gram::StripArgs<float> ash = a;
      ash.s = s_sh.data();
      ash.clip_row_f = f.row_f.data();
      ash.clip_col_f = f.col_f.data();
      ash.clip_shift = f.shift;
      double st[2] = {0.5, 0.25};
      k.gram_strip_rows(ash, 0, R, st, u_sh.data());
      for (size_t i = 0; i < s_sh.size(); ++i) {
        RFT_CHECK_MSG(near(s_sh[i], sd[i], 2e-5, 1e-6), "shared gram S ", i, ": ", s_sh[i],
                      " vs ", sd[i]);
      }
      for (int i = 0; i < 2; ++i) RFT_CHECK(near(st[i], want_stats[i], 2e-5, 1e-6));
      for (int64_t i = 0; i < 2 * n; ++i) RFT_CHECK(near(u_sh[i], want_u[i], 2e-5, 1e-6));
    }
    // The true pairs carry no m^2 dlogit: without CLIP their S entries are 0.
    if (!clip) {
      for (int64_t r = 0; r < R; ++r) RFT_CHECK(s[r * W + r] == 0.0f);
    }
    // Log-sum-exps 95 above the logits: every S entry would be subnormal; none is.
    {
      std::vector<float> high = lse, s_sub = g;
      for (float& x : high) x += 95.0f;
      gram::StripArgs<float> as = a;
      as.s = s_sub.data();
      as.lse = high.data();
      double st[2] = {0, 0};
      std::vector<float> us(size_t(2 * n), 0.0f);
      k.gram_strip_rows(as, 0, R, st, us.data());
      for (const float x : s_sub) {
        RFT_CHECK_MSG(x == 0.0f || std::fabs(x) >= std::numeric_limits<float>::min(),
                      "subnormal gram S ", x);
      }
    }
    // The same strip interleaved ([2 R, 2 W], its columns in blocks of R, the last of 6):
    // entry (r, c) of block (v, w) (v, w = 0 for I, 1 for T) at interleaved(v, w, r, c).
    auto interleaved = [&](int64_t v, int64_t w, int64_t r, int64_t c) {
      const int64_t b = c / R, len = std::min(R, W - b * R);
      return size_t((v * R + r) * 2 * W + 2 * b * R + w * len + (c - b * R));
    };
    auto blocks = [&](int64_t v, int64_t w, int64_t r, int64_t c) {
      return size_t(((2 * v + w) * R + r) * W + c);
    };
    std::vector<float> si(g.size());
    for (int64_t v = 0; v < 2; ++v)
      for (int64_t w = 0; w < 2; ++w)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t c = 0; c < W; ++c) si[interleaved(v, w, r, c)] = g[blocks(v, w, r, c)];
    gram::StripArgs<float> ai = a;
    ai.s = si.data();
    ai.interleaved = true;
    double stats_i[2] = {0.5, 0.25};
    std::vector<float> u_i(size_t(2 * n), 0.125f);
    k.gram_strip_rows(ai, 0, 5, stats_i, u_i.data());
    k.gram_strip_rows(ai, 5, R, stats_i, u_i.data());
    for (int64_t v = 0; v < 2; ++v)
      for (int64_t w = 0; w < 2; ++w)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t c = 0; c < W; ++c) {
            const float got = si[interleaved(v, w, r, c)];
            const double want = sd[blocks(v, w, r, c)];
            RFT_CHECK_MSG(near(got, want, 2e-5, 1e-6), "interleaved gram S (", v, w, r, c,
                          "): ", got, " vs ", want);
          }
    for (int i = 0; i < 2; ++i) {
      RFT_CHECK_MSG(near(stats_i[i], want_stats[i], 2e-5, 1e-6), "interleaved gram stat ", i);
    }
    for (int64_t i = 0; i < 2 * n; ++i) {
      RFT_CHECK_MSG(near(u_i[i], want_u[i], 2e-5, 1e-6), "interleaved gram u ", i);
    }
  }
}

// dot_double over n entries against a long double dot product, for lengths around the lane
// count; lane_sum's order: lane k takes the entries k mod kSumLanes, added in a fixed tree.
void check_lane_sums() {
  namespace cpu = ::robustft::cpu;
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(15), int64_t(16), int64_t(17), int64_t(33),
                    int64_t(512), int64_t(513)}) {
    std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
    long double want = 0, scale = 0;
    for (int64_t j = 0; j < n; ++j) {
      a[size_t(j)] = dist(gen);
      b[size_t(j)] = dist(gen);
      want += static_cast<long double>(a[size_t(j)]) * b[size_t(j)];
      scale += std::fabs(static_cast<long double>(a[size_t(j)]) * b[size_t(j)]);
    }
    const double got = cpu::dot_double(a.data(), b.data(), n);
    RFT_CHECK_MSG(std::fabs(got - want) <= 4 * std::numeric_limits<double>::epsilon() * scale,
                  "dot_double over ", n, " entries: ", got, " against ", double(want));
  }
  // Entries that cancel only in the lanes' order: 2^60 in lane 0, -2^60 in lane 8, and 1
  // in lane 1. Lanes k and k + 8 meet first, so the ones survive; a running sum would
  // lose the first 1 to 2^60.
  std::vector<double> x(32, 0.0);
  x[0] = std::ldexp(1.0, 60);
  x[8] = -std::ldexp(1.0, 60);
  x[1] = 1.0;
  x[17] = 1.0;
  const double total = cpu::lane_sum(int64_t(x.size()), [&](int64_t j) { return x[size_t(j)]; });
  RFT_CHECK_MSG(total == 2.0, "lane_sum's fixed order: got ", total, ", want 2");
}

RFT_CASES(vec_math) {
  add_case("maths/double_lane_sums", [] { check_lane_sums(); });
  add_case("maths/vec_kernels_best_is_first", [] {
    const auto sets = vec::supported_kernels();
    RFT_CHECK(&vec::kernels() == sets.front());
    RFT_CHECK(std::string(sets.back()->isa) == "baseline");
    rft_test::note(cat("kernel sets on this CPU (best first): ", [&] {
      std::string s;
      for (const auto* k : sets) s += std::string(s.empty() ? "" : ", ") + k->isa;
      return s;
    }()));
  });
  for (const vec::Kernels* k : vec::supported_kernels()) {
    const std::string isa = k->isa;
    add_case("maths/vec_exp_log1p_" + isa, [k] {
      const auto xs = sweep(4099);  // about one million arguments
      check_elementwise("exp", k->exp_n, ref_exp, xs, 2.0);
      check_elementwise("log1p", k->log1p_n, ref_log1p, xs, 2.0);
      check_specials(*k);
      // No subnormal result, on either side of the flush and at it.
      std::vector<float> near_min = {vec::kExpFlushBelow, std::nextafter(vec::kExpFlushBelow, 0.0f),
                                     std::nextafter(vec::kExpFlushBelow, -100.0f), -87.0f, -87.5f};
      for (int i = 0; i < 2000; ++i) near_min.push_back(-86.0f - 3.0f * float(i) / 2000.0f);
      std::vector<float> e(near_min.size());
      k->exp_n(near_min.data(), e.data(), int64_t(near_min.size()));
      for (size_t i = 0; i < e.size(); ++i) {
        RFT_CHECK_MSG(e[i] == 0.0f || e[i] >= std::numeric_limits<float>::min(), "exp(",
                      near_min[i], ") = ", e[i], " is subnormal");
        RFT_CHECK((e[i] == 0.0f) == (near_min[i] < vec::kExpFlushBelow));
      }
    });
    add_case("maths/vec_softplus_sigmoid_" + isa, [k] {
      const auto xs = sweep(4099);
      check_elementwise("softplus", k->softplus_n, ref_softplus, xs, 3.0);
      check_elementwise("sigmoid", k->sigmoid_n, ref_sigmoid, xs, 3.0);
    });
    add_case("maths/vec_tile_loops_" + isa, [k] { check_tile_loops(*k); });
    add_case("maths/vec_dlogit_loops_" + isa, [k] { check_dlogit_loops(*k); });
    add_case("maths/vec_gram_loops_" + isa, [k] { check_gram_loops(*k); });
  }
}

}  // namespace
