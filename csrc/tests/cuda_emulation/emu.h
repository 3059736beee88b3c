// A CPU emulation of the few CUDA features that the kernels of csrc/cuda/contrastive_device.cuh
// use, so that a plain C++ compiler (g++, no nvcc, no CUDA toolkit, no GPU) can compile and
// run THE SAME KERNEL SOURCE that the GPU build compiles. test_cuda_kernels_emulated.cpp
// includes this header, then cuda/contrastive_device.cuh, and launches the kernels as the
// launchers of csrc/cuda/contrastive_cuda.cu compose them.
//
// What is emulated:
//   * __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__ / __align__
//     (dropped or mapped to GCC attributes); __shared__ becomes `static`, which is correct
//     because the CTAs of a grid run one after another, never two at once;
//   * threadIdx, blockIdx, blockDim, gridDim (x only for threads; grids are 2-D);
//   * one execution context per CUDA thread of a CTA: by default a cooperative fiber
//     (ucontext) per thread, scheduled on one OS thread; with CUDA_EMU_THREADS=1 (the
//     ThreadSanitizer build) a real OS thread per CUDA thread, from a pool reused for every
//     launch;
//   * __syncthreads(): a barrier over the CTA's threads;
//   * __shfl_xor_sync(): every lane of the warp publishes its value, a barrier over the 32
//     lanes of the warp, then each lane reads its partner's value (double-buffered, so one
//     barrier per shuffle suffices);
//   * atomicCAS (64-bit), __float_as_uint / __uint_as_float, min / max of the device API.
//
// Limits (what this does NOT check):
//   * no memory model: no caches, no weak ordering, no bank conflicts, no coalescing, no
//     16-byte alignment faults; a missing __threadfence or volatile is not detected;
//   * warp-synchronous execution is emulated by barriers at each shuffle only: code relying
//     on implicit lock-step execution of a warp between shuffles is not emulated (the
//     kernels here do not rely on it), and the shuffle mask must be the full warp;
//   * CTAs run one at a time (in a shuffled order), so atomicCAS never meets contention:
//     the retry loop of atomic_lse_merge is not exercised, only its single-CTA path;
//   * __shared__ arrays are static storage: they start zeroed, not with garbage, and keep
//     their contents from one CTA / launch to the next;
//   * device maths (std::exp, ...) is the host's libm, not CUDA's (results agree to the
//     tolerances of the tests, not bitwise); half / bfloat16 convert in software;
//   * no limits on registers, shared memory or threads per block are enforced.
//
// Schedule (default, fiber mode): warp by warp, each lane runs until it blocks at a barrier,
// the lanes of a warp until all of them wait at __syncthreads() (or have finished), then the
// next warp; lane and warp orders alternate between ascending and descending. Warps thus
// drift as far apart as the CTA barriers allow: a barrier missing between a write and a read
// of shared memory, or between a read and the next write, gives wrong results
// deterministically (removing any one of the seven __syncthreads() of the kernels, or one
// shuffle stage, was checked to fail test_cuda_kernels_emulated.cpp). A
// __syncthreads() that not every thread reaches aborts with "deadlock" instead of hanging.
// With CUDA_EMU_THREADS=1 the OS schedules the threads; build that with -fsanitize=thread
// (CMake option ROBUSTFT_CUDA_EMU_TSAN) to have such races reported as data races.
// The fiber mode also works under -fsanitize=address,undefined (out-of-bounds accesses of
// the kernels' global or __shared__ arrays).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef CUDA_EMU_THREADS
#define CUDA_EMU_THREADS 0
#endif

#if CUDA_EMU_THREADS
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#endif

// ---- CUDA language keywords ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---- Built-in variables and types -------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

#if CUDA_EMU_THREADS
#define CUDA_EMU_TLS thread_local
#else
#define CUDA_EMU_TLS  // one OS thread: the scheduler sets threadIdx before each switch
#endif
inline CUDA_EMU_TLS uint3 threadIdx;
inline CUDA_EMU_TLS uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// ---- Device functions -------------------------------------------------------------------
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned long long atomicCAS(unsigned long long* addr, unsigned long long compare,
                                    unsigned long long val) {
  __atomic_compare_exchange_n(addr, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value, swapped or not
}

namespace cuda_emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;

// Per-CUDA-thread state of the running CTA.
struct ThreadState {
  unsigned shuffles = 0;  // parity of the shuffle buffer
#if !CUDA_EMU_THREADS
  ucontext_t ctx;
  const unsigned* wait_phase = nullptr;  // blocked until *wait_phase != wait_value
  unsigned wait_value = 0;
  bool done = false;
#endif
};

#if !CUDA_EMU_THREADS
// ---- Fiber backend: every CUDA thread of the CTA is a ucontext on the caller's thread ----

struct FiberBarrier {
  unsigned expected = 0, count = 0, phase = 0;
};

struct Cta {
  unsigned threads = 0;
  std::vector<ThreadState> ts;
  std::vector<std::unique_ptr<char[]>> stacks;
  FiberBarrier block;
  std::vector<FiberBarrier> warps;
  std::vector<unsigned long long> slots[2];  // shuffle buffers, one word per thread
  ucontext_t sched;
  ThreadState* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  static constexpr size_t kStack = 256 * 1024;
};

inline Cta& cta() {
  static Cta c;
  return c;
}

inline void fiber_entry() {
  Cta& c = cta();
  c.body(c.body_arg);
  c.current->done = true;
  swapcontext(&c.current->ctx, &c.sched);  // never resumed
  die("finished fiber resumed");
}

inline void arrive_and_wait(FiberBarrier& b) {
  Cta& c = cta();
  const unsigned phase = b.phase;
  if (++b.count == b.expected) {  // the last one releases the others and runs on
    b.count = 0;
    ++b.phase;
    return;
  }
  c.current->wait_phase = &b.phase;
  c.current->wait_value = phase;
  swapcontext(&c.current->ctx, &c.sched);
}

inline void block_barrier() { arrive_and_wait(cta().block); }
inline void warp_barrier(unsigned warp) { arrive_and_wait(cta().warps[warp]); }
inline ThreadState& self() { return *cta().current; }
inline unsigned long long* shuffle_slots(unsigned parity) { return cta().slots[parity].data(); }

// Runs body(arg) as every thread of every block of the grid.
inline void run_grid(dim3 grid, unsigned threads, void (*body)(void*), void* arg,
                     const std::vector<unsigned>& order) {
  Cta& c = cta();
  c.threads = threads;
  c.body = body;
  c.body_arg = arg;
  c.ts.assign(threads, ThreadState{});
  while (c.stacks.size() < threads) c.stacks.emplace_back(new char[Cta::kStack]);
  const unsigned nwarps = (threads + kWarpSize - 1) / kWarpSize;
  c.warps.assign(nwarps, FiberBarrier{});
  for (unsigned w = 0; w < nwarps; ++w) c.warps[w].expected = std::min(kWarpSize, threads - w * kWarpSize);
  c.block = FiberBarrier{};
  c.block.expected = threads;
  for (auto& s : c.slots) s.assign(size_t(nwarps) * kWarpSize, 0);

  for (const unsigned b : order) {
    blockIdx = uint3(b % grid.x, b / grid.x, 0);
    for (unsigned t = 0; t < threads; ++t) {
      ThreadState& s = c.ts[t];
      s = ThreadState{};
      if (getcontext(&s.ctx) != 0) die("getcontext failed");
      s.ctx.uc_stack.ss_sp = c.stacks[t].get();
      s.ctx.uc_stack.ss_size = Cta::kStack;
      s.ctx.uc_link = nullptr;
      makecontext(&s.ctx, &fiber_entry, 0);
    }
    // Warp by warp: the lanes of one warp run (each until it blocks, in alternating lane
    // order) until none of them can go on, i.e. all wait at __syncthreads() or have
    // finished; then the next warp. The warp order alternates too. So warps drift as far
    // apart as the CTA barriers allow, and lanes as far as the shuffles allow.
    unsigned live = threads;
    bool ascending = true;
    while (live > 0) {
      bool ran = false;
      for (unsigned kw = 0; kw < nwarps; ++kw) {
        const unsigned w = ascending ? kw : nwarps - 1 - kw;
        const unsigned lo = w * kWarpSize, hi = std::min(threads, lo + kWarpSize);
        bool lanes_ascending = ascending;
        for (bool warp_ran = true; warp_ran; lanes_ascending = !lanes_ascending) {
          warp_ran = false;
          for (unsigned k = lo; k < hi; ++k) {
            const unsigned t = lanes_ascending ? k : lo + hi - 1 - k;
            ThreadState& s = c.ts[t];
            if (s.done) continue;
            if (s.wait_phase != nullptr) {
              if (*s.wait_phase == s.wait_value) continue;  // its barrier is still closed
              s.wait_phase = nullptr;
            }
            threadIdx = uint3(t, 0, 0);
            c.current = &s;
            swapcontext(&c.sched, &s.ctx);
            warp_ran = ran = true;
            if (s.done) --live;
          }
        }
      }
      if (!ran) die("deadlock: some threads wait at a barrier that the others never reach");
      ascending = !ascending;
    }
    c.current = nullptr;
  }
}

#else
// ---- OS-thread backend (ThreadSanitizer): a pool of threads, one per CUDA thread ----------

struct Cta {
  unsigned threads = 0;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> slots[2];
  std::vector<ThreadState> ts;
};

inline Cta& cta() {
  static Cta c;
  return c;
}
inline thread_local ThreadState* t_self = nullptr;

inline void block_barrier() { cta().block->arrive_and_wait(); }
inline void warp_barrier(unsigned warp) { cta().warps[warp]->arrive_and_wait(); }
inline ThreadState& self() { return *t_self; }
inline unsigned long long* shuffle_slots(unsigned parity) { return cta().slots[parity].data(); }

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  // Runs job(t) on workers 0 .. threads-1 and waits for all of them.
  void run(unsigned threads, std::function<void(unsigned)> job) {
    while (workers_.size() < threads) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    std::unique_lock<std::mutex> lk(mu_);
    job_ = std::move(job);
    active_ = threads;
    pending_ = threads;
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(unsigned id) {
    unsigned long long seen = 0;
    while (true) {
      std::function<void(unsigned)>* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (id >= active_) continue;
        job = &job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::function<void(unsigned)> job_;
  unsigned long long generation_ = 0;
  unsigned active_ = 0, pending_ = 0;
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool p;
  return p;
}

inline void run_grid(dim3 grid, unsigned threads, void (*body)(void*), void* arg,
                     const std::vector<unsigned>& order) {
  Cta& c = cta();
  c.threads = threads;
  c.block = std::make_unique<std::barrier<>>(threads);
  const unsigned nwarps = (threads + kWarpSize - 1) / kWarpSize;
  c.warps.clear();
  for (unsigned w = 0; w < nwarps; ++w)
    c.warps.push_back(std::make_unique<std::barrier<>>(std::min(kWarpSize, threads - w * kWarpSize)));
  for (auto& s : c.slots) s.assign(size_t(nwarps) * kWarpSize, 0);
  c.ts.assign(threads, ThreadState{});
  pool().run(threads, [&](unsigned t) {
    t_self = &c.ts[t];
    threadIdx = uint3(t, 0, 0);
    for (const unsigned b : order) {
      blockIdx = uint3(b % grid.x, b / grid.x, 0);
      c.ts[t] = ThreadState{};
      body(arg);
      c.block->arrive_and_wait();  // the next CTA reuses the (static) shared memory
    }
    t_self = nullptr;
  });
}
#endif

// kernel<<<grid, threads>>>(args...): the arguments are converted to the kernel's
// parameter types first, as a launch does. CTAs run one at a time in a shuffled order
// (the kernels must not depend on the order of CTAs).
template <typename... KA, typename... A>
void launch(dim3 grid, unsigned threads, void (*kernel)(KA...), A... args) {
  static_assert(sizeof...(KA) == sizeof...(A), "wrong number of kernel arguments");
  if (threads == 0 || threads > kMaxThreads) die("bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z != 1) die("bad grid");
  gridDim = grid;
  blockDim = dim3(threads, 1, 1);
  std::tuple<KA...> targs(static_cast<KA>(args)...);
  struct Call {
    void (*kernel)(KA...);
    std::tuple<KA...>* args;
  } call{kernel, &targs};
  std::vector<unsigned> order(size_t(grid.x) * grid.y);
  for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
  static unsigned long long launches = 0;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(0x9e3779b97f4a7c15ull ^ ++launches));
  run_grid(
      grid, threads,
      [](void* p) {
        auto* c = static_cast<Call*>(p);
        std::apply(c->kernel, *c->args);
      },
      &call, order);
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::block_barrier(); }

// Butterfly shuffle over the full warp (the only mask the kernels use).
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a word");
  using namespace cuda_emu;
  if (mask != 0xffffffffu) die("__shfl_xor_sync: only the full mask is emulated");
  const unsigned warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const unsigned src = (lane & ~unsigned(width - 1)) | ((lane ^ unsigned(lane_mask)) & unsigned(width - 1));
  if (warp * kWarpSize + src >= blockDim.x) die("__shfl_xor_sync: source lane outside the block");
  ThreadState& me = self();
  // Alternating buffers: a lane writes buffer k % 2 at its k-th shuffle only after every
  // lane of the warp passed the barrier of shuffle k - 1, hence finished reading shuffle k - 2.
  unsigned long long* slots = shuffle_slots(me.shuffles++ & 1u);
  unsigned long long word = 0;
  std::memcpy(&word, &v, sizeof(T));
  slots[threadIdx.x] = word;
  warp_barrier(warp);
  word = slots[warp * kWarpSize + src];
  T r;
  std::memcpy(&r, &word, sizeof(T));
  return r;
}
