// Fused CUDA kernels of a robust fine-tuning step's tile work (docs/maths.md, sections 1, 3
// and 9): the CUDA launchers of step_kernels.h (slerp_weights_cuda, step_lse_cuda,
// step_dlogits_cuda), on which step_ops.h builds the ops slerp*, m2mix_*, lipsum_*, dive_*
// and robust_step_*, registered here for the CUDA dispatch key (RFT_REGISTER_STEP_OPS, as
// cpu/step_cpu.cpp does for the CPU). This file holds the host side; step_device.cuh the
// __global__ kernels; contrastive_cuda.cu explains the tiling they share.
//
// Design
// ------
// The op body makes M = slerp(I, T; lam) as one [n, D] buffer (a double prologue, rounded to
// the workspace dtype: 16-bit for 16-bit inputs, the tile products' operand type); every
// n x n quantity lives only tile by tile inside these kernels or in the workspace chunks.
//  * step_lse (one launch; small merge kernels after it). A CTA streams its tiles: one
//    engine call per tile computes A = I M^T, B = T M^T and C = I T^T (the pairs that are
//    on) from shared slabs of I, T and M loaded once per K block. The true pair diag[p]
//    replaces A_pp and B_pp; the row LSEs are streamed; the column LSE of C is merged across
//    CTAs through the packed 64-bit atomicCAS state of clip_lse. For double inputs (no
//    128-bit CAS) the column LSE of C is instead the row LSE of C^T, a pass of the
//    contrastive clip_lse_kernel over (T, I).
//  * step_dlogits (one launch per row chunk): the same tiles of the chunk's rows, turned into
//    dA, dB, dC in the workspace (step_kernels.h gives the normalisation) with per-CTA
//    scale-gradient partials; step_ops.h's cuBLAS GEMMs take every gradient from the chunk.
// All launches go to the current stream; scales, lam and lse are read on the device, so no
// launcher synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "cuda/contrastive_device.cuh"
#include "cuda/step_device.cuh"
#include "cuda/tile_dispatch.h"
#include "cuda/tile_epilogue.cuh"
#include "step_kernels.h"
#include "step_ops.h"

namespace robustft {
namespace {

using namespace cuda_tiles;

void check_step_problem(const StepProblem& p) {
  TORCH_CHECK(p.I.is_cuda() && p.T.device() == p.I.device(),
              "robustft_ext: CUDA step kernels need CUDA tensors on one device");
  TORCH_CHECK(p.I.is_contiguous() && p.T.is_contiguous() && (!p.with_m2 || p.M.is_contiguous()),
              "robustft_ext: step features must be contiguous");
  TORCH_CHECK(!p.with_m2 || p.M.scalar_type() == workspace_dtype_cuda(p.I.scalar_type()),
              "robustft_ext: the mixed negatives must be in the workspace dtype");
}

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
  const bool col_atomic = p.with_clip && kFloat;
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
    auto kernel = step_lse_kernel<E, in_t, kM2, kClip, kClip && kFloat>;
    constexpr int smem = E::template smem_bytes<StepPairs<kM2, kClip>>();
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(ops, step_scalars<acc_t>(p),
                                                         plan.tiles_per_split,
                                                         part.data_ptr<acc_t>(), state_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      // Double: the column LSE of C = s_c I T^T is the row LSE of s_c T I^T.
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

void slerp_weights_cuda(const at::Tensor& cos, const at::Tensor& lam, at::Tensor& out) {
  TORCH_CHECK(cos.is_cuda() && lam.device() == cos.device() && out.device() == cos.device(),
              "robustft_ext: slerp_weights needs CUDA tensors on one device");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == 4 &&
                  out.size(1) == cos.numel() && out.scalar_type() == at::kDouble &&
                  cos.scalar_type() == at::kDouble && lam.scalar_type() == at::kDouble,
              "robustft_ext: slerp_weights takes double cos and lam and a contiguous [4, n] "
              "double output");
  const c10::cuda::CUDAGuard guard(cos.device());
  const at::Tensor c = cos.contiguous();
  const int64_t n = c.numel();
  slerp_weights_kernel<<<elementwise_blocks(n), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<double>(), lam.data_ptr<double>(), n, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void step_lse_cuda(const StepProblem& p, at::Tensor& lse) {
  check_step_problem(p);
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == p.n,
              "robustft_ext: lse must be a contiguous [4, n] tensor");
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepMmaShape>(p.I.scalar_type(), [&](auto e, auto in, auto) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    launch_step_lse<E, in_t>(p, lse);
  });
}

void step_dlogits_cuda(const StepProblem& p, const at::Tensor& lse, int64_t r0, at::Tensor& dA,
                       at::Tensor& dB, at::Tensor& dC, at::Tensor& stats) {
  check_step_problem(p);
  for (const at::Tensor* t : {&dA, &dB, &dC}) {
    TORCH_CHECK(!t->defined() || (t->is_contiguous() && t->size(1) == p.n &&
                                  t->scalar_type() == workspace_dtype_cuda(p.I.scalar_type()) &&
                                  t->device() == p.I.device()),
                "robustft_ext: dlogit chunks must be contiguous [rows, n] workspace slices");
  }
  const at::Tensor lse_c = lse.contiguous();
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepMmaShape>(p.I.scalar_type(), [&](auto e, auto in, auto ws) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    using ws_t = typename decltype(ws)::type;
    launch_step_dlogits<E, in_t, ws_t>(p, lse_c, r0, dA, dB, dC, stats);
  });
}

static const StepKernelSet kCudaStepKernels{&slerp_weights_cuda, &step_lse_cuda,
                                            &step_dlogits_cuda,
                                            GemmKernels{&gemm_acc_cuda, &workspace_dtype_cuda}};

RFT_REGISTER_STEP_OPS(CUDA, kCudaStepKernels)

}  // namespace robustft
