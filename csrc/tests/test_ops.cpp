// The fused CPU ops, called through the dispatcher exactly as the Python extension
// calls them, against direct libtorch formulas (full logit matrix, at::logsumexp,
// at::log_sigmoid) evaluated in double, with gradients from torch::autograd.
//
// Shapes include sizes beyond the CPU tile sizes (kRowBlock = 512 rows, kColBlock =
// 1024 columns in cpu/contrastive_cpu.cpp) and sizes one off the tile boundaries.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "harness.h"

namespace {

using rft_test::add_case;
using rft_test::cat;
using at::Tensor;

// ---- The ops through the dispatcher ---------------------------------------------------
using Fwd3 = std::tuple<Tensor, Tensor, Tensor>;
using Bwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using ClipFwdSig = Fwd3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool);
using ClipBwdSig = Bwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, int64_t, bool);
using SiglipFwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using SiglipBwdSig = Bwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Fwd3 clip_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
              int64_t off, bool sym) {
  static const auto h = op<ClipFwdSig>("robustft_ext::clip_fwd");
  return h.call(a, b, scale, bias, off, sym);
}
Bwd4 clip_bwd(const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& scale,
              const Tensor& bias, const Tensor& r, const Tensor& c, int64_t off, bool sym) {
  static const auto h = op<ClipBwdSig>("robustft_ext::clip_bwd");
  return h.call(g, a, b, scale, bias, r, c, off, sym);
}
Tensor siglip_fwd(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                  bool neg) {
  static const auto h = op<SiglipFwdSig>("robustft_ext::siglip_fwd");
  return h.call(a, b, scale, bias, neg);
}
Bwd4 siglip_bwd(const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& scale,
                const Tensor& bias, bool neg) {
  static const auto h = op<SiglipBwdSig>("robustft_ext::siglip_bwd");
  return h.call(g, a, b, scale, bias, neg);
}

// The CPU variants that keep the dot products for the backward (contrastive_ops.h).
using Fwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using ClipFwdKeepSig = Fwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                            bool);
using ClipBwdKeptSig = Bwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, const Tensor&, Tensor&, int64_t, bool);
using SiglipFwdKeepSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, bool);
using SiglipBwdKeptSig = Bwd4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, Tensor&, bool);

Fwd4 clip_fwd_keep(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                   int64_t off, bool sym) {
  static const auto h = op<ClipFwdKeepSig>("robustft_ext::clip_fwd_keep");
  return h.call(a, b, scale, bias, off, sym);
}
Bwd4 clip_bwd_kept(const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& scale,
                   const Tensor& bias, const Tensor& r, const Tensor& c, Tensor& dots,
                   int64_t off, bool sym) {
  static const auto h = op<ClipBwdKeptSig>("robustft_ext::clip_bwd_kept");
  return h.call(g, a, b, scale, bias, r, c, dots, off, sym);
}
std::tuple<Tensor, Tensor> siglip_fwd_keep(const Tensor& a, const Tensor& b, const Tensor& scale,
                                           const Tensor& bias, bool neg) {
  static const auto h = op<SiglipFwdKeepSig>("robustft_ext::siglip_fwd_keep");
  return h.call(a, b, scale, bias, neg);
}
Bwd4 siglip_bwd_kept(const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& scale,
                     const Tensor& bias, Tensor& dots, bool neg) {
  static const auto h = op<SiglipBwdKeptSig>("robustft_ext::siglip_bwd_kept");
  return h.call(g, a, b, scale, bias, dots, neg);
}

// ---- Problems ----------------------------------------------------------------------
enum class Mode { ClipSymmetric, ClipOffset, Siglip, SiglipNegativeOnly };

const char* group_name(Mode m) {
  switch (m) {
    case Mode::ClipSymmetric: return "clip_symmetric";
    case Mode::ClipOffset: return "clip_offset";
    case Mode::Siglip: return "siglip";
    case Mode::SiglipNegativeOnly: return "siglip_negative_only";
  }
  return "?";
}

bool is_clip(Mode m) { return m == Mode::ClipSymmetric || m == Mode::ClipOffset; }

struct Spec {
  Mode mode;
  at::ScalarType dtype;
  int64_t n, m, D;
  int64_t offset;    // clip_offset: positives at (i, i + offset)
  double scale, bias;
  double g;          // upstream gradient of the loss
  double magnitude;  // feature row norm (1: L2-normalised as in CLIP; > 1 stresses exp)
  uint64_t seed;
  std::string group;  // ctest group (defaults to the mode's)
};

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float";
    case at::kDouble: return "double";
    case at::kHalf: return "half";
    case at::kBFloat16: return "bfloat16";
    default: return "other";
  }
}

std::string fmt(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

std::string case_name(const Spec& s) {
  std::string name = cat(s.group.empty() ? group_name(s.mode) : s.group, "/", dtype_name(s.dtype),
                         "/n=", s.n);
  if (s.mode == Mode::ClipOffset || s.mode == Mode::SiglipNegativeOnly) name += cat(",m=", s.m);
  name += cat(",D=", s.D);
  if (s.mode == Mode::ClipOffset) name += cat(",offset=", s.offset);
  name += cat("/scale=", fmt(s.scale), ",bias=", fmt(s.bias));
  if (s.g != 1.0) name += cat(",g=", fmt(s.g));
  if (s.magnitude != 1.0) name += cat(",|x|=", fmt(s.magnitude));
  return name;
}

Tensor unit_rows(const Tensor& x) { return x / x.norm(2, {1}, /*keepdim=*/true); }

// Features in double: a [n, D]; b [m, D] whose positive rows are noisy copies of a's rows
// (so positives have the largest logits, as in training), the rest independent.
std::pair<Tensor, Tensor> make_features(const Spec& s) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(s.seed);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor a = unit_rows(at::randn({s.n, s.D}, gen, opts));
  Tensor b = unit_rows(at::randn({s.m, s.D}, gen, opts));
  if (s.mode != Mode::SiglipNegativeOnly) {
    b.narrow(0, s.offset, s.n).copy_(unit_rows(a + 0.5 * at::randn({s.n, s.D}, gen, opts)));
  }
  return {a * s.magnitude, b * s.magnitude};
}

struct Result {
  Tensor loss, row_lse, col_lse, grad_a, grad_b, grad_scale, grad_bias;
  double logit_absmax = 0;  // reference only: max |S|
};

// The direct formula on the full logit matrix, in double, differentiated by autograd.
Result reference(const Spec& s, const Tensor& a, const Tensor& b, double scale, double bias) {
  at::AutoGradMode enable_grad(true);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor A = a.to(at::kDouble).detach().clone().requires_grad_(true);
  Tensor B = b.to(at::kDouble).detach().clone().requires_grad_(true);
  Tensor sc = at::full({}, scale, opts).requires_grad_(true);
  Tensor bi = at::full({}, bias, opts).requires_grad_(true);
  const Tensor S = at::matmul(A, B.t()) * sc + bi;
  const int64_t n = s.n;
  Result r;
  Tensor loss;
  if (is_clip(s.mode)) {
    r.row_lse = at::logsumexp(S, {1});
    const Tensor pos = S.narrow(1, s.offset, n).diagonal();
    if (s.mode == Mode::ClipSymmetric) {
      r.col_lse = at::logsumexp(S, {0});
      loss = ((r.row_lse - pos).mean() + (r.col_lse - pos).mean()) / 2;
    } else {
      loss = (r.row_lse - pos).mean();
    }
  } else {
    Tensor z = at::full({n, s.m}, -1.0, opts);
    if (s.mode == Mode::Siglip) z.diagonal().fill_(1.0);
    loss = -at::log_sigmoid(z * S).sum() / double(n);
  }
  const auto grads = torch::autograd::grad({loss}, {A, B, sc, bi}, {at::full({}, s.g, opts)});
  r.loss = loss.detach();
  r.logit_absmax = S.detach().abs().max().item<double>();
  if (r.row_lse.defined()) r.row_lse = r.row_lse.detach();
  if (r.col_lse.defined()) r.col_lse = r.col_lse.detach();
  r.grad_a = grads[0];
  r.grad_b = grads[1];
  r.grad_scale = grads[2];
  r.grad_bias = grads[3];
  return r;
}

// max |actual - expected| / max(max |expected|, floor): the error relative to the size of
// the tensor (floor: the size of the terms it sums, for results that cancel to ~0).
double rel_err(const Tensor& actual, const Tensor& expected, double floor) {
  const Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (a.numel() == 0 && e.numel() == 0) return 0.0;
  const double num = (a - e).abs().max().item<double>();
  const double den = std::max(e.abs().max().item<double>(), floor);
  return std::isfinite(num) ? num / den : std::numeric_limits<double>::infinity();
}

double eps_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kHalf: return 0.0009765625;    // 2^-10
    case at::kBFloat16: return 0.0078125;   // 2^-7
    default: return std::numeric_limits<float>::epsilon();
  }
}

void check_shape(const char* what, const Tensor& t, std::vector<int64_t> shape,
                 at::ScalarType dtype) {
  RFT_CHECK_MSG(t.defined() && t.sizes().vec() == shape && t.scalar_type() == dtype, what,
                ": got ", (t.defined() ? cat(t.sizes(), " ", t.scalar_type()) : "undefined"),
                ", expected ", at::IntArrayRef(shape), " ", dtype);
}

// Runs one path of the ops on a case and checks it against the reference; returns the
// errors for the case's note.
std::string check_ops(const Spec& s, const Tensor& a, const Tensor& b, const Tensor& scale_t,
                      const Tensor& bias_t, const Tensor& g_t, const Result& ref, bool kept) {
  Result out;
  const bool sym = s.mode == Mode::ClipSymmetric;
  const auto acc = scale_t.scalar_type();
  const double scale = scale_t.item<double>();
  if (is_clip(s.mode) && kept) {
    Tensor dots;
    std::tie(out.loss, out.row_lse, out.col_lse, dots) =
        clip_fwd_keep(a, b, scale_t, bias_t, s.offset, sym);
    check_shape("dots", dots, {s.n, s.m}, acc);
    std::tie(out.grad_a, out.grad_b, out.grad_scale, out.grad_bias) =
        clip_bwd_kept(g_t, a, b, scale_t, bias_t, out.row_lse, out.col_lse, dots, s.offset, sym);
  } else if (is_clip(s.mode)) {
    std::tie(out.loss, out.row_lse, out.col_lse) = clip_fwd(a, b, scale_t, bias_t, s.offset, sym);
    std::tie(out.grad_a, out.grad_b, out.grad_scale, out.grad_bias) =
        clip_bwd(g_t, a, b, scale_t, bias_t, out.row_lse, out.col_lse, s.offset, sym);
  } else {
    const bool neg = s.mode == Mode::SiglipNegativeOnly;
    if (kept) {
      Tensor dots;
      std::tie(out.loss, dots) = siglip_fwd_keep(a, b, scale_t, bias_t, neg);
      check_shape("dots", dots, {s.n, s.m}, acc);
      std::tie(out.grad_a, out.grad_b, out.grad_scale, out.grad_bias) =
          siglip_bwd_kept(g_t, a, b, scale_t, bias_t, dots, neg);
    } else {
      out.loss = siglip_fwd(a, b, scale_t, bias_t, neg);
      std::tie(out.grad_a, out.grad_b, out.grad_scale, out.grad_bias) =
          siglip_bwd(g_t, a, b, scale_t, bias_t, neg);
    }
  }
  if (is_clip(s.mode)) {
    check_shape("row_lse", out.row_lse, {s.n}, acc);
    check_shape("col_lse", out.col_lse, {sym ? s.m : 0}, acc);
  }
  check_shape("loss", out.loss, {}, acc);
  check_shape("grad_a", out.grad_a, {s.n, s.D}, s.dtype);
  check_shape("grad_b", out.grad_b, {s.m, s.D}, s.dtype);
  check_shape("grad_scale", out.grad_scale, {}, acc);
  check_shape("grad_bias", out.grad_bias, {}, acc);

  // Tolerance: the kernel's logits carry an absolute error of a few eps(acc) * |S|max
  // (dot products in acc dtype), which every exp(S - lse) and so every output inherits
  // relatively; outputs cast back to half/bfloat16 add that dtype's rounding.
  const double s_max = ref.logit_absmax;
  const double fmax = std::max(a.to(at::kDouble).abs().max().item<double>(),
                               b.to(at::kDouble).abs().max().item<double>());
  const double tol_acc = 64 * eps_of(acc) * std::max(1.0, s_max);
  const double tol_out = tol_acc + (s.dtype == acc ? 0.0 : eps_of(s.dtype));
  const double g = std::abs(s.g);
  const double grad_floor = g * std::abs(scale) * fmax / double(s.n);

  struct Item {
    const char* name;
    double err, tol;
  };
  std::vector<Item> items = {
      {"loss", rel_err(out.loss, ref.loss, 1.0), tol_acc},
      {"grad_a", rel_err(out.grad_a, ref.grad_a, grad_floor), tol_out},
      {"grad_b", rel_err(out.grad_b, ref.grad_b, grad_floor), tol_out},
      {"grad_scale", rel_err(out.grad_scale, ref.grad_scale, g * fmax * fmax), tol_acc},
      {"grad_bias", rel_err(out.grad_bias, ref.grad_bias, g), tol_acc},
  };
  if (is_clip(s.mode)) {
    items.push_back({"row_lse", rel_err(out.row_lse, ref.row_lse, 1.0), tol_acc});
    if (sym) items.push_back({"col_lse", rel_err(out.col_lse, ref.col_lse, 1.0), tol_acc});
  }
  std::string line = cat("; tol ", fmt(tol_acc));
  if (tol_out != tol_acc) line += cat(" (grad_a/b ", fmt(tol_out), ")");
  line += "; rel err:";
  for (const auto& it : items) {
    line += cat(" ", it.name, " ", fmt(it.err));
    RFT_CHECK_MSG(it.err <= it.tol, kept ? "kept dots: " : "", it.name, " relative error ",
                  it.err, " > tolerance ", it.tol);
  }
  return line;
}

void run_case(const Spec& s) {
  const auto [a64, b64] = make_features(s);
  const Tensor a = a64.to(s.dtype), b = b64.to(s.dtype);
  const auto acc = s.dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = at::TensorOptions().dtype(acc);
  const Tensor scale_t = at::full({}, s.scale, acc_opts), bias_t = at::full({}, s.bias, acc_opts);
  const Tensor g_t = at::full({}, s.g, acc_opts);
  // The reference sees exactly the values the kernel sees (inputs and scalars rounded to
  // the kernel's dtypes), so the comparison measures only the kernel's arithmetic.
  const double scale = scale_t.item<double>(), bias = bias_t.item<double>();
  const Result ref = reference(s, a, b, scale, bias);

  // Both CPU paths: the forward that keeps nothing, and the one that keeps the dot products
  // for its backward (contrastive_ops.h), against the same reference and tolerances.
  std::string line = cat("|S|max ", fmt(ref.logit_absmax));
  for (const bool kept : {false, true}) {
    line += cat(kept ? "; kept dots" : "", check_ops(s, a, b, scale_t, bias_t, g_t, ref, kept));
  }
  rft_test::note(line);
}

// ---- Case lists ------------------------------------------------------------------------
struct Shape {
  int64_t n, D;
};
// (1100, 8): three row tiles (512 + 512 + 76) and two column tiles (1024 + 76).
const Shape kShapes[] = {{1, 5}, {3, 33}, {129, 64}, {600, 17}, {1100, 8}};
double mode_bias(Mode m) { return is_clip(m) ? 3.7 : -10.0; }

// (scale, with bias): every scale of the range in docs/maths.md, notation (1, 14.3 at
// init, 100 at most), with and without the mode's bias. Cases with a bias also use g = 0.37 for the
// upstream gradient.
struct ScaleBias {
  double scale;
  bool with_bias;
};
const ScaleBias kScaleBias[] = {{1.0, false}, {14.3, true}, {100.0, false}, {100.0, true}};

void add_spec(const Spec& s) {
  add_case(case_name(s), [s] { run_case(s); });
}

Spec base_spec(Mode mode, at::ScalarType dtype, int64_t n, int64_t D, uint64_t seed) {
  Spec s{};
  s.mode = mode;
  s.dtype = dtype;
  s.n = n;
  s.D = D;
  s.m = n;
  s.offset = 0;
  s.g = 1.0;
  s.magnitude = 1.0;
  s.seed = seed;
  switch (mode) {
    case Mode::ClipOffset: {  // local_loss layout: world size 3, this rank's columns
      const int64_t world = 3;
      s.m = world * n;
      s.offset = n * int64_t(seed % world);
      break;
    }
    case Mode::SiglipNegativeOnly:  // another rank's texts: any row count
      s.m = 2 * n + 3;
      break;
    default:
      break;
  }
  return s;
}

void register_mode(Mode mode) {
  uint64_t seed = 1;
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& sh : kShapes) {
      for (const auto& sb : kScaleBias) {
        Spec s = base_spec(mode, dtype, sh.n, sh.D, seed++);
        s.scale = sb.scale;
        s.bias = sb.with_bias ? mode_bias(mode) : 0.0;
        s.g = sb.with_bias ? 0.37 : 1.0;
        add_spec(s);
      }
    }
    // Large logits (rows of norm 4, |S| up to 1600): the online log-sum-exp and
    // softplus must not overflow even in float.
    for (const auto& sh : {Shape{129, 64}, Shape{1100, 8}}) {
      Spec s = base_spec(mode, dtype, sh.n, sh.D, seed++);
      s.scale = 100.0;
      s.bias = mode_bias(mode);
      s.magnitude = 4.0;
      add_spec(s);
    }
  }
}

// Sizes exactly at and one past the tile boundaries, and positives straddling a column
// tile edge (kRowBlock = 512, kColBlock = 1024).
void register_tile_edges() {
  uint64_t seed = 1000;
  for (auto dtype : {at::kFloat, at::kDouble}) {
    auto with = [&](Spec s) {
      s.scale = 14.3;
      s.bias = mode_bias(s.mode);
      add_spec(s);
    };
    for (int64_t n : {512, 513, 1024, 1025}) with(base_spec(Mode::ClipSymmetric, dtype, n, 4, seed++));
    for (int64_t n : {512, 1025}) with(base_spec(Mode::Siglip, dtype, n, 4, seed++));
    // clip_offset: positives start at a tile edge, end at one, and cross one.
    const std::tuple<int64_t, int64_t, int64_t> offset_cases[] = {
        {100, 1124, 1024}, {100, 1024, 924}, {100, 1124, 1000}, {513, 1539, 1026}, {5, 12, 7}};
    for (const auto& [n, m, off] : offset_cases) {
      Spec s = base_spec(Mode::ClipOffset, dtype, n, 4, seed++);
      s.m = m;
      s.offset = off;
      with(s);
    }
    const std::pair<int64_t, int64_t> negative_cases[] = {{512, 1025}, {513, 1024}, {1, 2049}};
    for (const auto& [n, m] : negative_cases) {
      Spec s = base_spec(Mode::SiglipNegativeOnly, dtype, n, 4, seed++);
      s.m = m;
      with(s);
    }
  }
}

// half / bfloat16 inputs: the kernels accumulate in float and return gradients in the
// input dtype.
void register_low_precision() {
  uint64_t seed = 2000;
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    for (Mode mode : {Mode::ClipSymmetric, Mode::ClipOffset, Mode::Siglip,
                      Mode::SiglipNegativeOnly}) {
      for (const auto& sh : {Shape{129, 64}, Shape{1100, 8}}) {
        Spec s = base_spec(mode, dtype, sh.n, sh.D, seed++);
        s.scale = 14.3;
        s.bias = mode_bias(mode);
        s.group = "low_precision";
        add_spec(s);
      }
    }
  }
}

// ---- The op-level contract -------------------------------------------------------------
void test_rejects_bad_inputs() {
  const auto f = at::TensorOptions().dtype(at::kFloat);
  const Tensor a = at::randn({4, 8}, f), b = at::randn({4, 8}, f), b6 = at::randn({6, 8}, f);
  const Tensor sc = at::full({}, 10.0, f), bi = at::zeros({}, f);
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b6, sc, bi, 0, true));   // symmetric, not square
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b, sc, bi, 1, true));    // symmetric with offset
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b6, sc, bi, 3, false));  // positives past column 6
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b6, sc, bi, -1, false));
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, at::randn({4, 7}, f), sc, bi, 0, true));
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b.to(at::kDouble), sc, bi, 0, true));
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b, sc.to(at::kDouble), bi, 0, true));
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a, b, sc.reshape({1}), bi, 0, true));
  RFT_CHECK_THROWS(c10::Error, siglip_fwd(a, b6, sc, bi, false));  // positives need m == n
  RFT_CHECK_THROWS(c10::Error, siglip_bwd(sc, a, b6, sc, bi, false));
  RFT_CHECK_THROWS(c10::Error, clip_fwd(a.to(at::kInt), b.to(at::kInt), sc, bi, 0, true));
  // The valid counterparts run.
  (void)clip_fwd(a, b6, sc, bi, 2, false);
  (void)siglip_fwd(a, b6, sc, bi, true);
}

// Non-contiguous inputs (the ops make them contiguous) give the contiguous results.
void test_noncontiguous() {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(77);
  const auto f = at::TensorOptions().dtype(at::kDouble);
  const Tensor at_ = at::randn({16, 37}, gen, f).t();          // [37, 16], strided
  const Tensor bt_ = at::randn({16, 37 * 2}, gen, f).t().narrow(0, 0, 37);
  const Tensor a = at_.contiguous(), b = bt_.contiguous();
  RFT_CHECK(!at_.is_contiguous() && !bt_.is_contiguous());
  const Tensor sc = at::full({}, 14.3, f), bi = at::full({}, -1.0, f), g = at::ones({}, f);
  const auto [l1, r1, c1] = clip_fwd(at_, bt_, sc, bi, 0, true);
  const auto [l2, r2, c2] = clip_fwd(a, b, sc, bi, 0, true);
  RFT_CHECK(at::allclose(l1, l2, 1e-12, 1e-12) && at::allclose(r1, r2, 1e-12, 1e-12) &&
            at::allclose(c1, c2, 1e-12, 1e-12));
  const auto g1 = clip_bwd(g, at_, bt_, sc, bi, r1, c1, 0, true);
  const auto g2 = clip_bwd(g, a, b, sc, bi, r2, c2, 0, true);
  RFT_CHECK(at::allclose(std::get<0>(g1), std::get<0>(g2), 1e-12, 1e-14));
  RFT_CHECK(at::allclose(std::get<1>(g1), std::get<1>(g2), 1e-12, 1e-14));
  const auto s1 = siglip_bwd(g, at_, bt_, sc, bi, false);
  const auto s2 = siglip_bwd(g, a, b, sc, bi, false);
  RFT_CHECK(at::allclose(std::get<0>(s1), std::get<0>(s2), 1e-12, 1e-14));
  RFT_CHECK(at::allclose(siglip_fwd(at_, bt_, sc, bi, false), siglip_fwd(a, b, sc, bi, false),
                         1e-12, 1e-12));
}

// The schemas registered by schemas.cpp, with CPU kernels from cpu/contrastive_cpu.cpp.
void test_schemas_registered() {
  for (const char* name :
       {"robustft_ext::clip_fwd", "robustft_ext::clip_bwd", "robustft_ext::siglip_fwd",
        "robustft_ext::siglip_bwd", "robustft_ext::clip_fwd_keep", "robustft_ext::clip_bwd_kept",
        "robustft_ext::siglip_fwd_keep", "robustft_ext::siglip_bwd_kept"}) {
    const auto h = c10::Dispatcher::singleton().findSchema({name, ""});
    RFT_CHECK_MSG(h.has_value(), name, " not registered");
    if (h) {
      RFT_CHECK_MSG(h->hasKernelForDispatchKey(c10::DispatchKey::CPU), name, " has no CPU kernel");
    }
  }
}

}  // namespace

RFT_CASES(ops) {
  register_mode(Mode::ClipSymmetric);
  register_mode(Mode::ClipOffset);
  register_mode(Mode::Siglip);
  register_mode(Mode::SiglipNegativeOnly);
  register_tile_edges();
  register_low_precision();
  add_case("op_contract/schemas_registered", &test_schemas_registered);
  add_case("op_contract/rejects_bad_inputs", &test_rejects_bad_inputs);
  add_case("op_contract/noncontiguous_inputs", &test_noncontiguous);
}
