// Host memory of the CPU's kept tensors: the forward's dot products (contrastive_ops.h) or
// Gram strips (step_ops.h), held on the autograd context until their backward, and of the
// Gram design's O(n D) buffers of every step. A block freed returns here and serves the
// next request of the same size (the next forward's kept tensors, the next step's buffers), as
// torch's CUDA caching allocator does for device memory: a training loop's steps ask for the
// same sizes, and a fresh block from the system is page-faulted in on first touch (64 MiB is
// 16k faults, about 10 ms on the machine of docs/benchmarks.md, a tenth of a CLIP + m^2
// step at n = 2048). The free blocks held stay within twice the workspace limit (the oldest
// are returned first): a step's kept products take up to the limit and its other buffers
// come on top. Were the bound the limit alone, a caller freeing its gradients after the
// backward freed the kept products would send the kept block back to the system, and every
// forward would fault it in again (256 MiB a step for CLIP at n = 8192).
// set_workspace_limit trims them to the new bound.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "workspace.h"

namespace robustft {

class KeptCache {
 public:
  // A block of exactly `bytes` bytes: a free one of that size, else a new one.
  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          void* p = it->ptr;
          free_bytes_ -= bytes;
          free_.erase(it);
          return p;
        }
      }
    }
    return c10::alloc_cpu(bytes);
  }

  // A block its tensor no longer uses.
  void give(void* p, size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back({p, bytes});
    free_bytes_ += bytes;
    trim_locked(held_bound(workspace_limit_bytes().load()));
  }

  // The most bytes of free blocks held under a workspace limit of `limit` bytes.
  static int64_t held_bound(int64_t limit) {
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    return limit > kMax / 2 ? kMax : 2 * limit;
  }

  // Returns free blocks, the oldest first, until at most held_bound(limit) bytes are held.
  void trim_to_limit(int64_t limit) {
    const std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(held_bound(limit));
  }

  int64_t free_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return free_bytes_;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  void trim_locked(int64_t keep_bytes) {
    while (free_bytes_ > keep_bytes && !free_.empty()) {
      c10::free_cpu(free_.front().ptr);
      free_bytes_ -= int64_t(free_.front().bytes);
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  int64_t free_bytes_ = 0;
};

// One cache per process, never destroyed: kept tensors may outlive static destruction.
inline KeptCache& kept_cache() {
  static KeptCache* cache = new KeptCache();
  return *cache;
}

// An uninitialised tensor for a kept buffer or a large buffer every step asks for again (the
// Gram design's stacked rows and their gradient): on the CPU from kept_cache(), on other
// devices at::empty (their allocators cache already).
inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  if (opts.device().type() != c10::kCPU || bytes == 0) return at::empty(sizes, opts);
  void* p = kept_cache().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { kept_cache().give(q, bytes); }, opts);
}

}  // namespace robustft
