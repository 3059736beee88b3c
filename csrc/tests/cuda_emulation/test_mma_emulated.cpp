// The tensor-core primitives of csrc/cuda/mma_ptx.cuh (ldmatrix, mma.sync, cp.async,
// to_tf32, pack2, dynamic shared memory) on the CPU emulation of emu.h / emu_mma.h, run
// through the small kernels of mma_test_kernels.cuh and checked against references computed
// here independently of the emulator: the ldmatrix results per lane from the PTX ISA's
// description of the matrix fragments, the products against double-precision matmuls of
// the (rounded) inputs, the conversions against c10's Half / BFloat16 and a tf32 rounding
// written with ldexp / round, cp.async against the visibility rules of the PTX ISA.
//
// Groups (harness.h): mma_ldmatrix, mma_mma, mma_convert, mma_gemm, mma_cp_async,
// mma_dynamic_smem, and (fiber build only: the checks fork) mma_faults, which checks that
// the emulator aborts, with a message, where the hardware would fault or lose data.
#include "emu.h"  // first: the CUDA shims the kernels need

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#if !CUDA_EMU_THREADS
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "cuda_emulation/mma_test_kernels.cuh"
#include "harness.h"

namespace {

using namespace rft_mma_test;
using cuda_emu::launch;
using rft_test::cat;

uint16_t bits16(float x, bool bf16) {
  return bf16 ? c10::BFloat16(x).x : c10::Half(x).x;
}
double value16(uint16_t h, bool bf16) {
  if (bf16) {
    c10::BFloat16 v;
    v.x = h;
    return static_cast<float>(v);
  }
  c10::Half v;
  v.x = h;
  return static_cast<float>(v);
}
uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- ldmatrix -------------------------------------------------------------------------------

template <int kNum, bool kTrans>
void check_ldmatrix(unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<uint16_t> src(kLdmRows * kLdmStride);
  for (size_t i = 0; i < src.size(); ++i) src[i] = uint16_t(rng());
  // Each lane addresses a distinct row (a random permutation) at column 0, 8 or 16; the
  // lanes past the last matrix address rows too, which must be ignored.
  std::vector<int> rows(kLdmRows), row_of(32), col_of(32);
  for (int i = 0; i < kLdmRows; ++i) rows[i] = i;
  std::shuffle(rows.begin(), rows.end(), rng);
  for (int l = 0; l < 32; ++l) {
    row_of[l] = rows[l];
    col_of[l] = 8 * int(rng() % 3);
  }
  std::vector<uint32_t> out(32 * kNum, 0);
  launch(dim3(1), 32, &ldmatrix_probe_kernel<kNum, kTrans>, src.data(), row_of.data(),
         col_of.data(), out.data());
  // PTX ISA: matrix m's row r comes from the address of lane 8m + r; register m of lane
  // 4r + w holds (row r; elements 2w, 2w + 1), or with .trans (column r; rows 2w, 2w + 1).
  auto elem = [&](int addr_lane, int k) {
    return src[row_of[addr_lane] * kLdmStride + col_of[addr_lane] + k];
  };
  int bad = 0;
  for (int m = 0; m < kNum; ++m) {
    for (int r = 0; r < 8; ++r) {
      for (int w = 0; w < 4; ++w) {
        const int lane = 4 * r + w;
        const uint32_t lo = kTrans ? elem(8 * m + 2 * w, r) : elem(8 * m + r, 2 * w);
        const uint32_t hi = kTrans ? elem(8 * m + 2 * w + 1, r) : elem(8 * m + r, 2 * w + 1);
        const uint32_t want = lo | (hi << 16), got = out[lane * kNum + m];
        if (got != want && bad++ < 4)
          rft_test::fail(__FILE__, __LINE__,
                         cat("ldmatrix x", kNum, kTrans ? ".trans" : "", ": lane ", lane,
                             " register ", m, ": got 0x", std::hex, got, " want 0x", want));
      }
    }
  }
  RFT_CHECK_MSG(bad == 0, bad, " wrong registers");
}

// ---- mma --------------------------------------------------------------------------------------

// max over entries of |got - ref| / (|C| + sum |A B|): the accumulation error relative to
// the magnitude of the terms summed.
struct GemmRef {
  std::vector<double> ref, mag;
};
GemmRef matmul_ref(const std::vector<double>& A, const std::vector<double>& B,
                   const std::vector<double>& C, int M, int N, int K, bool b_nk) {
  GemmRef r{std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = C.empty() ? 0 : C[m * N + n], a = std::fabs(s);
      for (int k = 0; k < K; ++k) {
        const double p = A[m * K + k] * (b_nk ? B[n * K + k] : B[k * N + n]);
        s += p;
        a += std::fabs(p);
      }
      r.ref[m * N + n] = s;
      r.mag[m * N + n] = a;
    }
  return r;
}
double rel_err(const GemmRef& r, const std::vector<float>& got) {
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - r.ref[i]) / std::max(r.mag[i], 1e-30);
    e = std::max(e, std::isnan(d) ? INFINITY : d);
  }
  return e;
}
// Float accumulation of <= 129 exact terms: error well below 2^-16 of their magnitude.
constexpr double kAccTol = 1.0 / 65536;

template <bool kBf16>
void check_mma16(bool integers, bool alias, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> ui(-8, 8);
  auto draw = [&] { return integers ? float(ui(rng)) : nd(rng); };
  std::vector<uint16_t> A(256), B(128);
  std::vector<double> Ad(256), Bd(128), Cd(128);
  std::vector<float> C(128), D(128, NAN);
  for (int i = 0; i < 256; ++i) Ad[i] = value16(A[i] = bits16(draw(), kBf16), kBf16);
  for (int i = 0; i < 128; ++i) Bd[i] = value16(B[i] = bits16(draw(), kBf16), kBf16);
  for (int i = 0; i < 128; ++i) Cd[i] = C[i] = draw();
  launch(dim3(1), 32, &mma16_probe_kernel<kBf16>, A.data(), B.data(), C.data(), D.data(),
         int(alias));
  const GemmRef r = matmul_ref(Ad, Bd, Cd, 16, 8, 16, false);
  if (integers) {  // small integers: every sum is exact
    int bad = 0;
    for (int i = 0; i < 128; ++i) bad += double(D[i]) != r.ref[i];
    RFT_CHECK_MSG(bad == 0, bad, " of 128 entries differ from the exact product");
  } else {
    const double e = rel_err(r, D);
    RFT_CHECK_MSG(e <= kAccTol, "relative error ", e);
    rft_test::note(cat("relative error ", e));
  }
}

// tf32 rounding written independently of the bit trick: x scaled to an integer count of
// its quantum 2^(e - 10), rounded half away from zero (std::round), scaled back.
float tf32_ref(float x) {
  if (!std::isfinite(x) || x == 0) return x;
  const int e = std::max(std::ilogb(x), -126);
  return float(std::ldexp(std::round(std::ldexp(double(x), 10 - e)), e - 10));
}

void check_mma_tf32(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> A(128), B(64), C(128), D(128, NAN);
  std::vector<double> Ad(128), Bd(64), Cd(128);
  for (int i = 0; i < 128; ++i) Ad[i] = tf32_ref(A[i] = nd(rng));
  for (int i = 0; i < 64; ++i) Bd[i] = tf32_ref(B[i] = nd(rng));
  for (int i = 0; i < 128; ++i) Cd[i] = C[i] = nd(rng);
  launch(dim3(1), 32, &mma_tf32_probe_kernel, A.data(), B.data(), C.data(), D.data());
  const GemmRef r = matmul_ref(Ad, Bd, Cd, 16, 8, 8, false);
  const double e = rel_err(r, D);
  RFT_CHECK_MSG(e <= kAccTol, "relative error ", e);
  // The operands were rounded: the product of the unrounded inputs differs by far more.
  std::vector<double> Araw(A.begin(), A.end()), Braw(B.begin(), B.end());
  const double e_raw = rel_err(matmul_ref(Araw, Braw, Cd, 16, 8, 8, false), D);
  RFT_CHECK_MSG(e_raw > 1e-5, "tf32 rounding not visible: error vs the float product ", e_raw);
  rft_test::note(cat("relative error ", e, " (vs the unrounded float product: ", e_raw, ")"));
}

// ---- conversions ------------------------------------------------------------------------------

template <bool kBf16>
void check_convert() {
  std::mt19937 rng(7);
  std::vector<float> x;
  // Edge cases: ties and overflow of both formats, f16 subnormals, tf32 ties, specials.
  const float inf = std::numeric_limits<float>::infinity();
  const float special[] = {
      0.f, -0.f, 1.f, -1.f, 65504.f, 65519.f, 65520.f, -65520.f, 65536.f,  // f16 overflow
      std::ldexp(1.f, -24), std::ldexp(1.f, -25), std::ldexp(3.f, -26),  // f16 subnormals
      std::ldexp(1.f, -25) * 1.0001f, std::ldexp(5.f, -26), std::ldexp(1.f, -14),
      std::ldexp(1023.f, -24), std::ldexp(2047.f, -25),
      bitsf(0x3f808000u), bitsf(0x3f818000u), bitsf(0xbf808000u),  // bf16 ties
      bitsf(0x3f801000u), bitsf(0xbf801000u), bitsf(0x3f803000u),  // tf32 ties
      bitsf(0x7f7fffffu), bitsf(0x7f7ff000u), bitsf(0x00001000u), bitsf(0x00000fffu),
      bitsf(0x80003000u), inf, -inf, std::numeric_limits<float>::denorm_min()};
  for (float s : special) x.push_back(s);
  for (int i = 0; i < 4000; ++i) {  // random bit patterns (no NaN) and random magnitudes
    float f = bitsf(uint32_t(rng()));
    if (std::isnan(f)) f = 1.5f;
    x.push_back(f);
    x.push_back(std::ldexp(float(rng() % 4096) / 4096.f + 0.5f, int(rng() % 60) - 30) *
                (rng() % 2 ? 1.f : -1.f));
  }
  x.push_back(std::numeric_limits<float>::quiet_NaN());
  x.push_back(1.f);
  if (x.size() % 2) x.push_back(2.f);
  const int n = int(x.size());
  std::vector<uint32_t> tf32(n), packed(n / 2);
  launch(dim3(unsigned((n + 127) / 128)), 128, &convert_kernel<kBf16>, x.data(), n, tf32.data(),
         packed.data());
  int bad_tf32 = 0, bad_pack = 0;
  for (int i = 0; i < n; ++i) {
    const float want = tf32_ref(x[i]);
    const bool ok = std::isnan(x[i]) ? std::isnan(bitsf(tf32[i])) && (tf32[i] & 0x1fffu) == 0
                                     : tf32[i] == fbits(want);
    if (!ok && bad_tf32++ < 4)
      rft_test::fail(__FILE__, __LINE__, cat("to_tf32(", x[i], " = 0x", std::hex, fbits(x[i]),
                                             ") = 0x", tf32[i], ", want 0x", fbits(want)));
  }
  for (int i = 0; i < n / 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      const float v = x[2 * i + h];
      const uint16_t got = uint16_t(h ? packed[i] >> 16 : packed[i] & 0xffffu);
      const bool ok = std::isnan(v) ? std::isnan(value16(got, kBf16)) : got == bits16(v, kBf16);
      if (!ok && bad_pack++ < 4)
        rft_test::fail(__FILE__, __LINE__, cat("pack2 ", h ? "hi" : "lo", "(", v, ") = 0x",
                                               std::hex, got, ", want 0x", bits16(v, kBf16)));
    }
  }
  RFT_CHECK_MSG(bad_tf32 == 0 && bad_pack == 0, bad_tf32, " tf32 and ", bad_pack,
                " pack2 errors of ", n);
}

// ---- GEMM tile and chained products -------------------------------------------------------

template <bool kBf16, bool kTransB>
void check_gemm(int K, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> A(64 * K), B(64 * K);
  std::vector<double> Ad(64 * K), Bd(64 * K);  // Bd as B[n][k] whatever the storage
  for (int i = 0; i < 64 * K; ++i) Ad[i] = value16(A[i] = bits16(nd(rng), kBf16), kBf16);
  for (int n = 0; n < 64; ++n)
    for (int k = 0; k < K; ++k) {
      const uint16_t b = bits16(nd(rng), kBf16);
      B[kTransB ? k * 64 + n : n * K + k] = b;
      Bd[n * K + k] = value16(b, kBf16);
    }
  std::vector<float> D(64 * 64, NAN);
  launch(dim3(1), kGemmThreads, gemm_smem_bytes(), &gemm_tile_kernel<kBf16, kTransB>, A.data(),
         B.data(), D.data(), K);
  const double e = rel_err(matmul_ref(Ad, Bd, {}, 64, 64, K, true), D);
  RFT_CHECK_MSG(e <= kAccTol, "relative error ", e);
  rft_test::note(cat("relative error ", e));
}

template <bool kBf16>
void check_chain(bool integers, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> ui(-3, 3);
  auto draw = [&] { return integers ? float(ui(rng)) : nd(rng); };
  std::vector<uint16_t> A(256), B(256), V(128);
  std::vector<double> Ad(256), Bd(256), Vd(128);
  for (int i = 0; i < 256; ++i) Ad[i] = value16(A[i] = bits16(draw(), kBf16), kBf16);
  for (int i = 0; i < 256; ++i) Bd[i] = value16(B[i] = bits16(draw(), kBf16), kBf16);
  for (int i = 0; i < 128; ++i) Vd[i] = value16(V[i] = bits16(draw(), kBf16), kBf16);
  std::vector<float> O(128, NAN);
  launch(dim3(1), 32, &chain_kernel<kBf16>, A.data(), B.data(), V.data(), O.data());
  // S = A B^T rounded to the 16-bit format as pack2 rounds (to nearest even), then S V.
  std::vector<double> S = matmul_ref(Ad, Bd, {}, 16, 16, 16, true).ref;
  for (double& s : S) s = value16(bits16(float(s), kBf16), kBf16);
  const GemmRef r = matmul_ref(S, Vd, {}, 16, 8, 16, false);
  if (integers) {  // |S| <= 144 and |O| <= 6912: exact in every format
    int bad = 0;
    for (int i = 0; i < 128; ++i) bad += double(O[i]) != r.ref[i];
    RFT_CHECK_MSG(bad == 0, bad, " of 128 entries differ from the exact product");
  } else {
    // S in float may round to the other neighbour than S in double: one 16-bit ulp of S.
    const double e = rel_err(r, O), tol = kBf16 ? 1.0 / 128 : 1.0 / 1024;
    RFT_CHECK_MSG(e <= tol, "relative error ", e);
    rft_test::note(cat("relative error ", e));
  }
}

// ---- cp.async ---------------------------------------------------------------------------------

Bytes16 bytes_of(const unsigned char* p, int n) {  // n bytes of p, then zeros
  Bytes16 b{{0, 0, 0, 0}};
  std::memcpy(&b, p, n);
  return b;
}
bool same(const Bytes16& a, const Bytes16& b) { return std::memcmp(&a, &b, 16) == 0; }
const Bytes16 kPoison{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}};

void check_cp_async() {
  std::mt19937 rng(11);
  std::vector<Bytes16> src(32), src2(32), src3(32);
  for (auto* v : {&src, &src2, &src3})
    for (auto& b : *v)
      for (auto& w : b.w) w = uint32_t(rng());
  const int size_cycle[] = {0, 4, 16, 1, 8, 15};
  std::vector<int> sizes(32);
  for (int i = 0; i < 32; ++i) sizes[i] = size_cycle[i % 6];
  const Bytes16 fill{{0xa5a5a5a5u, 0x5a5a5a5au, 0x01234567u, 0x89abcdefu}};
  std::vector<Bytes16> before(32), after(32), mid2(32), mid3(32), end2(32), end3(32), unc(32),
      fin(32);
  launch(dim3(1), 32, &cp_async_probe_kernel, src.data(), sizes.data(), src2.data(), src3.data(),
         fill, before.data(), after.data(), mid2.data(), mid3.data(), end2.data(), end3.data(),
         unc.data(), fin.data());
  int bad = 0;
  auto expect = [&](bool ok, const char* what, int i) {
    if (!ok && bad++ < 6) rft_test::fail(__FILE__, __LINE__, cat(what, ", thread ", i));
  };
  for (int i = 0; i < 32; ++i) {
    // Between issue and wait the destination holds neither the old nor the new data.
    expect(same(before[i], kPoison), "read before the wait: not the pending-copy pattern", i);
    expect(!same(before[i], fill), "read before the wait sees the old data", i);
    const Bytes16 want = bytes_of(reinterpret_cast<const unsigned char*>(&src[i]), sizes[i]);
    expect(same(after[i], want), "after the wait: not src_bytes of the source then zeros", i);
    expect(same(mid2[i], src2[i]), "wait_group 1: the older group is not complete", i);
    expect(same(mid3[i], kPoison), "wait_group 1: the newest group is already visible", i);
    expect(same(end2[i], src2[i]) && same(end3[i], src3[i]), "wait_group 0: a group is missing", i);
    expect(same(unc[i], kPoison), "wait_group 0 performed an uncommitted copy", i);
    expect(same(fin[i], src2[i]), "commit + wait_group 0 did not perform the copy", i);
  }
  RFT_CHECK_MSG(bad == 0, bad, " wrong results");
}

void check_dynamic_smem(unsigned threads, size_t bytes) {
  const int words = int(bytes / 4);
  std::vector<uint32_t> first(threads, 0), out(words, 0);
  uintptr_t base = 1;
  launch(dim3(3), threads, bytes, &dynamic_smem_kernel, words, first.data(), out.data(), &base);
  RFT_CHECK_MSG(base % 128 == 0, "dynamic shared memory at ", base, ", not 128-byte aligned");
  int bad = 0;
  for (unsigned t = 0; t < threads; ++t) bad += first[t] != 0xffffffffu;  // each CTA: fresh
  RFT_CHECK_MSG(bad == 0, bad, " words not poisoned at the start of the (last) CTA");
  bad = 0;
  for (int w = 0; w < words; ++w) bad += out[w] != 0x9e3779b9u * uint32_t(w + 1);
  RFT_CHECK_MSG(bad == 0, bad, " of ", words, " words wrong");
}

// ---- Faults (fiber build: checked in a child process) ------------------------------------------

#if !CUDA_EMU_THREADS
// Runs fn in a child process; it must abort and print `expect` on stderr.
void expect_abort(const std::function<void()>& fn, const std::string& expect) {
  int fds[2];
  RFT_CHECK(pipe(fds) == 0);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 2);
    close(fds[0]);
    fn();
    _exit(0);
  }
  close(fds[1]);
  std::string err;
  char buf[512];
  for (ssize_t k; (k = read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, size_t(k));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  RFT_CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
                "expected an abort with \"", expect, "\"; status ", status, ", stderr: ", err);
  RFT_CHECK_MSG(err.find(expect) != std::string::npos, "stderr lacks \"", expect, "\": ", err);
}

__global__ void misaligned_ldmatrix_kernel(int bad_lane) {
  __shared__ __align__(16) uint16_t tile[32 * 8 + 8];
  const int lane = threadIdx.x;
  uint32_t r[4];
  ldmatrix_x4(r, &tile[lane * 8 + (lane == bad_lane ? 4 : 0)]);
}
__global__ void cp_async_fault_kernel(int mode, const unsigned char* g) {
  __shared__ __align__(16) unsigned char sm[64];
  if (mode == 0) cp_async_16(sm + 8, g, 16);   // misaligned shared address
  if (mode == 1) cp_async_16(sm, g + 4, 16);   // misaligned global address
  if (mode == 2) cp_async_16(sm, g, 17);       // src_bytes out of range
  if (mode == 3) cp_async_16(sm, g, 16);       // never committed
  if (mode == 4) {                             // committed, never waited for
    cp_async_16(sm, g, 16);
    cp_async_commit();
  }
}
const unsigned char* g_bytes() {
  alignas(16) static const unsigned char g[64] = {};
  return g;
}
__global__ void divergent_kernel() {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int lane = threadIdx.x % 32;
  uint32_t r[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0};
  if (lane < 16) ldmatrix_x4(r, &tile[lane * 8]);
  else mma_m16n8k16<true>(c, r, b, c);
}
__global__ void uses_dynamic_smem_kernel() { dynamic_smem<float>()[threadIdx.x] = 0.f; }
__global__ void partial_warp_mma_kernel() {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0};
  mma_m16n8k16<false>(c, a, b, c);
}
#endif

RFT_CASES(mma_emulated) {
  using rft_test::add_case;
  add_case("mma_ldmatrix/x1", [] { check_ldmatrix<1, false>(1); });
  add_case("mma_ldmatrix/x2", [] { check_ldmatrix<2, false>(2); });
  add_case("mma_ldmatrix/x4", [] { check_ldmatrix<4, false>(3); });
  add_case("mma_ldmatrix/x2_trans", [] { check_ldmatrix<2, true>(4); });
  add_case("mma_ldmatrix/x4_trans", [] { check_ldmatrix<4, true>(5); });

  add_case("mma_mma/bf16_random", [] { check_mma16<true>(false, false, 10); });
  add_case("mma_mma/bf16_integers_exact", [] { check_mma16<true>(true, false, 11); });
  add_case("mma_mma/bf16_d_aliases_c", [] { check_mma16<true>(false, true, 12); });
  add_case("mma_mma/f16_random", [] { check_mma16<false>(false, false, 13); });
  add_case("mma_mma/f16_integers_exact", [] { check_mma16<false>(true, false, 14); });
  add_case("mma_mma/f16_d_aliases_c", [] { check_mma16<false>(false, true, 15); });
  add_case("mma_mma/tf32", [] { check_mma_tf32(16); });

  add_case("mma_convert/bf16", [] { check_convert<true>(); });
  add_case("mma_convert/f16", [] { check_convert<false>(); });

  add_case("mma_gemm/bf16_b_nk_K64", [] { check_gemm<true, false>(64, 20); });
  add_case("mma_gemm/bf16_b_kn_trans_K64", [] { check_gemm<true, true>(64, 21); });
  add_case("mma_gemm/f16_b_nk_K64", [] { check_gemm<false, false>(64, 22); });
  add_case("mma_gemm/f16_b_kn_trans_K64", [] { check_gemm<false, true>(64, 23); });
  add_case("mma_gemm/bf16_b_nk_K128", [] { check_gemm<true, false>(128, 24); });
  add_case("mma_gemm/chain_bf16_integers_exact", [] { check_chain<true>(true, 30); });
  add_case("mma_gemm/chain_f16_integers_exact", [] { check_chain<false>(true, 31); });
  add_case("mma_gemm/chain_bf16_random", [] { check_chain<true>(false, 32); });
  add_case("mma_gemm/chain_f16_random", [] { check_chain<false>(false, 33); });

  add_case("mma_cp_async/visibility_and_zero_fill", [] { check_cp_async(); });

  add_case("mma_dynamic_smem/100KB_256_threads", [] { check_dynamic_smem(256, 100 * 1024); });
  add_case("mma_dynamic_smem/227KB_1024_threads", [] { check_dynamic_smem(1024, 227 * 1024); });

#if !CUDA_EMU_THREADS
  add_case("mma_faults/ldmatrix_misaligned_row", [] {
    expect_abort([] { launch(dim3(1), 32, &misaligned_ldmatrix_kernel, 5); },
                 "lane 5 passes row address");
  });
  add_case("mma_faults/cp_async_misaligned_smem", [] {
    expect_abort([] { launch(dim3(1), 32, &cp_async_fault_kernel, 0, g_bytes()); },
                 "shared-memory address not 16-byte aligned");
  });
  add_case("mma_faults/cp_async_misaligned_gmem", [] {
    expect_abort([] { launch(dim3(1), 32, &cp_async_fault_kernel, 1, g_bytes()); },
                 "global-memory address not 16-byte aligned");
  });
  add_case("mma_faults/cp_async_src_bytes", [] {
    expect_abort([] { launch(dim3(1), 32, &cp_async_fault_kernel, 2, g_bytes()); },
                 "src_bytes outside 0..16");
  });
  add_case("mma_faults/cp_async_never_committed", [] {
    expect_abort([] { launch(dim3(1), 32, &cp_async_fault_kernel, 3, g_bytes()); },
                 "never committed");
  });
  add_case("mma_faults/cp_async_never_waited", [] {
    expect_abort([] { launch(dim3(1), 32, &cp_async_fault_kernel, 4, g_bytes()); },
                 "never waited for");
  });
  add_case("mma_faults/divergent_collectives", [] {
    expect_abort([] { launch(dim3(1), 64, &divergent_kernel); }, "divergent .sync.aligned code");
  });
  add_case("mma_faults/partial_warp", [] {
    expect_abort([] { launch(dim3(1), 48, &partial_warp_mma_kernel); }, "block of partial warps");
  });
  add_case("mma_faults/dynamic_smem_over_227KB", [] {
    expect_abort([] { launch(dim3(1), 32, size_t(227 * 1024 + 1), &uses_dynamic_smem_kernel); },
                 "more than 227 KB");
  });
  add_case("mma_faults/dynamic_smem_not_launched", [] {
    expect_abort([] { launch(dim3(1), 32, &uses_dynamic_smem_kernel); },
                 "launched without dynamic shared memory");
  });
#endif
}

}  // namespace
