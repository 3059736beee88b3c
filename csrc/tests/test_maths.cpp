// Unit tests of csrc/robustft_maths.h, the per-entry maths shared by the CPU and CUDA
// kernels, in float and double, against long double references and hand-computed values.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "robustft_maths.h"

namespace {

namespace mx = ::robustft::maths;
using rft_test::add_case;
using rft_test::cat;

template <typename T>
const char* type_name() {
  return std::is_same<T, float>::value ? "float" : "double";
}

template <typename T>
constexpr T eps() {
  return std::numeric_limits<T>::epsilon();
}

// |actual - expected| <= rtol * |expected| + atol, with inf == inf.
template <typename T>
bool close(T actual, long double expected, long double rtol, long double atol) {
  if (std::isinf(expected)) return actual == static_cast<T>(expected);
  if (!std::isfinite(actual)) return false;
  return std::fabs(static_cast<long double>(actual) - expected) <=
         rtol * std::fabs(expected) + atol;
}

#define EXPECT_CLOSE(actual, expected, rtol, atol)                                      \
  RFT_CHECK_MSG(close((actual), (expected), (rtol), (atol)), "got ", (actual),           \
                ", expected ", static_cast<double>(expected), " (rtol ",                 \
                static_cast<double>(rtol), ", atol ", static_cast<double>(atol), ")")

// Direct log(sum(exp(x))) in long double: exp(+-1000) is representable there
// (long double reaches about 1e4932), so no max-shift is needed.
template <typename T>
long double direct_lse(const std::vector<T>& xs) {
  long double s = 0;
  for (T x : xs) s += std::exp(static_cast<long double>(x));
  return std::log(s);
}

template <typename T>
mx::LseState<T> push_all(const std::vector<T>& xs, size_t begin, size_t end) {
  auto st = mx::lse_empty<T>();
  for (size_t i = begin; i < end; ++i) st = mx::lse_push(st, xs[i]);
  return st;
}

template <typename T>
std::vector<std::vector<T>> lse_vectors() {
  std::vector<std::vector<T>> vs = {
      {T(0.5), T(-1.25), T(3), T(2)},
      {T(1000), T(-1000), T(999), T(0.5), T(1000)},  // large magnitudes, repeated max
      {T(-1000), T(-1000.5), T(-999)},               // all very negative
      {T(-1000), T(1000)},
      {T(1000)},
      {T(-1000)},
      {T(7), T(7), T(7), T(7)},                      // equal maxima
      {T(-3), T(-2), T(-1), T(0), T(1), T(2), T(3)},  // increasing: max moves every step
      {T(3), T(2), T(1), T(0), T(-1), T(-2), T(-3)},  // decreasing
  };
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> u(-1000.0, 1000.0), small(-5.0, 5.0);
  std::vector<T> wide, narrow;
  for (int i = 0; i < 1000; ++i) wide.push_back(static_cast<T>(u(rng)));
  for (int i = 0; i < 1000; ++i) narrow.push_back(static_cast<T>(small(rng)));
  vs.push_back(wide);
  vs.push_back(narrow);
  return vs;
}

// Error bound of a log-sum-exp of n values in the log domain: the running sum carries a
// relative error of about n * eps, which is an absolute error in log(l); m + log(l)
// adds rounding relative to |result|.
template <typename T>
long double lse_atol(size_t n) {
  return 4 * static_cast<long double>(eps<T>()) * (static_cast<long double>(n) + 1);
}

template <typename T>
void test_lse_push() {
  for (const auto& xs : lse_vectors<T>()) {
    const auto st = push_all(xs, 0, xs.size());
    const T v = mx::lse_value(st);
    const long double ref = direct_lse(xs);
    RFT_CHECK_MSG(std::isfinite(v), "lse of ", xs.size(), " values is ", v);
    EXPECT_CLOSE(v, ref, 4 * eps<T>(), lse_atol<T>(xs.size()));
    // The running maximum is the exact maximum.
    T mx_ = -std::numeric_limits<T>::infinity();
    for (T x : xs) mx_ = std::max(mx_, x);
    RFT_CHECK_MSG(st.m == mx_, "state max ", st.m, " != ", mx_);
    RFT_CHECK_MSG(st.l >= T(1) && st.l <= T(xs.size()) * (1 + 4 * eps<T>()),
                  "state sum ", st.l, " outside [1, n]");
  }
}

template <typename T>
void test_lse_merge() {
  for (const auto& xs : lse_vectors<T>()) {
    const long double ref = direct_lse(xs);
    const size_t n = xs.size();
    for (size_t k : {size_t(0), size_t(1), n / 2, n - 1, n}) {
      if (k > n) continue;
      const auto a = push_all(xs, 0, k), b = push_all(xs, k, n);
      const auto ab = mx::lse_merge(a, b), ba = mx::lse_merge(b, a);
      EXPECT_CLOSE(mx::lse_value(ab), ref, 4 * eps<T>(), lse_atol<T>(n));
      // Commutative up to rounding: same maximum, sums within a couple of ulps.
      RFT_CHECK_MSG(ab.m == ba.m, "merge(a,b).m ", ab.m, " != merge(b,a).m ", ba.m, " at k=", k);
      RFT_CHECK_MSG(std::fabs(ab.l - ba.l) <= 2 * eps<T>() * std::fabs(ab.l),
                    "merge(a,b).l ", ab.l, " vs merge(b,a).l ", ba.l, " at k=", k);
      // Associativity up to rounding on a three-way split.
      const size_t k2 = k + (n - k) / 2;
      const auto b1 = push_all(xs, k, k2), b2 = push_all(xs, k2, n);
      const auto left = mx::lse_merge(mx::lse_merge(a, b1), b2);
      const auto right = mx::lse_merge(a, mx::lse_merge(b1, b2));
      EXPECT_CLOSE(mx::lse_value(left), static_cast<long double>(mx::lse_value(right)),
                   4 * eps<T>(), lse_atol<T>(n));
    }
    // A block given by its (max, sum of exp(x - max)) equals pushing its elements.
    if (n >= 2) {
      T bmax = -std::numeric_limits<T>::infinity();
      for (size_t i = 1; i < n; ++i) bmax = std::max(bmax, xs[i]);
      T bsum = 0;
      for (size_t i = 1; i < n; ++i) bsum += std::exp(xs[i] - bmax);
      const auto st = mx::lse_push_block(mx::lse_push(mx::lse_empty<T>(), xs[0]), bmax, bsum);
      EXPECT_CLOSE(mx::lse_value(st), ref, 4 * eps<T>(), lse_atol<T>(n));
    }
  }
}

template <typename T>
void test_lse_empty() {
  const T inf = std::numeric_limits<T>::infinity();
  const auto e = mx::lse_empty<T>();
  RFT_CHECK(e.m == -inf && e.l == T(0));
  RFT_CHECK_MSG(mx::lse_value(e) == -inf, "value of the empty state is ", mx::lse_value(e));
  const auto ee = mx::lse_merge(e, e);
  RFT_CHECK_MSG(ee.l == T(0) && mx::lse_value(ee) == -inf, "merge(empty, empty) = {", ee.m,
                ", ", ee.l, "}");
  for (T x : {T(0), T(-1000), T(1000), T(3.25)}) {
    const auto s = mx::lse_push(e, x);
    RFT_CHECK_MSG(s.m == x && s.l == T(1) && mx::lse_value(s) == x, "push(empty, ", x,
                  ") = {", s.m, ", ", s.l, "}");
    const auto s2 = mx::lse_push(s, T(x - 2));
    for (const auto& m : {mx::lse_merge(e, s2), mx::lse_merge(s2, e)}) {
      RFT_CHECK_MSG(m.m == s2.m && m.l == s2.l, "merging the empty state changed {", s2.m, ", ",
                    s2.l, "} into {", m.m, ", ", m.l, "}");
    }
    // The empty block is a no-op too.
    const auto s3 = mx::lse_push_block(s2, -inf, T(0));
    RFT_CHECK(s3.m == s2.m && s3.l == s2.l);
  }
}

struct ActivationRow {
  double x, softplus, sigmoid;  // reference values (Python math, double)
};

template <typename T>
void test_softplus_sigmoid() {
  const ActivationRow rows[] = {
      {0.0, 0.6931471805599453, 0.5},
      {1.0, 1.3132616875182228, 0.7310585786300049},
      {-1.0, 0.31326168751822286, 0.2689414213699951},
      {50.0, 50.0, 1.0},
      {-50.0, 1.9287498479639178e-22, 1.928749847963918e-22},
      {100.0, 100.0, 1.0},
      {-100.0, 3.720075976020836e-44, 3.7200759760208356e-44},
  };
  // Results below the smallest normal (softplus(-100) in float is subnormal) can only be
  // as precise as the subnormal spacing.
  const long double atol = 4 * static_cast<long double>(std::numeric_limits<T>::denorm_min());
  for (const auto& r : rows) {
    const T x = static_cast<T>(r.x);
    const T sp = mx::softplus(x), sg = mx::sigmoid(x);
    RFT_CHECK_MSG(std::isfinite(sp) && std::isfinite(sg), "softplus/sigmoid(", r.x, ") = ", sp,
                  ", ", sg);
    EXPECT_CLOSE(sp, static_cast<long double>(r.softplus), 4 * eps<T>(), atol);
    EXPECT_CLOSE(sg, static_cast<long double>(r.sigmoid), 4 * eps<T>(), atol);
    // Long double reference computed here too, independently of the table.
    const long double xl = x;
    EXPECT_CLOSE(sp, std::log1p(std::exp(xl)), 4 * eps<T>(), atol);
    EXPECT_CLOSE(sg, 1.0L / (1.0L + std::exp(-xl)), 4 * eps<T>(), atol);
    // Limits and identities: softplus >= max(x, 0) and > 0, sigmoid in [0, 1],
    // softplus(x) - softplus(-x) = x, sigmoid(x) + sigmoid(-x) = 1.
    RFT_CHECK_MSG(sp >= std::max(x, T(0)) && sp > T(0), "softplus(", r.x, ") = ", sp);
    RFT_CHECK_MSG(sg >= T(0) && sg <= T(1), "sigmoid(", r.x, ") = ", sg);
    EXPECT_CLOSE(T(mx::softplus(x) - mx::softplus(T(-x))), static_cast<long double>(x),
                 4 * eps<T>(), 4 * eps<T>());
    EXPECT_CLOSE(T(mx::sigmoid(x) + mx::sigmoid(T(-x))), 1.0L, 4 * eps<T>(), 0.0L);
  }
  // Far beyond exp's range: exact limits, never inf or nan.
  for (T x : {T(1000), T(-1000), std::numeric_limits<T>::max() / 4, -std::numeric_limits<T>::max() / 4}) {
    const T sp = mx::softplus(x), sg = mx::sigmoid(x);
    RFT_CHECK_MSG(sp == (x > 0 ? x : T(0)), "softplus(", x, ") = ", sp);
    RFT_CHECK_MSG(sg == (x > 0 ? T(1) : T(0)), "sigmoid(", x, ") = ", sg);
  }
  // siglip_term: softplus(-s) on positives, softplus(s) on negatives.
  for (T s : {T(-3), T(0), T(2.5), T(100)}) {
    RFT_CHECK(mx::siglip_term(s, true) == mx::softplus(T(-s)));
    RFT_CHECK(mx::siglip_term(s, false) == mx::softplus(s));
  }
  RFT_CHECK(mx::logit(T(0.5), T(14), T(-2)) == T(5));
  RFT_CHECK(mx::logit(T(-0.25), T(100), T(0)) == T(-25));
}

template <typename T>
void test_clip_dlogit() {
  const T tol = 4 * eps<T>();
  // Hand-computed: s=2, r=3, c=1, w_row=0.5, w_col=0.25, w_pos=1:
  // 0.5 e^-1 + 0.25 e^1 = 0.8635101777004824; minus w_pos on a positive.
  EXPECT_CLOSE(mx::clip_dlogit(T(2), T(3), T(1), T(0.5), T(0.25), T(1), false),
               0.8635101777004824L, tol, 0.0L);
  EXPECT_CLOSE(mx::clip_dlogit(T(2), T(3), T(1), T(0.5), T(0.25), T(1), true),
               -0.13648982229951756L, tol, tol);
  // Only the row term: 0.125 exp(-1.5 - 0.5).
  EXPECT_CLOSE(mx::clip_dlogit(T(-1.5), T(0.5), T(123), T(0.125), T(0), T(0), false),
               0.016916910404576588L, tol, 0.0L);
  // s equal to the lse: exp(0) = 1 per weight.
  EXPECT_CLOSE(mx::clip_dlogit(T(4), T(4), T(4), T(0.5), T(0.5), T(1), true), 0.0L, tol, tol);

  // A zero weight switches its term off, whatever the statistic holds (+-inf, nan):
  // never 0 * inf = nan.
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  for (T junk : {inf, -inf, nan}) {
    // w_col = 0: the column statistic is unused.
    const T d1 = mx::clip_dlogit(T(2), T(3), junk, T(0.5), T(0), T(1), true);
    EXPECT_CLOSE(d1, static_cast<long double>(0.5 * std::exp(-1.0) - 1.0), tol, tol);
    // w_row = 0: the row statistic is unused.
    const T d2 = mx::clip_dlogit(T(2), junk, T(1), T(0), T(0.25), T(1), false);
    EXPECT_CLOSE(d2, static_cast<long double>(0.25 * std::exp(1.0)), tol, 0.0L);
    // Both off: only the positive term remains.
    RFT_CHECK_MSG(mx::clip_dlogit(T(2), junk, junk, T(0), T(0), T(0.75), true) == T(-0.75),
                  "both weights 0 with lse ", junk);
    RFT_CHECK_MSG(mx::clip_dlogit(T(2), junk, junk, T(0), T(0), T(0.75), false) == T(0),
                  "both weights 0 with lse ", junk);
  }
  // Large logits against their (equally large) lse stay finite.
  const T d = mx::clip_dlogit(T(1000), T(1000.5), T(999), T(1), T(1), T(1), true);
  EXPECT_CLOSE(d, static_cast<long double>(std::exp(-0.5) + std::exp(1.0) - 1.0), tol, tol);
}

template <typename T>
void test_siglip_dlogit() {
  const T tol = 4 * eps<T>();
  // w (sigmoid(s) - [positive]).
  EXPECT_CLOSE(mx::siglip_dlogit(T(0), T(1), true), -0.5L, tol, 0.0L);
  EXPECT_CLOSE(mx::siglip_dlogit(T(0), T(1), false), 0.5L, tol, 0.0L);
  // On positives sigmoid(s) - 1 cancels: the error is absolute, about w * eps.
  EXPECT_CLOSE(mx::siglip_dlogit(T(2), T(0.3), true), -0.0357608766066353L, tol, 0.3 * tol);
  EXPECT_CLOSE(mx::siglip_dlogit(T(2), T(0.3), false), 0.2642391233933647L, tol, 0.0L);
  EXPECT_CLOSE(mx::siglip_dlogit(T(-1.5), T(2), false), 0.3648510476127127L, tol, 0.0L);
  EXPECT_CLOSE(mx::siglip_dlogit(T(-1.5), T(2), true), -1.6351489523872873L, tol, 2 * tol);
  // Saturation: finite, the right limits.
  RFT_CHECK(mx::siglip_dlogit(T(100), T(1), true) == T(0));
  RFT_CHECK(mx::siglip_dlogit(T(-100), T(1), true) == T(-1));
  RFT_CHECK(mx::siglip_dlogit(T(100), T(0.5), false) == T(0.5));
  RFT_CHECK(mx::siglip_dlogit(T(-1000), T(1), false) == T(0));
  RFT_CHECK(mx::siglip_dlogit(T(3), T(0), true) == T(0));
}

void test_is_positive() {
  // Positives sit where q - p == offset; negative offsets are valid (transposed views).
  RFT_CHECK(mx::is_positive(3, 3, true, 0));
  RFT_CHECK(!mx::is_positive(3, 4, true, 0));
  RFT_CHECK(mx::is_positive(1, 3, true, 2));
  RFT_CHECK(!mx::is_positive(3, 1, true, 2));
  RFT_CHECK(mx::is_positive(3, 1, true, -2));
  RFT_CHECK(!mx::is_positive(1, 3, true, -2));
  RFT_CHECK(mx::is_positive(2048, 0, true, -2048));
  RFT_CHECK(!mx::is_positive(2048, 1, true, -2048));
  RFT_CHECK(mx::is_positive(0, 4096, true, 4096));
  const long long big = 3'000'000'000LL;  // beyond 32 bits
  RFT_CHECK(mx::is_positive(big, 2 * big, true, big));
  RFT_CHECK(mx::is_positive(2 * big, big, true, -big));
  RFT_CHECK(!mx::is_positive(2 * big, big + 1, true, -big));
  // has_positives = false: nothing is positive.
  RFT_CHECK(!mx::is_positive(3, 3, false, 0));
  RFT_CHECK(!mx::is_positive(3, 1, false, -2));
}

template <typename T>
void register_typed() {
  const std::string t = type_name<T>();
  add_case(cat("maths/lse_push/", t), &test_lse_push<T>);
  add_case(cat("maths/lse_merge/", t), &test_lse_merge<T>);
  add_case(cat("maths/lse_empty/", t), &test_lse_empty<T>);
  add_case(cat("maths/softplus_sigmoid/", t), &test_softplus_sigmoid<T>);
  add_case(cat("maths/clip_dlogit/", t), &test_clip_dlogit<T>);
  add_case(cat("maths/siglip_dlogit/", t), &test_siglip_dlogit<T>);
}

}  // namespace

RFT_CASES(maths) {
  register_typed<float>();
  register_typed<double>();
  add_case("maths/is_positive", &test_is_positive);
}
