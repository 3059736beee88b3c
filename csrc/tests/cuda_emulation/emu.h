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
//   * atomicCAS (64-bit), __float_as_uint / __uint_as_float, min / max of the device API;
//   * dynamic shared memory: launch(grid, threads, smem_bytes, kernel, args...) is
//     kernel<<<grid, threads, smem_bytes>>>; kernels reach it through
//     robustft::ptx::dynamic_smem<T>() (cuda/mma_ptx.cuh), since `extern __shared__` cannot
//     be given a meaning here (`__shared__` is `static`). It is 128-byte aligned, allocated
//     with exactly smem_bytes (so AddressSanitizer sees overruns), at most 227 KB (the
//     sm_90 limit per block), and filled with 0xff bytes (NaN in float, half and bfloat16)
//     at the start of every CTA: a read of an element no thread wrote shows up;
//   * warp-collective instructions (ldmatrix, mma.sync, in emu_mma.h, included at the end
//     of this header) through warp_collective(): every lane publishes its operands, and the
//     instruction's effect is computed once, for the 32 lanes together, when the last lane
//     of the warp arrives, before any lane goes on (so its shared-memory reads happen at one
//     point, as one instruction's do); lanes of a warp at different collective instructions
//     (divergent .sync.aligned code) abort;
//   * per-thread queues of asynchronous copies (cp.async, emu_mma.h); a thread that exits
//     with copies it never committed or never waited for aborts (the hardware would lose them).
//
// Limits (what this does NOT check):
//   * no memory model: no caches, no weak ordering, no bank conflicts, no coalescing, no
//     alignment faults of ordinary loads and stores (ldmatrix and cp.async check theirs,
//     emu_mma.h); a missing __threadfence or volatile is not detected;
//   * warp-synchronous execution is emulated by barriers at each shuffle only: code relying
//     on implicit lock-step execution of a warp between shuffles is not emulated (the
//     kernels here do not rely on it), and the shuffle mask must be the full warp;
//   * CTAs run one at a time (in a shuffled order), so atomicCAS never meets contention:
//     the retry loop of atomic_lse_merge is not exercised, only its single-CTA path;
//   * __shared__ arrays are static storage: they start zeroed, not with garbage, and keep
//     their contents from one CTA / launch to the next;
//   * device maths (std::exp, ...) is the host's libm, not CUDA's (results agree to the
//     tolerances of the tests, not bitwise); half / bfloat16 convert in software;
//   * no limits on registers, static shared memory or threads per block are enforced (only
//     the dynamic shared memory's 227 KB); a launch with more than 48 KB of dynamic shared
//     memory needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) on a GPU, which the
//     emulator cannot check.
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

// Tells device headers (cuda/mma_ptx.cuh) that they are compiled against this emulation.
#define RFT_CUDA_EMULATION 1

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

// One cp.async of a thread, queued until a cp.async.wait_group performs it.
struct AsyncCopy {
  void* dst;
  const void* src;
  unsigned src_bytes, bytes;  // bytes of src read; bytes of dst written (the rest zeros)
};

// Per-CUDA-thread state of the running CTA.
struct ThreadState {
  unsigned shuffles = 0;            // parity of the shuffle buffer
  unsigned long long collectives = 0;  // warp-collective instructions executed so far
  std::vector<AsyncCopy> async_copies;  // issued, not yet performed, in issue order
  std::vector<size_t> async_groups;     // committed groups: end index into async_copies
#if !CUDA_EMU_THREADS
  ucontext_t ctx;
  const unsigned* wait_phase = nullptr;  // blocked until *wait_phase != wait_value
  unsigned wait_value = 0;
  bool done = false;
#endif
};

// The operands one lane passes to a warp-collective instruction and the results it gets.
struct LaneIo {
  unsigned op;               // which instruction (all lanes of a warp must agree)
  unsigned long long seq;    // the lane's count of collective instructions before this one
  alignas(16) unsigned char in[48];
  alignas(16) unsigned char out[16];
};
// Computes one warp-collective instruction for the 32 lanes of a warp from their inputs.
using CollectiveFn = void (*)(LaneIo* lanes);

// Dynamic shared memory of the running launch (one CTA runs at a time).
struct DynamicSmem {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};
inline DynamicSmem& dynamic_smem_state() {
  static DynamicSmem d;
  return d;
}
// At the start of each CTA: the contents left by the previous CTA are not kept.
inline void poison_dynamic_smem() {
  DynamicSmem& d = dynamic_smem_state();
  if (d.bytes > 0) std::memset(d.data, 0xff, d.bytes);
}
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90 (sm_80: 163 KB)
inline void set_dynamic_smem(size_t bytes) {
  if (bytes > kMaxDynamicSmem) die("launch: more than 227 KB of dynamic shared memory per block");
  DynamicSmem& d = dynamic_smem_state();
  std::free(d.data);
  d.data = nullptr;
  d.bytes = bytes;
  if (bytes == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, 128, bytes) != 0) die("cannot allocate the dynamic shared memory");
  d.data = static_cast<unsigned char*>(p);
}
inline unsigned char* dynamic_smem() {
  DynamicSmem& d = dynamic_smem_state();
  if (d.bytes == 0) die("dynamic_smem(): the kernel was launched without dynamic shared memory");
  return d.data;
}

// A thread leaving the kernel must have performed all its asynchronous copies.
inline void check_thread_exit(const ThreadState& s) {
  if (s.async_copies.empty()) return;
  if (s.async_groups.empty() || s.async_groups.back() < s.async_copies.size())
    die("cp.async: a thread exits with copies it never committed (cp.async.commit_group)");
  die("cp.async: a thread exits with committed copies it never waited for (cp.async.wait_group)");
}

#if !CUDA_EMU_THREADS
// ---- Fiber backend: every CUDA thread of the CTA is a ucontext on the caller's thread ----

struct FiberBarrier {
  unsigned expected = 0, count = 0, phase = 0;
  CollectiveFn hook = nullptr;  // warp barriers: run by the last lane to arrive
  LaneIo* lanes = nullptr;      // warp barriers: the warp's 32 LaneIo records
};

struct Cta {
  unsigned threads = 0;
  std::vector<ThreadState> ts;
  std::vector<std::unique_ptr<char[]>> stacks;
  FiberBarrier block;
  std::vector<FiberBarrier> warps;
  std::vector<unsigned long long> slots[2];  // shuffle buffers, one word per thread
  std::vector<LaneIo> lane_io;               // warp-collective operands, one per thread
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
  check_thread_exit(*c.current);
  c.current->done = true;
  swapcontext(&c.current->ctx, &c.sched);  // never resumed
  die("finished fiber resumed");
}

inline void arrive_and_wait(FiberBarrier& b) {
  Cta& c = cta();
  const unsigned phase = b.phase;
  if (++b.count == b.expected) {  // the last one releases the others and runs on
    if (b.hook != nullptr) {      // a collective instruction: its effect, before the release
      const CollectiveFn hook = b.hook;
      b.hook = nullptr;
      hook(b.lanes);
    }
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
// A warp barrier whose last arrival runs fn(the warp's LaneIo records) before releasing.
inline void warp_barrier_with(unsigned warp, CollectiveFn fn) {
  FiberBarrier& b = cta().warps[warp];
  b.hook = fn;
  arrive_and_wait(b);
}
inline ThreadState& self() { return *cta().current; }
inline unsigned long long* shuffle_slots(unsigned parity) { return cta().slots[parity].data(); }
inline LaneIo* lane_io(unsigned warp) { return cta().lane_io.data() + size_t(warp) * kWarpSize; }

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
  c.lane_io.assign(size_t(nwarps) * kWarpSize, LaneIo{});
  for (unsigned w = 0; w < nwarps; ++w) {
    c.warps[w].expected = std::min(kWarpSize, threads - w * kWarpSize);
    c.warps[w].lanes = c.lane_io.data() + size_t(w) * kWarpSize;
  }
  c.block = FiberBarrier{};
  c.block.expected = threads;
  for (auto& s : c.slots) s.assign(size_t(nwarps) * kWarpSize, 0);

  for (const unsigned b : order) {
    blockIdx = uint3(b % grid.x, b / grid.x, 0);
    poison_dynamic_smem();
    std::fill(c.lane_io.begin(), c.lane_io.end(), LaneIo{});
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

// The completion step of a warp's barrier: runs the collective instruction registered for
// this phase, if any, after every lane arrived and before any is released.
struct WarpCompletion {
  std::atomic<CollectiveFn>* hook;
  LaneIo* lanes;
  void operator()() noexcept {
    const CollectiveFn fn = hook->exchange(nullptr, std::memory_order_relaxed);
    if (fn != nullptr) fn(lanes);
  }
};

struct Cta {
  unsigned threads = 0;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<WarpCompletion>>> warps;
  std::unique_ptr<std::atomic<CollectiveFn>[]> hooks;  // one per warp
  std::vector<unsigned long long> slots[2];
  std::vector<LaneIo> lane_io;
  std::vector<ThreadState> ts;
};

inline Cta& cta() {
  static Cta c;
  return c;
}
inline thread_local ThreadState* t_self = nullptr;

inline void block_barrier() { cta().block->arrive_and_wait(); }
inline void warp_barrier(unsigned warp) { cta().warps[warp]->arrive_and_wait(); }
inline void warp_barrier_with(unsigned warp, CollectiveFn fn) {
  cta().hooks[warp].store(fn, std::memory_order_relaxed);  // ordered by the barrier
  cta().warps[warp]->arrive_and_wait();
}
inline ThreadState& self() { return *t_self; }
inline unsigned long long* shuffle_slots(unsigned parity) { return cta().slots[parity].data(); }
inline LaneIo* lane_io(unsigned warp) { return cta().lane_io.data() + size_t(warp) * kWarpSize; }

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
  c.lane_io.assign(size_t(nwarps) * kWarpSize, LaneIo{});
  c.hooks = std::make_unique<std::atomic<CollectiveFn>[]>(nwarps);
  c.warps.clear();
  for (unsigned w = 0; w < nwarps; ++w) {
    c.hooks[w].store(nullptr);
    c.warps.push_back(std::make_unique<std::barrier<WarpCompletion>>(
        std::min(kWarpSize, threads - w * kWarpSize),
        WarpCompletion{&c.hooks[w], c.lane_io.data() + size_t(w) * kWarpSize}));
  }
  for (auto& s : c.slots) s.assign(size_t(nwarps) * kWarpSize, 0);
  c.ts.assign(threads, ThreadState{});
  const bool dynamic = dynamic_smem_state().bytes > 0;
  pool().run(threads, [&](unsigned t) {
    t_self = &c.ts[t];
    threadIdx = uint3(t, 0, 0);
    for (const unsigned b : order) {
      blockIdx = uint3(b % grid.x, b / grid.x, 0);
      c.ts[t] = ThreadState{};
      if (dynamic) {
        if (t == 0) poison_dynamic_smem();
        c.block->arrive_and_wait();
      }
      body(arg);
      check_thread_exit(c.ts[t]);
      c.block->arrive_and_wait();  // the next CTA reuses the (static) shared memory
    }
    t_self = nullptr;
  });
}
#endif

// kernel<<<grid, threads, smem_bytes>>>(args...): the arguments are converted to the
// kernel's parameter types first, as a launch does. CTAs run one at a time in a shuffled
// order (the kernels must not depend on the order of CTAs). smem_bytes of dynamic shared
// memory (robustft::ptx::dynamic_smem<T>()) are allocated for the launch.
template <typename... KA, typename... A>
void launch(dim3 grid, unsigned threads, size_t smem_bytes, void (*kernel)(KA...), A... args) {
  static_assert(sizeof...(KA) == sizeof...(A), "wrong number of kernel arguments");
  if (threads == 0 || threads > kMaxThreads) die("bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z != 1) die("bad grid");
  set_dynamic_smem(smem_bytes);
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
  set_dynamic_smem(0);
}

// kernel<<<grid, threads>>>(args...).
template <typename... KA, typename... A>
void launch(dim3 grid, unsigned threads, void (*kernel)(KA...), A... args) {
  launch(grid, threads, size_t(0), kernel, args...);
}

// One warp-collective instruction of the calling lane: publishes `in` (in_bytes) as the
// lane's operands of instruction `op`, waits for the warp; `fn`, run once when the last lane
// arrives, computes every lane's results from all the lanes' operands; then copies the
// lane's results (out_bytes) to `out`. Aborts when the lanes are not all at the same
// collective instruction (divergent .sync.aligned code) or the block is not whole warps.
inline void warp_collective(unsigned op, const void* in, size_t in_bytes, void* out,
                            size_t out_bytes, CollectiveFn fn) {
  if (blockDim.x % kWarpSize != 0)
    die("warp-collective instruction in a block of partial warps");
  if (in_bytes > sizeof(LaneIo::in) || out_bytes > sizeof(LaneIo::out))
    die("warp_collective: operands too large");
  const unsigned warp = threadIdx.x / kWarpSize;
  LaneIo& io = lane_io(warp)[threadIdx.x % kWarpSize];
  io.op = op;
  io.seq = self().collectives++;
  std::memcpy(io.in, in, in_bytes);
  warp_barrier_with(warp, fn);
  std::memcpy(out, io.out, out_bytes);
}

// For the CollectiveFn of `op`: aborts unless all 32 lanes are at this same instruction.
inline void check_converged(const LaneIo* lanes, unsigned op, const char* what) {
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (lanes[l].op != op || lanes[l].seq != lanes[0].seq) {
      std::fprintf(stderr, "cuda_emu: %s: lane %u of the warp is at another warp-collective "
                   "instruction (divergent .sync.aligned code)\n", what, l);
      die(what);
    }
  }
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

// ldmatrix, mma.sync, cp.async and the rest of cuda/mma_ptx.cuh's interface.
#include "emu_mma.h"
