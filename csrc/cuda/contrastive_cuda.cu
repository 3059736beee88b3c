// Fused CUDA kernels of the contrastive losses (docs/maths.md, sections 1-2): the CUDA
// launchers of contrastive_kernels.h, registered for the CUDA dispatch key.
//
// Files: this one holds the host side (plans, checks, launches, registration);
// contrastive_device.cuh the __global__ kernels, written once over a tile engine;
// ffma_tile.cuh and mma_tile.cuh the two engines (CUDA cores, tensor cores);
// tile_epilogue.cuh the per-tile statistics; tile_dispatch.h the choice of engine;
// gemm_cuda.cu the cuBLAS GEMMs of the backward.
//
// Nothing of size n x m is ever materialised:
//  * clip_lse (one pass): every CTA owns BM rows and streams a range of column tiles
//    (gridDim.y splits the columns so that small batches still fill the device); each
//    row's online LSE state stays in registers and each split writes one partial state
//    per row, merged afterwards. With col_lse, each tile's column states over the CTA's
//    rows are merged into a packed (float m, float l) state per column by an atomicCAS
//    loop, in the order the CTAs finish. There is no 128-bit CAS, so for double inputs the
//    column LSE is a second pass on the transposed problem (double is the reference dtype,
//    not the fast path); under torch.use_deterministic_algorithms(True) float takes that
//    pass too, whose splits are merged in a fixed order.
//  * siglip_softplus_sum: the same tile loop; each CTA writes one double partial.
//  * contrastive_dlogits: the tiles of one row chunk are recomputed and their dlogits
//    written into the workspace chunk (16-bit inputs: rounded to the input dtype, as
//    flash-attention rounds dS); the CTAs' scale-gradient sums are written as partials.
//    contrastive_ops.h then multiplies the chunk into both gradients with cuBLAS.
// All launches go to the current stream; scale, bias and the lse vectors are read on the
// device, so no launcher synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "launcher_contract.h"
#include "cuda/contrastive_device.cuh"
#include "cuda/tile_dispatch.h"
#include "cuda/tile_epilogue.cuh"

namespace robustft {
namespace {

using namespace cuda_tiles;

// The engine's shared memory is the plan's (tile_plan.h), which the device check relies on.
static_assert(MmaEngine<ContrastiveMmaShape, Bf16Mma>::smem_bytes<OneDotPair>() ==
                  cuda_plan::dynamic_bytes(cuda_plan::kContrastive, cuda_plan::kContrastive.large) &&
              MmaEngine<ContrastiveMmaShapeSmall, Bf16Mma>::smem_bytes<OneDotPair>() ==
                  cuda_plan::dynamic_bytes(cuda_plan::kContrastive, cuda_plan::kContrastive.small),
              "tile_plan.h's contrastive shared memory differs from the engine's");

// out[r] = LSE over the columns of S = scale * P Q^T + bias (the rows of P), through row
// partials of each split. With col_state: also the packed column states.
template <class E, typename in_t, bool kColStats>
void run_row_lse(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                 const at::Tensor& bias, at::Tensor& out, unsigned long long* col_state) {
  using acc_t = typename E::acc_t;
  const int64_t n = P.size(0), m = Q.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const EngineInputs in = engine_inputs<E>({P}, {Q});
  const TileOperands<in_t> ops = operands_of<in_t>(in, n, m);
  const SplitPlan plan = plan_splits(n, m, E::BM, E::BN, int64_t(1) << 20);
  at::Tensor part = at::empty({plan.splits, n, 2}, P.options().dtype(acc_dtype(P.scalar_type())));
  auto kernel = clip_lse_kernel<E, in_t, kColStats>;
  constexpr int smem = E::template smem_bytes<OneDotPair>();
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(ops, scale.data_ptr<acc_t>(),
                                                       bias.data_ptr<acc_t>(), plan.tiles_per_split,
                                                       part.data_ptr<acc_t>(), col_state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
      part.data_ptr<acc_t>(), plan.splits, n, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class E, typename in_t>
void launch_clip_lse(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                     const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  using acc_t = typename E::acc_t;
  const int64_t m = Q.size(0);
  if (!col_lse.defined()) {
    run_row_lse<E, in_t, false>(P, Q, scale, bias, row_lse, nullptr);
    return;
  }
  if constexpr (std::is_same<acc_t, float>::value) {
    if (at::globalContext().deterministicAlgorithms()) {
      // A fixed order: the column LSE is the row LSE of S^T, its splits merged in order.
      run_row_lse<E, in_t, false>(P, Q, scale, bias, row_lse, nullptr);
      run_row_lse<E, in_t, false>(Q, P, scale, bias, col_lse, nullptr);
      return;
    }
    // One pass: row states in the kernel, column states merged atomically (in the order the
    // CTAs finish, so the last bits may differ from run to run).
    const auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor state = at::empty({m}, P.options().dtype(at::kLong));
    auto* state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
    init_col_states_kernel<<<elementwise_blocks(m), 256, 0, stream>>>(state_p, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    run_row_lse<E, in_t, true>(P, Q, scale, bias, row_lse, state_p);
    finalize_col_states_kernel<<<elementwise_blocks(m), 256, 0, stream>>>(
        state_p, m, col_lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Double: no 64-bit-pair atomics; the column LSE is the row LSE of S^T.
    run_row_lse<E, in_t, false>(P, Q, scale, bias, row_lse, nullptr);
    run_row_lse<E, in_t, false>(Q, P, scale, bias, col_lse, nullptr);
  }
}

template <class E, typename in_t>
void launch_softplus_sum(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                         const at::Tensor& bias, at::Tensor& out) {
  using acc_t = typename E::acc_t;
  const int64_t n = P.size(0), m = Q.size(0);
  const EngineInputs in = engine_inputs<E>({P}, {Q});
  const TileOperands<in_t> ops = operands_of<in_t>(in, n, m);
  const SplitPlan plan = plan_splits(n, m, E::BM, E::BN, int64_t(1) << 20);
  at::Tensor partial = at::empty({plan.row_blocks * plan.splits}, P.options().dtype(at::kDouble));
  auto kernel = softplus_sum_kernel<E, in_t>;
  constexpr int smem = E::template smem_bytes<OneDotPair>();
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid_of(plan), E::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      ops, scale.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), plan.tiles_per_split,
      partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out.copy_(partial.sum());
}

template <class E, typename in_t, typename ws_t>
void launch_dlogits(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                    const at::Tensor& scale, const at::Tensor& bias, int64_t r0, at::Tensor& ds,
                    at::Tensor& stats) {
  using acc_t = typename E::acc_t;
  const int64_t n = P.size(0), m = Q.size(0), rows = ds.size(0);
  DlogitParams<acc_t> prm;
  prm.w_row = static_cast<acc_t>(spec.w_row);
  prm.w_col = spec.siglip ? acc_t(0) : static_cast<acc_t>(spec.w_col);
  prm.w_pos = spec.siglip ? acc_t(0) : static_cast<acc_t>(spec.w_pos);
  prm.row_lse = nullptr;
  prm.col_lse = nullptr;
  prm.has_positives = spec.has_positives;
  prm.pos_offset = spec.pos_offset;
  if (!spec.siglip && prm.w_row != acc_t(0)) prm.row_lse = spec.row_lse.data_ptr<acc_t>();
  if (!spec.siglip && prm.w_col != acc_t(0)) prm.col_lse = spec.col_lse.data_ptr<acc_t>();
  const EngineInputs in = engine_inputs<E>({P}, {Q});
  const TileOperands<in_t> ops = operands_of<in_t>(in, n, m);
  const SplitPlan plan = plan_splits(rows, m, E::BM, E::BN, int64_t(1) << 20);
  at::Tensor stats_part = at::empty({plan.row_blocks * plan.splits, 2}, P.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel) {
    constexpr int smem = E::template smem_bytes<OneDotPair>();
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(
        ops, scale.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), prm, r0, rows, plan.tiles_per_split,
        ds.data_ptr<ws_t>(), stats_part.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (spec.siglip) {
    launch(dlogits_kernel<E, in_t, ws_t, true>);
  } else {
    launch(dlogits_kernel<E, in_t, ws_t, false>);
  }
  stats += stats_part.sum(0).to(stats.scalar_type());
}

}  // namespace

// =================================================================================
// The launchers (contrastive_kernels.h)

void clip_lse_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                   const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  check_tile_operands(P, Q, scale, bias, c10::kCUDA);
  check_acc_vector(row_lse, P.size(0), P, "row_lse");
  if (col_lse.defined()) check_acc_vector(col_lse, Q.size(0), P, "col_lse");
  const c10::cuda::CUDAGuard guard(P.device());
  dispatch_engine<ContrastiveShapes>(P.scalar_type(), [&](auto e, auto in, auto) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    launch_clip_lse<E, in_t>(P, Q, scale, bias, row_lse, col_lse);
  });
}

void siglip_softplus_sum_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                              const at::Tensor& bias, at::Tensor& out) {
  check_tile_operands(P, Q, scale, bias, c10::kCUDA);
  check_acc_vector(out, 1, P, "out");
  const c10::cuda::CUDAGuard guard(P.device());
  dispatch_engine<ContrastiveShapes>(P.scalar_type(), [&](auto e, auto in, auto) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    launch_softplus_sum<E, in_t>(P, Q, scale, bias, out);
  });
}

void contrastive_dlogits_cuda(const DlogitSpec& spec, const at::Tensor& P, const at::Tensor& Q,
                              const at::Tensor& scale, const at::Tensor& bias, int64_t r0,
                              at::Tensor& ds, at::Tensor& stats) {
  check_tile_operands(P, Q, scale, bias, c10::kCUDA);
  check_dlogits(spec, P, Q, r0, ds, stats, workspace_dtype_cuda(P.scalar_type()));
  TORCH_CHECK(!spec.ds_holds_dots,
              "robustft_ext: the CUDA kernels recompute their dot products (none are kept)");
  if (ds.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(P.device());
  dispatch_engine<ContrastiveShapes>(P.scalar_type(), [&](auto e, auto in, auto ws) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    using ws_t = typename decltype(ws)::type;
    launch_dlogits<E, in_t, ws_t>(spec, P, Q, scale, bias, r0, ds, stats);
  });
}

static const KernelSet kCudaKernels{&clip_lse_cuda, &siglip_softplus_sum_cuda,
                                    &contrastive_dlogits_cuda,
                                    GemmKernels{&gemm_acc_cuda, &workspace_dtype_cuda}};

RFT_REGISTER_CONTRASTIVE_OPS(robustft_ext, CUDA, kCudaKernels)

}  // namespace robustft
