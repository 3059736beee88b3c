"""Every bad input of docs/api.md gets a ValueError/TypeError naming the argument, before any
kernel runs."""
from __future__ import annotations

import math

import pytest
import torch

import robustft_ext as rft
from helpers import require_backend
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


# ---- Checks of tensor values inside compiled graphs ------------------------------------
# Under torch.compile(fullgraph=True) a tensor's value is not known while tracing: the checks
# become assertions of the graph (torch._assert_async), which raise when the graph runs.
def _unit(n=6, d=8):
    return torch.nn.functional.normalize(torch.randn(n, d), dim=1)


_NAN = float("nan")
COMPILED_VALUE_CHECKS = {
    "clip_loss logit_scale": (lambda a, b, v: rft.clip_loss(a, b, v), _NAN, "logit_scale"),
    "clip_loss logit_bias": (lambda a, b, v: rft.clip_loss(a, b, 10.0, v), _NAN, "logit_bias"),
    "clip_rows_loss": (lambda a, b, v: rft.clip_rows_loss(a, b, v), _NAN, "logit_scale"),
    "siglip_loss": (lambda a, b, v: rft.siglip_loss(a, b, 10.0, v), _NAN, "logit_bias"),
    "m2mix_loss lam 1.5": (lambda a, b, v: rft.m2mix_loss(a, b, 10.0, v), 1.5, "lam"),
    "m2mix_loss lam -3": (lambda a, b, v: rft.m2mix_loss(a, b, 10.0, v), -3.0, "lam"),
    "m2mix_loss lam nan": (lambda a, b, v: rft.m2mix_loss(a, b, 10.0, v), _NAN, "lam"),
    "clip_m2mix_loss": (lambda a, b, v: sum(rft.clip_m2mix_loss(a, b, 10.0, 0.3,
                                                                m2_logit_scale=v)),
                        _NAN, "m2_logit_scale"),
    "slerp": (lambda a, b, v: rft.slerp(a, b, v).sum(), 2.0, "lam"),
    "lipsum_loss": (lambda a, b, v: rft.lipsum_loss(a, b, b[:3], v), _NAN, "logit_scale"),
    "ClipLoss": (lambda a, b, v: rft.ClipLoss()(a, b, v), _NAN, "logit_scale"),
    "SigLipLoss": (lambda a, b, v: rft.SigLipLoss()(a, b, 10.0, v), _NAN, "logit_bias"),
    "M2MixLoss": (lambda a, b, v: rft.M2MixLoss(lam=0.3)(a, b, v), _NAN, "logit_scale"),
    "RobustFTLoss": (lambda a, b, v: rft.RobustFTLoss(1.0, lipsum_weight=1.0)(
        a, b, 10.0, image_pre=b, random_text_features=b[:3], pre_logit_scale=v),
        _NAN, "pre_logit_scale"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(COMPILED_VALUE_CHECKS))
def test_value_checks_hold_under_torch_compile(case, backend, monkeypatch):
    fn, bad, name = COMPILED_VALUE_CHECKS[case]
    monkeypatch.setenv("ROBUSTFT_BACKEND", backend)
    a, b = _unit(), _unit()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(a, b, torch.tensor(0.5)))  # a good value compiles and runs
    with pytest.raises((ValueError, RuntimeError), match=name):
        compiled(a, b, torch.tensor(bad))
    with pytest.raises(ValueError, match=name):  # and eager says it too
        fn(a, b, torch.tensor(bad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_that_overflows_the_computation_dtype_is_refused(backend):
    a, b = _unit(), _unit()
    with pytest.raises(ValueError, match="logit_scale = 1e.39 overflows torch.float32"):
        rft.clip_loss(a, b, 1e39, backend=backend)
    with pytest.raises(ValueError, match="logit_scale must be finite in torch.float32.*overflows"):
        rft.clip_loss(a, b, torch.tensor(1e39, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="logit_bias = -1e.40 overflows torch.float32"):
        rft.siglip_loss(a, b, 10.0, -1e40, backend=backend)
    # float64 features compute in float64, where 1e39 is finite
    assert torch.isfinite(rft.clip_loss(a.double(), b.double(), 1e39, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("bad", [_NAN, math.inf])
def test_non_finite_features_give_a_non_finite_loss(backend, bad):
    """docs/api.md's contract: features are not scanned (an O(N D) pass and a host sync per
    call); a NaN or inf in them makes the loss NaN (or inf), never a finite number."""
    require_backend(backend, "cpu")
    a, b = _unit(), _unit()
    a[2, 3] = bad
    for value in (rft.clip_loss(a, b, 10.0, backend=backend),
                  rft.siglip_loss(a, b, 10.0, -1.0, backend=backend),
                  rft.m2mix_loss(a, b, 10.0, 0.3, backend=backend)):
        assert not torch.isfinite(value), value


def test_meta_tensors_pass_the_value_checks():
    """Tensors without values (the meta device) are checked for what they have, shape and
    dtype; the loss is a meta tensor (the reference backend serves the meta device)."""
    a = torch.empty(6, 8, device="meta")
    for loss in (rft.clip_loss(a, a, torch.tensor(10.0, device="meta")),
                 rft.m2mix_loss(a, a, 10.0, torch.tensor(0.3, device="meta"))):
        assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        rft.clip_loss(_unit(), _unit(), torch.tensor(10.0, device="meta"))
