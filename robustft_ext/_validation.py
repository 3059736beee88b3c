"""Checking user input before any kernel runs: clear errors naming the argument."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A logit scale, bias or mix ratio: a Python number or a 0-d tensor.
Scalar = float | torch.Tensor


class PairInputs(NamedTuple):
    """Validated features in one dtype, with scale and bias (0 when absent) as 0-d
    accumulation-dtype tensors."""

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the fused kernels: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_features(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [batch, dim] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has a zero feature dimension (shape {tuple(x.shape)})")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16, float16, float64")
    return x


def check_same_dim(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} have different feature dims: "
                         f"{a.shape[1]} vs {b.shape[1]}")


def check_same_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} have different batch sizes: "
                         f"{a.shape[0]} vs {b.shape[0]} (nothing is broadcast)")


def check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs are on different devices: {listing}")
    return first


def check_value(cond: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool tensor `cond` holds. In a compiled graph
    (torch.compile) the check is the graph's own assertion (torch._assert_async: a
    RuntimeError with the same message when the graph runs), so it holds there too; tensors
    without values (the meta device) pass."""
    if cond.device.type == "meta":
        return
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message)


def check_scalar(x: object, name: str, device: torch.device, dtype: torch.dtype,
                 *, optional: bool = False) -> torch.Tensor | None:
    """A float or 0-d floating tensor on `device` whose value is finite in `dtype` (the
    computation's: 1e39 is a finite float but overflows float32), returned as a 0-d `dtype`
    tensor."""
    if x is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a float or a 0-d tensor, got None")
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor (a scalar), got shape {tuple(x.shape)}; "
                             "use .squeeze() if it holds one value")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the features are on {device}")
        t = x.to(dtype)
        if torch.compiler.is_compiling() or t.device.type == "meta":
            check_value(torch.isfinite(t.detach()), f"{name} must be finite in {dtype}")
        elif not bool(torch.isfinite(t.detach())):
            raise ValueError(f"{name} must be finite in {dtype}, got {x.item()}"
                             + (f" (it overflows {dtype})" if bool(torch.isfinite(x)) else ""))
        return t
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {x}")
    if abs(value) > torch.finfo(dtype).max:
        raise ValueError(f"{name} = {x} overflows {dtype}, the dtype the loss is computed in")
    return torch.tensor(value, dtype=dtype, device=device)


def pair_inputs(image_features: object, text_features: object, logit_scale: object,
                logit_bias: object = None, *, names: tuple[str, str] = ("image_features", "text_features"),
                same_batch: bool = True) -> PairInputs:
    """Validate a feature pair with its scale and optional bias; promote mixed dtypes (autocast)."""
    na, nb = names
    a = check_features(image_features, na)
    b = check_features(text_features, nb)
    check_same_dim(a, b, na, nb)
    if same_batch:
        check_same_batch(a, b, na, nb)
    device = check_same_device({na: a, nb: b})
    dtype = torch.promote_types(a.dtype, b.dtype)
    acc = acc_dtype(dtype)
    scale = check_scalar(logit_scale, "logit_scale", device, acc)
    bias = check_scalar(logit_bias, "logit_bias", device, acc, optional=True)
    if bias is None:
        bias = torch.zeros((), dtype=acc, device=device)
    return PairInputs(a.to(dtype), b.to(dtype), scale, bias)


def check_lam(lam: object, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The mixing ratio: a float or 0-d tensor in [0, 1], returned as a 0-d `dtype` tensor."""
    t = check_scalar(lam, "lam", device, dtype).detach()
    if not isinstance(lam, torch.Tensor):  # checked on the host value: no read back from t
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {float(lam)}")
    elif torch.compiler.is_compiling() or t.device.type == "meta":
        check_value((t >= 0) & (t <= 1), "lam must lie in [0, 1]")
    elif not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {float(t)}")
    return t


def check_weight(value: object, name: str) -> float:
    """A loss-term weight: a finite, non-negative float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value}")
    return float(value)


def check_dive_inputs(image_ft: object, text_ft: object, image_pre: object, text_pre: object,
                      center: object) -> tuple[torch.Tensor, ...]:
    """The four [B', D] DiVE features (one shape, dtype and device) and a [D] centre, returned
    in one dtype with the centre in the accumulation dtype."""
    names = ("image_ft", "text_ft", "image_pre", "text_pre")
    feats = [check_features(x, n) for x, n in zip((image_ft, text_ft, image_pre, text_pre), names)]
    for x, n in zip(feats[1:], names[1:]):
        if x.shape != feats[0].shape:
            raise ValueError(f"the four DiVE inputs must have one shape: image_ft is "
                             f"{tuple(feats[0].shape)} but {n} is {tuple(x.shape)}")
    if not isinstance(center, torch.Tensor):
        raise TypeError(f"center must be a torch.Tensor, got {type(center).__name__}")
    if center.dim() != 1 or center.shape[0] != feats[0].shape[1]:
        raise ValueError(f"center must be a [D] = [{feats[0].shape[1]}] tensor, got shape "
                         f"{tuple(center.shape)}")
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {center.dtype}")
    # {**a, ...} rather than a | b: torch.compile of torch 2.6 cannot trace dict union
    device = check_same_device({**dict(zip(names, feats)), "center": center})
    dtype = feats[0].dtype
    for x in feats[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return (*(x.to(dtype) for x in feats), center.detach().to(device=device, dtype=acc_dtype(dtype)))


def check_lipsum_inputs(image_ft: object, image_pre: object, random_text_features: object
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F, F0 [B, D] of one shape and G [K, D], in one dtype and on one device."""
    f = check_features(image_ft, "image_ft")
    f0 = check_features(image_pre, "image_pre")
    g = check_features(random_text_features, "random_text_features")
    if f0.shape != f.shape:
        raise ValueError(f"image_pre must have image_ft's shape {tuple(f.shape)}, got "
                         f"{tuple(f0.shape)}")
    check_same_dim(f, g, "image_ft", "random_text_features")
    check_same_device({"image_ft": f, "image_pre": f0, "random_text_features": g})
    dtype = torch.promote_types(torch.promote_types(f.dtype, f0.dtype), g.dtype)
    return f.to(dtype), f0.to(dtype), g.to(dtype)


def check_positive_float(value: object, name: str, *, optional: bool = False) -> float | None:
    """A finite positive float (None passes when optional)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        what = "None or a finite positive float" if optional else "a finite positive float"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_positive_int(value: object, name: str) -> int:
    """A positive int (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
