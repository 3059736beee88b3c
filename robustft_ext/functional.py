"""The public loss functions in one namespace (each lives in its op family's module,
robustft_ext.ops): rft.functional.dive_terms is the one not exported at the top level."""
from .ops.clip import clip_loss, clip_rows_loss
from .ops.dive import dive_loss, dive_terms
from .ops.lipsum import lipsum_loss
from .ops.m2mix import clip_m2mix_loss, m2mix_loss
from .ops.siglip import siglip_loss
from .ops.slerp import slerp

__all__ = ["clip_loss", "clip_m2mix_loss", "clip_rows_loss", "dive_loss", "dive_terms",
           "lipsum_loss", "m2mix_loss", "siglip_loss", "slerp"]
