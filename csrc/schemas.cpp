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
}
