"""What computes each loss (a provider), and why a provider is not benchmarked here.

  reference           rft.<loss>(backend="reference"): eager PyTorch, materialises N x N logits
                      (for m^2 the full mixed logit matrices, as the paper's code does)
  reference+compile   torch.compile of that same call (compile time is not timed)
  native              rft.<loss>(backend="native"): the compiled C++/CUDA extension; CLIP + m^2,
                      m^2 and the robust step under the "gram" step design (the default:
                      the symmetric Gram formulation, docs/maths.md 9.4)
  native-products     the same calls under the "products" step design (the three tile
                      products, docs/maths.md 9.3): the old design beside the new in one run
                      (m^2, CLIP + m^2 and the robust step only; the design changes nothing
                      else)
  triton              rft.<loss>(backend="triton"): CUDA only (on CPU only under
                      TRITON_INTERPRET=1, far too slow to benchmark: skipped)
  open_clip           open_clip.loss.ClipLoss / SigLipLoss, eager (CLIP and SigLIP)
  inf_cl              Inf-CL's triton kernel (CUDA, CLIP only, when `import inf_cl` works):
                      (cal_inf_loss(s*img, txt) + cal_inf_loss(s*txt, img)) / 2
  native-separate     CLIP + m^2 and the robust step by one fused call per term (gram design)
  floor               the library GEMMs an exact evaluation needs, nothing else (floor.py)

Every provider is a function fn(image_features, text_features, logit_scale, logit_bias) ->
0-d tensor whose backward the harness times.

The step design (robustft_ext.set_step_design) is one setting of the process, read by the
fused backends' forward and backward, so every provider that runs them pins its own design:
each call sets it (when it differs) before the forward, and the harness runs the backward
before any other provider's call. Providers of different designs can then take turns in one
process (cpu_compare.py's rounds, gpu_bench.py's long-lived worker) whatever the environment's
ROBUSTFT_STEP_DESIGN says.
"""
from __future__ import annotations

from typing import Callable

import torch

from harness import floor
from harness.losses import (DIVE_WEIGHT, LIPSUM_WEIGHT, LOSSES, M2_LAM, M2_SCALE, M2_WEIGHT,
                            PRE_LOGIT_SCALE, robust_step_extras)

PROVIDERS = ("reference", "reference+compile", "native", "native-products", "triton",
             "open_clip", "inf_cl", "native-separate", "floor")
M2_LOSSES = ("m2mix", "clip_m2mix", "robust_step")
# The step design each provider that runs the fused backends pins (module docstring); the
# others do not read it.
STEP_DESIGN = {"native": "gram", "native-products": "products", "native-separate": "gram",
               "triton": "gram"}

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def has_loss(loss: str, provider: str) -> bool:
    """Whether the provider computes this loss at all (else its rows would only say it does not)."""
    if provider == "native-separate":
        return loss in ("clip_m2mix", "robust_step")
    if provider == "native-products":
        return loss in M2_LOSSES
    if provider == "open_clip":
        return loss in ("clip", "siglip")
    if provider == "inf_cl":
        return loss == "clip"
    return True


def skip_reason(loss: str, provider: str, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """Why this provider is not benchmarked here (None: it is)."""
    if provider in ("reference", "reference+compile", "floor"):
        return None
    if provider == "triton" and device.type != "cuda":
        return ("triton runs on CUDA only (on CPU only under TRITON_INTERPRET=1, an "
                "interpreter far too slow to benchmark): skipped on CPU")
    if provider in ("native", "triton"):
        return _backend_unavailable(provider, device, dtype)
    if provider == "native-separate":
        if not has_loss(loss, provider):
            return ("native-separate (the terms by separate fused calls) is for clip_m2mix and "
                    "robust_step")
        return _backend_unavailable("native", device, dtype)
    if provider == "native-products":
        if not has_loss(loss, provider):
            return ("native-products (the three-products step design) differs from native only "
                    "for m2mix, clip_m2mix and robust_step")
        return _backend_unavailable("native", device, dtype)
    if loss in M2_LOSSES and provider in ("open_clip", "inf_cl"):
        return f"{provider} has no m^2-mix loss"
    if provider == "open_clip":
        try:
            import open_clip.loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"open_clip not importable ({type(exc).__name__}: {exc})"
        return None
    if provider == "inf_cl":
        return _inf_cl_skip_reason(loss, device, d)
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _backend_unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        from robustft_ext.backends import unavailable_reason
        return unavailable_reason(backend, device, dtype)
    except Exception as exc:  # noqa: BLE001 - a broken backend is a skip with the reason
        return f"{backend} backend check failed ({type(exc).__name__}: {exc})"


def _inf_cl_skip_reason(loss: str, device: torch.device, d: int) -> str | None:
    if loss != "clip":
        return "inf_cl has no SigLIP loss"
    try:
        import inf_cl  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"inf_cl not installed ({type(exc).__name__}: {exc}); pip install inf_cl"
    if device.type != "cuda":
        return "inf_cl's kernels are Triton/CUDA only: skipped on CPU"
    if _inf_cl_head_dim(d) is None:
        return f"inf_cl needs D divisible by 16, got D={d}"
    return None


def _inf_cl_head_dim(d: int) -> int | None:
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    return None


def make_loss_fn(loss: str, provider: str, d: int | None = None, *,
                 fresh_compile: bool = True) -> LossFn:
    """fn(image_features, text_features, logit_scale, logit_bias) -> 0-d loss tensor.

    fresh_compile (reference+compile): reset torch.compile's caches first, so that each
    configuration of a long-lived process compiles for its own shapes (and never meets the
    recompile limit). A caller that keeps several compiled providers alive at once
    (cpu_compare.py) passes False and resets once before making them: a reset drops the graphs
    of every provider made before it."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
    if provider in STEP_DESIGN and loss in M2_LOSSES:
        backend = "native" if provider == "native-products" else provider
        return _pinned(_make_loss_fn(loss, backend, d, fresh_compile), STEP_DESIGN[provider])
    if provider == "native-products":
        raise ValueError(f"native-products has no {loss} loss (only {M2_LOSSES})")
    return _make_loss_fn(loss, provider, d, fresh_compile)


def _pinned(fn: LossFn, design: str) -> LossFn:
    """fn under one step design: set before each call when the process's setting differs (a
    Python read; the set is one op call, microseconds against the milliseconds timed)."""
    import robustft_ext as rft

    def pinned(a, b, s, bias):
        if rft.step_design() != design:
            rft.set_step_design(design)
        return fn(a, b, s, bias)
    return pinned


def _make_loss_fn(loss: str, provider: str, d: int | None, fresh_compile: bool) -> LossFn:
    if provider == "floor":
        return floor.make_floor_fn(loss)
    if provider == "reference+compile":
        if fresh_compile:
            torch._dynamo.reset()  # a fresh cache per configuration: static shapes, no fallback
        return torch.compile(make_loss_fn(loss, "reference", d), dynamic=False)
    if loss in ("m2mix", "clip_m2mix"):
        return _m2mix_loss_fn(loss, provider)
    if loss == "robust_step":
        return _robust_step_fn(provider)
    if provider in ("reference", "native", "triton"):
        return _contrastive_fn(loss, provider)
    if provider == "open_clip":
        import open_clip.loss as ocl
        module = ocl.ClipLoss() if loss == "clip" else ocl.SigLipLoss()
        return lambda a, b, s, bias: module(a, b, s, bias)
    if provider == "inf_cl":
        return _inf_cl_fn(loss, d)
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _contrastive_fn(loss: str, backend: str) -> LossFn:
    import robustft_ext as rft
    if loss == "clip":
        return lambda a, b, s, bias: rft.clip_loss(a, b, s, bias, backend=backend)
    return lambda a, b, s, bias: rft.siglip_loss(a, b, s, bias, backend=backend)


def _inf_cl_fn(loss: str, d: int | None) -> LossFn:
    if loss != "clip":
        raise ValueError("inf_cl has no SigLIP loss")
    from inf_cl import cal_inf_loss
    head_dim = _inf_cl_head_dim(d or 0) or 256

    def inf(a, b, s, bias):
        if bias is not None:
            raise ValueError("inf_cl takes no logit bias")
        # The scale is applied here (as inf_cl does internally) rather than through its
        # `scale=` argument, whose backward all-reduces and needs torch.distributed.
        i2t = cal_inf_loss(s * a, b, head_dim=head_dim)
        t2i = cal_inf_loss(s * b, a, head_dim=head_dim)
        return (i2t + t2i) / 2
    return inf


def _m2mix_loss_fn(loss: str, provider: str) -> LossFn:
    """m^2 alone, or the paper's objective CLIP + w m^2 (from one fused pass, or, for
    native-separate, two fused calls)."""
    import robustft_ext as rft

    if provider == "native-separate" and loss == "clip_m2mix":
        return lambda a, b, s, bias: _weighted(
            rft.clip_loss(a, b, s, backend="native"),
            rft.m2mix_loss(a, b, M2_SCALE, M2_LAM, backend="native"))
    if provider not in ("reference", "native", "triton"):
        raise ValueError(f"{provider!r} has no {loss} loss")
    if loss == "m2mix":
        return lambda a, b, s, bias: rft.m2mix_loss(a, b, s, M2_LAM, backend=provider)
    return lambda a, b, s, bias: _weighted(*rft.clip_m2mix_loss(
        a, b, s, M2_LAM, m2_logit_scale=M2_SCALE, backend=provider))


def _weighted(clip: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    return clip + M2_WEIGHT * m2


def _robust_step_fn(provider: str) -> LossFn:
    """A RobustFTLoss step with every term on; the extra inputs are made once per shape, and
    their gradients cleared before each step as a training loop's zero_grad(set_to_none=True)
    does (the timing loop clears only a, b and the scale's): else every step after the first
    would also add its DiVE gradients into the previous step's, a pass no training step has."""
    import robustft_ext as rft

    extras: dict = {}

    def inputs(a: torch.Tensor) -> dict:
        key = (a.shape, a.dtype, a.device)
        if key not in extras:
            extras.clear()
            extras[key] = robust_step_extras(a)
        for t in extras[key].values():
            t.grad = None
        return extras[key]

    if provider == "native-separate":
        def separate(a, b, s, bias):
            x = inputs(a)
            avl, pvl = rft.dive_loss(x["ref_image_ft"], x["ref_text_ft"], x["ref_image_pre"],
                                     x["ref_text_pre"], torch.zeros(a.shape[1], device=a.device),
                                     backend="native")
            return (rft.clip_loss(a, b, s, backend="native")
                    + M2_WEIGHT * rft.m2mix_loss(a, b, M2_SCALE, M2_LAM, backend="native")
                    + LIPSUM_WEIGHT * rft.lipsum_loss(a, x["image_pre"], x["random_text_features"],
                                                      PRE_LOGIT_SCALE, backend="native")
                    + DIVE_WEIGHT * (avl + pvl))
        return separate
    if provider not in ("reference", "native", "triton"):
        raise ValueError(f"{provider!r} has no robust_step loss")
    module = rft.RobustFTLoss(m2_weight=M2_WEIGHT, lipsum_weight=LIPSUM_WEIGHT,
                              dive_weight=DIVE_WEIGHT, m2_lam=M2_LAM, m2_logit_scale=M2_SCALE,
                              backend=provider)

    def step(a, b, s, bias):
        return module(a, b, s, pre_logit_scale=PRE_LOGIT_SCALE, **inputs(a))
    return step
