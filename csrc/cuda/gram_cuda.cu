// The CUDA launchers of the symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md,
// section 9.4; step_kernels.h: gram_lse_cuda and gram_strip_cuda; launcher_contract.h's
// atomic_gram_serves says when the op body may take them). The kernels are gram_device.cuh's; step_cuda.cu
// registers these launchers with the step's others (and holds pair_backward_cuda, a row pass).
//
// Design
// ------
//  * gram_lse (one launch, with a state initialisation before and a finalisation after): a
//    triangular schedule. The tiles on and above the diagonal are numbered row block by row
//    block and every CTA takes the same count of consecutive numbers (GramTriangle), about
//    two CTAs per multiprocessor in all, so the triangle is balanced whatever the shape of
//    its rows. Each tile computes G_II, G_IT, G_TI, G_TT on the step's tile engine and
//    shapes (two row and two column slabs, as StepPairs<true, true>) and folds both
//    orientations: the direct one into the row states of its rows (registers, merged when
//    the CTA leaves the row block), the transposed one into the row states of its columns.
//    All four statistics (LSE of A, B and C by rows, C by columns) are packed (float m,
//    float l) states merged by 64-bit atomicCAS, as clip_lse's column LSE is: the order in
//    which CTAs merge changes the last bits, so the forward is not deterministic.
//  * gram_strip (one launch per row strip, a merge after it): a grid of row blocks x column
//    splits over the strip, as step_dlogits. S is written once per entry; the scale sums are
//    per-CTA double partials summed in CTA order; u's column sums are per-CTA (per-warp for
//    the row sums) partials added in a fixed order by gram_u_merge_kernel: no atomics, so
//    the strip is deterministic.
// Not taken: double inputs (no packed pair of doubles fits a 64-bit CAS) and
// torch.use_deterministic_algorithms(True) (the forward's atomics); atomic_gram_serves
// answers false for them and the op body takes the three-product design.
//
// Partial buffers of a strip of R rows (acc dtype unless said): stats [CTAs, 2] double;
// row sums [splits x kRowWarps, 2, R] with splits about 2 multiprocessors / ceil(R / BM) (at
// least 1): about 2 kRowWarps max(R, 2 multiprocessors x BM) values, whatever n is; column
// sums [ceil(R / BM), 2, n - r0 - R]: one value per 2 BM entries of the strip's S when BM
// divides R (a float per 128 or 256 bf16 entries: 1 / BM of the S workspace's bytes, at most
// 1.6%; 1 / (2 BM) for float S).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/gram_device.cuh"
#include "cuda/tile_dispatch.h"
#include "cuda/tile_epilogue.cuh"
#include "cuda/tile_shapes.cuh"
#include "launcher_contract.h"
#include "step_kernels.h"

namespace robustft {

namespace {

using namespace cuda_tiles;

// The Gram tile's shared memory is the step plan's (two row and two column slabs).
static_assert(MmaEngine<StepMmaShape, Bf16Mma>::smem_bytes<GramPairs>() ==
                      cuda_plan::dynamic_bytes(cuda_plan::kStep, cuda_plan::kStep.large) &&
                  MmaEngine<StepMmaShapeSmall, Bf16Mma>::smem_bytes<GramPairs>() ==
                      cuda_plan::dynamic_bytes(cuda_plan::kStep, cuda_plan::kStep.small),
              "tile_plan.h's step shared memory differs from the Gram tile's");

// The launchers' contract is launcher_contract.h's, with cuBLAS's and the tile
// schedule's int range.
void check_gram_problem_cuda(const GramProblem& p) {
  check_gram_problem(p, c10::kCUDA);
  TORCH_CHECK(p.n <= INT32_MAX, "robustft_ext: too many rows for the Gram kernels: ", p.n);
}

// The engine's inputs: row and column operands are both {I, T} (padded once if needed).
template <class E, typename in_t>
TileOperands<in_t> gram_operands(const GramProblem& p, EngineInputs& in) {
  in = engine_inputs<E>({p.I, p.T}, {});
  TileOperands<in_t> ops = operands_of<in_t>(in, p.n, p.n);
  ops.y[0] = ops.x[0];
  ops.y[1] = ops.x[1];
  return ops;
}

template <class E>
GramScalars<typename E::acc_t> gram_scalars(const GramProblem& p) {
  using acc_t = typename E::acc_t;
  GramScalars<acc_t> sc{p.m2_scale.data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr};
  if (p.with_clip) sc.clip_scale = p.clip_scale.data_ptr<acc_t>();
  return sc;
}

// Calls fn(bool tag) with CLIP on or off.
template <class Fn>
void dispatch_clip(bool with_clip, Fn&& fn) {
  if (with_clip) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

template <class E, typename in_t>
void launch_gram_lse(const GramProblem& p, at::Tensor& lse) {
  const int64_t n = p.n;
  const auto stream = at::cuda::getCurrentCUDAStream();
  EngineInputs in;
  const TileOperands<in_t> ops = gram_operands<E, in_t>(p, in);
  static_assert(E::BM % E::BN == 0, "a row block starts on a column tile");
  GramTriangle tri{n, ceil_div(n, E::BM), ceil_div(n, E::BN), E::BM / E::BN, 0};
  tri.tiles = triangle_prefix(tri, tri.row_blocks);
  const int64_t target =
      2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  TORCH_CHECK(tri.tiles <= INT32_MAX, "robustft_ext: too many Gram tiles for one launch: ",
              tri.tiles);
  const int64_t per_cta = ceil_div(tri.tiles, target), ctas = ceil_div(tri.tiles, per_cta);
  const int64_t states = (p.with_clip ? 4 : 2) * n;
  at::Tensor state = at::empty({states}, p.I.options().dtype(at::kLong));
  auto* state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
  init_col_states_kernel<<<elementwise_blocks(states), 256, 0, stream>>>(state_p, states);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  GramScalars<float> sc = gram_scalars<E>(p);
  sc.diag = p.diag.data_ptr<float>();
  dispatch_clip(p.with_clip, [&](auto clip) {
    constexpr bool kClip = decltype(clip)::value;
    auto kernel = gram_lse_kernel<E, in_t, kClip>;
    constexpr int smem = gram_lse_smem_bytes<E, kClip>();
    allow_dynamic_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(ctas), E::kThreads, smem, stream>>>(
        ops, sc, p.weights.data_ptr<double>(), tri, per_cta, state_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // lse is a contiguous [4, n]: its first `states` entries are the rows of the terms that are on.
  finalize_col_states_kernel<<<elementwise_blocks(states), 256, 0, stream>>>(
      state_p, states, lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class E, typename in_t, typename ws_t>
void launch_gram_strip(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                       const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S,
                       at::Tensor& stats, at::Tensor& u) {
  using acc_t = typename E::acc_t;
  using L = typename E::L;
  const int64_t n = p.n, rows = S.size(1), r1 = r0 + rows;
  const auto stream = at::cuda::getCurrentCUDAStream();
  EngineInputs in;
  const TileOperands<in_t> ops = gram_operands<E, in_t>(p, in);
  const SplitPlan plan = plan_splits(rows, n - r0, E::BM, E::BN, int64_t(1) << 20);
  const auto opts = p.I.options().dtype(acc_dtype(p.I.scalar_type()));
  const int64_t row_parts = plan.splits * L::kRowWarps;
  at::Tensor stats_part = at::empty({plan.row_blocks * plan.splits, 2}, opts.dtype(at::kDouble));
  at::Tensor row_part = at::empty({row_parts, 2, rows}, opts);
  at::Tensor col_part = at::empty({plan.row_blocks, 2, n - r1}, opts);
  GramScalars<acc_t> sc = gram_scalars<E>(p);
  sc.f_m2 = f_m2.data_ptr<acc_t>();
  if (p.with_clip) sc.f_clip = f_clip.data_ptr<acc_t>();
  dispatch_clip(p.with_clip, [&](auto clip) {
    auto kernel = gram_strip_kernel<E, in_t, ws_t, decltype(clip)::value>;
    constexpr int smem = E::template smem_bytes<GramPairs>();
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid_of(plan), E::kThreads, smem, stream>>>(
        ops, sc, p.weights.data_ptr<double>(), lse.data_ptr<acc_t>(), r0, rows,
        plan.tiles_per_split, S.data_ptr<ws_t>(), stats_part.data_ptr<double>(),
        row_part.data_ptr<acc_t>(), col_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  gram_u_merge_kernel<acc_t><<<elementwise_blocks(n - r0), 256, 0, stream>>>(
      row_part.data_ptr<acc_t>(), row_parts, col_part.data_ptr<acc_t>(), plan.row_blocks, r0,
      rows, n, u.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats += stats_part.sum(0).to(stats.scalar_type());
}

}  // namespace

// =================================================================================
// The launchers (step_kernels.h)

void gram_lse_cuda(const GramProblem& p, at::Tensor& lse) {
  check_gram_problem_cuda(p);
  TORCH_CHECK(atomic_gram_serves(p.I.scalar_type()), "robustft_ext: gram_lse_cuda takes no "
              "double inputs and does not run under torch.use_deterministic_algorithms(True) "
              "(it merges by atomics); ask atomic_gram_serves and take the three-product design");
  check_lse_rows(lse, p.n, p.I);
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepShapes>(p.I.scalar_type(), [&](auto e, auto in, auto) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    if constexpr (std::is_same<typename E::acc_t, float>::value) launch_gram_lse<E, in_t>(p, lse);
  });
}

void gram_strip_cuda(const GramProblem& p, const at::Tensor& lse, int64_t r0,
                     const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S,
                     at::Tensor& stats, at::Tensor& u) {
  check_gram_problem_cuda(p);
  TORCH_CHECK(p.I.scalar_type() != at::kDouble, "robustft_ext: gram_strip_cuda takes no "
              "double inputs (neither does gram_lse_cuda: see atomic_gram_serves)");
  check_gram_strip(p, lse, r0, f_m2, f_clip, S, stats, u, workspace_dtype_cuda(p.I.scalar_type()),
                   c10::kCUDA);
  const c10::cuda::CUDAGuard guard(p.I.device());
  dispatch_engine<StepShapes>(p.I.scalar_type(), [&](auto e, auto in, auto ws) {
    using E = typename decltype(e)::type;
    using in_t = typename decltype(in)::type;
    using ws_t = typename decltype(ws)::type;
    if constexpr (std::is_same<typename E::acc_t, float>::value) {
      launch_gram_strip<E, in_t, ws_t>(p, lse, r0, f_m2, f_clip, S, stats, u);
    }
  });
}

}  // namespace robustft
