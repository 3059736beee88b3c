// The m^2-mix maths (maths::slerp_weights) against long double closed forms, and the fused
// CPU ops (slerp, slerp_bwd, m2mix_fwd, m2mix_bwd) through the dispatcher against direct
// libtorch formulas in double (explicit mixing, full logit matrices, at::log_softmax), with
// gradients from torch::autograd. Sizes include n beyond the CPU row block (512) and column
// tile (1024).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "harness.h"
#include "robustft_maths.h"
#include "step_kernels.h"

namespace {

namespace mx = ::robustft::maths;
using ::robustft::gram_kept_count;
using ::robustft::gram_kept_offset;
using ::robustft::gram_kept_strip;
using ::robustft::gram_strip_entries;
using at::Tensor;
using rft_test::add_case;
using rft_test::cat;

// ---- maths::slerp_weights ------------------------------------------------------------
// sin(l theta) / sin(theta) in long double, and its c-derivative by a central difference in c.
long double weight_ld(long double l, long double c) {
  const long double t = std::acos(c);
  return std::sin(l * t) / std::sin(t);
}

template <typename T>
void check_weights_closed_form() {
  const T tol = sizeof(T) == 8 ? T(1e-9) : T(2e-4);
  for (long double lam : {0.0L, 0.2L, 0.5L, 0.9L, 1.0L}) {
    for (long double c : {-0.999L, -0.5L, 0.0L, 0.3L, 0.9L, 0.99L, 0.9999L}) {
      const auto w = mx::slerp_weights<T>(T(c), T(lam));
      const long double h = 1e-7L;
      const long double dwa = (weight_ld(lam, c + h) - weight_ld(lam, c - h)) / (2 * h);
      const long double dwb = (weight_ld(1 - lam, c + h) - weight_ld(1 - lam, c - h)) / (2 * h);
      RFT_CHECK_MSG(std::fabs(w.wa - weight_ld(lam, c)) <= tol * (1 + std::fabs(weight_ld(lam, c))),
                    "w_a lam=", double(lam), " c=", double(c), ": ", w.wa);
      RFT_CHECK_MSG(std::fabs(w.wb - weight_ld(1 - lam, c)) <= tol * (1 + std::fabs(weight_ld(1 - lam, c))),
                    "w_b lam=", double(lam), " c=", double(c), ": ", w.wb);
      const T dtol = sizeof(T) == 8 ? T(1e-5) : T(3e-3);
      RFT_CHECK_MSG(std::fabs(w.dwa_dc - dwa) <= dtol * (1 + std::fabs(dwa)),
                    "dw_a/dc lam=", double(lam), " c=", double(c), ": ", w.dwa_dc, " vs ", double(dwa));
      RFT_CHECK_MSG(std::fabs(w.dwb_dc - dwb) <= dtol * (1 + std::fabs(dwb)),
                    "dw_b/dc lam=", double(lam), " c=", double(c), ": ", w.dwb_dc, " vs ", double(dwb));
    }
  }
}

// At c = 1 (and above, from rounding) the weights are exactly lam, 1 - lam, with the
// analytic derivative; the series and the closed form agree at the switch-over angle.
template <typename T>
void check_weights_small_angle() {
  for (T lam : {T(0), T(0.3), T(0.5), T(1)}) {
    for (T c : {T(1), T(1) + std::numeric_limits<T>::epsilon()}) {
      const auto w = mx::slerp_weights<T>(c, lam);
      RFT_CHECK(w.wa == lam && w.wb == T(1) - lam);
      const T expect = -lam * (1 - lam * lam) / 3;
      RFT_CHECK_MSG(std::fabs(w.dwa_dc - expect) <= T(1e-6), w.dwa_dc, " vs ", expect);
    }
    const T t0 = mx::slerp_small_angle<T>();
    const auto below = mx::slerp_weights<T>(std::cos(t0 * T(0.999)), lam);
    const auto above = mx::slerp_weights<T>(std::cos(t0 * T(1.001)), lam);
    const T tol = sizeof(T) == 8 ? T(1e-8) : T(1e-4);
    RFT_CHECK_MSG(std::fabs(below.wa - above.wa) <= tol, below.wa, " vs ", above.wa);
    RFT_CHECK_MSG(std::fabs(below.dwa_dc - above.dwa_dc) <= 20 * tol, below.dwa_dc, " vs ", above.dwa_dc);
  }
}

// Opposite rows: finite weights at the clamp, no gradient through c below it.
template <typename T>
void check_weights_antipodal() {
  for (T lam : {T(0), T(0.3), T(0.5), T(1)}) {
    const auto w = mx::slerp_weights<T>(T(-1), lam);
    RFT_CHECK(std::isfinite(w.wa) && std::isfinite(w.wb));
    RFT_CHECK(w.dwa_dc == T(0) && w.dwb_dc == T(0));
  }
}

// ---- The ops ----------------------------------------------------------------------------
using Fwd3 = std::tuple<Tensor, Tensor, Tensor>;
using Bwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using M2FwdSig = Fwd3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using M2BwdSig = Bwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, bool);
using SlerpSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor unit_rows(const Tensor& x) { return x / x.norm(2, {1}, true); }

struct M2Case {
  at::ScalarType dtype;
  int64_t n, D;
  double lam;
  bool with_clip;
};

// The direct formula in double: explicit mix (closed-form weights), full logits.
std::pair<Tensor, Tensor> direct_losses(const Tensor& I, const Tensor& T, const Tensor& sm,
                                        const Tensor& sc, double lam) {
  const auto theta = at::acos((I * T).sum(1, true));
  const auto M = (at::sin(lam * theta) * I + at::sin((1 - lam) * theta) * T) / at::sin(theta);
  const int64_t n = I.size(0);
  const auto eye = at::eye(n, I.options().dtype(at::kBool));
  const auto pos = sm * (I * T).sum(1, true);
  const auto A = at::where(eye, pos, sm * at::mm(I, M.t()));
  const auto B = at::where(eye, pos, sm * at::mm(T, M.t()));
  auto ce = [](const Tensor& L) { return -at::log_softmax(L, 1).diagonal().mean(); };
  const auto m2 = (ce(A) + ce(B)) / 2;
  const auto C = sc * at::mm(I, T.t());
  const auto clip = (ce(C) + ce(C.t())) / 2;
  return {m2, clip};
}

void run_m2_case(const M2Case& k) {
  static const auto fwd = op<M2FwdSig>("robustft_ext::m2mix_fwd");
  static const auto bwd = op<M2BwdSig>("robustft_ext::m2mix_bwd");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(uint64_t(k.n * 131 + k.D));
  const auto d64 = at::TensorOptions().dtype(at::kDouble);
  const Tensor I0 = unit_rows(at::randn({k.n, k.D}, gen, d64));
  const Tensor T0 = unit_rows(I0 + 0.8 * at::randn({k.n, k.D}, gen, d64));
  // The op's inputs, rounded to its dtype; the reference sees the same rounded values.
  const Tensor I = I0.to(k.dtype), T = T0.to(k.dtype);
  const auto acc = k.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto sc_v = 30.0, sm_v = 14.3, g_m = 1.3, g_c = 0.6;
  auto t = [&](double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(acc)); };
  auto [m2, clip, lse] = fwd.call(I, T, t(sm_v), t(k.lam), t(sc_v), k.with_clip);
  auto [gI, gT, gsm, gsc] =
      bwd.call(t(g_m), t(k.with_clip ? g_c : 0.0), I, T, t(sm_v), t(k.lam), t(sc_v), lse, k.with_clip);

  Tensor Ir = I.to(at::kDouble).requires_grad_(), Tr = T.to(at::kDouble).requires_grad_();
  Tensor smr = at::scalar_tensor(sm_v, d64).requires_grad_(), scr = at::scalar_tensor(sc_v, d64).requires_grad_();
  auto [m2r, clipr] = direct_losses(Ir, Tr, smr, scr, k.lam);
  Tensor total = g_m * m2r + (k.with_clip ? g_c : 0.0) * clipr;
  auto grads = torch::autograd::grad({total}, {Ir, Tr, smr, scr});
  const double tol = k.dtype == at::kDouble ? 1e-10 : 2e-5;
  auto rel = [](const Tensor& x, const Tensor& r, double floor = 1e-3) {
    return (x.to(at::kDouble) - r).abs().max().item<double>() / std::max(floor, r.abs().max().item<double>());
  };
  // A loss is a difference of log-sum-exps of logits of size ~scale: its rounding error
  // scales with the logits, not with the (possibly ~0, e.g. n = 1) loss.
  RFT_CHECK_MSG(rel(m2, m2r.detach(), sm_v) <= tol, "m2 loss ", rel(m2, m2r.detach(), sm_v));
  if (k.with_clip) {
    RFT_CHECK_MSG(rel(clip, clipr.detach(), sc_v) <= tol, "clip loss ", rel(clip, clipr.detach(), sc_v));
  }
  RFT_CHECK_MSG(rel(gI, grads[0]) <= tol, "grad image ", rel(gI, grads[0]));
  RFT_CHECK_MSG(rel(gT, grads[1]) <= tol, "grad text ", rel(gT, grads[1]));
  RFT_CHECK_MSG(rel(gsm, grads[2]) <= tol, "grad m2 scale ", rel(gsm, grads[2]));
  if (k.with_clip) RFT_CHECK_MSG(rel(gsc, grads[3]) <= tol, "grad clip scale ", rel(gsc, grads[3]));
  RFT_CHECK(gI.scalar_type() == k.dtype && gT.scalar_type() == k.dtype);
  RFT_CHECK(lse.size(0) == (k.with_clip ? 4 : 2) && lse.size(1) == k.n);
}

// slerp of identical rows is the row itself, with finite gradients.
void test_slerp_identical_rows() {
  static const auto slerp = op<SlerpSig>("robustft_ext::slerp");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const Tensor a = unit_rows(at::randn({5, 9}, gen, at::TensorOptions().dtype(at::kFloat)));
  for (double lam : {0.0, 0.3, 1.0}) {
    const Tensor out = slerp.call(a, a, at::scalar_tensor(lam, at::TensorOptions().dtype(at::kFloat)));
    RFT_CHECK_MSG((out - a).abs().max().item<double>() <= 1e-6, "lam=", lam);
  }
}

// The kept Gram strips' packing (step_kernels.h): strip j holds 4 R_j (n - j R) entries,
// R_j = min(R, n - j R); the strips follow one another with no gap and cover the packed
// buffer of all strips exactly; gram_kept_count inverts the offsets and refuses a size that
// ends inside a strip.
void test_gram_kept_packing() {
  for (int64_t n : {1, 5, 256, 300, 1024, 1100}) {
    for (int64_t R : {128, 256}) {
      const int64_t strips = (n + R - 1) / R;
      int64_t offset = 0;
      for (int64_t j = 0; j < strips; ++j) {
        const int64_t rows = std::min(R, n - j * R), W = n - j * R;
        RFT_CHECK_MSG(gram_kept_offset(n, R, j) == offset, "offset of strip ", j, ", n=", n,
                      " R=", R);
        RFT_CHECK_MSG(gram_strip_entries(n, R, j) == 4 * rows * W, "entries of strip ", j);
        RFT_CHECK_MSG(gram_kept_count(n, R, offset) == j, "count at strip ", j, ", n=", n);
        RFT_CHECK_MSG(gram_kept_count(n, R, offset + 1) == -1, "inside strip ", j, ", n=", n);
        const at::Tensor keep = at::arange(gram_kept_offset(n, R, strips), at::kLong);
        const at::Tensor strip = gram_kept_strip(keep, n, R, j);
        RFT_CHECK_MSG(strip.numel() == 4 * rows * W && strip[0].item<int64_t>() == offset,
                      "strip ", j, "'s view, n=", n);
        offset += 4 * rows * W;
      }
      RFT_CHECK_MSG(gram_kept_count(n, R, offset) == strips, "all strips, n=", n, " R=", R);
      RFT_CHECK_MSG(gram_kept_count(n, R, offset + 1) == -1, "past the last strip, n=", n);
      if (n % R == 0) {  // whole strips: 4 R (K n - R K (K - 1) / 2) = 2 n^2 + 2 n R
        RFT_CHECK_MSG(offset == 2 * n * n + 2 * n * R, "total, n=", n, " R=", R);
      }
    }
  }
}

// The CPU's slerp prologue that also writes the pair's dot products: the weights (and M) are
// mix_rows_cpu's, pair_dot is <I_p, T_p> (from the double product) in the accumulation dtype,
// and a pair_dot of another length or dtype is refused by name before anything is written.
void test_mix_pair_dot_launcher() {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const int64_t n = 37, D = 33;  // neither a multiple of a vector width
  const Tensor I0 = unit_rows(at::randn({n, D}, gen, at::TensorOptions().dtype(at::kDouble)));
  const Tensor T0 = unit_rows(I0 + 0.7 * at::randn({n, D}, gen, at::TensorOptions().dtype(at::kDouble)));
  const Tensor lam = at::scalar_tensor(0.3, at::TensorOptions().dtype(at::kDouble));
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    const Tensor I = I0.to(dtype), T = T0.to(dtype);
    const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    const auto d64 = at::TensorOptions().dtype(at::kDouble);
    Tensor w_ref = at::empty({4, n}, d64), w = at::empty({4, n}, d64);
    Tensor M_ref = at::empty({n, D}, at::TensorOptions().dtype(acc)), M = at::empty_like(M_ref);
    Tensor pair = at::full({n}, -7.0, at::TensorOptions().dtype(acc));
    robustft::mix_rows_cpu(I, T, lam, M_ref, w_ref);
    robustft::mix_rows_pair_dot_cpu(I, T, lam, M, w, pair);
    RFT_CHECK_MSG(at::equal(w, w_ref) && at::equal(M, M_ref), "dtype ", dtype);
    const Tensor dots = (I.to(at::kDouble) * T.to(at::kDouble)).sum(1);
    const double err = (pair.to(at::kDouble) - dots).abs().max().item<double>();
    RFT_CHECK_MSG(err <= (acc == at::kDouble ? 1e-14 : 1e-7), "dtype ", dtype, " error ", err);
    Tensor no_m;  // the weights alone
    Tensor pair2 = at::full({n}, -7.0, at::TensorOptions().dtype(acc));
    robustft::mix_rows_pair_dot_cpu(I, T, lam, no_m, w, pair2);
    RFT_CHECK_MSG(at::equal(pair2, pair) && at::equal(w, w_ref), "dtype ", dtype, " without M");
  }
  const Tensor I = I0.to(at::kFloat), T = T0.to(at::kFloat);
  Tensor w = at::full({4, n}, -7.0, at::TensorOptions().dtype(at::kDouble)), no_m;
  for (Tensor bad : {at::zeros({n + 1}), at::zeros({n}, at::TensorOptions().dtype(at::kDouble)),
                     at::zeros({n, 1}), at::zeros({n, 2}).select(1, 0),
                     Tensor()}) {
    bool named = false;
    try {
      robustft::mix_rows_pair_dot_cpu(I, T, lam, no_m, w, bad);
    } catch (const c10::Error& e) {
      named = std::string(e.what()).find("pair_dot") != std::string::npos;
    }
    RFT_CHECK_MSG(named, "a bad pair_dot ", bad.defined() ? bad.sizes() : at::IntArrayRef{},
                  " was not refused by name");
    RFT_CHECK(at::all(w == -7.0).item<bool>());
  }
}

}  // namespace

RFT_CASES(m2mix) {
  add_case("maths/slerp_weights_closed_form/float", &check_weights_closed_form<float>);
  add_case("maths/slerp_weights_closed_form/double", &check_weights_closed_form<double>);
  add_case("maths/slerp_weights_small_angle/float", &check_weights_small_angle<float>);
  add_case("maths/slerp_weights_small_angle/double", &check_weights_small_angle<double>);
  add_case("maths/slerp_weights_antipodal/float", &check_weights_antipodal<float>);
  add_case("maths/slerp_weights_antipodal/double", &check_weights_antipodal<double>);
  add_case("m2mix/slerp_identical_rows", &test_slerp_identical_rows);
  add_case("m2mix/mix_pair_dot_launcher", &test_mix_pair_dot_launcher);
  add_case("m2mix/gram_kept_packing", &test_gram_kept_packing);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (int64_t n : {1, 3, 70, 1100}) {
      for (int64_t D : {5, 17}) {
        if (n == 1100 && D == 17) continue;
        for (bool clip : {false, true}) {
          for (double lam : {0.0, 0.35, 1.0}) {
            if (n == 1100 && lam != 0.35) continue;
            const M2Case k{dtype, n, D, lam, clip};
            add_case(cat("m2mix/", dtype == at::kDouble ? "double" : "float", "/n=", n, ",D=", D,
                         ",lam=", lam, clip ? ",clip" : ""),
                     [k] { run_m2_case(k); });
          }
        }
      }
    }
  }
}
