"""RobustFTLoss: every combination of enabled terms equals the sum of the separate functions,
values and gradients, on every backend; its DiVE centre; bad input."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import DEVICES, require_backend
from helpers import TOLERANCE, assert_close_rel

COMBOS = [c for c in itertools.product([0.0, 1.0], [0.0, 0.05], [0.0, 2.0], [0.0, 10.0])
          if any(c)]  # (clip, m2, lipsum, dive) weights: all 15 non-empty combinations


def _batch(n, b_ref, k, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    I, T = unit(n, d), unit(n, d)
    I_pre = F.normalize(I + 0.3 * unit(n, d), dim=1)
    G = unit(k, d)
    refs = [unit(b_ref, d) for _ in range(4)]
    cast = lambda t, grad=False: t.to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return dict(I=cast(I, True), T=cast(T, True), I_pre=cast(I_pre), G=cast(G),
                rfi=cast(refs[0], True), rft=cast(refs[1], True), rpi=cast(refs[2]), rpt=cast(refs[3]))


def _separate(x, weights, scale, lam, m2_scale, s0, center, backend):
    """The same terms by the separate public functions."""
    clip_w, m2_w, lip_w, dive_w = weights
    total = torch.zeros((), device=x["I"].device)
    if clip_w:
        total = total + clip_w * rft.clip_loss(x["I"], x["T"], scale, backend=backend)
    if m2_w:
        total = total + m2_w * rft.m2mix_loss(x["I"], x["T"], m2_scale, lam, backend=backend)
    if lip_w:
        total = total + lip_w * rft.lipsum_loss(x["I"], x["I_pre"], x["G"], s0, backend=backend)
    if dive_w:
        avl, pvl = rft.dive_loss(x["rfi"], x["rft"], x["rpi"], x["rpt"], center, backend=backend)
        total = total + dive_w * (avl + pvl)
    return total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("weights", COMBOS, ids=lambda c: "clip{}-m2{}-lip{}-dive{}".format(*c))
def test_equals_sum_of_separate_losses(device, backend, weights):
    require_backend(backend, device)
    x = _batch(9, 5, 7, 12, device=device)
    scale = torch.tensor(30.0, device=device, requires_grad=True)
    loss_fn = rft.RobustFTLoss(*weights[:1], m2_weight=weights[1], lipsum_weight=weights[2],
                               dive_weight=weights[3], m2_lam=0.35, m2_logit_scale=14.3,
                               backend=backend).to(device)
    center = loss_fn.dive.center.clone() if loss_fn.dive.initialized else torch.zeros(12, device=device)
    terms = loss_fn(x["I"], x["T"], scale, image_pre=x["I_pre"], random_text_features=x["G"],
                    pre_logit_scale=20.0, ref_image_ft=x["rfi"], ref_text_ft=x["rft"],
                    ref_image_pre=x["rpi"], ref_text_pre=x["rpt"], output_dict=True)
    total = sum(terms.values())
    expect = _separate(x, weights, scale, 0.35, 14.3, 20.0, center, backend)
    assert_close_rel(total, expect, 2e-5, f"{backend} total {weights}")
    leaves = [x["I"], x["T"], scale, x["rfi"], x["rft"]]
    g = torch.autograd.grad(total, leaves, allow_unused=True)
    ge = torch.autograd.grad(expect, leaves, allow_unused=True)
    for name, a, b in zip(["I", "T", "scale", "ref image", "ref text"], g, ge):
        if b is None:
            assert a is None or not a.abs().any(), f"{name}: gradient where none is expected"
            continue
        assert a is not None, f"{name}: no gradient"
        assert_close_rel(a, b, 2e-5, f"{backend} d{name} {weights}")
    expected_keys = {k for k, w in zip(["contrastive_loss", "m2mix_loss", "lipsum_loss"], weights[:3]) if w}
    if weights[3]:
        expected_keys |= {"dive_avl_loss", "dive_pvl_loss"}
    assert set(terms) == expected_keys


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_reference(device, backend, dtype):
    require_backend(backend, device, dtype)
    x = _batch(10, 6, 5, 16, dtype=dtype, device=device)
    kw = dict(m2_weight=0.1, lipsum_weight=1.0, dive_weight=5.0, m2_lam=0.3)
    args = dict(image_pre=x["I_pre"], random_text_features=x["G"], pre_logit_scale=14.0,
                ref_image_ft=x["rfi"], ref_text_ft=x["rft"], ref_image_pre=x["rpi"],
                ref_text_pre=x["rpt"])
    out = rft.RobustFTLoss(**kw, backend=backend).to(device)(x["I"], x["T"], 20.0, **args)
    ref = rft.RobustFTLoss(**kw, backend="reference").to(device)(
        x["I"].double(), x["T"].double(), 20.0, **{k: (v.double() if torch.is_tensor(v) else v)
                                                     for k, v in args.items()})
    assert_close_rel(out, ref, 4 * TOLERANCE[dtype], f"{backend}/{dtype} total")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_dive_centre_updates_and_round_trips(backend):
    """The centre is updated after each training forward, as DiVELoss does, and is saved in
    state_dict under dive.center."""
    require_backend(backend, "cpu")
    x = _batch(6, 4, 3, 8)
    a = rft.RobustFTLoss(dive_weight=1.0, dive_momentum=0.9, backend=backend)
    b = rft.DiVELoss(weight=1.0, momentum=0.9, backend=backend)
    for step in range(3):
        y = _batch(6, 4, 3, 8, seed=step + 1)
        args = (y["rfi"], y["rft"], y["rpi"], y["rpt"])
        la = a(y["I"], y["T"], 10.0, ref_image_ft=args[0], ref_text_ft=args[1],
               ref_image_pre=args[2], ref_text_pre=args[3], output_dict=True)
        lb = b(*args, output_dict=True)
        assert torch.allclose(la["dive_avl_loss"], lb["dive_avl_loss"], rtol=1e-6)
        assert torch.allclose(a.dive.center, b.center, rtol=1e-6, atol=1e-7)
    fresh = rft.RobustFTLoss(dive_weight=1.0, dive_momentum=0.9, backend=backend)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.dive.center, a.dive.center)
    a.eval()
    before = a.dive.center.clone()
    a(x["I"], x["T"], 10.0, ref_image_ft=x["rfi"], ref_text_ft=x["rft"], ref_image_pre=x["rpi"],
      ref_text_pre=x["rpt"])
    assert torch.equal(a.dive.center, before), "eval mode must not update the centre"


def test_m2_lam_sampling_is_reproducible():
    """One Beta(alpha, alpha) draw per call: the same sequence (and losses) from the same seed,
    varying from call to call, another sequence from another seed."""
    x = _batch(6, 2, 2, 8)

    def draws(seed: int, calls: int = 6) -> tuple[list[float], list[torch.Tensor]]:
        loss = rft.RobustFTLoss(m2_weight=0.1, generator=torch.Generator().manual_seed(seed))
        values, lams = [], []
        for _ in range(calls):
            values.append(loss(x["I"], x["T"], 10.0))
            lams.append(loss.last_lam)
        return lams, values

    lams, values = draws(5)
    again, values_again = draws(5)
    assert lams == again
    assert all(torch.equal(u, v) for u, v in zip(values, values_again))
    assert len(set(lams)) == len(lams) and all(0.0 < lam < 1.0 for lam in lams)
    assert draws(6)[0] != lams


def test_bad_inputs():
    x = _batch(4, 3, 2, 6)
    with pytest.raises(ValueError, match="every term weight is 0"):
        rft.RobustFTLoss(clip_weight=0.0)
    with pytest.raises(ValueError, match="dive_weight must be finite and non-negative"):
        rft.RobustFTLoss(dive_weight=-1.0)
    with pytest.raises(ValueError, match="lipsum_weight must be finite"):
        rft.RobustFTLoss(lipsum_weight=float("nan"))
    with pytest.raises(ValueError, match="m2_alpha must be"):
        rft.RobustFTLoss(m2_weight=1.0, m2_alpha=0.0)
    with pytest.raises(ValueError, match="lipsum_weight > 0 needs random_text_features, pre_logit_scale"):
        rft.RobustFTLoss(lipsum_weight=1.0)(x["I"], x["T"], 10.0, image_pre=x["I_pre"])
    with pytest.raises(ValueError, match="dive_weight > 0 needs ref_text_pre"):
        rft.RobustFTLoss(dive_weight=1.0)(x["I"], x["T"], 10.0, ref_image_ft=x["rfi"],
                                          ref_text_ft=x["rft"], ref_image_pre=x["rpi"])
    with pytest.raises(ValueError, match="different feature dims"):
        rft.RobustFTLoss(lipsum_weight=1.0)(x["I"], x["T"], 10.0, image_pre=x["I_pre"],
                                            random_text_features=torch.randn(3, 5),
                                            pre_logit_scale=1.0)
    with pytest.raises(ValueError, match="different batch sizes|one shape"):
        rft.RobustFTLoss(dive_weight=1.0)(x["I"], x["T"], 10.0, ref_image_ft=x["rfi"],
                                          ref_text_ft=x["rft"][:2], ref_image_pre=x["rpi"],
                                          ref_text_pre=x["rpt"])


def test_bad_distributed_arguments():
    """rank / world_size as ClipLoss checks them; world_size > 1 without a process group is a
    clear error before any kernel runs."""
    x = _batch(4, 3, 2, 6)
    for kw in (dict(rank=2, world_size=2), dict(rank=-1, world_size=2), dict(rank=0, world_size=0),
               dict(rank=0.5, world_size=2)):
        with pytest.raises(ValueError, match="rank|world_size"):
            rft.RobustFTLoss(**kw)
    with pytest.raises(RuntimeError, match="init_process_group"):
        rft.RobustFTLoss(m2_weight=0.1, rank=0, world_size=2)(x["I"], x["T"], 10.0)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("lam", [0.3, None], ids=["fixed", "sampled"])
def test_m2_step_under_torch_compile(backend, lam):
    """With a fixed lam a step with m^2 traces whole under torch.compile(fullgraph=True). A
    sampled lam is drawn on the host from the user's torch.Generator, which Dynamo cannot
    trace: that draw runs between graphs. Either way the compiled steps give eager's losses and
    lams, call after call."""
    require_backend(backend, "cpu")
    x = _batch(6, 2, 2, 8)

    def module():
        return rft.RobustFTLoss(m2_weight=0.1, m2_lam=lam, backend=backend,
                                generator=torch.Generator().manual_seed(3))
    eager, traced = module(), module()
    torch._dynamo.reset()
    compiled = torch.compile(traced, fullgraph=lam is not None, backend="aot_eager")
    lams = []
    for _ in range(3):
        want = eager(x["I"], x["T"], 10.0)
        got = compiled(x["I"], x["T"], 10.0)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got, want)
        assert traced.last_lam == eager.last_lam and 0.0 < eager.last_lam < 1.0
        lams.append(eager.last_lam)
    if lam is not None:
        assert lams == [pytest.approx(lam)] * 3
    else:
        assert len(set(lams)) == 3


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_m2_lam_adds_no_host_read(backend):
    """A step with m^2 (fixed lam) reads no more tensor values back on the host than one
    without: the lam used is kept as the step's tensor and read as a float only when last_lam
    is asked for, so a GPU step does not wait for it (the scale checks' reads are the same
    in both)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    require_backend(backend, "cpu")
    x = _batch(6, 2, 2, 8)

    def reads(m2_weight: float) -> int:
        loss = rft.RobustFTLoss(m2_weight=m2_weight, m2_lam=0.3, backend=backend)
        HostReads.count = 0
        with HostReads():
            loss(x["I"], x["T"], torch.tensor(10.0))
        return HostReads.count
    assert reads(0.1) == reads(0.0)
