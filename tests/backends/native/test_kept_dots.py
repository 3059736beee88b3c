"""The CPU forward that keeps its n x m dot products for the backward (native backend: CLIP,
SigLIP, and the m^2 / robust step's two or three products): used exactly when gradients are
wanted and the products fit the workspace limit, the same losses and gradients as the forward
that keeps nothing, the ops' contract (the limit, bad dot products; opcheck in
tests/backends/test_opcheck.py) and a second
backward through a retained graph."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from helpers import require_backend
from helpers import assert_close_rel, features

LOSSES = {
    "clip": lambda a, b, s, c: rft.clip_loss(a, b, s, backend="native"),
    "clip_bias": lambda a, b, s, c: rft.clip_loss(a, b, s, c, backend="native"),
    # Positives at (i, i + 37): the kept forward reads them off a diagonal of its products.
    "clip_rows": lambda a, b, s, c: rft.clip_rows_loss(a, b, s, c, diag_offset=37,
                                                       backend="native"),
    "siglip": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, backend="native"),
    "siglip_neg": lambda a, b, s, c: rft.siglip_loss(a, b, s, c, negative_only=True,
                                                     backend="native"),
}


# The extension's ops that compute no loss (settings and the Gram strips' plan).
SETTINGS_OPS = {"set_workspace_limit", "set_step_design", "gram_strips"}


@pytest.fixture
def calls():
    """The names of the native ops the autograd Functions call, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "robustft_ext" and func._opname not in SETTINGS_OPS:
                seen.append(func._opname)
            return func(*args, **(kwargs or {}))

    with Record():
        yield seen


def _run(kind, n, m, dtype, grad=True):
    a = features(n, 24, dtype).requires_grad_(grad)
    b = features(m, 24, dtype).requires_grad_(grad)
    s = torch.tensor(7.5, requires_grad=grad)
    c = torch.tensor(-1.5, requires_grad=grad)
    loss = LOSSES[kind](a, b, s, c)
    if not grad or not torch.is_grad_enabled():
        return loss, None
    loss.backward()
    return loss, [x.grad for x in (a, b, s, c)]


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_products_give_the_recomputed_results(kind, dtype, calls):
    """n = 300 spans several row blocks and column tiles of neither size's multiple."""
    require_backend("native", "cpu", dtype)
    n, m = 300, {"siglip_neg": 170, "clip_rows": 350}.get(kind, 300)
    torch.manual_seed(0)
    kept_loss, kept_grads = _run(kind, n, m, dtype)
    assert any(c.endswith("_keep") for c in calls) and any(c.endswith("_kept") for c in calls)
    calls.clear()
    rft.set_workspace_limit(1)  # nothing fits: the forward keeps nothing
    try:
        torch.manual_seed(0)
        loss, grads = _run(kind, n, m, dtype)
    finally:
        rft.set_workspace_limit(None)
    assert not any("kept" in c or "keep" in c for c in calls)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_rel(kept_loss, loss, tol, "loss")
    for name, g_kept, g in zip("a b scale bias".split(), kept_grads, grads):
        if kind == "clip" and name == "bias":
            assert g_kept is None and g is None
            continue
        # bfloat16 feature gradients are float sums rounded to bfloat16 (8 bits): the two paths'
        # float sums differ in their last bits, which flips the rounding of a few entries.
        g_tol = 2.0 ** -8 if dtype == torch.bfloat16 and name in ("a", "b") else tol
        assert_close_rel(g_kept, g, g_tol, name)


def test_forward_without_gradients_keeps_nothing(calls):
    require_backend("native", "cpu")
    with torch.no_grad():
        _run("clip", 64, 64, torch.float32, grad=True)  # inputs require grad, no graph
    _run("siglip", 64, 64, torch.float32, grad=False)
    assert calls == ["clip_fwd", "siglip_fwd"]


def test_products_over_the_limit_are_not_kept(calls):
    """The limit is on the products' bytes: 64 x 64 floats are 16 KiB."""
    require_backend("native", "cpu")
    rft.set_workspace_limit(64 * 64 * 4 - 1)
    try:
        _run("clip", 64, 64, torch.float32)
        rft.set_workspace_limit(64 * 64 * 4)
        _run("clip", 64, 64, torch.float32)
    finally:
        rft.set_workspace_limit(None)
    assert calls == ["clip_fwd", "clip_bwd", "clip_fwd_keep", "clip_bwd_kept"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_second_backward_through_a_retained_graph(kind, calls):
    """The first backward turns the kept products into dlogits; the second recomputes."""
    require_backend("native", "cpu")
    a = features(40, 16).requires_grad_()
    b = features(40, 16).requires_grad_()
    s = torch.tensor(5.0, requires_grad=True)
    loss = LOSSES[kind](a, b, s, torch.tensor(-0.5))
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    loss.backward()
    torch.testing.assert_close(a.grad, first, rtol=1e-5, atol=1e-7)
    assert calls[1].endswith("_kept") and calls[2] == f"{kind}_bwd"


def test_keep_ops_refuse_products_over_the_limit():
    require_backend("native", "cpu")
    a, b = features(64, 8).detach(), features(64, 8).detach()
    one = torch.tensor(1.0)
    rft.set_workspace_limit(1024)
    try:
        with pytest.raises(RuntimeError, match="more than the workspace limit"):
            torch.ops.robustft_ext.clip_fwd_keep(a, b, one, one, 0, True)
        with pytest.raises(RuntimeError, match="more than the workspace limit"):
            torch.ops.robustft_ext.siglip_fwd_keep(a, b, one, one, False)
    finally:
        rft.set_workspace_limit(None)


def test_kept_backward_rejects_mismatched_products():
    require_backend("native", "cpu")
    a, b = features(16, 8).detach(), features(16, 8).detach()
    one, g = torch.tensor(1.0), torch.tensor(1.0)
    _, r, c, dots = torch.ops.robustft_ext.clip_fwd_keep(a, b, one, one, 0, True)
    for bad in (dots[:8], dots.t(), dots.double()):
        with pytest.raises(RuntimeError, match="kept dot products must be a contiguous"):
            torch.ops.robustft_ext.clip_bwd_kept(g, a, b, one, one, r, c, bad, 0, True)


def _step_keep_args(n: int = 40, d: int = 12):
    """A whole step's arguments (robust_step ops), its kept products and carry, and grads."""
    from robustft_ext.ops.robust_step import StepArgs
    torch.manual_seed(5)
    t = torch.tensor
    a, b, pre, texts = (features(k, d).detach() for k in (n, n, n, 7))
    refs = [features(9, d).detach() for _ in range(4)]
    args = tuple(StepArgs(a, b, t(3.0), t(9.0), t(0.3), True, True, pre, texts, t(2.0), *refs,
                          t([0.01] * d)))
    _, _, lse, kept, carried = torch.ops.robustft_ext.robust_step_fwd_keep(*args)
    return args, lse, kept, carried, t([1.0, 0.1, 0.5, 2.0, 3.0])


def test_kept_backward_rejects_a_mismatched_carry():
    """The forward's carry (pair products, slerp weights, stacked rows, Lipsum's V) is checked
    entry by entry against what the backward would form, naming the entry."""
    require_backend("native", "cpu")
    args, lse, kept, carried, grads = _step_keep_args()
    assert [tuple(x.shape) for x in carried] == [(40,), (4, 40), (80, 12), (40, 7)]
    bad = [carried[:3], [carried[0][:39], *carried[1:]], [carried[0], carried[1].float(),
           *carried[2:]], [*carried[:2], carried[2].t(), carried[3]],
           [*carried[:3], carried[3][:, :6]]]
    messages = ["list of 4 tensors", r"carried\[0\]", r"carried\[1\]", r"carried\[2\]",
                r"carried\[3\]"]
    for c, message in zip(bad, messages):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.robustft_ext.robust_step_bwd_kept(grads, *args, lse, kept.clone(), c)


@pytest.mark.parametrize("entry", [0, 1, 2, 3])
def test_the_kept_backward_takes_the_forward_carry(entry):
    """Each carried entry is what the backward reads (it forms none of them again): the
    backward with the carry as given matches the backward that recomputes, and one altered
    entry changes the gradients, without being written to (the carry is an input)."""
    require_backend("native", "cpu")
    args, lse, kept, carried, grads = _step_keep_args()
    ops = torch.ops.robustft_ext
    fresh = ops.robust_step_bwd(grads, *args, lse)
    got = ops.robust_step_bwd_kept(grads, *args, lse, kept.clone(), carried)
    for x, y in zip(got, fresh):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    altered = list(carried)
    altered[entry] = carried[entry] * 1.25
    before = altered[entry].clone()
    image_grad = ops.robust_step_bwd_kept(grads, *args, lse, kept.clone(), altered)[0]
    assert float((image_grad - fresh[0]).abs().max()) > 1e-4 * float(fresh[0].abs().max())
    assert torch.equal(altered[entry], before)


def test_the_carry_serves_a_backward_under_another_workspace_limit():
    """Lipsum's V is carried only where the forward's limit holds it in one chunk; a backward
    run after the limit changed takes what the forward carried (here nothing: V formed
    again) rather than asking for what the new limit would have carried."""
    require_backend("native", "cpu")
    from robustft_ext.ops.robust_step import StepArgs
    torch.manual_seed(5)
    t = torch.tensor
    n, d = 40, 12
    a, b, pre = (features(n, d).detach() for _ in range(3))
    texts = features(200, d).detach()  # n K floats = 32000 bytes, past the limit below
    refs = [features(9, d).detach() for _ in range(4)]
    args = tuple(StepArgs(a, b, t(3.0), t(9.0), t(0.3), True, True, pre, texts, t(2.0), *refs,
                          t([0.01] * d)))
    grads = t([1.0, 0.1, 0.5, 2.0, 3.0])
    ops = torch.ops.robustft_ext
    rft.set_workspace_limit(26000)  # one Gram strip of 4 n^2 floats fits, V does not
    try:
        _, _, lse, kept, carried = ops.robust_step_fwd_keep(*args)
    finally:
        rft.set_workspace_limit(None)
    assert kept.numel() == 4 * n * n and carried[3].numel() == 0  # one strip of n rows
    got = ops.robust_step_bwd_kept(grads, *args, lse, kept, carried)
    fresh = ops.robust_step_bwd(grads, *args, lse)
    for x, y in zip(got, fresh):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_weights_that_leave_the_gram_design_do_not_write_into_the_carry():
    """Carried weights the Gram design refuses (NaN here) send the backward to the three
    products, whose mix forms the weights again: into a buffer of its own, not the carry."""
    require_backend("native", "cpu")
    args, lse, kept, carried, grads = _step_keep_args()
    nan_weights = torch.full_like(carried[1], float("nan"))
    torch.ops.robustft_ext.robust_step_bwd_kept(grads, *args, lse, kept.clone(),
                                                [carried[0], nan_weights, *carried[2:]])
    assert bool(torch.isnan(nan_weights).all())


def test_gradcheck_float64_through_kept_products():
    require_backend("native", "cpu", torch.float64)
    a = features(6, 5, torch.float64).requires_grad_()
    b = features(6, 5, torch.float64).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    for kind in ("clip_bias", "siglip"):
        assert torch.autograd.gradcheck(LOSSES[kind], (a, b, s, c), eps=1e-6, atol=1e-7)


# ---- The m^2 / robust step's products ---------------------------------------------------
def _step_loss(kind, a, b, s, refs):
    if kind == "m2mix":
        return rft.m2mix_loss(a, b, s, 0.35, backend="native")
    if kind == "clip_m2mix":
        m2, clip = rft.clip_m2mix_loss(a, b, s, 0.35, backend="native")
        return 0.3 * m2 + clip
    loss = rft.RobustFTLoss(m2_weight=0.3, lipsum_weight=2.0, dive_weight=10.0, m2_lam=0.35,
                            m2_logit_scale=14.3, backend="native")
    pre, texts, rfi, rft_, rpi, rpt = refs
    return sum(loss(a, b, s, image_pre=pre, random_text_features=texts, pre_logit_scale=20.0,
                    ref_image_ft=rfi, ref_text_ft=rft_, ref_image_pre=rpi, ref_text_pre=rpt,
                    output_dict=True).values())


def _run_step(kind, n, dtype):
    torch.manual_seed(0)
    a, b = features(n, 24, dtype), features(n, 24, dtype)
    refs = [features(k, 24, dtype).detach() for k in (n, 9, 6, 6, 6, 6)]
    refs[2].requires_grad_()
    refs[3].requires_grad_()
    s = torch.tensor(7.5, requires_grad=True)
    loss = _step_loss(kind, a, b, s, refs)
    loss.backward()
    return loss, [x.grad for x in (a, b, s, refs[2], refs[3])]


@pytest.mark.parametrize("kind", ["m2mix", "clip_m2mix", "robust_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_kept_products_give_the_recomputed_results(kind, dtype, calls):
    require_backend("native", "cpu", dtype)
    kept_loss, kept_grads = _run_step(kind, 130, dtype)
    family = "robust_step" if kind == "robust_step" else "m2mix"
    assert f"{family}_fwd_keep" in calls and f"{family}_bwd_kept" in calls
    calls.clear()
    rft.set_workspace_limit(1)
    try:
        loss, grads = _run_step(kind, 130, dtype)
    finally:
        rft.set_workspace_limit(None)
    assert not any("kept" in c or "keep" in c for c in calls)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_rel(kept_loss, loss, tol, "loss")
    for name, g_kept, g in zip(["a", "b", "scale", "ref image", "ref text"], kept_grads, grads):
        if g is None:
            assert g_kept is None, name
            continue
        assert_close_rel(g_kept, g, tol, name)


def test_step_keeps_nothing_without_gradients_or_over_the_limit(calls):
    require_backend("native", "cpu")
    a, b = features(40, 16), features(40, 16)
    with torch.no_grad():
        rft.clip_m2mix_loss(a, b, 5.0, 0.3, backend="native")
    # m^2 and CLIP: three 40 x 40 float products, 19200 bytes.
    rft.set_workspace_limit(3 * 40 * 40 * 4 - 1)
    try:
        sum(rft.clip_m2mix_loss(a, b, 5.0, 0.3, backend="native")).backward()
    finally:
        rft.set_workspace_limit(None)
    assert calls == ["m2mix_fwd", "m2mix_fwd", "m2mix_bwd"]


def test_step_second_backward_through_a_retained_graph(calls):
    require_backend("native", "cpu")
    a, b = features(40, 16), features(40, 16)
    loss = sum(rft.clip_m2mix_loss(a, b, 5.0, 0.3, backend="native"))
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    loss.backward()
    torch.testing.assert_close(a.grad, first, rtol=1e-5, atol=1e-7)
    assert calls == ["m2mix_fwd_keep", "m2mix_bwd_kept", "m2mix_bwd"]


@pytest.mark.parametrize("design,message", [("products", "more than the workspace limit"),
                                            ("gram", "not one Gram strip of 64 rows fits")])
def test_step_keep_op_refuses_products_over_the_limit(design, message):
    require_backend("native", "cpu")
    a, b = features(64, 8).detach(), features(64, 8).detach()
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    rft.set_workspace_limit(1024)
    rft.set_step_design(design)
    try:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.robustft_ext.robust_step_fwd_keep(a, b, one, one, torch.tensor(0.3), True,
                                                        True, None, None, zero, None, None, None,
                                                        None, None)
    finally:
        rft.set_workspace_limit(None)
        rft.set_step_design(None)


@pytest.mark.parametrize("kind", ["m2mix", "clip_m2mix", "robust_step"])
def test_gram_keeps_the_strips_that_fit(kind):
    """The Gram design keeps the Gram blocks of as many backward strips as fit the limit,
    packed: all of them, the first of two, or none (a limit below one strip of 128 rows), the
    numbers those strips' backward would recompute otherwise. The second strip (44 rows against
    44 columns) takes only its own entries: a limit of the two strips' exact size keeps both,
    where two strips of the first one's size would not fit."""
    require_backend("native", "cpu")
    n, slot = 300, 4 * 300 * 4  # a strip row's four Gram entries per column, float32
    first, second = 4 * 256 * 300, 4 * 44 * 44  # the strips' entries
    cases = {"all": (None, (256, 2, first + second)),
             "packed": (4 * (first + second), (256, 2, first + second)),
             "first": (4 * (first + second) - 1, (256, 1, first)),
             "none": (128 * slot - 1, (128, 0, 0))}
    results = {}
    for name, (limit, expected) in cases.items():
        if limit is not None:
            rft.set_workspace_limit(limit)
        try:
            assert tuple(torch.ops.robustft_ext.gram_strips(n, 4)) == expected, name
            results[name] = _run_step(kind, n, torch.float32)
        finally:
            rft.set_workspace_limit(None)
    loss, grads = results["none"]
    for name in ("all", "packed", "first"):
        other_loss, other_grads = results[name]
        assert_close_rel(other_loss, loss, 1e-6, f"{name} loss")
        for x, y in zip(other_grads, grads):
            if y is not None:
                assert_close_rel(x, y, 1e-5, f"{name} gradient")


@pytest.mark.parametrize("op", ["clip", "m2mix"])
def test_a_freed_kept_buffer_serves_the_next_step(op):
    """The kept buffers' host memory is cached (csrc/kept_cache.h): the block a backward frees
    serves the next forward of the same size (a training loop's next step), while the block
    still held is never handed out twice; the results are those of a fresh buffer."""
    require_backend("native", "cpu")
    torch.manual_seed(3)
    a, b = (features(300, 24).detach() for _ in range(2))
    one = torch.tensor(1.0)

    def forward():
        if op == "clip":
            return torch.ops.robustft_ext.clip_fwd_keep(a, b, one * 10, one * 0, 0, True)
        return torch.ops.robustft_ext.m2mix_fwd_keep(a, b, one * 10, torch.tensor(0.3),
                                                     one * 12, True)

    def kept_of(out):  # (m2mix_fwd_keep's last output is the carried list)
        return out[-1] if op == "clip" else out[3]

    first = forward()
    kept = kept_of(first)
    held = kept_of(forward())  # the first is still held: a different block
    assert held.data_ptr() != kept.data_ptr()
    ptr, values = kept.data_ptr(), kept.clone()
    del first, kept
    again = kept_of(forward())
    assert again.data_ptr() == ptr
    # Bitwise, NaN included: the reused block keeps whatever bits the first forward wrote.
    assert torch.equal(again.view(torch.int32), values.view(torch.int32))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("kept", [True, False])
def test_freed_feature_gradients_serve_the_next_backward(kind, kept):
    """CLIP's and SigLIP's feature gradients come from the block cache, as the step's do: the
    blocks of gradients the caller dropped serve the next backward, which writes them whole
    (its first chunk's product with beta 0): left full of NaN, they give the fresh results.
    kept False: the forward keeps nothing and the backward runs in chunks of rows."""
    require_backend("native", "cpu")
    a, b = (features(300, 24).requires_grad_() for _ in range(2))
    s, c = torch.tensor(7.5), torch.tensor(-1.5)

    def grads():
        a.grad = b.grad = None
        LOSSES[kind](a, b, s, c).backward()
        return a.grad, b.grad

    rft.set_workspace_limit(1)  # empties the cache of free blocks other tests left
    rft.set_workspace_limit(None if kept else 300 * 4 * 64)  # else chunks of 64 rows
    try:
        fresh = [g.clone() for g in grads()]
        ga, gb = grads()
        ptrs = {ga.data_ptr(), gb.data_ptr()}
        ga.fill_(float("nan"))
        gb.fill_(float("nan"))
        del ga, gb
        a.grad = b.grad = None
        again = grads()
    finally:
        rft.set_workspace_limit(None)
    assert {g.data_ptr() for g in again} == ptrs
    for g, want in zip(again, fresh):
        assert torch.equal(g, want)


def test_the_kept_block_stays_cached_when_the_caller_frees_its_gradients_after_it():
    """A training loop frees a step's gradients (a.grad = None) after the backward freed the
    kept products. With the kept products filling the workspace limit, the cache still holds
    them beside the gradients' blocks (its bound is twice the limit), so the next forward takes
    them instead of faulting in a fresh block; set_workspace_limit trims to twice the new
    limit."""
    require_backend("native", "cpu")
    n, d = 300, 24
    a, b = (features(n, d).requires_grad_() for _ in range(2))
    s = torch.tensor(7.5)
    kept_bytes = n * n * 4
    free_bytes = torch.ops.robustft_ext.kept_cache_free_bytes

    def step():
        a.grad = b.grad = None
        rft.clip_loss(a, b, s, backend="native").backward()

    rft.set_workspace_limit(1)  # empties the cache of free blocks other tests left
    assert free_bytes() == 0
    rft.set_workspace_limit(kept_bytes)  # the n x n products fill the limit exactly
    try:
        step()
        step()
        a.grad = b.grad = None
        held = free_bytes()
        _poison_cached_blocks(n, n, 4)  # more free blocks than the bound allows
        bounded = free_bytes()
        rft.set_workspace_limit(kept_bytes // 2)
        trimmed = free_bytes()
    finally:
        rft.set_workspace_limit(None)
    assert held >= kept_bytes + 2 * n * d * 4  # the kept block and both gradients
    assert kept_bytes < bounded <= 2 * kept_bytes
    assert trimmed <= kept_bytes


def _poison_cached_blocks(rows: int, cols: int, count: int) -> None:
    """Leaves `count` free blocks of rows x cols floats, full of NaN, in the block cache (the
    kept dot products of clip_fwd_keep, freed)."""
    one = torch.tensor(1.0)
    blocks = [torch.ops.robustft_ext.clip_fwd_keep(features(rows, 24).detach(),
                                                   features(cols, 24).detach(), one * 10,
                                                   one * 0, 0, False)[-1] for _ in range(count)]
    for x in blocks:
        x.fill_(float("nan"))


def test_step_buffers_from_reused_blocks_full_of_nan_give_the_fresh_results():
    """The step's n x D buffers and gradients (the batch's, DiVE's reference rows', the Lipsum
    difference, the row products) and its Lipsum products V (n x K) come from the block cache:
    blocks that a previous use left full of NaN serve the next step, which writes each whole
    before reading it."""
    require_backend("native", "cpu")
    fresh_loss, fresh = _run_step("robust_step", 130, torch.float32)
    rft.set_workspace_limit(1)  # empties the cache of free blocks other tests left
    rft.set_workspace_limit(None)
    _poison_cached_blocks(24, 130, 6)  # 130 x 24 floats: the batch's n x D buffers
    _poison_cached_blocks(6, 24, 4)    # 6 x 24: DiVE's reference gradients
    _poison_cached_blocks(9, 130, 2)   # 130 x 9: the Lipsum products V, forward and backward
    loss, again = _run_step("robust_step", 130, torch.float32)
    assert torch.equal(loss, fresh_loss)
    for g, want in zip(again, fresh):
        assert torch.equal(g, want)


@pytest.mark.parametrize("kind", ["m2mix", "robust_step"])
def test_a_reused_kept_block_full_of_nan_gives_the_fresh_results(kind):
    """A reused block keeps whatever the previous step left in it. The block a step frees is
    filled with NaN before the next step takes it; that step's loss and gradients are those of a
    step on fresh memory, bit for bit, and the packed strips leave no entry of it unwritten."""
    require_backend("native", "cpu")
    n = 300  # two strips of 256 rows: the second has 44 of them
    fresh_loss, fresh_grads = _run_step(kind, n, torch.float32)
    a, b = (features(n, 24).detach() for _ in range(2))
    one = torch.tensor(1.0)
    kept = torch.ops.robustft_ext.m2mix_fwd_keep(a, b, one * 10, torch.tensor(0.3), one * 12,
                                                  True)[3]
    assert torch.ops.robustft_ext.gram_strips(n, 4)[1] == 2, "the test wants two strips"
    kept.fill_(float("nan"))
    ptr = kept.data_ptr()
    del kept  # the NaN block is cached and serves the next forward of the same size
    loss, grads = _run_step(kind, n, torch.float32)
    # The step took the NaN block and freed it again: the next forward of that size gets it
    # and writes every entry (the strips are packed: no unused tail keeps a NaN).
    again = torch.ops.robustft_ext.m2mix_fwd_keep(a, b, one * 10, torch.tensor(0.3), one * 12,
                                                   True)[3]
    assert again.data_ptr() == ptr and bool(torch.isfinite(again).all())
    assert torch.isfinite(loss)
    assert torch.equal(loss, fresh_loss)
    for g, g_fresh in zip(grads, fresh_grads):
        if g_fresh is not None:
            assert torch.equal(g, g_fresh)


def test_the_kept_strips_are_the_interleaved_gram_blocks():
    """Each kept strip is X_r X_c^T of the strip-interleaved rows X = [I_0; T_0; I_1; T_1]
    (blocks of 256 rows, the last of 44), its own block included, packed one after another
    with nothing between or after them. The own block's T I^T quarter is the transpose of its
    I T^T quarter exactly (the forward copies it rather than multiplying it)."""
    require_backend("native", "cpu")
    n, R = 300, 256
    a, b = (features(n, 24).detach() for _ in range(2))
    one = torch.tensor(1.0)
    kept = torch.ops.robustft_ext.m2mix_fwd_keep(a, b, one * 10, torch.tensor(0.3), one * 12,
                                                  True)[3]
    assert tuple(torch.ops.robustft_ext.gram_strips(n, 4)) == (R, 2, kept.numel())
    X = torch.cat([a[:R], b[:R], a[R:], b[R:]]).double()
    offset = 0
    for r0 in (0, R):
        rows, width = min(R, n - r0), n - r0
        strip = kept[offset:offset + 4 * rows * width].view(2 * rows, 2 * width)
        offset += strip.numel()
        X_c = X[2 * r0:]
        torch.testing.assert_close(strip.double(), X_c[:2 * rows] @ X_c.t(), rtol=0,
                                   atol=1e-6)
        assert torch.equal(strip[rows:, :rows], strip[:rows, rows:2 * rows].t())
    assert offset == kept.numel()


@pytest.mark.parametrize("op", ["clip", "m2mix"])
def test_the_backward_products_read_no_subnormal(op):
    """A dlogit of a logit 87 to 104 below its log-sum-exp is a subnormal float, and x86 BLAS
    products slow down by orders of magnitude on subnormal operands (docs/backends.md): the
    CPU's loops write 0 for them. After the kept backward the kept buffer holds the operand of
    the backward's products (CLIP's dlogits, the Gram strips' S): no subnormal in it, where the
    float64 dlogits of these inputs do fall in that range."""
    require_backend("native", "cpu")
    torch.manual_seed(5)
    n = 64
    a = features(n, 8).detach()
    b = a.clone()  # every positive pair at cosine 1: logits up to 100 above the negatives'
    scale, one = torch.tensor(100.0), torch.tensor(1.0)
    tiny = torch.finfo(torch.float32).tiny
    logits = scale.double() * a.double() @ b.double().t()
    probs = torch.cat([logits.softmax(1).flatten(), logits.softmax(0).flatten()])
    assert bool(((probs > 0) & (probs < tiny)).any()), "the inputs must reach the subnormals"
    if op == "clip":
        _, r, c, kept = torch.ops.robustft_ext.clip_fwd_keep(a, b, scale, one * 0, 0, True)
        torch.ops.robustft_ext.clip_bwd_kept(one, a, b, scale, one * 0, r, c, kept, 0, True)
    else:
        lam = torch.tensor(0.3)
        m2, clip, lse, kept, carried = torch.ops.robustft_ext.m2mix_fwd_keep(a, b, scale, lam,
                                                                              scale, True)
        assert kept.numel() == 4 * n * n, "one strip"
        torch.ops.robustft_ext.m2mix_bwd_kept(one, one, a, b, scale, lam, scale, lse, kept, carried,
                                              True)
    assert int(((kept != 0) & (kept.abs() < tiny)).sum()) == 0
    assert bool(torch.isfinite(kept).all()) and bool((kept != 0).any())
