"""CLIP + m^2-mix and the robust step by the symmetric Gram formulation (docs/maths.md, section
9.4; robustft_ext.step_design "gram", the default) against the float64 reference and against
the three-product design, on the native backend: tile and strip edges (n = 1, n not a multiple
of the Gram block, several backward strips whose columns reach past their rows), with and
without CLIP, every dtype, and the fall-back of a batch with a near-opposite pair."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robustft_ext as rft
from helpers import TOLERANCE, CudaRules, assert_close_rel, require_backend
from robustft_ext import backends


@pytest.fixture(autouse=True)
def _native_without_kept_products(monkeypatch):
    """The Gram formulation's own path: no kept three-product dot products on the CPU."""
    require_backend("native", "cpu")
    monkeypatch.setattr(backends, "keeps_products", lambda *args, **kwargs: False)


@pytest.fixture
def design():
    """Runs the test's body under a design: design("gram") or design("products")."""
    def use(name: str) -> None:
        rft.set_step_design(name)

    yield use
    rft.set_step_design(None)


def _pairs(n: int, d: int, dtype: torch.dtype, seed: int = 0, cos: float | None = None):
    g = torch.Generator().manual_seed(seed)
    I = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    T = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    if cos is not None:  # row 0's pair at a prescribed cosine
        e = F.normalize(T[0] - (T[0] @ I[0]) * I[0], dim=0)
        T[0] = cos * I[0] + (1 - cos * cos) ** 0.5 * e
    return I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_()


def _step_inputs(n: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return dict(image_pre=unit(n, d).to(dtype), random_text_features=unit(5, d).to(dtype),
                ref_image_ft=unit(6, d).to(dtype).requires_grad_(),
                ref_text_ft=unit(6, d).to(dtype).requires_grad_(),
                ref_image_pre=unit(6, d).to(dtype), ref_text_pre=unit(6, d).to(dtype))


def _run(kind: str, I, T, scale, backend: str, extra=None):
    """The loss and its gradients with respect to I, T and the scale."""
    if kind == "m2mix":
        loss = rft.m2mix_loss(I, T, scale, 0.35, backend=backend)
    elif kind == "clip_m2mix":
        clip, m2 = rft.clip_m2mix_loss(I, T, scale, 0.35, m2_logit_scale=14.3, backend=backend)
        loss = 0.7 * clip + m2
    else:
        module = rft.RobustFTLoss(1.0, m2_weight=0.5, lipsum_weight=2.0, dive_weight=3.0,
                                  m2_lam=0.35, m2_logit_scale=14.3, backend=backend)
        if I.dtype == torch.float64:
            module = module.double()
        loss = module(I, T, scale, pre_logit_scale=20.0, **extra)
    leaves = [I, T, scale]
    return loss, torch.autograd.grad(loss * 1.3, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("kind", ["m2mix", "clip_m2mix", "robust_step"])
@pytest.mark.parametrize("n,d,limit", [(1, 5, None), (3, 33, None), (300, 24, None),
                                       (300, 24, 1)], ids=["n1", "n3", "n300", "n300-strips"])
def test_gram_against_the_reference(kind, dtype, n, d, limit, design):
    """limit 1: the backward in strips of 128 rows, each against every column from its first
    row on (the columns past its rows transposed onto theirs)."""
    design("gram")
    I, T = _pairs(n, d, dtype)
    scale = torch.tensor(20.0, requires_grad=True)
    extra = _step_inputs(n, d, dtype) if kind == "robust_step" else None
    if limit is not None:
        rft.set_workspace_limit(limit)
    try:
        loss, grads = _run(kind, I, T, scale, "native", extra)
    finally:
        rft.set_workspace_limit(None)
    ref_in = [x.detach().double().requires_grad_() for x in (I, T, scale)]
    ref_extra = None if extra is None else {k: v.detach().double().requires_grad_(v.requires_grad)
                                            for k, v in extra.items()}
    ref_loss, ref_grads = _run(kind, *ref_in, "reference", ref_extra)
    bound = TOLERANCE[dtype] if dtype != torch.float64 else 1e-9
    assert_close_rel(loss, ref_loss, bound, f"{kind} loss", floor=1.0)
    for name, x, y in zip(("I", "T", "scale"), grads, ref_grads):
        assert_close_rel(x, y, max(bound, TOLERANCE[x.dtype]), f"{kind} d{name}",
                         floor=1.0 if x.dim() == 0 else 1e-3)


@pytest.mark.parametrize("kind", ["m2mix", "clip_m2mix", "robust_step"])
def test_the_two_designs_agree(kind, design):
    n, d = 200, 32
    I, T = _pairs(n, d, torch.float32, seed=3)
    scale = torch.tensor(17.0, requires_grad=True)
    extra = _step_inputs(n, d, torch.float32) if kind == "robust_step" else None
    out = {}
    for name in ("gram", "products"):
        design(name)
        out[name] = _run(kind, I, T, scale, "native", extra)
    (lg, gg), (lp, gp) = out["gram"], out["products"]
    assert_close_rel(lg, lp, 2e-6, "loss")
    for x, y in zip(gg, gp):
        assert_close_rel(x, y, 2e-5, "gradient", floor=1.0 if x.dim() == 0 else 1e-3)
    # Different arithmetic, so not the same bits: the Gram path did run.
    assert not all(torch.equal(x, y) for x, y in zip(gg, gp))


@pytest.mark.parametrize("cos", [-0.99, -1.0 + 1e-5])
def test_a_near_opposite_pair_takes_the_three_products(cos, design):
    """Row 0's pair past the weights' limit (section 9.4): the batch is evaluated by the three
    products, bit for bit, with their float64 mix."""
    I, T = _pairs(40, 16, torch.float32, seed=5, cos=cos)
    scale = torch.tensor(12.0, requires_grad=True)
    out = {}
    for name in ("gram", "products"):
        design(name)
        out[name] = _run("clip_m2mix", I, T, scale, "native")
    assert torch.equal(out["gram"][0], out["products"][0])
    for x, y in zip(out["gram"][1], out["products"][1]):
        assert torch.equal(x, y)


def _against_reference(kind, I, T, scale, extra, backend="native"):
    loss, grads = _run(kind, I, T, scale, backend, extra)
    ref_in = [x.detach().double().requires_grad_() for x in (I, T, scale)]
    ref_extra = None if extra is None else {k: v.detach().double().requires_grad_(v.requires_grad)
                                            for k, v in extra.items()}
    ref_loss, ref_grads = _run(kind, *ref_in, "reference", ref_extra)
    return (loss, grads), (ref_loss, ref_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["clip_m2mix", "robust_step"])
def test_gram_under_cuda_rules(kind, dtype, design):
    """The path a GPU takes: the op bodies under CUDA's rules (16-bit inputs keep 16-bit
    strips in the workspace, the eight products read them), in strips of 128 rows."""
    design("gram")
    n, d = 260, 40
    I, T = _pairs(n, d, dtype, seed=2)
    scale = torch.tensor(20.0, requires_grad=True)
    extra = _step_inputs(n, d, dtype) if kind == "robust_step" else None
    rft.set_workspace_limit(1)
    try:
        with CudaRules() as rules:
            (loss, grads), (ref_loss, ref_grads) = _against_reference(kind, I, T, scale, extra)
    finally:
        rft.set_workspace_limit(None)
    assert "robustft_cuda_rules" in rules.namespaces
    bound = TOLERANCE[dtype]
    assert_close_rel(loss, ref_loss, bound, f"{kind} loss", floor=1.0)
    for name, x, y in zip(("I", "T", "scale"), grads, ref_grads):
        assert_close_rel(x, y, max(bound, TOLERANCE[x.dtype]), f"{kind} d{name}",
                         floor=1.0 if x.dim() == 0 else 1e-3)


@pytest.mark.parametrize("case", ["float64", "deterministic"])
def test_cuda_rules_take_the_products_where_cuda_does(case, design):
    """CUDA's Gram forward merges by atomics in float: for float64 inputs and under
    torch.use_deterministic_algorithms(True) the step takes the three products there, and so
    it does under CUDA's rules, bit for bit."""
    dtype = torch.float64 if case == "float64" else torch.float32
    I, T = _pairs(50, 16, dtype, seed=4)
    scale = torch.tensor(12.0, dtype=torch.float64 if case == "float64" else torch.float32,
                         requires_grad=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(case == "deterministic")
    try:
        out = {}
        for name in ("gram", "products"):
            design(name)
            with CudaRules():
                out[name] = _run("clip_m2mix", I, T, scale, "native")
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(out["gram"][0], out["products"][0])
    for x, y in zip(out["gram"][1], out["products"][1]):
        assert torch.equal(x, y)


def test_design_setting():
    assert rft.step_design() in ("gram", "products")
    with pytest.raises(ValueError, match="design must be one of"):
        rft.set_step_design("triangle")
    rft.set_step_design("products")
    assert rft.step_design() == "products"
    rft.set_step_design(None)
    assert rft.step_design() == "gram"


def test_the_weight_limit_is_one_number_on_both_sides():
    """The Triton backend's GRAM_WEIGHT_LIMIT and csrc's kGramWeightLimit are the same fact,
    written once per language (the Triton backend runs without the C++ extension)."""
    import pathlib
    import re

    from robustft_ext.step_design import GRAM_WEIGHT_LIMIT
    header = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "step_kernels.h"
    found = re.search(r"constexpr double kGramWeightLimit = ([0-9.eE+-]+);", header.read_text())
    assert found, "kGramWeightLimit not found in csrc/step_kernels.h"
    assert float(found.group(1)) == GRAM_WEIGHT_LIMIT
