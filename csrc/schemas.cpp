// Op schemas of robustft_ext, declared once (define_loss_ops). Device kernels are
// registered beside the launchers they run on: cpu/contrastive_cpu.cpp and cpu/step_cpu.cpp,
// cuda/contrastive_cuda.cu and cuda/step_cuda.cu; the fake (meta) implementations and the
// autograd Functions live in robustft_ext's Python modules. The same schemas are declared
// again in the namespace robustft_cuda_rules, whose CPU kernels run the ops' host code under
// CUDA's rules (cpu/cuda_rules_cpu.cpp).
//
// This translation unit needs no Python: the C++ unit tests (csrc/tests, CMake)
// link it with the CPU kernels. The Python module init is in module.cpp.
#include "schemas.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "cuda/tile_plan.h"
#include "kept_cache.h"
#include "step_args.h"
#include "step_ops.h"
#include "workspace.h"

void robustft::define_loss_ops(torch::Library& m) {
  // CLIP / InfoNCE loss over logits S = scale * a b^T + bias.
  // symmetric: a, b are [n, D]; loss = (CE_rows(S) + CE_rows(S^T)) / 2 with
  //   positives on the diagonal; returns (loss, row_lse [n], col_lse [n]).
  // otherwise: b is [m, D]; loss = CE_rows(S) with positives at (i, i + diag_offset);
  //   returns (loss, row_lse [n], col_lse [0]).
  m.def(
      "clip_fwd(Tensor a, Tensor b, Tensor scale, Tensor bias, int diag_offset, "
      "bool symmetric) -> (Tensor, Tensor, Tensor)");
  m.def(
      "clip_bwd(Tensor grad_loss, Tensor a, Tensor b, Tensor scale, Tensor bias, "
      "Tensor row_lse, Tensor col_lse, int diag_offset, bool symmetric) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // SigLIP loss (1/n) sum_ij -log sigmoid(z_ij S_ij), z = +1 on the diagonal unless
  // negative_only (then every pair is a negative and b may have any row count).
  m.def(
      "siglip_fwd(Tensor a, Tensor b, Tensor scale, Tensor bias, bool negative_only) "
      "-> Tensor");
  m.def(
      "siglip_bwd(Tensor grad_loss, Tensor a, Tensor b, Tensor scale, Tensor bias, "
      "bool negative_only) -> (Tensor, Tensor, Tensor, Tensor)");
  // The CPU variants that keep the n x m dot products for the backward (contrastive_ops.h,
  // "Kept dot products"); only when they fit the workspace limit. The _keep forwards return
  // them last; the _kept backwards overwrite them with the dlogits.
  m.def(
      "clip_fwd_keep(Tensor a, Tensor b, Tensor scale, Tensor bias, int diag_offset, "
      "bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "clip_bwd_kept(Tensor grad_loss, Tensor a, Tensor b, Tensor scale, Tensor bias, "
      "Tensor row_lse, Tensor col_lse, Tensor(a!) dots, int diag_offset, bool symmetric) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "siglip_fwd_keep(Tensor a, Tensor b, Tensor scale, Tensor bias, bool negative_only) "
      "-> (Tensor, Tensor)");
  m.def(
      "siglip_bwd_kept(Tensor grad_loss, Tensor a, Tensor b, Tensor scale, Tensor bias, "
      "Tensor(a!) dots, bool negative_only) -> (Tensor, Tensor, Tensor, Tensor)");
  // Geodesic mixing of matched rows: out_p = slerp(a_p, b_p; lam) (docs/maths.md, section 3,
  // stabilised as robustft_maths.h slerp_weights says); lam is a 0-d tensor of the
  // accumulation dtype. slerp_bwd returns the gradients of a and b.
  m.def("slerp(Tensor a, Tensor b, Tensor lam) -> Tensor");
  m.def("slerp_bwd(Tensor grad_out, Tensor a, Tensor b, Tensor lam) -> (Tensor, Tensor)");
  // m^2-mix loss (docs/maths.md, section 3) with scale m2_scale, and, when with_clip, the
  // CLIP loss of the same batch with scale clip_scale from the same pass over the tiles.
  // Returns (m2_loss, clip_loss (0 without clip), lse [4 or 2, n]: see step_kernels.h).
  m.def(
      "m2mix_fwd(Tensor image, Tensor text, Tensor m2_scale, Tensor lam, Tensor clip_scale, "
      "bool with_clip) -> (Tensor, Tensor, Tensor)");
  // Gradients of grad_m2 * m2_loss + grad_clip * clip_loss: (grad_image, grad_text,
  // grad_m2_scale, grad_clip_scale).
  m.def(
      "m2mix_bwd(Tensor grad_m2, Tensor grad_clip, Tensor image, Tensor text, Tensor m2_scale, "
      "Tensor lam, Tensor clip_scale, Tensor lse, bool with_clip) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // DiVE (docs/maths.md, section 4) on B' reference pairs: (AVL, PVL, diff_mean [D] =
  // mean_j (u_j + v_j) / 2, the batch mean of the centre update); gradients to the
  // fine-tuned features only.
  m.def(
      "dive_fwd(Tensor image_ft, Tensor text_ft, Tensor image_pre, Tensor text_pre, "
      "Tensor center) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dive_bwd(Tensor grad_avl, Tensor grad_pvl, Tensor image_ft, Tensor text_ft, "
      "Tensor image_pre, Tensor text_pre, Tensor center) -> (Tensor, Tensor)");
  // Lipsum-FT regulariser (docs/maths.md, section 5): |s0 (F - F0) G^T|_F^2 / (2 K B), with
  // scale = s0; gradient to image_ft only.
  m.def("lipsum_fwd(Tensor image_ft, Tensor image_pre, Tensor texts, Tensor scale) -> Tensor");
  m.def(
      "lipsum_bwd(Tensor grad_loss, Tensor image_ft, Tensor image_pre, Tensor texts, "
      "Tensor scale) -> Tensor");
  // A robust fine-tuning step in one pass (csrc/step_kernels.h): with_clip the CLIP loss of
  // (image, text) at clip_scale, with_m2 the m^2-mix term at m2_scale, with image_pre and
  // lipsum_texts the Lipsum-FT term at lipsum_scale, with the four ref_* and center the
  // DiVE terms. Returns (terms [5] = clip, m2, lipsum, avl, pvl (0 when absent),
  // diff_mean [D] (DiVE; [0] without), lse [4, n]).
  m.def("robust_step_fwd(" RFT_STEP_SCHEMA ") -> (Tensor, Tensor, Tensor)");
  // Gradients of sum_i grad_terms[i] * terms[i]: (grad_image, grad_text, grad_clip_scale,
  // grad_m2_scale, grad_ref_image_ft, grad_ref_text_ft ([0, D] without DiVE)).
  m.def("robust_step_bwd(Tensor grad_terms, " RFT_STEP_SCHEMA
        ", Tensor lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // robust_step_fwd and m2mix_fwd that also return the tiles' products (the Gram strips that
  // fit the workspace limit, packed, [E]; under the three-products design the dot products
  // [V, n, n], V = 2 with m^2 + 1 with CLIP, refused beyond the limit) and the O(n D) rest
  // the backward would form again, `carried` (step_ops.h, StepCarry: <I_p, T_p>, the slerp
  // weights, the stacked rows, Lipsum's V); and the backwards that take both instead of
  // recomputing them and overwrite the products (they are their dlogit workspace): a kept
  // tensor serves one backward. CPU only, as the _keep ops above.
  m.def("robust_step_fwd_keep(" RFT_STEP_SCHEMA ") -> (Tensor, Tensor, Tensor, Tensor, Tensor[])");
  m.def("robust_step_bwd_kept(Tensor grad_terms, " RFT_STEP_SCHEMA
        ", Tensor lse, Tensor(a!) kept, Tensor[] carried) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "m2mix_fwd_keep(Tensor image, Tensor text, Tensor m2_scale, Tensor lam, "
      "Tensor clip_scale, bool with_clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "m2mix_bwd_kept(Tensor grad_m2, Tensor grad_clip, Tensor image, Tensor text, "
      "Tensor m2_scale, Tensor lam, Tensor clip_scale, Tensor lse, Tensor(a!) kept, "
      "Tensor[] carried, bool with_clip) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY(robustft_ext, m) {
  // The byte limit of the backward passes' dlogit workspace (workspace.h), for every device.
  m.def("set_workspace_limit(int nbytes) -> ()", [](int64_t nbytes) {
    TORCH_CHECK(nbytes > 0, "robustft_ext: the workspace limit must be positive, got ", nbytes);
    robustft::workspace_limit_bytes().store(nbytes);
    robustft::kept_cache().trim_to_limit(nbytes);
  });
  // The bytes of free blocks the CPU's block cache holds (kept_cache.h): at most twice the
  // workspace limit.
  m.def("kept_cache_free_bytes() -> int", [] { return robustft::kept_cache().free_bytes(); });
  // Which tile configuration the native CUDA kernels take on a device with this much opt-in
  // shared memory per block (cuda/tile_plan.h): (contrastive, step) each "large", "small" or
  // "none", and the bytes the smaller configurations need. A pure function: no GPU needed.
  m.def("native_cuda_tiles(int shared_memory_per_block_optin) -> (str, str, int)",
        [](int64_t optin) {
          namespace plan = robustft::cuda_plan;
          const int bytes = static_cast<int>(std::min<int64_t>(optin, INT32_MAX));
          const int64_t need = std::max(plan::needed_bytes(plan::kContrastive, plan::kContrastive.small),
                                        plan::needed_bytes(plan::kStep, plan::kStep.small));
          return std::make_tuple(std::string(plan::tiles_name(plan::choose(plan::kContrastive, bytes))),
                                 std::string(plan::tiles_name(plan::choose(plan::kStep, bytes))), need);
        });
  // The whole plan (cuda/tile_plan.h) as JSON: shapes, dynamic bytes, static budgets.
  m.def("native_cuda_tile_plan() -> str", [] { return robustft::cuda_plan::plan_json(); });
  // "gram" (the default) or "products": how CLIP + m^2 and the step are evaluated
  // (workspace.h, StepDesign).
  m.def("set_step_design(str design) -> ()", [](std::string design) {
    TORCH_CHECK(design == "gram" || design == "products",
                "robustft_ext: the step design is 'gram' or 'products', got '", design, "'");
    robustft::step_design_setting().store(
        int(design == "gram" ? robustft::StepDesign::kGram : robustft::StepDesign::kProducts));
  });
  // (rows per strip R, kept strips K, kept entries E) of the Gram formulation's CPU passes
  // for n rows of `element_size` bytes under the current workspace limit (step_ops.h,
  // gram_strips): the kept Gram strips of m2mix_fwd_keep / robust_step_fwd_keep (the CPU's)
  // are [E], the first K strips packed.
  m.def("gram_strips(int n, int element_size) -> (int, int, int)", [](int64_t n, int64_t elem) {
    const auto g = robustft::gram_strips(n, elem, robustft::kCpuGramStripRows);
    return std::make_tuple(g.rows, g.kept, g.entries);
  });
  robustft::define_loss_ops(m);
}
