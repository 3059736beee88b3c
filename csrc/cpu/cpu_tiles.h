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

// A rows x cols tile whose row r starts at d + r * ld.
template <typename T>
struct Tile {
  T* d;
  int64_t rows, cols, ld;
  T* row(int64_t r) const { return d + r * ld; }
};

// Problems of at most this many entries (n <= 512 for square ones) take their dot products
// from one multi-threaded GEMM into a buffer of that size (1 MiB in float, half of one
// task's tile buffer in a larger problem), the tiles being slices of it: the tasks of a
// small problem have small tiles, whose sequential matmuls ran slower on two threads than
// one threaded GEMM (n = 512: 2.0 against 2.35 ms per forward). Larger problems take each
// tile from its task's own sequential matmul.
constexpr int64_t kWholeProductEntries = int64_t(1) << 18;

// A task's working memory: its tile buffer (tiled problems) and its tile's row and column
// statistics.
template <typename T>
struct TileScratch {
  at::Tensor buffer;  // [rows * min(m, kColBlock)]; undefined for whole products
  std::vector<T> row_max, row_sum, col_max, col_sum;

  TileScratch(int64_t rows, int64_t m, const at::Tensor& buffer_)
      : buffer(buffer_), row_max(rows), row_sum(rows), col_max(std::min(m, kColBlock)),
        col_sum(std::min(m, kColBlock)) {}
};

// The dot products <P_i, Q_j> of an n x m problem, tile by tile (P and Q contiguous, of
// the accumulation dtype): a slice of the whole product when it holds at most
// kWholeProductEntries entries (one GEMM, run by the constructor outside any parallel
// region), else the tile's own matmul into the calling task's buffer. Tiles may be
// overwritten (each tile of a whole product belongs to one task).
template <typename T>
class DotProducts {
 public:
  DotProducts(const at::Tensor& P, const at::Tensor& Q) : P_(P), Q_(Q) {
    if (P.size(0) * Q.size(0) <= kWholeProductEntries) whole_ = at::mm(P, Q.t());
  }

  // Scratch for a task of up to `rows` rows.
  TileScratch<T> scratch(int64_t rows) const {
    const int64_t m = Q_.size(0);
    return TileScratch<T>(rows, m,
                          whole_.defined() ? at::Tensor()
                                           : at::empty({rows * std::min(m, kColBlock)},
                                                       P_.options()));
  }

  Tile<T> tile(TileScratch<T>& s, int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    if (whole_.defined()) {
      const int64_t m = Q_.size(0);
      return Tile<T>{whole_.data_ptr<T>() + i0 * m + j0, rows, cols, m};
    }
    at::Tensor t = s.buffer.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(t, P_.narrow(0, i0, rows), Q_.narrow(0, j0, cols).t());
    return Tile<T>{t.data_ptr<T>(), rows, cols, cols};
  }

 private:
  at::Tensor P_, Q_, whole_;
};

// Dot products to logits scale * d + bias in place, and the tile's row maxima into
// s.row_max and, with_cols, its column maxima into s.col_max. Float runs the vectorised
// loops of cpu_vec_kernels.h, double the scalar maths of robustft_maths.h.
inline void tile_logits(const Tile<float>& t, float scale, float bias, TileScratch<float>& s,
                        bool with_cols) {
  float* col_max = nullptr;
  if (with_cols) {
    std::fill(s.col_max.begin(), s.col_max.begin() + t.cols,
              -std::numeric_limits<float>::infinity());
    col_max = s.col_max.data();
  }
  vec::kernels().logits_max(t.d, t.rows, t.cols, t.ld, scale, bias, s.row_max.data(), col_max);
}

inline void tile_logits(const Tile<double>& t, double scale, double bias,
                        TileScratch<double>& s, bool with_cols) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  if (with_cols) std::fill(s.col_max.begin(), s.col_max.begin() + t.cols, kNegInf);
  for (int64_t r = 0; r < t.rows; ++r) {
    double* row = t.row(r);
    double m = kNegInf;
    for (int64_t c = 0; c < t.cols; ++c) {
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
void tile_set_logit(const Tile<T>& t, int64_t r, int64_t c, T value, TileScratch<T>& s) {
  T* row = t.row(r);
  row[c] = value;
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t q = 0; q < t.cols; ++q) m = std::max(m, row[q]);
  s.row_max[r] = m;
}

// Both orientations' sums of a tile of logits S = scale t + bias from one exp per entry,
// shifted by the tile's largest logit, where every row's and column's maximum (s.row_max,
// s.col_max) lies within maths::kSharedShiftSpread of it: s.row_sum, s.col_sum (zeroed by
// the caller) get the sums and s.row_max, s.col_max the shift. False (nothing done) for a
// wider spread, NaN or infinities.
inline bool tile_shared_sums(const Tile<float>& t, float scale, float bias,
                             TileScratch<float>& s) {
  const auto [lo_r, hi] = std::minmax_element(s.row_max.begin(), s.row_max.begin() + t.rows);
  const float lo_c = *std::min_element(s.col_max.begin(), s.col_max.begin() + t.cols);
  const float shift = *hi;
  if (!mx::shares_shift(std::min(*lo_r, lo_c), shift)) return false;
  vec::kernels().dot_exp_sums_shared(t.d, t.rows, t.cols, t.ld, scale, bias, shift,
                                     s.row_sum.data(), s.col_sum.data());
  std::fill(s.row_max.begin(), s.row_max.begin() + t.rows, shift);
  std::fill(s.col_max.begin(), s.col_max.begin() + t.cols, shift);
  return true;
}

// The tile's row sums of exp(S - row max) into s.row_sum and, with_cols, its column sums
// of exp(S - column max) into s.col_sum (or both with one shift: tile_shared_sums).
inline void tile_exp_sums(const Tile<float>& t, TileScratch<float>& s, bool with_cols) {
  float* col_sum = nullptr;
  if (with_cols) {
    std::fill(s.col_sum.begin(), s.col_sum.begin() + t.cols, 0.0f);
    if (tile_shared_sums(t, 1.0f, 0.0f, s)) return;
    col_sum = s.col_sum.data();
  }
  vec::kernels().exp_sums(t.d, t.rows, t.cols, t.ld, s.row_max.data(), s.row_sum.data(),
                          with_cols ? s.col_max.data() : nullptr, col_sum);
}

inline void tile_exp_sums(const Tile<double>& t, TileScratch<double>& s, bool with_cols) {
  if (with_cols) std::fill(s.col_sum.begin(), s.col_sum.begin() + t.cols, 0.0);
  for (int64_t r = 0; r < t.rows; ++r) {
    const double* row = t.row(r);
    double sum = 0;
    for (int64_t c = 0; c < t.cols; ++c) {
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
void tile_fold(const Tile<T>& t, int64_t i0, int64_t j0, TileScratch<T>& s,
               std::vector<mx::LseState<T>>& row_states,
               std::vector<mx::LseState<T>>* col_states) {
  tile_exp_sums(t, s, col_states != nullptr);
  for (int64_t r = 0; r < t.rows; ++r) {
    row_states[i0 + r] = mx::lse_push_block(row_states[i0 + r], s.row_max[r], s.row_sum[r]);
  }
  if (col_states != nullptr) {
    auto& cs = *col_states;
    for (int64_t c = 0; c < t.cols; ++c) {
      cs[j0 + c] = mx::lse_push_block(cs[j0 + c], s.col_max[c], s.col_sum[c]);
    }
  }
}

// The Gram formulation's mixed logits (gram_rows.h) into tile t, with the tile's row maxima
// into s.row_max (by_rows) or its column maxima into s.col_max (otherwise).
inline void tile_mixed_logits(const Tile<float>& t, const gram::MixArgs<float>& a,
                              TileScratch<float>& s, bool by_rows) {
  if (!by_rows) {
    std::fill(s.col_max.begin(), s.col_max.begin() + t.cols,
              -std::numeric_limits<float>::infinity());
  }
  vec::kernels().gram_logits_max(t.d, t.rows, t.cols, t.ld, a, by_rows ? s.row_max.data() : nullptr,
                                 by_rows ? nullptr : s.col_max.data());
}

inline void tile_mixed_logits(const Tile<double>& t, const gram::MixArgs<double>& a,
                              TileScratch<double>& s, bool by_rows) {
  if (!by_rows) {
    std::fill(s.col_max.begin(), s.col_max.begin() + t.cols,
              -std::numeric_limits<double>::infinity());
  }
  gram::mixed_logits_max(t.d, t.rows, t.cols, t.ld, a, by_rows ? s.row_max.data() : nullptr,
                         by_rows ? nullptr : s.col_max.data());
}

// Each column's (max, sum exp) of a logit tile whose column maxima s.col_max holds joins
// col_states[j0 + c]; the rows are not folded.
inline void tile_fold_columns(const Tile<float>& t, int64_t j0, TileScratch<float>& s,
                              std::vector<mx::LseState<float>>& col_states) {
  std::fill(s.col_sum.begin(), s.col_sum.begin() + t.cols, 0.0f);
  vec::kernels().exp_sums(t.d, t.rows, t.cols, t.ld, nullptr, nullptr, s.col_max.data(),
                          s.col_sum.data());
  for (int64_t c = 0; c < t.cols; ++c) {
    col_states[j0 + c] = mx::lse_push_block(col_states[j0 + c], s.col_max[c], s.col_sum[c]);
  }
}

inline void tile_fold_columns(const Tile<double>& t, int64_t j0, TileScratch<double>& s,
                              std::vector<mx::LseState<double>>& col_states) {
  std::fill(s.col_sum.begin(), s.col_sum.begin() + t.cols, 0.0);
  for (int64_t r = 0; r < t.rows; ++r) {
    const double* row = t.row(r);
    for (int64_t c = 0; c < t.cols; ++c) s.col_sum[c] += std::exp(row[c] - s.col_max[c]);
  }
  for (int64_t c = 0; c < t.cols; ++c) {
    col_states[j0 + c] = mx::lse_push_block(col_states[j0 + c], s.col_max[c], s.col_sum[c]);
  }
}

// tile_fold over a tile of dot products that stays as it is (the forward that keeps the
// dot products for its backward): the logits scale d + bias are formed on the fly.
inline void tile_fold_dots(const Tile<float>& t, float scale, float bias, int64_t i0, int64_t j0,
                           TileScratch<float>& s, std::vector<mx::LseState<float>>& row_states,
                           std::vector<mx::LseState<float>>* col_states) {
  const bool with_cols = col_states != nullptr;
  float* col_max = nullptr;
  float* col_sum = nullptr;
  if (with_cols) {
    std::fill(s.col_max.begin(), s.col_max.begin() + t.cols,
              -std::numeric_limits<float>::infinity());
    std::fill(s.col_sum.begin(), s.col_sum.begin() + t.cols, 0.0f);
    col_max = s.col_max.data();
    col_sum = s.col_sum.data();
  }
  const auto& k = vec::kernels();
  k.dot_logit_max(t.d, t.rows, t.cols, t.ld, scale, bias, s.row_max.data(), col_max);
  if (!with_cols || !tile_shared_sums(t, scale, bias, s)) {
    k.dot_exp_sums(t.d, t.rows, t.cols, t.ld, scale, bias, s.row_max.data(), s.row_sum.data(),
                   col_max, col_sum);
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    row_states[i0 + r] = mx::lse_push_block(row_states[i0 + r], s.row_max[r], s.row_sum[r]);
  }
  if (with_cols) {
    auto& cs = *col_states;
    for (int64_t c = 0; c < t.cols; ++c) {
      cs[j0 + c] = mx::lse_push_block(cs[j0 + c], s.col_max[c], s.col_sum[c]);
    }
  }
}

// Double keeps the scalar maths: each entry's logit is pushed into its row's and column's
// state as it is formed.
inline void tile_fold_dots(const Tile<double>& t, double scale, double bias, int64_t i0,
                           int64_t j0, TileScratch<double>& s,
                           std::vector<mx::LseState<double>>& row_states,
                           std::vector<mx::LseState<double>>* col_states) {
  (void)s;
  for (int64_t r = 0; r < t.rows; ++r) {
    const double* row = t.row(r);
    mx::LseState<double> st = row_states[i0 + r];
    for (int64_t c = 0; c < t.cols; ++c) {
      const double v = mx::logit(row[c], scale, bias);
      st = mx::lse_push(st, v);
      if (col_states != nullptr) (*col_states)[j0 + c] = mx::lse_push((*col_states)[j0 + c], v);
    }
    row_states[i0 + r] = st;
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
