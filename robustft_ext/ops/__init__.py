"""The library's ops, one module per op family, as csrc/contrastive_ops.h and csrc/step_ops.h
hold their C++ bodies: each module holds the family's public function(s), its autograd.Function
over the fused backends' ops, and the fake (meta) implementations of its compiled ops (so
torch.compile traces them).

family        public functions                 compiled ops (csrc/schemas.cpp)
clip          clip_loss, clip_rows_loss        clip_fwd, clip_bwd (+ _keep / _kept: native CPU)
siglip        siglip_loss                      siglip_fwd, siglip_bwd (+ _keep / _kept)
slerp         slerp                            slerp, slerp_bwd
m2mix         m2mix_loss, clip_m2mix_loss      m2mix_fwd, m2mix_bwd (+ _keep / _kept)
lipsum        lipsum_loss                      lipsum_fwd, lipsum_bwd
dive          dive_loss, dive_terms            dive_fwd, dive_bwd
robust_step   (RobustFTLoss's one pass)        robust_step_fwd, robust_step_bwd (+ _keep / _kept)

A call: the public function checks its arguments (robustft_ext._validation), then
backends.dispatch runs the reference or the family's Function on the chosen fused backend,
which calls that backend's ops (backends.fused_ops: torch.ops.robustft_ext or
torch.ops.robustft_triton, the same names and schemas).
"""
