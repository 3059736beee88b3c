// The bounded workspace of the fused backward passes (docs/backends.md, "Workspace"), and the
// other process-wide settings of the ops (the step's design).
//
// A backward forms its dlogits one chunk of rows at a time (every column of the chunk's
// rows) and multiplies the chunk into the feature gradients with library GEMMs. The
// chunk holds as many rows as fit in the limit, which the Python side sets
// (robustft_ext.set_workspace_limit, $ROBUSTFT_WORKSPACE_MB) through the op
// robustft_ext::set_workspace_limit. So no buffer grows with n x m.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace robustft {

// 512 MiB: twice CLIP's N x N float products at N = 8192, since the Gram formulation keeps
// twice CLIP's entries (docs/backends.md, workspace).
constexpr int64_t kDefaultWorkspaceBytes = int64_t(512) << 20;

inline std::atomic<int64_t>& workspace_limit_bytes() {
  static std::atomic<int64_t> limit{kDefaultWorkspaceBytes};
  return limit;
}

// Rows per chunk of an n-row problem whose chunk rows cost bytes_per_row each: as many as
// fit in the limit, rounded down to a multiple of `align` (the kernels' row block), never
// fewer than `align` rows, and never more than half the rows (rounded up to `align`), so the
// workspace never holds the whole n x m block of a problem larger than one row block.
inline int64_t workspace_chunk_rows(int64_t n, int64_t bytes_per_row, int64_t align) {
  const int64_t fit = workspace_limit_bytes().load() / std::max<int64_t>(1, bytes_per_row);
  const int64_t half = ((n + 1) / 2 + align - 1) / align * align;
  const int64_t rows = std::max(align, std::min(fit / align * align, half));
  return std::min(n, rows);
}

// How the ops evaluate CLIP + m^2-mix (and the robust step): the symmetric Gram formulation
// (docs/maths.md, section 9.4; the default) or the three tile products of section 9.3 (for
// comparison). Set by robustft_ext.set_step_design through the op
// robustft_ext::set_step_design.
enum class StepDesign : int { kGram = 0, kProducts = 1 };

inline std::atomic<int>& step_design_setting() {
  static std::atomic<int> design{int(StepDesign::kGram)};
  return design;
}

inline StepDesign step_design() { return StepDesign(step_design_setting().load()); }

}  // namespace robustft
