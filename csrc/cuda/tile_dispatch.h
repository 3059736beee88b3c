// Host side of the CUDA kernels: which tile engine serves a dtype on this device, the
// operand preparation the tensor-core engine needs, and the launch plans. Shared by
// contrastive_cuda.cu and step_cuda.cu.
//
// Engines (docs/backends.md, "CUDA kernels"):
//   bf16 / f16                 MmaEngine (mma.sync m16n8k16, float accumulation)
//   float, TF32 allowed        MmaEngine (mma.sync m16n8k8 tf32): torch.get_float32_matmul_precision()
//                              "high" or "medium", as torch's own matmuls
//   float, "highest"           FfmaEngine<float> (exact float products)
//   double                     FfmaEngine<double>
// The kernels need sm_80 or newer (mma.sync m16n8k16, cp.async); setup.py builds no older
// architecture, and the Python side reports the native CUDA backend unavailable below 8.0.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "contrastive_ops.h"
#include "cuda/ffma_tile.cuh"
#include "cuda/mma_tile.cuh"
#include "cuda/tile_layout.cuh"
#include "cuda/tile_shapes.cuh"

namespace robustft {
namespace cuda_tiles {

inline bool float32_matmul_allows_tf32() { return at::globalContext().allowTF32CuBLAS(); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls launch(Tag<Engine>, Tag<in_t>, Tag<ws_t>) with the engine for features of dtype t on
// the current device. Shapes: the caller's kernel family (tile_shapes.cuh), whose large or
// small tensor-core shape the device's opt-in shared memory per block allows (tile_plan.h).
// in_t is the features' element type; ws_t the dlogit workspace's (workspace_dtype_cuda).
template <class Shapes, class Launch>
void dispatch_engine(at::ScalarType t, Launch&& launch) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "robustft_ext: the native CUDA kernels need compute capability "
              "8.0 or newer; this device (", props->name, ") has ", props->major, ".",
              props->minor, ". Use backend='triton' or 'reference'.");
  const auto& family = Shapes::kFamily;
  const int optin = static_cast<int>(props->sharedMemPerBlockOptin);
  const cuda_plan::Tiles tiles = cuda_plan::choose(family, optin);
  auto mma = [&](auto elt, auto in) {
    using Elt = typename decltype(elt)::type;
    TORCH_CHECK(tiles != cuda_plan::Tiles::kNone, "robustft_ext: the native CUDA ", family.name,
                " kernels need ", cuda_plan::needed_bytes(family, family.small),
                " bytes of shared memory per block; this device (", props->name, ") offers ",
                optin, ". Use backend='triton' or 'reference'.");
    if (tiles == cuda_plan::Tiles::kLarge) {
      launch(Tag<MmaEngine<typename Shapes::Large, Elt>>{}, in, in);
    } else {
      launch(Tag<MmaEngine<typename Shapes::Small, Elt>>{}, in, in);
    }
  };
  switch (t) {
    case at::kDouble:
      launch(Tag<FfmaEngine<double>>{}, Tag<double>{}, Tag<double>{});
      return;
    case at::kFloat:
      if (float32_matmul_allows_tf32()) {
        mma(Tag<Tf32Mma>{}, Tag<float>{});
      } else {
        launch(Tag<FfmaEngine<float>>{}, Tag<float>{}, Tag<float>{});
      }
      return;
    case at::kBFloat16:
      mma(Tag<Bf16Mma>{}, Tag<c10::BFloat16>{});
      return;
    case at::kHalf:
      mma(Tag<F16Mma>{}, Tag<c10::Half>{});
      return;
    default:
      TORCH_CHECK(false, "robustft_ext: unsupported dtype ", t);
  }
}

template <class E>
struct IsMma : std::false_type {};
template <class S, class Elt>
struct IsMma<MmaEngine<S, Elt>> : std::true_type {};

// Feature matrices as an engine reads them: the tensor-core engine copies rows through
// 16-byte cp.async, so each row must start 16-byte aligned and hold a whole number of 16-byte
// chunks; inputs that miss that are copied once into a zero-padded [rows, D_pad] buffer
// (zeros add nothing to a dot product). Holds the copies alive.
struct EngineInputs {
  at::Tensor x[2], y[2];
  int64_t D = 0, ld = 0;
};

inline bool mma_ready(const at::Tensor& t) {
  return t.is_contiguous() && (t.size(1) * t.element_size()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// xs / ys: the row and column operands (undefined entries are skipped), contiguous [*, D].
template <class E>
EngineInputs engine_inputs(std::initializer_list<at::Tensor> xs, std::initializer_list<at::Tensor> ys) {
  EngineInputs in;
  const at::Tensor& first = *xs.begin();
  in.D = first.size(1);
  int64_t D_pad = in.D;
  bool pad = false;
  if constexpr (IsMma<E>::value) {
    const int64_t per_chunk = 16 / first.element_size();
    D_pad = (in.D + per_chunk - 1) / per_chunk * per_chunk;
    for (const auto& t : xs) pad = pad || (t.defined() && !mma_ready(t));
    for (const auto& t : ys) pad = pad || (t.defined() && !mma_ready(t));
  }
  auto prepare = [&](const at::Tensor& t) {
    if (!t.defined() || !pad) return t;
    at::Tensor out = at::zeros({t.size(0), D_pad}, t.options());
    out.narrow(1, 0, in.D).copy_(t);
    return out;
  };
  int i = 0;
  for (const auto& t : xs) in.x[i++] = prepare(t);
  i = 0;
  for (const auto& t : ys) in.y[i++] = prepare(t);
  if (pad) in.D = D_pad;
  in.ld = in.D;
  return in;
}

template <typename in_t>
TileOperands<in_t> operands_of(const EngineInputs& in, int64_t n, int64_t m) {
  TileOperands<in_t> ops{};
  for (int i = 0; i < 2; ++i) {
    ops.x[i] = in.x[i].defined() ? in.x[i].data_ptr<in_t>() : nullptr;
    ops.y[i] = in.y[i].defined() ? in.y[i].data_ptr<in_t>() : nullptr;
  }
  ops.n = n;
  ops.m = m;
  ops.D = in.D;
  ops.ld = in.ld;
  return ops;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the column tiles of an n x m problem are split over CTAs (gridDim.y): about
// `waves` CTAs per multiprocessor in all; never more splits than column tiles or max_splits,
// and every split holds at least one tile.
struct SplitPlan {
  int64_t row_blocks;       // gridDim.x
  int64_t col_tiles;        // ceil(m / BN)
  int64_t tiles_per_split;  // consecutive column tiles per CTA
  int64_t splits;           // gridDim.y
};

inline SplitPlan plan_splits(int64_t n, int64_t m, int BM, int BN, int64_t max_splits,
                             int64_t waves = 2) {
  SplitPlan s;
  s.row_blocks = ceil_div(n, BM);
  s.col_tiles = ceil_div(m, BN);
  TORCH_CHECK(s.row_blocks <= static_cast<int64_t>(INT32_MAX),
              "robustft_ext: too many rows for one launch: ", n);
  const int64_t target =
      waves * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t splits = ceil_div(target, s.row_blocks);
  splits = std::min({splits, s.col_tiles, max_splits, int64_t(65535)});
  splits = std::max<int64_t>(splits, 1);
  s.tiles_per_split = ceil_div(s.col_tiles, splits);
  s.splits = ceil_div(s.col_tiles, s.tiles_per_split);  // drops empty splits
  return s;
}

inline dim3 grid_of(const SplitPlan& s) {
  return dim3(static_cast<unsigned>(s.row_blocks), static_cast<unsigned>(s.splits));
}

// Blocks for a 1-D elementwise kernel over `count` entries (grid-stride loops).
inline unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(count, 256), 1),
                                                 int64_t(65535)));
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the default 48 KB) and checks the
// device has them beside the kernel's static shared memory.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int limit = static_cast<int>(props->sharedMemPerBlockOptin);
  cudaFuncAttributes attrs{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  TORCH_CHECK(bytes + static_cast<int>(attrs.sharedSizeBytes) <= limit, "robustft_ext: a kernel needs ",
              bytes, " bytes of dynamic and ", attrs.sharedSizeBytes, " of static shared memory "
              "per block; this device (", props->name, ") has ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace cuda_tiles
}  // namespace robustft
