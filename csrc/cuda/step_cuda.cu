// Fused CUDA kernels of the m^2-mix loss (METHODS.md section 3): the CUDA launchers
// declared in m2mix_kernels.h (slerp_weights_cuda, m2mix_lse_cuda, m2mix_grad_rows_cuda,
// m2mix_grad_cols_cuda), on which m2mix_ops.h builds the ops, registered for the CUDA
// dispatch key. This file holds the host side (checks, plans, launches, registration);
// m2mix_device.cuh the __global__ kernels; contrastive_tiles.cuh the building blocks
// they share with the contrastive kernels (contrastive_cuda.cu explains the tiling).
//
// Design
// ------
// The op body makes M = slerp(I, T; lam) as one [n, D] buffer in the input dtype (O(n D),
// with slerp_weights_cuda); every n x n quantity lives only tile by tile inside these
// kernels. The CTA layout is that of the contrastive kernels: 256 threads, a BM-row block
// of owner rows against a range of BN-column streamed tiles (64 x 64 tiles, 4 x 4 register
// micro-tiles, fp32 accumulation; 32 x 32 and fp64 for double), column splits over
// gridDim.y for small n.
//  * m2mix_lse (one pass): per step, the A and B dot tiles I_p.M_q and T_p.M_q come from
//    one K loop over D that loads the slabs of I, T and M once (tile_dots_multi: 32 FMAs
//    per three 16-byte shared loads); with clip, C = I_p.T_q from a second K loop (a
//    third live tile would spill). The true pair diag[p] replaces A_pp and B_pp inside
//    the tile; the row LSEs of A, B (and C) are streamed (push_tile_rows); with clip the
//    column LSE of C is merged across CTAs through the packed 64-bit atomicCAS state of
//    clip_lse (merge_tile_col_states). For double inputs (no 128-bit CAS on sm_80) the
//    column LSE of C is instead the row LSE of C^T, a second pass of the contrastive
//    clip_lse_kernel over (T, I) with bias 0.
//  * m2mix_grad_rows (owner p, streams q) and m2mix_grad_cols (owner q, streams p) are one
//    kernel template in a row and a column view (M2Pairs). Pair after pair (A, B, C),
//    a streaming loop over the split's tiles recomputes the pair's dot tile, forms the
//    dlogits with maths::clip_dlogit (A, B diagonal excluded, padded entries 0), puts the
//    dS tile in shared memory and runs the GEMM out_row(k) (+)= scale_k dS_k @ Y_col(k)
//    over D in BD-wide chunks (accumulate_dS_rows). Deterministic: each output element is
//    always updated by the same thread of the owning CTA; with several splits each split
//    writes its own slice of a [splits, n, D] buffer, summed by at::sum_out. The
//    scalar-gradient sums (stats) are per-thread double sums in shared memory, reduced
//    per CTA into double partials and summed on the device.
//    Shared memory (float): the two operand slabs (2 x 4.3 KB) unioned with the GEMM's Y
//    chunk (17 KB), one dS tile (17 KB), the owner rows' LSE and, in the row view, the
//    per-thread stats (4 KB): 35-39 KB, so two CTAs fit on an SM.
// What would be tuned on a GPU (none was available when this was written): BK, the
// micro-tile shape and double buffering of the slabs; tensor cores (mma.sync / wgmma)
// for the fp16 / bf16 inputs; merging the row view's two GEMMs into grad_I (A @ M and
// C @ T) into one sweep over D; the split target (two CTAs per SM).
// All launches go to the current stream; scales, lam, grads are read on the device
// through pointers, so no launcher synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "contrastive_ops.h"
#include "cuda/contrastive_device.cuh"
#include "cuda/contrastive_tiles.cuh"
#include "cuda/m2mix_device.cuh"
#include "m2mix_kernels.h"
#include "m2mix_ops.h"
#include "robustft_maths.h"

namespace robustft {
namespace {

using namespace cuda_tiles;

// Largest [splits, n, D] gradient partial buffer per output, in elements (as
// contrastive_cuda.cu: 64 MB of float).
constexpr int64_t kMaxGradPartial = int64_t(1) << 24;

// About two CTAs per SM (the kernels run with __launch_bounds__(256, 2)).
ColumnSplit plan_m2(int64_t n, int BM, int BN, int64_t max_splits) {
  const ColumnSplit s = plan_column_split(
      n, n, BM, BN, max_splits,
      2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount));
  TORCH_CHECK(s.row_blocks <= static_cast<int64_t>(INT32_MAX),
              "robustft_ext: too many rows for one launch: ", n);
  return s;
}

dim3 grid_of(const ColumnSplit& s) {
  return dim3(static_cast<unsigned>(s.row_blocks), static_cast<unsigned>(s.splits));
}

unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(
      std::min<int64_t>(std::max<int64_t>((count + 255) / 256, 1), int64_t(65535)));
}

// ---- Checks ---------------------------------------------------------------------------

// I, T, M: CUDA, [n, D] with n, D >= 1, contiguous, one supported dtype, one device.
void check_m2_features(const at::Tensor& I, const at::Tensor& T, const at::Tensor& M) {
  TORCH_CHECK(I.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  TORCH_CHECK(I.dim() == 2 && I.size(0) > 0 && I.size(1) > 0,
              "robustft_ext: I must be a non-empty [n, D] matrix, got ", I.sizes());
  TORCH_CHECK(T.sizes() == I.sizes() && M.sizes() == I.sizes(),
              "robustft_ext: I, T and M must share one [n, D] shape, got ", I.sizes(), ", ",
              T.sizes(), " and ", M.sizes());
  const auto t = I.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "robustft_ext: unsupported dtype ", t);
  TORCH_CHECK(T.scalar_type() == t && M.scalar_type() == t,
              "robustft_ext: I, T and M dtypes differ");
  TORCH_CHECK(T.device() == I.device() && M.device() == I.device(),
              "robustft_ext: all tensors must be on one device");
  TORCH_CHECK(I.is_contiguous() && T.is_contiguous() && M.is_contiguous(),
              "robustft_ext: I, T and M must be contiguous");
}

// A contiguous tensor of the accumulation dtype of `ref`, on its device, with `sizes`.
void check_acc(const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& ref,
               const char* name) {
  TORCH_CHECK(t.defined(), "robustft_ext: ", name, " is undefined");
  const auto acc = acc_dtype(ref.scalar_type());
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous() && t.scalar_type() == acc &&
                  t.device() == ref.device(),
              "robustft_ext: ", name, " must be a contiguous ", acc, " tensor of shape ", sizes,
              " on ", ref.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
}

// A one-element tensor of the accumulation dtype on ref's device.
void check_acc_scalar(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == 1 && t.scalar_type() == acc_dtype(ref.scalar_type()) &&
                  t.device() == ref.device(),
              "robustft_ext: ", name, " must be a one-element ", acc_dtype(ref.scalar_type()),
              " tensor on ", ref.device());
}

// lse [2, n] or [4, n]: returns whether it is "with clip".
bool check_lse(const at::Tensor& lse, const at::Tensor& I) {
  const int64_t n = I.size(0);
  TORCH_CHECK(lse.defined() && lse.dim() == 2 && (lse.size(0) == 2 || lse.size(0) == 4),
              "robustft_ext: lse must be [2, n] or [4, n]");
  check_acc(lse, {lse.size(0), n}, I, "lse");
  return lse.size(0) == 4;
}

// ---- Launches ------------------------------------------------------------------------

template <typename scalar_t>
void launch_lse(const at::Tensor& I, const at::Tensor& T, const at::Tensor& M,
                const at::Tensor& diag, const at::Tensor& m2_scale, const at::Tensor& clip_scale,
                at::Tensor& lse) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  const int64_t n = I.size(0), D = I.size(1);
  const bool with_clip = lse.size(0) == 4;
  const int64_t K = with_clip ? 3 : 2;  // row LSEs from the fused pass
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = I.options().dtype(acc_dtype(I.scalar_type()));
  constexpr bool kFloatAcc = std::is_same<acc_t, float>::value;

  const ColumnSplit plan = plan_m2(n, Tl::BM, Tl::BN, int64_t(1) << 20);
  at::Tensor part = at::empty({K, plan.splits, n, 2}, acc_opts);
  at::Tensor state;  // packed column states of C (float accumulation, with clip)
  unsigned long long* state_p = nullptr;
  if (with_clip && kFloatAcc) {
    state = at::empty({n}, I.options().dtype(at::kLong));
    state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
    init_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(state_p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto launch = [&](auto kernel) {
    kernel<<<grid_of(plan), kThreads, 0, stream>>>(
        I.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), n, D,
        diag.data_ptr<acc_t>(), m2_scale.data_ptr<acc_t>(), clip_scale.data_ptr<acc_t>(),
        plan.tiles_per_split, part.data_ptr<acc_t>(), state_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!with_clip) {
    launch(m2mix_lse_kernel<scalar_t, acc_t, false, false>);
  } else if constexpr (kFloatAcc) {
    launch(m2mix_lse_kernel<scalar_t, acc_t, true, true>);
  } else {
    launch(m2mix_lse_kernel<scalar_t, acc_t, true, false>);
  }
  for (int64_t k = 0; k < K; ++k) {
    merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
        part.data_ptr<acc_t>() + k * plan.splits * n * 2, plan.splits, n,
        lse.data_ptr<acc_t>() + k * n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!with_clip) return;
  acc_t* col_out = lse.data_ptr<acc_t>() + 3 * n;
  if constexpr (kFloatAcc) {
    finalize_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(state_p, n, col_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Double: the column LSE of C = s_c I T^T is the row LSE of s_c T I^T (clip_lse).
    const at::Tensor zero_bias = at::zeros({}, acc_opts);
    at::Tensor part_t = at::empty({plan.splits, n, 2}, acc_opts);
    clip_lse_kernel<scalar_t, acc_t, false><<<grid_of(plan), kThreads, 0, stream>>>(
        T.data_ptr<scalar_t>(), I.data_ptr<scalar_t>(), n, n, D, clip_scale.data_ptr<acc_t>(),
        zero_bias.data_ptr<acc_t>(), plan.tiles_per_split, part_t.data_ptr<acc_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
        part_t.data_ptr<acc_t>(), plan.splits, n, col_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// One gradient pass (kTransposed: the column view). out1 undefined: the view has one
// output (column view without clip).
template <typename scalar_t, bool kTransposed>
void launch_grad(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& T,
                 const at::Tensor& M, const at::Tensor& m2_scale, const at::Tensor& clip_scale,
                 const at::Tensor& lse, at::Tensor& out0, at::Tensor* out1, at::Tensor* stats) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  const int64_t n = I.size(0), D = I.size(1);
  const bool with_clip = lse.size(0) == 4;
  const int64_t outputs = out1 != nullptr ? 2 : 1;
  const ColumnSplit plan = plan_m2(
      n, Tl::BM, Tl::BN, std::max<int64_t>(1, kMaxGradPartial / (outputs * n * D)));
  // One split writes the outputs directly; several write slices of buffers, summed below.
  at::Tensor t0 = plan.splits > 1 ? at::empty({plan.splits, n, D}, out0.options()) : out0;
  at::Tensor t1;
  if (out1 != nullptr)
    t1 = plan.splits > 1 ? at::empty({plan.splits, n, D}, out1->options()) : *out1;
  at::Tensor stats_part;
  if (stats != nullptr)
    stats_part = at::empty({plan.row_blocks * plan.splits, 2}, I.options().dtype(at::kDouble));

  auto launch = [&](auto kernel) {
    kernel<<<grid_of(plan), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        I.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), n, D,
        grads.data_ptr<acc_t>(), m2_scale.data_ptr<acc_t>(), clip_scale.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), plan.tiles_per_split, t0.data_ptr<acc_t>(),
        out1 != nullptr ? t1.data_ptr<acc_t>() : nullptr,
        stats != nullptr ? stats_part.data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (with_clip) {
    launch(m2mix_grad_kernel<scalar_t, acc_t, true, kTransposed>);
  } else {
    launch(m2mix_grad_kernel<scalar_t, acc_t, false, kTransposed>);
  }
  if (plan.splits > 1) {
    at::sum_out(out0, t0, at::IntArrayRef{0});
    if (out1 != nullptr) at::sum_out(*out1, t1, at::IntArrayRef{0});
  }
  if (stats != nullptr) stats->copy_(stats_part.sum(0));
}

}  // namespace

// =================================================================================
// The launchers (m2mix_kernels.h)

void slerp_weights_cuda(const at::Tensor& cos, const at::Tensor& lam, at::Tensor& out) {
  TORCH_CHECK(cos.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  TORCH_CHECK(cos.dim() == 1 && cos.is_contiguous() &&
                  (cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kDouble),
              "robustft_ext: cos must be a contiguous float or double vector");
  const int64_t n = cos.size(0);
  check_acc_scalar(lam, cos, "lam");
  check_acc(out, {4, n}, cos, "out");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(cos.device());
  AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "robustft_slerp_weights_cuda", [&] {
    slerp_weights_kernel<scalar_t>
        <<<elementwise_blocks(n), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
            cos.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), n, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void m2mix_lse_cuda(const at::Tensor& I, const at::Tensor& T, const at::Tensor& M,
                    const at::Tensor& diag, const at::Tensor& m2_scale,
                    const at::Tensor& clip_scale, at::Tensor& lse) {
  check_m2_features(I, T, M);
  check_acc(diag, {I.size(0)}, I, "diag");
  check_acc_scalar(m2_scale, I, "m2_scale");
  check_acc_scalar(clip_scale, I, "clip_scale");
  check_lse(lse, I);
  const c10::cuda::CUDAGuard guard(I.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(),
                                  "robustft_m2mix_lse_cuda", [&] {
                                    launch_lse<scalar_t>(I, T, M, diag, m2_scale, clip_scale,
                                                         lse);
                                  });
}

void m2mix_grad_rows_cuda(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& T,
                          const at::Tensor& M, const at::Tensor& m2_scale,
                          const at::Tensor& clip_scale, const at::Tensor& lse,
                          at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats) {
  check_m2_features(I, T, M);
  check_acc(grads, {2}, I, "grads");
  check_acc_scalar(m2_scale, I, "m2_scale");
  check_acc_scalar(clip_scale, I, "clip_scale");
  check_lse(lse, I);
  check_acc(grad_I, I.sizes(), I, "grad_I");
  check_acc(grad_T, I.sizes(), I, "grad_T");
  check_acc(stats, {2}, I, "stats");
  const c10::cuda::CUDAGuard guard(I.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(),
                                  "robustft_m2mix_grad_rows_cuda", [&] {
                                    launch_grad<scalar_t, false>(grads, I, T, M, m2_scale,
                                                                 clip_scale, lse, grad_I,
                                                                 &grad_T, &stats);
                                  });
}

void m2mix_grad_cols_cuda(const at::Tensor& grads, const at::Tensor& I, const at::Tensor& T,
                          const at::Tensor& M, const at::Tensor& m2_scale,
                          const at::Tensor& clip_scale, const at::Tensor& lse,
                          at::Tensor& grad_M, at::Tensor& grad_Tc) {
  check_m2_features(I, T, M);
  check_acc(grads, {2}, I, "grads");
  check_acc_scalar(m2_scale, I, "m2_scale");
  check_acc_scalar(clip_scale, I, "clip_scale");
  const bool with_clip = check_lse(lse, I);
  check_acc(grad_M, I.sizes(), I, "grad_M");
  if (with_clip) check_acc(grad_Tc, I.sizes(), I, "grad_Tc");
  const c10::cuda::CUDAGuard guard(I.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, I.scalar_type(),
                                  "robustft_m2mix_grad_cols_cuda", [&] {
                                    launch_grad<scalar_t, true>(
                                        grads, I, T, M, m2_scale, clip_scale, lse, grad_M,
                                        with_clip ? &grad_Tc : nullptr, nullptr);
                                  });
}

static const M2MixKernelSet kCudaM2MixKernels{&slerp_weights_cuda, &m2mix_lse_cuda,
                                              &m2mix_grad_rows_cuda, &m2mix_grad_cols_cuda};

RFT_REGISTER_M2MIX_OPS(CUDA, kCudaM2MixKernels)

}  // namespace robustft
