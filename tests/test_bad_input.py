"""Every bad input of docs/api.md gets a ValueError/TypeError naming the argument, before any
kernel runs."""
from __future__ import annotations

import math

import pytest
import torch

import robustft_ext as rft
from helpers import features

LOSSES = {
    "clip_loss": lambda a, b, s, c=None, **kw: rft.clip_loss(a, b, s, c, **kw),
    "siglip_loss": lambda a, b, s, c=-10.0, **kw: rft.siglip_loss(a, b, s, c, **kw),
    "ClipLoss": lambda a, b, s, c=None, **kw: rft.ClipLoss(**kw)(a, b, s, c),
    "SigLipLoss": lambda a, b, s, c=-10.0, **kw: rft.SigLipLoss(**kw)(a, b, s, c),
}
BACKENDS = ["reference", "native"]


@pytest.fixture(params=list(LOSSES))
def loss(request):
    return LOSSES[request.param]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_shape,b_shape,match", [
    ((4, 8), (4, 9), "feature dims"),
    ((4, 8), (5, 8), "batch sizes"),
    ((4, 8, 1), (4, 8), "image_features must be a 2-D"),
    ((4, 8), (8,), "text_features must be a 2-D"),
    ((0, 8), (0, 8), "image_features is an empty batch"),
    ((4, 0), (4, 0), "zero feature dimension"),
])
def test_shape_errors(loss, backend, a_shape, b_shape, match):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    with pytest.raises(ValueError, match=match):
        loss(a, b, 10.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_errors(loss, backend):
    a = torch.randn(4, 8)
    with pytest.raises(TypeError, match="text_features has dtype torch.int64"):
        loss(a, torch.ones(4, 8, dtype=torch.long), 10.0, backend=backend)
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        loss([[1.0]], a, 10.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, torch.tensor(math.nan),
                                 torch.tensor(math.inf)])
def test_non_finite_logit_scale(loss, backend, bad):
    a, b = features(4, 8), features(4, 8)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        loss(a, b, bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_shape_and_type(loss, backend):
    a, b = features(4, 8), features(4, 8)
    with pytest.raises(ValueError, match="logit_scale must be a 0-d tensor"):
        loss(a, b, torch.ones(4), backend=backend)
    with pytest.raises(TypeError, match="logit_scale must be a float or a 0-d tensor"):
        loss(a, b, "14", backend=backend)
    with pytest.raises(TypeError, match="logit_scale must be a floating-point tensor"):
        loss(a, b, torch.tensor(3), backend=backend)


def test_non_finite_logit_bias():
    a, b = features(4, 8), features(4, 8)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        rft.siglip_loss(a, b, 10.0, math.nan)
    with pytest.raises(ValueError, match="logit_bias must be a 0-d tensor"):
        rft.clip_loss(a, b, 10.0, torch.zeros(4, 4))


def test_mixed_devices_named():
    a = features(4, 8)
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="image_features on cpu, text_features on meta"):
        rft.clip_loss(a, meta, 10.0)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        rft.clip_loss(a, a, torch.tensor(1.0, device="meta"))


def test_clip_rows_offset_checked():
    a, b = features(3, 8), features(9, 8)
    with pytest.raises(ValueError, match="diag_offset must be"):
        rft.clip_rows_loss(a, b, 10.0, diag_offset=7)
    with pytest.raises(ValueError, match="diag_offset must be"):
        rft.clip_rows_loss(a, b, 10.0, diag_offset=-1)


def test_module_arguments_checked():
    with pytest.raises(ValueError, match="rank must be"):
        rft.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be"):
        rft.SigLipLoss(world_size=0)
    with pytest.raises(ValueError, match="use_horovod"):
        rft.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl must be"):
        rft.SigLipLoss(dist_impl="ring")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        rft.ClipLoss(rank=0, world_size=2)(features(2, 4), features(2, 4), 10.0)


def test_unknown_backend():
    a = features(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        rft.clip_loss(a, a, 10.0, backend="cudnn")


def test_nothing_is_launched_for_bad_input(monkeypatch):
    """Validation happens before the kernels: the ops are never reached."""
    from robustft_ext import backends

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(backends, "fused_ops", boom)
    with pytest.raises(ValueError):
        rft.clip_loss(torch.randn(4, 8), torch.randn(5, 8), 10.0, backend="native")
