// The tile shapes the CUDA launchers instantiate the tensor-core engine with (tile_dispatch.h),
// kept apart from the host code so the CPU emulation tests run exactly these instantiations.
//   Contrastive ops: 128 x 128 tiles, 8 warps of 64 x 32 (64 float accumulators a thread),
//   3 cp.async stages of 32 KB.
//   Step ops (up to three products from four operand slabs): 128 x 64 tiles, 8 warps of
//   32 x 32 (96 accumulators), 3 stages of 48 KB.
// One CTA per SM by the registers (about 200 a thread): capping them at 128 for two CTAs made
// ptxas spill 12 to 180 bytes in the contrastive kernels (sm_90, checked with -Xptxas -v).
#pragma once

#include "cuda/mma_tile.cuh"

namespace robustft {
namespace cuda_tiles {

using ContrastiveMmaShape = MmaShape<128, 128, 2, 4, 3>;
using StepMmaShape = MmaShape<128, 64, 4, 2, 3>;

}  // namespace cuda_tiles
}  // namespace robustft
