// The ops' host code under CUDA's rules, on CPU tensors: the namespace robustft_cuda_rules
// holds every loss op of robustft_ext (the same schemas, schemas.cpp) with the same op
// bodies (contrastive_ops.h, step_ops.h) over launchers that keep the CUDA launchers'
// contract and compute with the CPU kernels:
//  * the workspace dtype is CUDA's (tensor_core_workspace_dtype: 16-bit inputs give 16-bit
//    dlogit chunks and mixed negatives);
//  * every launcher checks its arguments as the CUDA launcher does (launcher_contract.h),
//    gemm_acc as cuBLAS would take them (one operand dtype);
//  * the launchers CUDA has, and only those: no kept dot products; the Gram formulation's
//    (section 9.4 of docs/maths.md) with 16-bit strips.
// So a call the host code gets wrong for CUDA (a 16-bit operand beside a float one, a chunk
// of the wrong dtype) fails in the CPU tests, and the op bodies' memory under CUDA's choices
// can be measured on the CPU (tests/). The results are the CPU kernels' (16-bit chunks
// rounded from them), to the tolerances of the CUDA kernels.
//
// A test hook, not a backend: robustft_ext's Python side never dispatches to it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "launcher_contract.h"
#include "schemas.h"
#include "step_kernels.h"
#include "step_ops.h"

namespace robustft {
namespace {

// Rows per block of the float scratch a 16-bit chunk is rounded from: the scratch stays
// small beside the chunk it fills.
constexpr int64_t kScratchRows = 32;

// The CPU kernels form float (double) dlogits; a 16-bit chunk takes them rounded, block by
// block of rows: fill(r0 + i, block) forms rows [r0 + i, r0 + i + block.size(0)).
template <typename Fill>
void fill_rounded(at::Tensor& chunk, int64_t r0, Fill&& fill) {
  const auto acc = acc_dtype(chunk.scalar_type());
  if (chunk.scalar_type() == acc) {
    fill(r0, chunk);
    return;
  }
  const int64_t rows = chunk.size(0);
  at::Tensor scratch = at::empty({std::min(rows, kScratchRows), chunk.size(1)},
                                 chunk.options().dtype(acc));
  for (int64_t i = 0; i < rows; i += kScratchRows) {
    const int64_t r = std::min(kScratchRows, rows - i);
    at::Tensor block = scratch.narrow(0, 0, r);
    fill(r0 + i, block);
    chunk.narrow(0, i, r).copy_(block);
  }
}

// The CPU tile launchers take the mixed negatives in their own workspace dtype.
StepProblem as_cpu_problem(const StepProblem& p) {
  StepProblem q = p;
  if (p.with_m2) q.M = p.M.to(workspace_dtype_cpu(p.I.scalar_type()));
  return q;
}

}  // namespace

at::ScalarType workspace_dtype_cuda_rules(at::ScalarType t) {
  return tensor_core_workspace_dtype(t);
}

void gemm_acc_cuda_rules(const at::Tensor& A, bool transpose_a, const at::Tensor& B,
                         bool transpose_b, const at::Tensor& alpha, double beta,
                         at::Tensor& out) {
  check_gemm_acc(A, transpose_a, B, transpose_b, alpha, beta, out, c10::kCPU);
  // cuBLAS multiplies 16-bit operands exactly and accumulates in float: the float GEMM of
  // the widened operands forms the same sums (in another order).
  const at::Tensor a = A.to(out.scalar_type()), b = B.to(out.scalar_type());
  out.addmm_(transpose_a ? a.t() : a, transpose_b ? b.t() : b, beta, alpha.item());
}

void clip_lse_cuda_rules(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                         const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  clip_lse_cpu(P, Q, scale, bias, row_lse, col_lse);  // the checks are the CUDA launcher's
}

void siglip_softplus_sum_cuda_rules(const at::Tensor& P, const at::Tensor& Q,
                                    const at::Tensor& scale, const at::Tensor& bias,
                                    at::Tensor& out) {
  siglip_softplus_sum_cpu(P, Q, scale, bias, out);
}

void contrastive_dlogits_cuda_rules(const DlogitSpec& spec, const at::Tensor& P,
                                    const at::Tensor& Q, const at::Tensor& scale,
                                    const at::Tensor& bias, int64_t r0, at::Tensor& ds,
                                    at::Tensor& stats) {
  check_tile_operands(P, Q, scale, bias, c10::kCPU);
  check_dlogits(spec, P, Q, r0, ds, stats, workspace_dtype_cuda_rules(P.scalar_type()));
  TORCH_CHECK(!spec.ds_holds_dots,
              "robustft_ext: the CUDA kernels recompute their dot products (none are kept)");
  fill_rounded(ds, r0, [&](int64_t row, at::Tensor& block) {
    contrastive_dlogits_cpu(spec, P, Q, scale, bias, row, block, stats);
  });
}

void step_lse_cuda_rules(const StepProblem& p, at::Tensor& lse) {
  check_step_problem(p, workspace_dtype_cuda_rules(p.I.scalar_type()), c10::kCPU);
  check_step_lse(p, lse);
  TORCH_CHECK(!p.keep.defined(), "robustft_ext: the CUDA kernels keep no dot products");
  step_lse_cpu(as_cpu_problem(p), lse);
}

void step_dlogits_cuda_rules(const StepProblem& p, const at::Tensor& lse, int64_t r0,
                             at::Tensor& dA, at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  const auto ws = workspace_dtype_cuda_rules(p.I.scalar_type());
  check_step_problem(p, ws, c10::kCPU);
  check_step_lse(p, lse);
  const int64_t rows = check_step_chunks(p, r0, dA, dB, dC, ws);
  check_acc_vector(stats, 2, p.I, "stats");
  TORCH_CHECK(!p.keep.defined(), "robustft_ext: the CUDA kernels keep no dot products");
  const StepProblem q = as_cpu_problem(p);
  const auto acc = acc_dtype(p.I.scalar_type());
  if (ws == acc) {
    step_dlogits_cpu(q, lse, r0, dA, dB, dC, stats);
    return;
  }
  // Float scratch for each present chunk, rounded into it block by block of rows.
  const auto opts = p.I.options().dtype(acc);
  for (int64_t i = 0; i < rows; i += kScratchRows) {
    const int64_t r = std::min(kScratchRows, rows - i);
    auto scratch = [&](const at::Tensor& t) {
      return t.defined() ? at::empty({r, p.n}, opts) : at::Tensor();
    };
    at::Tensor a = scratch(dA), b = scratch(dB), c = scratch(dC);
    step_dlogits_cpu(q, lse, r0 + i, a, b, c, stats);
    if (a.defined()) dA.narrow(0, i, r).copy_(a);
    if (b.defined()) dB.narrow(0, i, r).copy_(b);
    if (c.defined()) dC.narrow(0, i, r).copy_(c);
  }
}

void mix_rows_cuda_rules(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                         at::Tensor& M, at::Tensor& weights) {
  check_mix(I, T, lam, M, weights, workspace_dtype_cuda_rules(I.scalar_type()), c10::kCPU);
  mix_rows_cpu(I, T, lam, M, weights);
}

void mix_backward_cuda_rules(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T,
                             const at::Tensor& weights, const at::Tensor& g_pair,
                             at::Tensor& grad_I, at::Tensor& grad_T) {
  mix_backward_cpu(dM, I, T, weights, g_pair, grad_I, grad_T);
}

void dive_sums_cuda_rules(const DiveInputs& d, at::Tensor& sums, at::Tensor& mean) {
  dive_sums_cpu(d, sums, mean);
}

void dive_grads_cuda_rules(const DiveInputs& d, const at::Tensor& w_a, const at::Tensor& w_p,
                           at::Tensor& grad_fi, at::Tensor& grad_ft) {
  dive_grads_cpu(d, w_a, w_p, grad_fi, grad_ft);
}

void pair_backward_cuda_rules(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T,
                              at::Tensor& grad_I, at::Tensor& grad_T) {
  pair_backward_cpu(coef, I, T, grad_I, grad_T);
}

void gram_lse_cuda_rules(const GramProblem& p, at::Tensor& lse) { gram_lse_cpu(p, lse); }

void gram_strip_cuda_rules(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                           const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S,
                           at::Tensor& stats, at::Tensor& u) {
  const auto ws = workspace_dtype_cuda_rules(p.I.scalar_type());
  TORCH_CHECK(S.is_contiguous() && S.dim() == 3 && S.size(0) == 4 && S.scalar_type() == ws,
              "robustft_ext: the Gram strip must be a contiguous [4, rows, n - r0] ", ws,
              " tensor (the workspace dtype)");
  if (S.scalar_type() == acc_dtype(p.I.scalar_type())) {
    gram_strip_cpu(p, lse, r0, f_m2, f_clip, S, stats, u);
    return;
  }
  // A 16-bit strip: the CPU kernel's float strip, rounded into it.
  at::Tensor strip = at::empty(S.sizes(), S.options().dtype(acc_dtype(p.I.scalar_type())));
  gram_strip_cpu(p, lse, r0, f_m2, f_clip, strip, stats, u);
  S.copy_(strip);
}

static const KernelSet kCudaRulesKernels{
    &clip_lse_cuda_rules, &siglip_softplus_sum_cuda_rules, &contrastive_dlogits_cuda_rules,
    GemmKernels{&gemm_acc_cuda_rules, &workspace_dtype_cuda_rules}};

static const StepKernelSet kCudaRulesStepKernels{
    &step_lse_cuda_rules, &step_dlogits_cuda_rules,
    GemmKernels{&gemm_acc_cuda_rules, &workspace_dtype_cuda_rules},
    &mix_rows_cuda_rules, &mix_backward_cuda_rules, &dive_sums_cuda_rules,
    &dive_grads_cuda_rules, &pair_backward_cuda_rules, &gram_lse_cuda_rules,
    &gram_strip_cuda_rules, &atomic_gram_serves, kGpuGramStripRows};

TORCH_LIBRARY(robustft_cuda_rules, m) { define_loss_ops(m); }

RFT_REGISTER_CONTRASTIVE_OPS(robustft_cuda_rules, CPU, kCudaRulesKernels)
RFT_REGISTER_STEP_OPS(robustft_cuda_rules, CPU, kCudaRulesStepKernels)

}  // namespace robustft
