// Building blocks of the fused C++ CPU kernels (contrastive_cpu.cpp, step_cpu.cpp).
//
// Rows are split into blocks processed in parallel (at::parallel_for); each task streams
// the column tiles of its block in order. One parallel region per launch keeps the threads
// busy on whole blocks: alternating multi-threaded BLAS calls with short parallel loops per
// tile made the threads spin-wait for each other and ran slower on two threads than on
// one. Tile matmuls run sequentially inside a task, into a buffer the task reuses for
// all its tiles. tile_logits / tile_fold form a tile's logits and fold them into
// log-sum-exp states: float through the vectorised loops of cpu_vec_kernels.h, double
// through the scalar maths of robustft_maths.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/cpu_vec_kernels.h"
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

// The calling thread's slot in per-thread state.
inline int64_t thread_slot(int64_t slots) {
  const int64_t t = at::get_thread_num();
  TORCH_CHECK(t >= 0 && t < slots, "robustft_ext: thread ", t, " has no state slot");
  return t;
}

// Rows per task of a parallel loop over rows of m entries each: tiny problems run on the
// calling thread, where waking the pool costs more than the work.
inline int64_t rows_per_task(int64_t m) {
  constexpr int64_t kMinEntriesPerTask = 32768;
  return std::max<int64_t>(1, kMinEntriesPerTask / std::max<int64_t>(1, m));
}

// Calls task(i0, rows) for every row block of an n-row problem, in one parallel region.
template <typename Fn>
void for_each_row_block(int64_t n, Fn&& task) {
  const RowBlocks blocks(n);
  parallel_tasks(blocks.count, [&](int64_t b) { task(blocks.start(b), blocks.rows(b)); });
}

// A task's buffer for one tile of dot products at a time (P's dtype), and the tile's row
// and column statistics.
template <typename T>
struct TileScratch {
  at::Tensor buffer;  // [rows * min(m, kColBlock)]
  std::vector<T> row_max, row_sum, col_max, col_sum;

  // For tiles of up to `rows` rows of an m-column problem.
  TileScratch(const at::Tensor& like, int64_t rows, int64_t m)
      : buffer(at::empty({rows * std::min(m, kColBlock)}, like.options())),
        row_max(rows), row_sum(rows), col_max(std::min(m, kColBlock)),
        col_sum(std::min(m, kColBlock)) {}

  // The rows x cols tile of dot products <P_i, Q_j> in the buffer (contiguous).
  T* dots(const at::Tensor& P, const at::Tensor& Q, int64_t i0, int64_t rows, int64_t j0,
          int64_t cols) {
    at::Tensor tile = buffer.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(tile, P.narrow(0, i0, rows), Q.narrow(0, j0, cols).t());
    return tile.data_ptr<T>();
  }
};

// Dot products to logits scale * d + bias in place, and the tile's row maxima into
// s.row_max and, with_cols, its column maxima into s.col_max. Float runs the vectorised
// loops of cpu_vec_kernels.h, double the scalar maths of robustft_maths.h.
inline void tile_logits(float* d, int64_t rows, int64_t cols, float scale, float bias,
                        TileScratch<float>& s, bool with_cols) {
  float* col_max = nullptr;
  if (with_cols) {
    std::fill(s.col_max.begin(), s.col_max.begin() + cols, -std::numeric_limits<float>::infinity());
    col_max = s.col_max.data();
  }
  vec::kernels().logits_max(d, rows, cols, scale, bias, s.row_max.data(), col_max);
}

inline void tile_logits(double* d, int64_t rows, int64_t cols, double scale, double bias,
                        TileScratch<double>& s, bool with_cols) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  if (with_cols) std::fill(s.col_max.begin(), s.col_max.begin() + cols, kNegInf);
  for (int64_t r = 0; r < rows; ++r) {
    double* row = d + r * cols;
    double m = kNegInf;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = mx::logit(row[c], scale, bias);
      m = std::max(m, row[c]);
      if (with_cols) s.col_max[c] = std::max(s.col_max[c], row[c]);
    }
    s.row_max[r] = m;
  }
}

// Overwrites entry (r, c) of a logit tile that tile_logits formed (row maxima only) and
// recomputes that row's maximum.
template <typename T>
void tile_set_logit(T* d, int64_t r, int64_t c, int64_t cols, T value, TileScratch<T>& s) {
  T* row = d + r * cols;
  row[c] = value;
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t q = 0; q < cols; ++q) m = std::max(m, row[q]);
  s.row_max[r] = m;
}

// The tile's row sums of exp(S - row max) into s.row_sum and, with_cols, its column sums
// of exp(S - column max) into s.col_sum.
inline void tile_exp_sums(const float* d, int64_t rows, int64_t cols, TileScratch<float>& s,
                          bool with_cols) {
  float* col_sum = nullptr;
  if (with_cols) {
    std::fill(s.col_sum.begin(), s.col_sum.begin() + cols, 0.0f);
    col_sum = s.col_sum.data();
  }
  vec::kernels().exp_sums(d, rows, cols, s.row_max.data(), s.row_sum.data(),
                          with_cols ? s.col_max.data() : nullptr, col_sum);
}

inline void tile_exp_sums(const double* d, int64_t rows, int64_t cols, TileScratch<double>& s,
                          bool with_cols) {
  if (with_cols) std::fill(s.col_sum.begin(), s.col_sum.begin() + cols, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = d + r * cols;
    double sum = 0;
    for (int64_t c = 0; c < cols; ++c) {
      sum += std::exp(row[c] - s.row_max[r]);
      if (with_cols) s.col_sum[c] += std::exp(row[c] - s.col_max[c]);
    }
    s.row_sum[r] = sum;
  }
}

// Each row's (max, sum exp) of a logit tile formed by tile_logits joins
// row_states[i0 + r]; with col_states, each column's (over the tile's rows) joins
// (*col_states)[j0 + c].
template <typename T>
void tile_fold(const T* d, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
               TileScratch<T>& s, std::vector<mx::LseState<T>>& row_states,
               std::vector<mx::LseState<T>>* col_states) {
  tile_exp_sums(d, rows, cols, s, col_states != nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    row_states[i0 + r] = mx::lse_push_block(row_states[i0 + r], s.row_max[r], s.row_sum[r]);
  }
  if (col_states != nullptr) {
    auto& cs = *col_states;
    for (int64_t c = 0; c < cols; ++c) {
      cs[j0 + c] = mx::lse_push_block(cs[j0 + c], s.col_max[c], s.col_sum[c]);
    }
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
