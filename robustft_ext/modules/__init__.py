"""The library's nn.Modules, thin over the op families' functions (robustft_ext.ops): they hold
what the functions leave to the caller (weights, the m^2 mix ratio's sampler, DiVE's centre,
Lipsum-FT's random texts, torch.distributed ranks) and check their own arguments.

contrastive  ClipLoss, SigLipLoss (open_clip's, drop-in)
m2mix        M2MixLoss, sample_beta
dive         DiVELoss
lipsum       LipsumLoss
robust_ft    RobustFTLoss (every term of a step in one pass)
"""
