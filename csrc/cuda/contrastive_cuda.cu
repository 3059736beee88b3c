// Fused CUDA kernels of the contrastive losses (docs/maths.md, sections 1-2): the CUDA
// launchers declared in contrastive_kernels.h (clip_lse_cuda, siglip_softplus_sum_cuda,
// contrastive_grad_rows_cuda, which contrastive_ops.h runs for the spec and for
// spec.transposed()), registered for the CUDA dispatch key.
// Files: this one holds the host side (plans, checks, launches, registration);
// contrastive_device.cuh the __global__ kernels; contrastive_tiles.cuh their building
// blocks (tile shapes, the tiled dot-product tile, reductions, packed atomic merge).
//
// Tiling, and why
// ---------------
// Nothing of size n x m is ever materialised: every kernel recomputes the logits
// S = scale * P Q^T + bias tile by tile and folds each tile into O(n + m) state.
//  * A CTA (256 threads, a 16 x 16 grid) owns a block of BM rows of P and streams a
//    contiguous range of BN-column tiles of Q. Each BM x BN dot-product tile is a
//    shared-memory tiled GEMM over D in BK-deep slabs with TM x TN register
//    micro-tiles and fp32 accumulation (fp64 for double inputs); see
//    contrastive_tiles.cuh. BM = BN = 64 (32 for double, to stay under 48 KB of
//    static shared memory), BK = 16, 4 x 4 (2 x 2) micro-tiles read with 16-byte
//    shared loads. Feature rows are loaded with masks (any n, m, D >= 1; zeros pad the
//    last slab), and every statistic masks rows >= n and columns >= m.
//  * Column split: with only ceil(n / BM) row blocks a small batch would leave most
//    SMs idle, so the column tiles are also split over gridDim.y CTAs (about two CTAs
//    per SM in total). Each split keeps its own per-row partial result in a small
//    buffer (O(n * splits) for the LSE, O(splits * n * D) for the gradient, capped),
//    merged afterwards. Every split holds at least one column tile.
//  * clip_lse (one pass): per tile, each row's (max, sum exp) over the tile's valid
//    columns is reduced across the 16 tx lanes by shuffles and merged into a running
//    per-row online LSE state held in registers. When col_lse is wanted, each column's
//    (max, sum exp) over the block's valid rows is reduced (shuffle + shared memory)
//    and merged into a global per-column state, a packed (float m, float l) 64-bit word
//    updated by an atomicCAS loop. There is no 128-bit CAS on sm_80, so for double
//    inputs the column LSE is instead a second pass of the same kernel on the
//    transposed problem (row LSE of S^T); double is the reference dtype, not the
//    fast path, and that keeps it exact and deterministic.
//    Padded rows / columns are never pushed into any state; a NaN logit propagates
//    (NaN-aware max), as lse_push does on the CPU.
//  * siglip_softplus_sum: the same tile loop; each CTA sums softplus(S) over its valid
//    entries (per-tile float sums added into a double), writes one partial, and the
//    partials are summed with at::sum.
//  * contrastive_grad_rows: the same tile loop recomputes S, forms dS per entry with
//    maths::clip_dlogit / siglip_dlogit (masked entries are 0), keeps the BM x BN dS
//    tile in shared memory, and accumulates grad[p, :] += scale * dS_tile @ Q_tile in
//    BD-wide feature chunks. The fp32 (fp64) output rows belong to this CTA (and this
//    split), and each element is always updated by the same thread, so the
//    read-modify-write in global memory (L2-resident) is race-free and needs no
//    synchronisation; the first tile writes, later tiles add. With several splits,
//    each writes its own slice of a [splits, n, D] buffer and at::sum_out reduces it
//    into grad_P (deterministic, no float atomics). The two scalar-gradient sums use
//    the raw dot products already in registers (never (S - bias) / scale).
// All launches go to the current stream; scale, bias and grad_loss are read on the
// device through pointers, so no launcher synchronises with the host.
#include <ATen/ATen.h>
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
#include "cuda/contrastive_tiles.cuh"
#include "robustft_maths.h"

namespace robustft {
namespace {

using namespace cuda_tiles;

// =================================================================================
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the column tiles of an n x m problem are split over CTAs.
struct SplitPlan {
  int64_t row_blocks;       // gridDim.x
  int64_t col_tiles;        // ceil(m / BN)
  int64_t tiles_per_split;  // consecutive column tiles per CTA
  int64_t splits;           // gridDim.y; every split has >= 1 tile
};

// Aim at about two CTAs per SM; never more splits than column tiles or max_splits.
SplitPlan plan_splits(int64_t n, int64_t m, int BM, int BN, int64_t max_splits) {
  SplitPlan s;
  s.row_blocks = ceil_div(n, BM);
  s.col_tiles = ceil_div(m, BN);
  TORCH_CHECK(s.row_blocks <= static_cast<int64_t>(INT32_MAX),
              "robustft_ext: too many rows for one launch: ", n);
  const int64_t target = 2 * static_cast<int64_t>(
                                 at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t splits = ceil_div(target, s.row_blocks);
  splits = std::min({splits, s.col_tiles, max_splits, int64_t(65535)});
  splits = std::max<int64_t>(splits, 1);
  s.tiles_per_split = ceil_div(s.col_tiles, splits);
  s.splits = ceil_div(s.col_tiles, s.tiles_per_split);  // drops empty splits
  return s;
}

dim3 grid_of(const SplitPlan& s) {
  return dim3(static_cast<unsigned>(s.row_blocks), static_cast<unsigned>(s.splits));
}

// Blocks for a 1-D elementwise kernel over `count` entries (grid-stride loops).
unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(count, 256), 1),
                                                 int64_t(65535)));
}

void check_features_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                         const at::Tensor& bias) {
  TORCH_CHECK(P.is_cuda(), "robustft_ext: CUDA kernels need CUDA tensors");
  TORCH_CHECK(P.dim() == 2 && Q.dim() == 2 && P.size(1) == Q.size(1),
              "robustft_ext: P and Q must be [n, D] and [m, D]");
  TORCH_CHECK(P.size(0) > 0 && Q.size(0) > 0 && P.size(1) > 0,
              "robustft_ext: empty feature matrix");
  TORCH_CHECK(P.is_contiguous() && Q.is_contiguous(),
              "robustft_ext: P and Q must be contiguous");
  TORCH_CHECK(P.scalar_type() == Q.scalar_type(), "robustft_ext: P and Q dtypes differ");
  const auto acc = acc_dtype(P.scalar_type());
  for (const at::Tensor* t : {&Q, &scale, &bias})
    TORCH_CHECK(t->device() == P.device(), "robustft_ext: all tensors must be on one device");
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1 && scale.scalar_type() == acc &&
                  bias.scalar_type() == acc,
              "robustft_ext: scale and bias must be one-element tensors of dtype ", acc);
}

// An accumulation-dtype vector of `len` entries on P's device.
void check_acc_vector(const at::Tensor& t, int64_t len, const at::Tensor& P, const char* name) {
  TORCH_CHECK(t.defined(), "robustft_ext: ", name, " is undefined");
  TORCH_CHECK(t.numel() == len && t.is_contiguous() &&
                  t.scalar_type() == acc_dtype(P.scalar_type()) && t.device() == P.device(),
              "robustft_ext: ", name, " must be a contiguous ", acc_dtype(P.scalar_type()),
              " tensor of ", len, " entries on ", P.device());
}

// out[r] = LSE over the columns of S = scale * P Q^T + bias (rows of P), via row
// partials of each split. With col_state: also the packed column states.
template <typename scalar_t, bool kColStats>
void run_row_lse(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                 const at::Tensor& bias, at::Tensor& out, unsigned long long* col_state) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  const int64_t n = P.size(0), m = Q.size(0), D = P.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const SplitPlan plan = plan_splits(n, m, T::BM, T::BN, int64_t(1) << 20);
  at::Tensor part = at::empty({plan.splits, n, 2}, P.options().dtype(acc_dtype(P.scalar_type())));
  clip_lse_kernel<scalar_t, acc_t, kColStats><<<grid_of(plan), kThreads, 0, stream>>>(
      P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), n, m, D, scale.data_ptr<acc_t>(),
      bias.data_ptr<acc_t>(), plan.tiles_per_split, part.data_ptr<acc_t>(), col_state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_row_states_kernel<acc_t><<<elementwise_blocks(n), 256, 0, stream>>>(
      part.data_ptr<acc_t>(), plan.splits, n, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_clip_lse(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                     const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  using acc_t = acc_of_t<scalar_t>;
  const int64_t m = Q.size(0);
  if (!col_lse.defined()) {
    run_row_lse<scalar_t, false>(P, Q, scale, bias, row_lse, nullptr);
    return;
  }
  if constexpr (std::is_same<acc_t, float>::value) {
    // One pass: row states in the kernel, column states merged atomically.
    const auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor state = at::empty({m}, P.options().dtype(at::kLong));
    auto* state_p = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
    init_col_states_kernel<<<elementwise_blocks(m), 256, 0, stream>>>(state_p, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    run_row_lse<scalar_t, true>(P, Q, scale, bias, row_lse, state_p);
    finalize_col_states_kernel<<<elementwise_blocks(m), 256, 0, stream>>>(
        state_p, m, col_lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Double: no 64-bit-pair atomics; the column LSE is the row LSE of S^T.
    run_row_lse<scalar_t, false>(P, Q, scale, bias, row_lse, nullptr);
    run_row_lse<scalar_t, false>(Q, P, scale, bias, col_lse, nullptr);
  }
}

template <typename scalar_t>
void launch_softplus_sum(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                         const at::Tensor& bias, at::Tensor& out) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  const int64_t n = P.size(0), m = Q.size(0), D = P.size(1);
  const SplitPlan plan = plan_splits(n, m, T::BM, T::BN, int64_t(1) << 20);
  at::Tensor partial = at::empty({plan.row_blocks * plan.splits}, P.options().dtype(at::kDouble));
  softplus_sum_kernel<scalar_t, acc_t>
      <<<grid_of(plan), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), n, m, D, scale.data_ptr<acc_t>(),
          bias.data_ptr<acc_t>(), plan.tiles_per_split, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out.copy_(partial.sum());
}

// Largest [splits, n, D] gradient partial buffer, in elements (64 MB of float).
constexpr int64_t kMaxGradPartial = int64_t(1) << 24;

template <typename scalar_t>
void launch_grad_rows(const DlogitSpec& spec, const at::Tensor& grad_loss, const at::Tensor& P,
                      const at::Tensor& Q, const at::Tensor& scale, const at::Tensor& bias,
                      at::Tensor& grad_P, at::Tensor& stats) {
  using acc_t = acc_of_t<scalar_t>;
  using T = Tile<acc_t>;
  const int64_t n = P.size(0), m = Q.size(0), D = P.size(1);

  DlogitParams<acc_t> prm;
  prm.w_row = static_cast<acc_t>(spec.w_row);
  prm.w_col = spec.siglip ? acc_t(0) : static_cast<acc_t>(spec.w_col);
  prm.w_pos = spec.siglip ? acc_t(0) : static_cast<acc_t>(spec.w_pos);
  prm.row_lse = nullptr;
  prm.col_lse = nullptr;
  prm.has_positives = spec.has_positives;
  prm.pos_offset = spec.pos_offset;
  if (!spec.siglip && prm.w_row != acc_t(0)) {
    check_acc_vector(spec.row_lse, n, P, "row_lse");
    prm.row_lse = spec.row_lse.data_ptr<acc_t>();
  }
  if (!spec.siglip && prm.w_col != acc_t(0)) {
    check_acc_vector(spec.col_lse, m, P, "col_lse");
    prm.col_lse = spec.col_lse.data_ptr<acc_t>();
  }

  const SplitPlan plan =
      plan_splits(n, m, T::BM, T::BN, std::max<int64_t>(1, kMaxGradPartial / (n * D)));
  // One split writes grad_P directly; several write slices of a buffer, summed below.
  at::Tensor target = plan.splits > 1 ? at::empty({plan.splits, n, D}, grad_P.options()) : grad_P;
  at::Tensor stats_part;
  if (stats.defined())
    stats_part = at::empty({plan.row_blocks * plan.splits, 2}, P.options().dtype(at::kDouble));
  double* stats_p = stats.defined() ? stats_part.data_ptr<double>() : nullptr;

  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel) {
    kernel<<<grid_of(plan), kThreads, 0, stream>>>(
        P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), n, m, D, scale.data_ptr<acc_t>(),
        bias.data_ptr<acc_t>(), grad_loss.data_ptr<acc_t>(), prm, plan.tiles_per_split,
        target.data_ptr<acc_t>(), stats_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (spec.siglip) {
    launch(grad_rows_kernel<scalar_t, acc_t, true>);
  } else {
    launch(grad_rows_kernel<scalar_t, acc_t, false>);
  }
  if (plan.splits > 1) at::sum_out(grad_P, target, at::IntArrayRef{0});
  if (stats.defined()) stats.copy_(stats_part.sum(0));
}

}  // namespace

// =================================================================================
// The launchers (contrastive_kernels.h)

void clip_lse_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                   const at::Tensor& bias, at::Tensor& row_lse, at::Tensor& col_lse) {
  check_features_cuda(P, Q, scale, bias);
  check_acc_vector(row_lse, P.size(0), P, "row_lse");
  if (col_lse.defined()) check_acc_vector(col_lse, Q.size(0), P, "col_lse");
  const c10::cuda::CUDAGuard guard(P.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(),
                                  "robustft_clip_lse_cuda", [&] {
                                    launch_clip_lse<scalar_t>(P, Q, scale, bias, row_lse,
                                                              col_lse);
                                  });
}

void siglip_softplus_sum_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& scale,
                              const at::Tensor& bias, at::Tensor& out) {
  check_features_cuda(P, Q, scale, bias);
  check_acc_vector(out, 1, P, "out");
  const c10::cuda::CUDAGuard guard(P.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(),
                                  "robustft_siglip_softplus_sum_cuda", [&] {
                                    launch_softplus_sum<scalar_t>(P, Q, scale, bias, out);
                                  });
}

void contrastive_grad_rows_cuda(const DlogitSpec& spec, const at::Tensor& grad_loss,
                                const at::Tensor& P, const at::Tensor& Q,
                                const at::Tensor& scale, const at::Tensor& bias,
                                at::Tensor& grad_P, at::Tensor& stats) {
  check_features_cuda(P, Q, scale, bias);
  check_acc_vector(grad_loss, 1, P, "grad_loss");
  check_acc_vector(grad_P, P.numel(), P, "grad_P");
  TORCH_CHECK(grad_P.sizes() == P.sizes(), "robustft_ext: grad_P must have the shape of P");
  if (stats.defined()) check_acc_vector(stats, 2, P, "stats");
  const c10::cuda::CUDAGuard guard(P.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(),
                                  "robustft_contrastive_grad_rows_cuda", [&] {
                                    launch_grad_rows<scalar_t>(spec, grad_loss, P, Q, scale,
                                                               bias, grad_P, stats);
                                  });
}

// Both gradients as two row-streaming passes: rows of P against Q (with the scalar
// sums), then rows of Q against P with the transposed spec (its own weights, lse
// roles and positive offset). No atomics, no n x m buffer.

static const KernelSet kCudaKernels{&clip_lse_cuda, &siglip_softplus_sum_cuda,
                                    &contrastive_grad_rows_cuda};

RFT_REGISTER_CONTRASTIVE_OPS(CUDA, kCudaKernels)

}  // namespace robustft
