// Building blocks of the fused C++ CPU kernels (contrastive_cpu.cpp, step_cpu.cpp).
//
// Rows are split into blocks processed in parallel (at::parallel_for); each task streams
// the column tiles of its block in order. One parallel region per launch keeps the threads
// busy on whole blocks: alternating multi-threaded BLAS calls with short parallel loops per
// tile made the threads spin-wait for each other and ran slower on two threads than on
// one. Tile matmuls run sequentially inside a task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "robustft_maths.h"

namespace robustft {
namespace cpu {

namespace mx = ::robustft::maths;

constexpr int64_t kMaxRowBlock = 512;
constexpr int64_t kMinRowBlock = 32;
constexpr int64_t kColBlock = 1024;

// The value of an optional 0-d tensor (0 when undefined).
template <typename T>
T value(const at::Tensor& t) {
  return t.defined() ? t.item<T>() : T(0);
}

// Rows per block: enough blocks for every thread, no more rows than kMaxRowBlock.
inline int64_t row_block(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t even = (n + 2 * threads - 1) / (2 * threads);
  return std::min(kMaxRowBlock, std::max(kMinRowBlock, even));
}

// Calls task(t) for t in [0, tasks) in one parallel region. Worker threads start with
// default thread-local state (grad mode on, no dispatch keys excluded): they get the
// caller's, set by the op's RFT_KERNEL_GUARDS.
template <typename Fn>
void parallel_tasks(int64_t tasks, Fn&& task) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) task(t);
  });
}

// The row blocks of an n-row problem: block b covers rows [b * size, b * size + rows(b)).
struct RowBlocks {
  int64_t n, size, count;
  explicit RowBlocks(int64_t n_) : n(n_), size(row_block(n_)), count((n_ + size - 1) / size) {}
  int64_t start(int64_t b) const { return b * size; }
  int64_t rows(int64_t b) const { return std::min(size, n - b * size); }
};

// Calls fn(j0, cols) for the column tiles of an m-column problem, in order.
template <typename Fn>
void for_each_col_tile(int64_t m, Fn&& fn) {
  for (int64_t j0 = 0; j0 < m; j0 += kColBlock) fn(j0, std::min(kColBlock, m - j0));
}

// Calls fn(i0, rows, j0, cols) for every (row block, column tile) of an n x m problem,
// row blocks in parallel and column tiles in order within a block. fn must only write
// state of rows [i0, i0 + rows) or state private to the calling thread.
template <typename Fn>
void for_each_block(int64_t n, int64_t m, Fn&& fn) {
  const RowBlocks blocks(n);
  parallel_tasks(blocks.count, [&](int64_t b) {
    for_each_col_tile(m, [&](int64_t j0, int64_t cols) {
      fn(blocks.start(b), blocks.rows(b), j0, cols);
    });
  });
}

// The rows x cols tile of dot products <P_i, Q_j> (contiguous, P's dtype).
inline at::Tensor dot_tile(const at::Tensor& P, const at::Tensor& Q, int64_t i0, int64_t rows,
                           int64_t j0, int64_t cols) {
  return at::mm(P.narrow(0, i0, rows), Q.narrow(0, j0, cols).t()).contiguous();
}

// The calling thread's slot in per-thread state.
inline int64_t thread_slot(int64_t slots) {
  const int64_t t = at::get_thread_num();
  TORCH_CHECK(t >= 0 && t < slots, "robustft_ext: thread ", t, " has no state slot");
  return t;
}

// Each row's (max, sum exp) of a rows x cols tile of logits joins states[i0 + r].
template <typename T>
void push_row_lse(const T* logits, int64_t rows, int64_t cols, int64_t i0,
                  std::vector<mx::LseState<T>>& states) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = logits + r * cols;
    T row_max = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, row[c]);
    T sum = 0;
    for (int64_t c = 0; c < cols; ++c) sum += std::exp(row[c] - row_max);
    states[i0 + r] = mx::lse_push_block(states[i0 + r], row_max, sum);
  }
}

// Each column's (max, sum exp) over the tile's rows joins states[j0 + c], rows streamed
// so the inner loop stays contiguous.
template <typename T>
void push_col_lse(const T* logits, int64_t rows, int64_t cols, int64_t j0,
                  std::vector<mx::LseState<T>>& states) {
  std::vector<T> cmax(cols, -std::numeric_limits<T>::infinity()), csum(cols, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = logits + r * cols;
    for (int64_t c = 0; c < cols; ++c) cmax[c] = std::max(cmax[c], row[c]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = logits + r * cols;
    for (int64_t c = 0; c < cols; ++c) csum[c] += std::exp(row[c] - cmax[c]);
  }
  for (int64_t c = 0; c < cols; ++c) {
    states[j0 + c] = mx::lse_push_block(states[j0 + c], cmax[c], csum[c]);
  }
}

// Per-thread column states of an m-column problem, merged at the end.
template <typename T>
struct ColumnStates {
  std::vector<std::vector<mx::LseState<T>>> parts;

  explicit ColumnStates(int64_t m, int64_t slots)
      : parts(slots, std::vector<mx::LseState<T>>(m, mx::lse_empty<T>())) {}

  std::vector<mx::LseState<T>>& mine() { return parts[thread_slot(parts.size())]; }

  // out[j] = LSE over every part's state of column j.
  void write(T* out, int64_t m) const {
    for (int64_t j = 0; j < m; ++j) {
      mx::LseState<T> st = mx::lse_empty<T>();
      for (const auto& part : parts) st = mx::lse_merge(st, part[j]);
      out[j] = mx::lse_value(st);
    }
  }
};

template <typename T>
void write_lse(const std::vector<mx::LseState<T>>& states, T* out) {
  for (size_t i = 0; i < states.size(); ++i) out[i] = mx::lse_value(states[i]);
}

}  // namespace cpu
}  // namespace robustft

// Runs the body with acc_t = double for double tensors, float otherwise.
#define RFT_DISPATCH_ACC(TENSOR, ...)     \
  [&] {                                   \
    if ((TENSOR).scalar_type() == at::kDouble) { \
      using acc_t = double;               \
      return __VA_ARGS__();               \
    }                                     \
    using acc_t = float;                  \
    return __VA_ARGS__();                 \
  }()
