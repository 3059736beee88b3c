// The tile configurations of the native CUDA kernels' tensor-core engine, the shared memory
// each needs per block, and the choice between them for a device from its opt-in shared
// memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin). Plain host C++ (no CUDA
// headers), so that the choice can be made and tested without a GPU: the op
// robustft_ext::native_cuda_tiles (schemas.cpp) answers it for any device's figures, and
// backends.py asks it before choosing the native backend.
//
// Devices (opt-in bytes per block): A100 (sm_80) 166912; RTX 3090 / 4090 (sm_86 / sm_89) and
// RTX 5090 (sm_120) 101376; H100 / H200 (sm_90) and B200 (sm_100) 232448. The large
// configurations fill a Hopper or an A100; the small ones fit 99 KB.
#pragma once

#include <string>

namespace robustft {
namespace cuda_plan {

// One K block of an operand row: 128 bytes (64 bf16 / f16, 32 float).
constexpr int kRowBytes = 128;

struct TileShape {
  int bm, bn, warps_m, warps_n, stages;
};

// A kernel family: its operand slabs per stage and its two shapes. static_budget bounds the
// bytes of the family's __shared__ arrays (benchmarks/kernel_report.py --strict checks every
// kernel of the built extension against it).
struct Family {
  const char* name;
  int row_slabs, col_slabs;
  TileShape large, small;
  int static_budget;
};

// Contrastive ops: one row slab (P) and one column slab (Q); 128 x 128 tiles, 8 warps of
// 64 x 32; three cp.async stages (two when the shared memory is short).
constexpr Family kContrastive{"contrastive", 1, 1, {128, 128, 2, 4, 3}, {128, 128, 2, 4, 2}, 8192};
// The step with every term on: two row slabs (I, T) and two column slabs (M, T); 128 x 64
// tiles of 8 warps, or 64 x 64 tiles of 4 warps (both 32 x 32 a warp). The Gram forward
// (gram_lse_kernel, same slabs) holds its row block's four states and a stash besides:
// 5632 B, and 6656 B in an sm_90 build, whose toolchain adds the 1 KB it reserves per block.
constexpr Family kStep{"step", 2, 2, {128, 64, 4, 2, 3}, {64, 64, 2, 2, 2}, 7168};

constexpr int dynamic_bytes(const Family& f, const TileShape& s) {
  return s.stages * (f.row_slabs * s.bm + f.col_slabs * s.bn) * kRowBytes;
}

constexpr int needed_bytes(const Family& f, const TileShape& s) {
  return dynamic_bytes(f, s) + f.static_budget;
}

enum class Tiles { kNone, kSmall, kLarge };

constexpr Tiles choose(const Family& f, int smem_optin) {
  return smem_optin >= needed_bytes(f, f.large)   ? Tiles::kLarge
         : smem_optin >= needed_bytes(f, f.small) ? Tiles::kSmall
                                                  : Tiles::kNone;
}

inline const char* tiles_name(Tiles t) {
  return t == Tiles::kLarge ? "large" : t == Tiles::kSmall ? "small" : "none";
}

// The plan as JSON, for tools that check the built kernels against it (kernel_report.py):
// {"row_bytes": 128, "families": {"contrastive": {"row_slabs": 1, "col_slabs": 1,
//  "static_budget": 8192, "large": {"bm": 128, ..., "dynamic": 98304}, "small": {...}}, ...}}
inline std::string plan_json() {
  auto shape = [](const Family& f, const TileShape& s) {
    return "{\"bm\": " + std::to_string(s.bm) + ", \"bn\": " + std::to_string(s.bn) +
           ", \"warps_m\": " + std::to_string(s.warps_m) + ", \"warps_n\": " +
           std::to_string(s.warps_n) + ", \"stages\": " + std::to_string(s.stages) +
           ", \"dynamic\": " + std::to_string(dynamic_bytes(f, s)) + "}";
  };
  auto family = [&](const Family& f) {
    return "\"" + std::string(f.name) + "\": {\"row_slabs\": " + std::to_string(f.row_slabs) +
           ", \"col_slabs\": " + std::to_string(f.col_slabs) + ", \"static_budget\": " +
           std::to_string(f.static_budget) + ", \"large\": " + shape(f, f.large) +
           ", \"small\": " + shape(f, f.small) + "}";
  };
  return "{\"row_bytes\": " + std::to_string(kRowBytes) + ", \"families\": {" +
         family(kContrastive) + ", " + family(kStep) + "}}";
}

static_assert(choose(kContrastive, 101376) == Tiles::kSmall && choose(kStep, 101376) == Tiles::kSmall,
              "the small configurations must fit 99 KB (sm_86, sm_89, sm_120)");
static_assert(choose(kContrastive, 166912) == Tiles::kLarge && choose(kStep, 166912) == Tiles::kLarge,
              "the large configurations must fit an A100");

}  // namespace cuda_plan
}  // namespace robustft
