// Op schemas of robustft_ext, declared once. Device kernels are registered in
// cpu/contrastive_cpu.cpp and cuda/contrastive_cuda.cu; the fake (meta)
// implementations and the autograd Functions live in robustft_ext/native.py.
//
// This translation unit needs no Python: the C++ unit tests (csrc/tests, CMake)
// link it with the CPU kernels. The Python module init is in module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(robustft_ext, m) {
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
  // Geodesic mixing of matched rows: out_p = slerp(a_p, b_p; lam) (METHODS.md section 3,
  // stabilised as robustft_maths.h slerp_weights says); lam is a 0-d tensor of the
  // accumulation dtype. slerp_bwd returns the gradients of a and b.
  m.def("slerp(Tensor a, Tensor b, Tensor lam) -> Tensor");
  m.def("slerp_bwd(Tensor grad_out, Tensor a, Tensor b, Tensor lam) -> (Tensor, Tensor)");
  // m^2-mix loss (METHODS.md section 3) with scale m2_scale, and, when with_clip, the
  // CLIP loss of the same batch with scale clip_scale from the same pass over the tiles.
  // Returns (m2_loss, clip_loss (0 without clip), lse [4 or 2, n]: see m2mix_kernels.h).
  m.def(
      "m2mix_fwd(Tensor image, Tensor text, Tensor m2_scale, Tensor lam, Tensor clip_scale, "
      "bool with_clip) -> (Tensor, Tensor, Tensor)");
  // Gradients of grad_m2 * m2_loss + grad_clip * clip_loss: (grad_image, grad_text,
  // grad_m2_scale, grad_clip_scale).
  m.def(
      "m2mix_bwd(Tensor grad_m2, Tensor grad_clip, Tensor image, Tensor text, Tensor m2_scale, "
      "Tensor lam, Tensor clip_scale, Tensor lse, bool with_clip) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
