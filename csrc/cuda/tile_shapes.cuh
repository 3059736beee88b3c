// The tile shapes the CUDA launchers instantiate the tensor-core engine with (tile_dispatch.h),
// from the configurations of tile_plan.h, kept apart from the host code so the CPU emulation
// tests run exactly these instantiations.
//   Contrastive ops: 128 x 128 tiles, 8 warps of 64 x 32 (64 float accumulators a thread),
//   3 cp.async stages of 32 KB (2 stages where a block gets less than 104 KB).
//   Step ops (up to three products from four operand slabs): 128 x 64 tiles, 8 warps of
//   32 x 32 (96 accumulators), 3 stages of 48 KB; or 64 x 64 tiles of 4 warps, 2 stages of
//   32 KB where a block gets less than 150 KB.
// One CTA per SM by the registers (about 200 a thread): capping them at 128 for two CTAs made
// ptxas spill 12 to 180 bytes in the contrastive kernels (sm_90, checked with -Xptxas -v).
#pragma once

#include "cuda/mma_tile.cuh"
#include "cuda/tile_plan.h"

namespace robustft {
namespace cuda_tiles {

#define RFT_MMA_SHAPE(S) MmaShape<(S).bm, (S).bn, (S).warps_m, (S).warps_n, (S).stages>

using ContrastiveMmaShape = RFT_MMA_SHAPE(cuda_plan::kContrastive.large);
using ContrastiveMmaShapeSmall = RFT_MMA_SHAPE(cuda_plan::kContrastive.small);
using StepMmaShape = RFT_MMA_SHAPE(cuda_plan::kStep.large);
using StepMmaShapeSmall = RFT_MMA_SHAPE(cuda_plan::kStep.small);

#undef RFT_MMA_SHAPE

// A kernel family's two shapes and its plan, for dispatch_engine (tile_dispatch.h).
struct ContrastiveShapes {
  static constexpr const cuda_plan::Family& kFamily = cuda_plan::kContrastive;
  using Large = ContrastiveMmaShape;
  using Small = ContrastiveMmaShapeSmall;
};
struct StepShapes {
  static constexpr const cuda_plan::Family& kFamily = cuda_plan::kStep;
  using Large = StepMmaShape;
  using Small = StepMmaShapeSmall;
};

}  // namespace cuda_tiles
}  // namespace robustft
