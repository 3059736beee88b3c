"""robustft_ext: fused losses for robust fine-tuning of CLIP-style models.

Public API (see README): clip_loss, siglip_loss, ClipLoss, SigLipLoss, available_backends.
"""
from . import _extension, native  # noqa: F401  (loads the compiled ops and their fakes)
from .backends import BackendUnavailableError, available_backends
from .functional import clip_loss, clip_rows_loss, siglip_loss
from .modules import ClipLoss, SigLipLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClipLoss",
    "SigLipLoss",
    "available_backends",
    "clip_loss",
    "clip_rows_loss",
    "siglip_loss",
]
