// Fused CUDA kernels of a robust fine-tuning step (docs/maths.md, sections 1, 3, 4 and 9):
// the CUDA launchers of step_kernels.h (step_lse_cuda, step_dlogits_cuda and the row passes
// mix_rows_cuda, mix_backward_cuda, dive_sums_cuda, dive_grads_cuda, pair_backward_cuda), on
// which step_ops.h builds the ops slerp*, m2mix_*, lipsum_*, dive_* and robust_step_*,
// registered here for the CUDA dispatch key (RFT_REGISTER_STEP_OPS, as cpu/step_cpu.cpp does
// for the CPU) with the Gram launchers of gram_cuda.cu. This file holds the host side;
// step_device.cuh the tile kernels, row_device.cuh (and gram_device.cuh's pair_backward) the
// row kernels; contrastive_cuda.cu explains the tiling they share.
//
// Design
// ------
// The op body makes M = slerp(I, T; lam) as one [n, D] buffer (mix_rows: a double prologue,
// rounded to the workspace dtype: 16-bit for 16-bit inputs, the tile products' operand
// type); every n x n quantity lives only tile by tile inside these kernels or in the
// workspace chunks.
//  * step_lse (one launch; small merge kernels after it). A CTA streams its tiles: one
//    engine call per tile computes A = I M^T, B = T M^T and C = I T^T (the pairs that are
//    on) from shared slabs of I, T and M loaded once per K block. The true pair diag[p]
//    replaces A_pp and B_pp; the row LSEs are streamed; the column LSE of C is merged across
//    CTAs through the packed 64-bit atomicCAS state of clip_lse. For double inputs (no
//    128-bit CAS), and for every dtype under torch.use_deterministic_algorithms(True), the
//    column LSE of C is instead the row LSE of C^T, a pass of the contrastive
//    clip_lse_kernel over (T, I) whose splits merge in a fixed order.
//  * step_dlogits (one launch per row chunk): the same tiles of the chunk's rows, turned into
//    dA, dB, dC in the workspace (step_kernels.h gives the normalisation) with per-CTA
//    scale-gradient partials; step_ops.h's cuBLAS GEMMs take every gradient from the chunk.
// All launches go to the current stream; scales, lam and lse are read on the device, so no
// launcher synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "cuda/contrastive_device.cuh"
#include "cuda/gram_device.cuh"
#include "cuda/row_device.cuh"
#include "cuda/step_device.cuh"
#include "cuda/tile_dispatch.h"
#include "cuda/tile_epilogue.cuh"
#include "launcher_contract.h"
#include "step_kernels.h"
#include "step_ops.h"

namespace robustft {
namespace {

using namespace cuda_tiles;

// The engine's shared memory with every term on is the plan's (tile_plan.h).
static_assert(MmaEngine<StepMmaShape, Bf16Mma>::smem_bytes<StepPairs<true, true>>() ==
                  cuda_plan::dynamic_bytes(cuda_plan::kStep, cuda_plan::kStep.large) &&
              MmaEngine<StepMmaShapeSmall, Bf16Mma>::smem_bytes<StepPairs<true, true>>() ==
                  cuda_plan::dynamic_bytes(cuda_plan::kStep, cuda_plan::kStep.small),
              "tile_plan.h's step shared memory differs from the engine's");

template <typename acc_t>
StepScalars<acc_t> step_scalars(const StepProblem& p) {
  StepScalars<acc_t> sc{nullptr, nullptr, nullptr};
  if (p.with_m2) {
    sc.m2_scale = p.m2_scale.data_ptr<acc_t>();
    sc.diag = p.diag.data_ptr<acc_t>();
  }
  if (p.with_clip) sc.clip_scale = p.clip_scale.data_ptr<acc_t>();
  return sc;
}

// The engine inputs of a step: x = {I, T}, y = {M, T} with m^2; x = {I}, y = {T} for CLIP.
template <class E>
EngineInputs step_inputs(const StepProblem& p) {
  if (p.with_m2) return engine_inputs<E>({p.I, p.T}, {p.M, p.T});
  return engine_inputs<E>({p.I}, {p.T});
}

// Calls fn(StepPairs-shaped bool tags) for the step's term combination.
template <class Fn>
void dispatch_terms(const StepProblem& p, Fn&& fn) {
  if (p.with_m2 && p.with_clip) {
    fn(std::true_type{}, std::true_type{});
  } else if (p.with_m2) {
    fn(std::true_type{}, std::false_type{});
  } else {
    TORCH_CHECK(p.with_clip, "robustft_ext: a step's tile work needs m^2 or CLIP");
    fn(std::false_type{}, std::true_type{});
  }
}

template <class E, typename in_t>
void launch_step_lse(const StepProblem& p, at::Tensor& lse) {
  using acc_t = typename E::acc_t;
  const int64_t n = p.n;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const EngineInputs in = step_inputs<E>(p);
  const TileOperands<in_t> ops = operands_of<in_t>(in, n, n);
  const SplitPlan plan = plan_splits(n, n, E::BM, E::BN, int64_t(1) << 20);
  const auto opts = p.I.options().dtype(acc_dtype(p.I.scalar_type()));
  at::Tensor part = at::empty({3, plan.splits, n, 2}, opts);
  constexpr bool kFloat = std::is_same<acc_t, float>::value;
  // The column LSE of C by atomics (the CTAs' merge order may change its last bits), unless
  // torch.use_deterministic_algorithms(True) asks for a fixed order (the transposed pass).
  const bool col_atomic =
      p.with_clip && kFloat && !at::globalContext().deterministicAlgorithms();
  at::Tensor state;
  unsigned long long* state_p = nullptr;
  if (col_atomic) {
    state = at::empty({n}, p.I.options().dtype(at::kLong));
    state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
    init_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(state_p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dispatch_terms(p, [&](auto m2, auto clip) {
    constexpr bool kM2 = decltype(m2)::value, kClip = decltype(clip)::value;
    auto launch = [&](auto kernel) {
      constexpr int smem = E::template smem_bytes<StepPairs<kM2, kClip>>();
      allow_dynamic_smem(kernel, smem);
      kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(ops, step_scalars<acc_t>(p),
                                                           plan.tiles_per_split,
                                                           part.data_ptr<acc_t>(), state_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (col_atomic) {
      launch(step_lse_kernel<E, in_t, kM2, kClip, kClip && kFloat>);
    } else {
      launch(step_lse_kernel<E, in_t, kM2, kClip, false>);
    }
  });
  acc_t* l = lse.data_ptr<acc_t>();
  auto merge = [&](int term, acc_t* out) {
    merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
        part[term].data_ptr<acc_t>(), plan.splits, n, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.with_m2) {
    merge(0, l);
    merge(1, l + n);
  }
  if (p.with_clip) {
    merge(2, l + 2 * n);
    if (col_atomic) {
      finalize_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(
          state_p, n, reinterpret_cast<float*>(l + 3 * n));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // Double, or a deterministic run: the column LSE of C = s_c I T^T is the row LSE of
      // s_c T I^T.
      const at::Tensor zero = at::zeros({}, opts);
      at::Tensor col = lse[3], none;
      clip_lse_cuda(p.T, p.I, p.clip_scale, zero, col, none);
    }
  }
}

template <class E, typename in_t, typename ws_t>
void launch_step_dlogits(const StepProblem& p, const at::Tensor& lse, int64_t r0, at::Tensor& dA,
                         at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  using acc_t = typename E::acc_t;
  const int64_t n = p.n;
  const int64_t rows = p.with_m2 ? dA.size(0) : dC.size(0);
  const EngineInputs in = step_inputs<E>(p);
  const TileOperands<in_t> ops = operands_of<in_t>(in, n, n);
  const SplitPlan plan = plan_splits(rows, n, E::BM, E::BN, int64_t(1) << 20);
  at::Tensor stats_part = at::empty({plan.row_blocks * plan.splits, 2}, p.I.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<ws_t>() : nullptr; };
  dispatch_terms(p, [&](auto m2, auto clip) {
    constexpr bool kM2 = decltype(m2)::value, kClip = decltype(clip)::value;
    auto kernel = step_dlogits_kernel<E, in_t, ws_t, kM2, kClip>;
    constexpr int smem = E::template smem_bytes<StepPairs<kM2, kClip>>();
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(
        ops, step_scalars<acc_t>(p), lse.data_ptr<acc_t>(), r0, rows, plan.tiles_per_split,
        ptr(dA), ptr(dB), ptr(dC), stats_part.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  stats += stats_part.sum(0).to(stats.scalar_type());
}

}  // namespace

// =================================================================================
// The launchers (step_kernels.h)

void step_lse_cuda(const StepProblem& p, at::Tensor& lse) {
  check_step_problem(p, workspace_dtype_cuda(p.I.scalar_type()), c10::kCUDA);
  check_step_lse(p, lse);
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepShapes>(p.I.scalar_type(), [&](auto e, auto in, auto) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    launch_step_lse<E, in_t>(p, lse);
  });
}

void step_dlogits_cuda(const StepProblem& p, const at::Tensor& lse, int64_t r0, at::Tensor& dA,
                       at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  check_step_problem(p, workspace_dtype_cuda(p.I.scalar_type()), c10::kCUDA);
  check_step_lse(p, lse);
  check_step_chunks(p, r0, dA, dB, dC, workspace_dtype_cuda(p.I.scalar_type()));
  check_acc_vector(stats, 2, p.I, "stats");
  const at::Tensor& lse_c = lse;
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepShapes>(p.I.scalar_type(), [&](auto e, auto in, auto ws) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    using ws_t = typename decltype(ws)::type;
    launch_step_dlogits<E, in_t, ws_t>(p, lse_c, r0, dA, dB, dC, stats);
  });
}

// The row passes: a warp per row (row_device.cuh), as many blocks as fill the device twice.
namespace {

unsigned row_blocks(int64_t rows) {
  const int64_t fill = 2 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                       (2048 / kRowThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(rows, kRowWarps), fill)));
}

// Calls f(in_t{}) with the features' element type.
template <typename F>
void dispatch_features(at::ScalarType t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "robustft_row_pass",
                                  [&] { f(scalar_t{}); });
}

}  // namespace

void mix_rows_cuda(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam, at::Tensor& M,
                   at::Tensor& weights) {
  check_mix(I, T, lam, M, weights, workspace_dtype_cuda(I.scalar_type()), c10::kCUDA);
  const c10::cuda::CUDAGuard guard(I.device());
  const int64_t n = I.size(0), D = I.size(1);
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_features(I.scalar_type(), [&](auto in) {
    using in_t = decltype(in);
    auto launch = [&](auto out) {
      using out_t = decltype(out);
      mix_rows_kernel<in_t, out_t><<<row_blocks(n), kRowThreads, 0, stream>>>(
          I.data_ptr<in_t>(), T.data_ptr<in_t>(), lam.data_ptr<double>(), n, D,
          M.defined() ? M.data_ptr<out_t>() : nullptr, weights.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!M.defined() || M.scalar_type() == I.scalar_type()) {
      launch(in_t{});
    } else if (M.scalar_type() == at::kDouble) {
      launch(double{});
    } else {
      launch(float{});
    }
  });
}

void mix_backward_cuda(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T,
                       const at::Tensor& weights, const at::Tensor& g_pair, at::Tensor& grad_I,
                       at::Tensor& grad_T) {
  check_mix_backward(dM, I, T, weights, g_pair, grad_I, grad_T, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(I.device());
  const int64_t n = I.size(0), D = I.size(1);
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_features(I.scalar_type(), [&](auto in) {
    using in_t = decltype(in);
    using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
    mix_backward_kernel<in_t, acc_t><<<row_blocks(n), kRowThreads, 0, stream>>>(
        dM.data_ptr<acc_t>(), I.data_ptr<in_t>(), T.data_ptr<in_t>(), weights.data_ptr<double>(),
        g_pair.data_ptr<acc_t>(), n, D, grad_I.data_ptr<acc_t>(), grad_T.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dive_sums_cuda(const DiveInputs& d, at::Tensor& sums, at::Tensor& mean) {
  check_dive(d, c10::kCUDA);
  check_acc_vector(sums, 2, d.fi, "sums");
  check_acc_vector(mean, d.fi.size(1), d.fi, "mean");
  const c10::cuda::CUDAGuard guard(d.fi.device());
  const int64_t B = d.fi.size(0), D = d.fi.size(1), blocks = ceil_div(B, kDiveRows);
  TORCH_CHECK(blocks <= INT32_MAX, "robustft_ext: too many DiVE rows for one launch: ", B);
  const auto dopts = d.fi.options().dtype(at::kDouble);
  at::Tensor part = at::empty({blocks, 2}, dopts), col = at::empty({blocks, D}, dopts);
  dispatch_features(d.fi.scalar_type(), [&](auto in) {
    using in_t = decltype(in);
    using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
    dive_sums_kernel<in_t, acc_t><<<static_cast<unsigned>(blocks), kRowThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        d.fi.data_ptr<in_t>(), d.ft.data_ptr<in_t>(), d.pi.data_ptr<in_t>(), d.pt.data_ptr<in_t>(),
        d.center.data_ptr<acc_t>(), B, D, part.data_ptr<double>(), col.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sums.copy_(part.sum(0));
  mean.copy_(col.sum(0) / (2.0 * double(B)));
}

void dive_grads_cuda(const DiveInputs& d, const at::Tensor& w_a, const at::Tensor& w_p,
                     at::Tensor& grad_fi, at::Tensor& grad_ft) {
  check_dive_grads(d, w_a, w_p, grad_fi, grad_ft, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(d.fi.device());
  const int64_t count = d.fi.numel();
  if (count == 0) return;
  dispatch_features(d.fi.scalar_type(), [&](auto in) {
    using in_t = decltype(in);
    using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
    dive_grads_kernel<in_t, acc_t><<<elementwise_blocks(count), kRowThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        d.fi.data_ptr<in_t>(), d.ft.data_ptr<in_t>(), d.pi.data_ptr<in_t>(), d.pt.data_ptr<in_t>(),
        d.center.data_ptr<acc_t>(), w_a.data_ptr<acc_t>(), w_p.data_ptr<acc_t>(), d.fi.size(0),
        d.fi.size(1), grad_fi.data_ptr<acc_t>(), grad_ft.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pair_backward_cuda(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T,
                        at::Tensor& grad_I, at::Tensor& grad_T) {
  check_mix_pair(I, T, c10::kCUDA);
  const auto acc = acc_dtype(I.scalar_type());
  check_acc_vector(coef, I.size(0), I, "coef");
  for (const at::Tensor* t : {&grad_I, &grad_T}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == I.sizes() && t->scalar_type() == acc &&
                    t->device() == I.device(),
                "robustft_ext: pair_backward takes contiguous [n, D] ", acc, " gradients on ",
                I.device());
  }
  const c10::cuda::CUDAGuard guard(I.device());
  const int64_t n = I.size(0), D = I.size(1);
  if (n == 0) return;
  dispatch_features(I.scalar_type(), [&](auto in) {
    using in_t = decltype(in);
    using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
    pair_backward_kernel<in_t, acc_t><<<row_blocks(n), kRowThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        coef.data_ptr<acc_t>(), I.data_ptr<in_t>(), T.data_ptr<in_t>(), n, D,
        grad_I.data_ptr<acc_t>(), grad_T.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

static const StepKernelSet kCudaStepKernels{&step_lse_cuda,
                                            &step_dlogits_cuda,
                                            GemmKernels{&gemm_acc_cuda, &workspace_dtype_cuda},
                                            &mix_rows_cuda,
                                            &mix_backward_cuda,
                                            &dive_sums_cuda,
                                            &dive_grads_cuda,
                                            &pair_backward_cuda,
                                            &gram_lse_cuda,
                                            &gram_strip_cuda,
                                            &atomic_gram_serves,
                                            kGpuGramStripRows};

RFT_REGISTER_STEP_OPS(robustft_ext, CUDA, kCudaStepKernels)

}  // namespace robustft
