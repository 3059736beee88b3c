// The per-device kernel launchers of a robust fine-tuning step: its tile work (CLIP and
// m^2-mix from one pass over the logit tiles, docs/maths.md, sections 1, 3 and 9) and its
// O(n D) row passes (the slerp prologue and backward, DiVE's sums and gradients).
//
// Each device (cpu/, cuda/) implements these launchers; step_ops.h builds every op of the
// step's losses on top of them once (slerp*, m2mix_*, lipsum_*, dive_*, robust_step_*).
// Lipsum-FT has no n x n work (an n x K product with K ~ 80): step_ops.h computes it with the
// device's library GEMMs.
//
// The problem (StepProblem below). Training batch: n pairs (I_p, T_p), and for m^2-mix the
// mixed negatives M_q = slerp(I_q, T_q; lam) (an n x D buffer the op body computes):
//   A_pq = s_m <I_p, M_q> (q != p),  A_pp = diag[p] = s_m <I_p, T_p>      (with_m2)
//   B_pq = s_m <T_p, M_q> (q != p),  B_pp = diag[p]                        (with_m2)
//   C_pq = s_c <I_p, T_q>                                                  (with_clip)
//
// Forward, one pass over the tiles (step_lse): lse [4, n] with
//   lse[0][p] = LSE_q A_pq, lse[1][p] = LSE_q B_pq, lse[2][p] = LSE_q C_pq,
//   lse[3][q] = LSE_p C_pq  (rows of absent terms: unset).
// The losses are m2 = (sum lse0 + sum lse1 - 2 sum diag) / 2n and
// clip = (sum lse2 + sum lse3 - 2 s_c sum <I_p, T_p>) / 2n.
//
// Backward, per chunk of rows [r0, r0 + R) (step_dlogits), the dlogits up to their
// constant factors (contrastive_kernels.h says why they are kept O(1)):
//   dA[p - r0][q] = exp(A_pq - lse[0][p])  (0 for q == p),  dB likewise with B, lse[1];
//   dC[p - r0][q] = (exp(C_pq - lse[2][p]) + exp(C_pq - lse[3][q])) / 2 - [p == q];
//   stats[0] += sum_{q != p} (dA_pq <I_p, M_q> + dB_pq <T_p, M_q>),  stats[1] += sum dC_pq <I_p, T_q>.
// The true dlogits are g_m2 / 2n times dA, dB and g_clip / n times dC. step_ops.h then
// multiplies each chunk into the gradients with the device's gemm_acc:
//   grad_I[chunk] = s_m g_m2 / 2n dA M + s_c g_clip / n dC T,  grad_T[chunk] = s_m g_m2 / 2n dB M,
//   grad_M += s_m g_m2 / 2n (dA^T I[chunk] + dB^T T[chunk]),  grad_Tc += s_c g_clip / n dC^T I[chunk].
// The true pair on the diagonals of A and B is excluded from dA and dB: its O(n D)
// gradient, which flows to T_p / I_p rather than M_p, is added by the op body, as is the
// backward of the slerp.
//
// Conventions (checked by launcher_contract.h): I and T are contiguous and share one dtype,
// M is contiguous of the device's workspace dtype (contrastive_kernels.h); diag, lse, stats and the scales are in the
// accumulation dtype (double for double inputs, float otherwise) on the device of the
// features; dA, dB, dC are [R, n] contiguous chunks of the workspace dtype. No launcher
// allocates anything of size n x n.
#pragma once

#include <ATen/ATen.h>

namespace robustft {

struct StepProblem {
  int64_t n = 0;
  bool with_m2 = false;
  bool with_clip = false;
  at::Tensor I, T, M;                  // [n, D]; M only with m^2
  at::Tensor diag;                     // [n] s_m <I_p, T_p> (with m^2)
  at::Tensor m2_scale, clip_scale;     // 0-d; each defined when its term is on
  // Optional [V, n, n] workspace-dtype buffer of the views' dot products (A, B with m^2,
  // then C with CLIP; CPU only): step_lse writes them, step_dlogits takes each chunk's
  // dot products from its rows instead of a GEMM and turns them into dlogits in place.
  at::Tensor keep;
};

// DiVE's inputs (docs/maths.md, section 4): u = fi - pi, v = ft - pt, centre m.
struct DiveInputs {
  at::Tensor fi, ft, pi, pt;  // [B', D], contiguous, one dtype
  at::Tensor center;          // [D] acc dtype
};

// Where a backward strip's Gram blocks (rows [r0, r0 + R) against the columns [r0, n), W =
// n - r0) lie in its workspace (docs/maths.md, section 9.4):
//   kBlocks:      S [4, R, W], the blocks II, IT, TI, TT one after another;
//   kInterleaved: S [2 R, 2 W], the product X_r X_c^T of the strip-interleaved rows
//                 X = [I_0; T_0; I_1; T_1; ...] (block b: the rows [b R, (b + 1) R) of I,
//                 then of T), X_r the strip's own block and X_c the blocks from it on. One
//                 BLAS call forms a strip past its own block and two take its gradients,
//                 where kBlocks needs four and eight of a quarter the size (which BLAS runs
//                 more slowly).
enum class GramLayout { kBlocks, kInterleaved };

// The symmetric Gram formulation of CLIP + m^2-mix (docs/maths.md, section 9.4): every logit
// from the Gram entries of [I; T] and the slerp weights, one triangle of block pairs forward
// and one per backward (no M buffer). m^2 is always on; CLIP with with_clip.
struct GramProblem {
  int64_t n = 0;
  bool with_clip = false;
  at::Tensor I, T;                  // [n, D] contiguous, one dtype
  at::Tensor weights;               // [4, n] double: w_a, w_b, dw_a/dc, dw_b/dc (mix_rows)
  at::Tensor diag;                  // [n] acc: the true pair s_m <I_p, T_p>
  at::Tensor m2_scale, clip_scale;  // 0-d acc (clip_scale defined with CLIP)
  // The CPU forward's strips: rows [j R, (j + 1) R) against the columns [j R, n), R =
  // strip_rows (the backward's chunk); with keep (flat, acc), the Gram blocks of the first
  // K strips are kept there, packed (gram_kept_strip) in the strips' layout, for the
  // backward, which then recomputes nothing for them. Devices that recompute ignore both.
  int64_t strip_rows = 0;
  at::Tensor keep;
  // The backward strips' layout; with kInterleaved, stacked [2 n, D] (the GEMM operand dtype)
  // holds X = [I_0; T_0; ...] in blocks of strip_rows rows (interleave_strips, step_ops.h).
  GramLayout layout = GramLayout::kBlocks;
  at::Tensor stacked;
};

// The largest slerp weight the Gram formulation takes (section 9.4, "near-opposite pairs"):
// above it the weights amplify the Gram entries' rounding, and the three-product design,
// which forms M in double, evaluates the batch.
constexpr double kGramWeightLimit = 4.0;

// The most rows of the CPU's Gram strips. Its forward takes the Gram blocks strip by strip
// (the backward's strips, so that it can keep them for it) and computes each strip's own
// square block but for its T I^T quarter (copied from I T^T): its products cover 2 n^2 + n R
// of the 2n x 2n Gram matrix's entries, against the triangle's 2 n^2 (1.06 times at n =
// 2048). The CUDA forward schedules the triangle by tiles and takes the workspace's strips.
constexpr int64_t kCpuGramStripRows = 256;

// The most rows of the GPU backends' Gram strips (CUDA's here, Triton's GRAM_STRIP_ROWS_MAX).
// Their backward recomputes each strip's Gram tiles, its own square block whole: 4 n^2 D R / n
// more multiply-adds in all. 2048 rows hold that to an eighth at n = 16384 (the design point
// of benchmarks/README.md) whatever the workspace limit, and a 2048-row strip still fills a
// GPU with tiles.
constexpr int64_t kGpuGramStripRows = 2048;

// The kept strips' packing: strip j (rows [j R, j R + R_j), R_j = min(R, n - j R), against
// the columns [j R, n)) holds 4 R_j (n - j R) entries, and the strips follow one another from
// strip 0 with no gap. A later strip is narrower than the first, so a limit holds more strips
// packed than in slots of the first strip's size (at n = 8192, R = 256 and 512 MiB of float,
// 26 of the 32 strips against 16).
inline int64_t gram_strip_entries(int64_t n, int64_t R, int64_t j) {
  const int64_t W = n - j * R;
  return 4 * std::min(R, W) * W;
}

// Where strip j starts in the packed buffer (the entries of the strips before it).
inline int64_t gram_kept_offset(int64_t n, int64_t R, int64_t j) {
  int64_t offset = 0;
  for (int64_t i = 0; i < j; ++i) offset += gram_strip_entries(n, R, i);
  return offset;
}

// How many whole strips a packed buffer of `entries` holds, or -1 when no number of strips
// fills it exactly (a buffer that is not a forward's).
inline int64_t gram_kept_count(int64_t n, int64_t R, int64_t entries) {
  int64_t offset = 0, j = 0;
  while (offset < entries && R > 0 && j * R < n) offset += gram_strip_entries(n, R, j++);
  return offset == entries ? j : -1;
}

// Strip j's entries in the packed buffer `keep`.
inline at::Tensor gram_kept_strip(const at::Tensor& keep, int64_t n, int64_t R, int64_t j) {
  return keep.narrow(0, gram_kept_offset(n, R, j), gram_strip_entries(n, R, j));
}

// The O(n D) launchers (mix, mix_backward, dive_sums, dive_grads) are one pass over the rows
// each, on the device: the slerp prologue's and DiVE's maths as a dozen whole-tensor ATen
// passes would cost as much as the tile work at small n and hold several n x D double
// temporaries at once. Their per-entry formulas are robustft_maths.h's.
#define RFT_DECLARE_STEP_KERNELS(DEV)                                                   \
  void step_lse_##DEV(const StepProblem& p, at::Tensor& lse);                           \
  void step_dlogits_##DEV(const StepProblem& p, const at::Tensor& lse, int64_t r0,      \
                          at::Tensor& dA, at::Tensor& dB, at::Tensor& dC, at::Tensor& stats); \
  /* M [n, D] = slerp(I_p, T_p; lam) rounded once from double (M of the workspace dtype, \
     or of the inputs' for the slerp op, or undefined for the weights alone); weights    \
     [4, n] double = (w_a, w_b, dw_a/dc, dw_b/dc) of maths::slerp_weights(<I_p, T_p>,    \
     lam), the row dot in double; lam a one-element double tensor. */                   \
  void mix_rows_##DEV(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,  \
                      at::Tensor& M, at::Tensor& weights);                              \
  /* grad_I += g_pair[p] T_p + w_a dM + k T_p, grad_T += g_pair[p] I_p + w_b dM + k I_p  \
     with k = <dM, I_p> dw_a/dc + <dM, T_p> dw_b/dc (dM, g_pair and the gradients of    \
     the accumulation dtype; the row dots in double). */                                \
  void mix_backward_##DEV(const at::Tensor& dM, const at::Tensor& I, const at::Tensor& T, \
                          const at::Tensor& weights, const at::Tensor& g_pair,          \
                          at::Tensor& grad_I, at::Tensor& grad_T);                      \
  /* sums [2] = (sum_j |u_j - m|^2 + |v_j - m|^2, sum_j |u_j - v_j|^2), mean [D] =      \
     mean_j (u_j + v_j) / 2, accumulation dtype, summed in double in a fixed order. */   \
  void dive_sums_##DEV(const DiveInputs& d, at::Tensor& sums, at::Tensor& mean);        \
  /* The [B', D] gradients of w_a AVL_sum + w_p PVL_sum (w_a, w_p 0-d, m constant). */   \
  void dive_grads_##DEV(const DiveInputs& d, const at::Tensor& w_a, const at::Tensor& w_p, \
                        at::Tensor& grad_fi, at::Tensor& grad_ft);                      \
  /* grad_I_p += coef_p T_p, grad_T_p += coef_p I_p (coef [n] and the gradients of the   \
     accumulation dtype): the true pair's and the slerp weights' terms of the Gram       \
     backward. */                                                                       \
  void pair_backward_##DEV(const at::Tensor& coef, const at::Tensor& I, const at::Tensor& T, \
                           at::Tensor& grad_I, at::Tensor& grad_T);                     \
  /* Gram forward: lse [4, n] (acc) as step_lse, from the triangle of block pairs. */   \
  void gram_lse_##DEV(const GramProblem& p, at::Tensor& lse);                           \
  /* Gram backward, the strip of rows [r0, r0 + R) against the columns [r0, n): S       \
     (workspace dtype, contiguous) in p.layout, [4, R, n - r0] or [2 R, 2 (n - r0)], = the \
     blocks S_II, S_IT, S_TI, S_TT of section 9.4 with a_m, a_c replaced by the 0-d acc  \
     factors f_m2, f_clip                                                                \
     (the op passes a / (|a_m| + |a_c|)); stats [2] (acc) += (sum over the strip's ordered \
     pairs of dA' A + dB' B, over s_m; of dC' C, over s_c); u [2, n] (acc) += the strip's \
     u_I, u_T terms (unscaled). Each ordered pair counted once: entries with q >= r0 + R  \
     serve both orientations, the others the direct one only. S holds the strip's Gram   \
     blocks on entry when it is a strip the forward kept (p.keep), and is formed from     \
     them in place. */                                                                  \
  void gram_strip_##DEV(const GramProblem& p, const at::Tensor& lse, int64_t r0,         \
                        const at::Tensor& f_m2, const at::Tensor& f_clip, at::Tensor& S, \
                        at::Tensor& stats, at::Tensor& u);

RFT_DECLARE_STEP_KERNELS(cpu)
RFT_DECLARE_STEP_KERNELS(cuda)
RFT_DECLARE_STEP_KERNELS(cuda_rules)

// The interleaved layout's end of the Gram backward (the CPU's; the blocks layout adds into
// grad_I, grad_T directly and takes pair_backward): from the stacked rows X and their
// gradient dX [2 n, D] in blocks of R rows (interleave_strips, step_ops.h; X of the
// workspace dtype, dX of the accumulation dtype), grad_I_p = dX_{I row of p} + coef_p T_p,
// grad_T_p = dX_{T row of p} + coef_p I_p, written whole ([n, D] acc, contiguous): the
// rows back in their own order and pair_backward's terms in one pass.
void unstack_pair_backward_cpu(const at::Tensor& coef, const at::Tensor& X, const at::Tensor& dX,
                               int64_t R, at::Tensor& grad_I, at::Tensor& grad_T);

// mix_rows that also writes the pair's dot products pair_dot [n] (accumulation dtype,
// contiguous) = <I_p, T_p> rounded from the double product the weights are formed from (the
// CPU's): a step then reads them from here instead of a pass over I and T of their own.
void mix_rows_pair_dot_cpu(const at::Tensor& I, const at::Tensor& T, const at::Tensor& lam,
                           at::Tensor& M, at::Tensor& weights, at::Tensor& pair_dot);

#undef RFT_DECLARE_STEP_KERNELS

}  // namespace robustft
