"""robustft_ext: fused losses for robust fine-tuning of CLIP-style models.

Public API (docs/api.md): clip_loss, clip_rows_loss, siglip_loss, m2mix_loss, clip_m2mix_loss,
slerp, sample_beta, dive_loss, lipsum_loss, ClipLoss, SigLipLoss, M2MixLoss, DiVELoss, LipsumLoss,
RobustFTLoss, available_backends (a BackendReport), BackendUnavailableError, workspace_limit and
set_workspace_limit (the backward's dlogit workspace), step_design and set_step_design (how
CLIP + m^2 and the robust step evaluate their tiles), patch_open_clip and OpenClipPatch
(open_clip's trainer on these losses).
"""
from . import _extension  # noqa: F401  (loads the compiled ops)
from .backends import BackendReport, BackendUnavailableError, available_backends
from .functional import (clip_loss, clip_m2mix_loss, clip_rows_loss, dive_loss, lipsum_loss,
                         m2mix_loss, siglip_loss, slerp)
from .modules.contrastive import ClipLoss, SigLipLoss
from .modules.dive import DiVELoss
from .modules.lipsum import LipsumLoss
from .modules.m2mix import M2MixLoss, sample_beta
from .modules.robust_ft import RobustFTLoss
from .open_clip_patch import OpenClipPatch, patch_open_clip
from .step_design import set_step_design, step_design
from .workspace import set_workspace_limit, workspace_limit

workspace_limit()  # hands $ROBUSTFT_WORKSPACE_MB to the compiled ops
step_design()  # and $ROBUSTFT_STEP_DESIGN

__version__ = "0.1.0"

__all__ = [
    "BackendReport",
    "BackendUnavailableError",
    "ClipLoss",
    "DiVELoss",
    "LipsumLoss",
    "RobustFTLoss",
    "M2MixLoss",
    "OpenClipPatch",
    "SigLipLoss",
    "available_backends",
    "clip_loss",
    "clip_m2mix_loss",
    "clip_rows_loss",
    "dive_loss",
    "lipsum_loss",
    "m2mix_loss",
    "patch_open_clip",
    "sample_beta",
    "siglip_loss",
    "set_step_design",
    "set_workspace_limit",
    "slerp",
    "step_design",
    "workspace_limit",
]
