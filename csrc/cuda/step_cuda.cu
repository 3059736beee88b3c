// Fused CUDA kernels of a robust fine-tuning step (docs/maths.md, sections 1, 3, 4, 5): the
// CUDA launchers of step_kernels.h (slerp_weights_cuda, step_fwd_cuda,
// step_grad_rows_cuda, step_grad_cols_cuda), on which step_ops.h builds the ops slerp*,
// m2mix_*, lipsum_*, dive_* and robust_step_*, registered here for the CUDA dispatch key
// (RFT_REGISTER_STEP_OPS, as cpu/step_cpu.cpp does for the CPU). This file holds the host
// side (checks, plans, launches, registration); step_device.cuh the __global__ kernels;
// contrastive_tiles.cuh the building blocks they share with the contrastive kernels
// (contrastive_cuda.cu explains the tiling).
//
// Design
// ------
// The op body makes M = slerp(I, T; lam) as one [n, D] buffer in the input dtype (O(n D),
// with slerp_weights_cuda); every n x n (and n x K) quantity lives only tile by tile
// inside these kernels. The CTA layout is that of the contrastive kernels: 256 threads, a
// BM-row block of owner rows against a range of BN-column streamed tiles (64 x 64 tiles,
// 4 x 4 register micro-tiles, fp32 accumulation; 32 x 32 and fp64 for double), column
// splits for small n. The grid of a step launch is 1-D: the training CTAs (row block,
// split) first, then (forward and row pass) one CTA per kDiveRows rows of DiVE's
// reference batch.
//  * step_fwd (one launch for every term; small merge kernels after it). A training CTA
//    streams its tiles for the terms that are on: the A and B dot tiles I_p.M_q and
//    T_p.M_q from one K loop over D that loads the slabs of I, T and M once
//    (tile_dots_multi); with CLIP, C = I_p.T_q from a second K loop (a third live tile
//    would spill). The true pair diag[p] replaces A_pp and B_pp; the row LSEs are
//    streamed (push_tile_rows); the column LSE of C is merged across CTAs through the
//    packed 64-bit atomicCAS state of clip_lse (merge_tile_col_states). Then (split 0 of
//    each row block) the Lipsum entries of its rows over the K columns of G, as squares
//    summed into a per-CTA partial (the difference I_p - P_p formed in the slab before
//    the product). DiVE CTAs fold their reference rows: per-CTA partial sums of the AVL
//    and PVL terms and per-CTA partial column sums of (u + v) / 2. The partials are
//    reduced after the launch in a fixed order (at::sum over the partial buffers), so the
//    sums are deterministic. For double inputs (no 128-bit CAS on sm_80) the column LSE
//    of C is instead the row LSE of C^T, a second pass of the contrastive clip_lse_kernel
//    over (T, I) with bias 0.
//  * step_grad_rows (one launch) and step_grad_cols are one kernel template in a row and
//    a column view. Pair after pair (A, B, C; those that are on), a streaming loop over
//    the split's tiles recomputes the pair's dot tile, forms the dlogits with
//    maths::clip_dlogit (A, B diagonal excluded, padded entries 0), puts the dS tile in
//    shared memory and runs the GEMM out (+)= scale dS @ Y over D in BD-wide chunks
//    (accumulate_dS_rows). In the row view split 0 then adds the Lipsum gradient to
//    grad_I the same way (dS_pk = lipsum_dgrad(<I_p - P_p, G_k>), GEMM with G), and the
//    DiVE CTAs write grad_fi / grad_ft elementwise (maths::dive_grads). Deterministic:
//    each output element is always updated by the same thread of the owning CTA; with
//    several splits each split writes its own slice of a [splits, n, D] buffer, summed
//    by at::sum_out. The scalar-gradient sums (stats) are per-thread double sums in
//    shared memory, reduced per CTA into double partials and summed on the device.
//    Shared memory (float): the two operand slabs (2 x 4.3 KB) unioned with the GEMM's Y
//    chunk (17 KB), one dS tile (17 KB), the owner rows' LSE and, in the row view, the
//    per-thread stats (4 KB): 35-39 KB, so two CTAs fit on an SM.
//    Registers (ptxas, -O3): every kernel at or under 128 registers with no spill on
//    sm_90; on sm_80 one variant spills, the column view of m^2 without CLIP for half /
//    bfloat16 inputs (8-byte stack frame, 4 bytes stored and 8 loaded per thread: one
//    value kept across the pair loop). Which variant spills moved with small source
//    changes (before the port it was the one with CLIP); not chased further.
// What would be tuned on a GPU (none was available when this was written): BK, the
// micro-tile shape and double buffering of the slabs; tensor cores (mma.sync / wgmma)
// for the fp16 / bf16 inputs; merging the row view's GEMMs into grad_I (A @ M, C @ T,
// Lipsum's V @ G) into one sweep over D; the split target (two CTAs per SM); kDiveRows.
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
#include "cuda/step_device.cuh"
#include "robustft_maths.h"
#include "step_kernels.h"
#include "step_ops.h"

namespace robustft {

static_assert(cuda_tiles::kGradClip == kClip && cuda_tiles::kGradM2 == kM2 &&
                  cuda_tiles::kGradLipsum == kLipsum && cuda_tiles::kGradAvl == kAvl &&
                  cuda_tiles::kGradPvl == kPvl,
              "step_device.cuh's gradient order must be step_kernels.h's StepTerm");

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


// The plan of a pass without tiles (Lipsum and / or DiVE only): one CTA per row block.
ColumnSplit plan_no_tiles(int64_t n, int BM) {
  ColumnSplit s;
  s.row_blocks = (n + BM - 1) / BM;
  s.col_tiles = 0;
  s.tiles_per_split = 0;
  s.splits = 1;
  return s;
}

int64_t dive_ctas(const StepProblem& p) {
  return p.with_dive ? (p.dv_fi.size(0) + kDiveRows - 1) / kDiveRows : 0;
}

unsigned step_grid(const ColumnSplit& s, int64_t extra) {
  const int64_t ctas = s.row_blocks * s.splits + extra;
  TORCH_CHECK(ctas >= 1 && ctas <= static_cast<int64_t>(INT32_MAX),
              "robustft_ext: a step launch of ", ctas, " CTAs");
  return static_cast<unsigned>(ctas);
}

// ---- Checks ---------------------------------------------------------------------------

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


// The tensor that decides the dtypes of a step.
const at::Tensor& step_source(const StepProblem& p) { return p.n > 0 ? p.I : p.dv_fi; }

// A contiguous [rows, D] feature tensor of the step's dtype on its device.
void check_rows(const at::Tensor& t, int64_t rows, int64_t D, const at::Tensor& ref,
                const char* name) {
  TORCH_CHECK(t.defined() && t.dim() == 2 && t.size(0) == rows && t.size(1) == D &&
                  t.is_contiguous() && t.scalar_type() == ref.scalar_type() &&
                  t.device() == ref.device(),
              "robustft_ext: ", name, " must be a contiguous [", rows, ", ", D, "] ",
              ref.scalar_type(), " tensor on ", ref.device());
}

// The kernels' view of a step, with every input checked.
template <typename scalar_t>
StepDev<scalar_t, acc_of_t<scalar_t>> step_dev(const StepProblem& p) {
  using acc_t = acc_of_t<scalar_t>;
  const at::Tensor& src = step_source(p);
  TORCH_CHECK(src.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  const auto t = src.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "robustft_ext: unsupported dtype ", t);
  StepDev<scalar_t, acc_t> a{};
  a.n = p.n;
  a.D = src.size(1);
  TORCH_CHECK(a.D > 0, "robustft_ext: empty feature dimension");
  if (p.n > 0) {
    check_rows(p.I, p.n, a.D, src, "I");
    a.I = p.I.data_ptr<scalar_t>();
  }
  if (p.with_tiles()) {
    check_rows(p.T, p.n, a.D, src, "T");
    a.T = p.T.data_ptr<scalar_t>();
  }
  if (p.with_m2) {
    check_rows(p.M, p.n, a.D, src, "M");
    check_acc(p.diag, {p.n}, src, "diag");
    check_acc_scalar(p.m2_scale, src, "m2_scale");
    a.M = p.M.data_ptr<scalar_t>();
    a.diag = p.diag.data_ptr<acc_t>();
    a.m2_scale = p.m2_scale.data_ptr<acc_t>();
  }
  if (p.with_clip) {
    check_acc_scalar(p.clip_scale, src, "clip_scale");
    a.clip_scale = p.clip_scale.data_ptr<acc_t>();
  }
  if (p.with_lipsum) {
    TORCH_CHECK(p.n > 0, "robustft_ext: Lipsum needs a training batch");
    check_rows(p.lip_pre, p.n, a.D, src, "lip_pre");
    TORCH_CHECK(p.lip_texts.defined() && p.lip_texts.dim() == 2 && p.lip_texts.size(0) > 0,
                "robustft_ext: lip_texts must be [K >= 1, D]");
    check_rows(p.lip_texts, p.lip_texts.size(0), a.D, src, "lip_texts");
    check_acc_scalar(p.lip_scale, src, "lip_scale");
    a.P = p.lip_pre.data_ptr<scalar_t>();
    a.G = p.lip_texts.data_ptr<scalar_t>();
    a.K = p.lip_texts.size(0);
    a.lip_scale = p.lip_scale.data_ptr<acc_t>();
  }
  if (p.with_dive) {
    a.n_ref = p.dv_fi.size(0);
    TORCH_CHECK(a.n_ref > 0, "robustft_ext: empty DiVE batch");
    check_rows(p.dv_fi, a.n_ref, a.D, src, "dv_fi");
    check_rows(p.dv_ft, a.n_ref, a.D, src, "dv_ft");
    check_rows(p.dv_pi, a.n_ref, a.D, src, "dv_pi");
    check_rows(p.dv_pt, a.n_ref, a.D, src, "dv_pt");
    check_acc(p.center, {a.D}, src, "center");
    a.fi = p.dv_fi.data_ptr<scalar_t>();
    a.ft = p.dv_ft.data_ptr<scalar_t>();
    a.pi = p.dv_pi.data_ptr<scalar_t>();
    a.pt = p.dv_pt.data_ptr<scalar_t>();
    a.center = p.center.data_ptr<acc_t>();
  }
  TORCH_CHECK(p.n > 0 || p.with_dive, "robustft_ext: a step with no term");
  return a;
}

template <typename StepDevT>
void set_plan(StepDevT& a, const ColumnSplit& s) {
  a.row_blocks = s.row_blocks;
  a.splits = s.splits;
  a.tiles_per_split = s.tiles_per_split;
}

// ---- Launches ------------------------------------------------------------------------

template <typename scalar_t>
void launch_fwd(const StepProblem& p, at::Tensor& lse, at::Tensor& sums, at::Tensor& diff_mean) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  constexpr bool kFloatAcc = std::is_same<acc_t, float>::value;
  auto a = step_dev<scalar_t>(p);
  const at::Tensor& src = step_source(p);
  const int64_t n = p.n, D = a.D;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = src.options().dtype(acc_dtype(src.scalar_type()));
  check_acc(lse, {4, n}, src, "lse");
  check_acc(sums, {3}, src, "sums");
  check_acc(diff_mean, {p.with_dive ? D : 0}, src, "diff_mean");

  const ColumnSplit plan =
      p.with_tiles() ? plan_m2(n, Tl::BM, Tl::BN, int64_t(1) << 20) : plan_no_tiles(n, Tl::BM);
  set_plan(a, plan);
  const int64_t train = plan.row_blocks * plan.splits, extra = dive_ctas(p);
  const int64_t R = (p.with_m2 ? 2 : 0) + (p.with_clip ? 1 : 0);  // streamed row LSEs
  at::Tensor part = at::empty({plan.splits, R, n, 2}, acc_opts);
  at::Tensor sums_part = at::empty({train + extra, 3}, acc_opts.dtype(at::kDouble));
  at::Tensor mean_part = at::empty({extra, D}, acc_opts);
  at::Tensor state;  // packed column states of C (float accumulation, with CLIP)
  unsigned long long* state_p = nullptr;
  if (p.with_clip && kFloatAcc) {
    state = at::empty({n}, src.options().dtype(at::kLong));
    state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
    init_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(state_p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto launch = [&](auto kernel) {
    kernel<<<step_grid(plan, extra), kThreads, 0, stream>>>(
        a, R > 0 ? part.data_ptr<acc_t>() : nullptr, state_p, sums_part.data_ptr<double>(),
        extra > 0 ? mean_part.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.with_m2 && p.with_clip) {
    if constexpr (kFloatAcc) launch(step_fwd_kernel<scalar_t, acc_t, true, true, true>);
    else launch(step_fwd_kernel<scalar_t, acc_t, true, true, false>);
  } else if (p.with_m2) {
    launch(step_fwd_kernel<scalar_t, acc_t, true, false, false>);
  } else if (p.with_clip) {
    if constexpr (kFloatAcc) launch(step_fwd_kernel<scalar_t, acc_t, false, true, true>);
    else launch(step_fwd_kernel<scalar_t, acc_t, false, true, false>);
  } else {
    launch(step_fwd_kernel<scalar_t, acc_t, false, false, false>);
  }
  // Row LSEs, one merge for all: A -> lse[0], B -> lse[1], C -> lse[2] (R rows of n from
  // lse[0] with m^2, from lse[2] without).
  if (R > 0) {
    merge_row_states_kernel<acc_t><<<elementwise_blocks(R * n), 256, 0, stream>>>(
        part.data_ptr<acc_t>(), plan.splits, R * n,
        lse.data_ptr<acc_t>() + (p.with_m2 ? 0 : 2) * n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.with_clip) {
    acc_t* col_out = lse.data_ptr<acc_t>() + 3 * n;
    if constexpr (kFloatAcc) {
      finalize_col_states_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(state_p, n,
                                                                             col_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // Double: the column LSE of C = s_c I T^T is the row LSE of s_c T I^T (clip_lse).
      const at::Tensor zero_bias = at::zeros({}, acc_opts);
      at::Tensor part_t = at::empty({plan.splits, n, 2}, acc_opts);
      clip_lse_kernel<scalar_t, acc_t, false><<<grid_of(plan), kThreads, 0, stream>>>(
          a.T, a.I, n, n, D, a.clip_scale, zero_bias.data_ptr<acc_t>(), plan.tiles_per_split,
          part_t.data_ptr<acc_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
          part_t.data_ptr<acc_t>(), plan.splits, n, col_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  // Per-CTA partials in CTA order: deterministic.
  sums.copy_(sums_part.sum(0));
  if (p.with_dive) {
    at::sum_out(diff_mean, mean_part, at::IntArrayRef{0});
    diff_mean.mul_(1.0 / static_cast<double>(a.n_ref));
  }
}

// One gradient pass. Row view: out0 = grad_I, out1 = grad_T, stats, and the DiVE outputs.
// Column view: out0 = grad_M (with m^2), out1 = grad_Tc (with CLIP), the others null.
template <typename scalar_t, bool kTransposed>
void launch_grad(const StepProblem& p, bool m2, bool clip, const at::Tensor& grads,
                 const at::Tensor& lse, at::Tensor* out0, at::Tensor* out1, at::Tensor* stats,
                 at::Tensor* grad_fi, at::Tensor* grad_ft) {
  using acc_t = acc_of_t<scalar_t>;
  using Tl = Tile<acc_t>;
  auto a = step_dev<scalar_t>(p);
  const int64_t n = p.n, D = a.D;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool tiles = m2 || clip;
  // Outputs with a slice per split: grad_I always, grad_T with m^2 (row view); grad_M,
  // grad_Tc (column view).
  const bool split0 = out0 != nullptr, split1 = out1 != nullptr && (kTransposed || m2);
  const int64_t sliced = (split0 ? 1 : 0) + (split1 ? 1 : 0);
  const ColumnSplit plan =
      tiles ? plan_m2(n, Tl::BM, Tl::BN,
                      std::max<int64_t>(1, kMaxGradPartial / (std::max<int64_t>(sliced, 1) * n * D)))
            : plan_no_tiles(n, Tl::BM);
  set_plan(a, plan);
  const int64_t train = plan.row_blocks * plan.splits;
  const int64_t extra = kTransposed ? 0 : dive_ctas(p);
  if (!kTransposed && !p.with_dive) a.n_ref = 0;
  if (kTransposed) a.G = nullptr;  // Lipsum is the row view's
  const bool buffered = plan.splits > 1;
  at::Tensor t0, t1;
  if (split0) t0 = buffered ? at::empty({plan.splits, n, D}, out0->options()) : *out0;
  if (out1 != nullptr) t1 = (buffered && split1) ? at::empty({plan.splits, n, D}, out1->options()) : *out1;
  at::Tensor stats_part;
  if (stats != nullptr)
    stats_part = at::empty({train, 2}, lse.options().dtype(at::kDouble));

  auto launch = [&](auto kernel) {
    kernel<<<step_grid(plan, extra), kThreads, 0, stream>>>(
        a, grads.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        split0 && n > 0 ? t0.data_ptr<acc_t>() : nullptr,
        out1 != nullptr && n > 0 ? t1.data_ptr<acc_t>() : nullptr, split1 ? n * D : int64_t(0),
        stats != nullptr && train > 0 ? stats_part.data_ptr<double>() : nullptr,
        extra > 0 ? grad_fi->data_ptr<acc_t>() : nullptr,
        extra > 0 ? grad_ft->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if constexpr (!kTransposed) {
    if (m2 && clip) launch(step_grad_kernel<scalar_t, acc_t, true, true, false>);
    else if (m2) launch(step_grad_kernel<scalar_t, acc_t, true, false, false>);
    else if (clip) launch(step_grad_kernel<scalar_t, acc_t, false, true, false>);
    else launch(step_grad_kernel<scalar_t, acc_t, false, false, false>);
  } else {
    if (m2 && clip) launch(step_grad_kernel<scalar_t, acc_t, true, true, true>);
    else if (m2) launch(step_grad_kernel<scalar_t, acc_t, true, false, true>);
    else launch(step_grad_kernel<scalar_t, acc_t, false, true, true>);
  }
  if (buffered) {
    if (split0) at::sum_out(*out0, t0, at::IntArrayRef{0});
    if (split1) at::sum_out(*out1, t1, at::IntArrayRef{0});
  }
  if (stats != nullptr) stats->copy_(stats_part.sum(0));
}

}  // namespace

// =================================================================================
// The launchers (step_kernels.h)

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

void step_fwd_cuda(const StepProblem& p, at::Tensor& lse, at::Tensor& sums,
                   at::Tensor& diff_mean) {
  const at::Tensor& src = step_source(p);
  TORCH_CHECK(src.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  const c10::cuda::CUDAGuard guard(src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "robustft_step_fwd_cuda",
                                  [&] { launch_fwd<scalar_t>(p, lse, sums, diff_mean); });
}

void step_grad_rows_cuda(const StepProblem& p, const at::Tensor& grads, const at::Tensor& lse,
                         at::Tensor& grad_I, at::Tensor& grad_T, at::Tensor& stats,
                         at::Tensor& grad_fi, at::Tensor& grad_ft) {
  const at::Tensor& src = step_source(p);
  TORCH_CHECK(src.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  const int64_t D = src.size(1);
  check_acc(grads, {5}, src, "grads");
  check_acc(lse, {4, p.n}, src, "lse");
  check_acc(grad_I, {p.n, D}, src, "grad_I");
  check_acc(grad_T, {p.n, D}, src, "grad_T");
  check_acc(stats, {2}, src, "stats");
  if (p.with_dive) {
    check_acc(grad_fi, p.dv_fi.sizes(), src, "grad_fi");
    check_acc(grad_ft, p.dv_fi.sizes(), src, "grad_ft");
  }
  const c10::cuda::CUDAGuard guard(src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "robustft_step_grad_rows_cuda", [&] {
                                    launch_grad<scalar_t, false>(
                                        p, p.with_m2, p.with_clip, grads, lse, &grad_I,
                                        &grad_T, &stats, &grad_fi, &grad_ft);
                                  });
}

void step_grad_cols_cuda(const StepProblem& p, const at::Tensor& grads, const at::Tensor& lse,
                         at::Tensor& grad_M, at::Tensor& grad_Tc) {
  TORCH_CHECK(p.with_tiles() && p.n > 0, "robustft_ext: the column pass needs m^2 or CLIP");
  const at::Tensor& src = p.I;
  TORCH_CHECK(src.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  const int64_t D = src.size(1);
  check_acc(grads, {5}, src, "grads");
  check_acc(lse, {4, p.n}, src, "lse");
  if (p.with_m2) check_acc(grad_M, {p.n, D}, src, "grad_M");
  if (p.with_clip) check_acc(grad_Tc, {p.n, D}, src, "grad_Tc");
  const c10::cuda::CUDAGuard guard(src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "robustft_step_grad_cols_cuda", [&] {
    launch_grad<scalar_t, true>(p, p.with_m2, p.with_clip, grads, lse,
                                p.with_m2 ? &grad_M : nullptr,
                                p.with_clip ? &grad_Tc : nullptr, nullptr, nullptr, nullptr);
  });
}

static const StepKernelSet kCudaStepKernels{&slerp_weights_cuda, &step_fwd_cuda,
                                            &step_grad_rows_cuda, &step_grad_cols_cuda};

RFT_REGISTER_STEP_OPS(CUDA, kCudaStepKernels)

}  // namespace robustft
