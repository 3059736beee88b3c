"""DiVELoss and LipsumLoss (docs/maths.md, sections 4-5): values and gradients against independent
float64 formulas written here, the centre's EMA against its closed form, center_mode="batch",
eval mode, state_dict resume, 2-process gloo, and Lipsum-FT's random texts for open_clip's
tokenizers on a tiny open_clip model."""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import robustft_ext as rft
from helpers import require_backend
from helpers import TOLERANCE, assert_close_rel, run_gloo

BACKENDS = ["reference", "native"]
DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 5), (3, 33), (16, 64), (7, 768)]


# ---- independent formulas (float64) ----------------------------------------------------------
def dive_formula(fi, ft, pi, pt, m, a=1.0, b=1.0):
    """(AVL, PVL, d(a AVL + b PVL)/d image_ft, .../d text_ft, batch mean of (u + v) / 2), m constant."""
    fi, ft, pi, pt, m = (x.detach().double() for x in (fi, ft, pi, pt, m))
    u, v = fi - pi, ft - pt
    n = u.shape[0]
    avl = sum(float(((u[j] - m) ** 2).sum() + ((v[j] - m) ** 2).sum()) for j in range(n)) / n
    pvl = sum(float(((u[j] - v[j]) ** 2).sum()) for j in range(n)) / n
    du = (2.0 / n) * (a * (u - m) + b * (u - v))
    dv = (2.0 / n) * (a * (v - m) - b * (u - v))
    return torch.tensor(avl, dtype=torch.float64), torch.tensor(pvl, dtype=torch.float64), du, dv, \
        ((u + v) / 2).mean(0)


def lipsum_formula(f, f0, g, s):
    """(R, dR/dF) with V = s (F - F0) G^T, R = |V|^2 / (2 K B), dF = s V G / (K B)."""
    f, f0, g = (x.detach().double() for x in (f, f0, g))
    s = float(torch.as_tensor(s).detach())
    k, n = g.shape[0], f.shape[0]
    V = s * (f - f0) @ g.T
    return (V ** 2).sum() / (2 * k * n), s * V @ g / (k * n)


def dive_batch(n, d, dtype=torch.float64, seed=0, pre_grad=False):
    """Fine-tuned features near the pre-trained ones (requiring grad), and the pre-trained ones."""
    g = torch.Generator().manual_seed(seed)
    pi = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    pt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    fi = F.normalize(pi + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    ft = F.normalize(pt + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    out = [x.to(dtype).requires_grad_() for x in (fi, ft)]
    out += [x.to(dtype).requires_grad_(pre_grad) for x in (pi, pt)]
    return out


def tol(dtype):
    return TOLERANCE[dtype]


# ---- DiVE: values and gradients --------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_dive_function_and_terms_vs_formula(backend, dtype, n, d):
    require_backend(backend, "cpu", dtype)
    fi, ft, pi, pt = dive_batch(n, d, dtype, seed=n * 1000 + d, pre_grad=True)
    center = (0.05 * torch.randn(d, dtype=torch.float64)).to(dtype).requires_grad_()
    a, b = 0.7, 1.9
    avl, pvl = rft.dive_loss(fi, ft, pi, pt, center, backend=backend)
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert avl.shape == () and pvl.shape == () and avl.dtype == expect_dtype
    (a * avl + b * pvl).backward()
    e_avl, e_pvl, e_du, e_dv, e_mean = dive_formula(fi, ft, pi, pt, center, a, b)
    assert_close_rel(avl, e_avl, tol(dtype), "AVL")
    assert_close_rel(pvl, e_pvl, tol(dtype), "PVL")
    assert_close_rel(fi.grad, e_du, tol(dtype), "d image_ft")
    assert_close_rel(ft.grad, e_dv, tol(dtype), "d text_ft")
    for x, name in ((pi, "image_pre"), (pt, "text_pre"), (center, "center")):
        assert x.grad is None, f"{name} got a gradient"
    # dive_terms: same pass, plus the detached batch mean of (u + v) / 2
    t_avl, t_pvl, t_mean = rft.functional.dive_terms(fi, ft, pi, pt, center, backend=backend)
    assert_close_rel(t_avl, e_avl, tol(dtype), "dive_terms AVL")
    assert_close_rel(t_pvl, e_pvl, tol(dtype), "dive_terms PVL")
    assert t_mean.shape == (d,) and not t_mean.requires_grad
    assert_close_rel(t_mean, e_mean, tol(dtype), "dive_terms diff_mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_dive_module_vs_formula(backend, dtype, n, d):
    require_backend(backend, "cpu", dtype)
    weight = 123.0
    for output_dict in (False, True):
        fi, ft, pi, pt = dive_batch(n, d, dtype, seed=n + d, pre_grad=True)
        mod = rft.DiVELoss(weight=weight, backend=backend)
        with torch.no_grad():  # a non-zero centre: load one into the fresh (dim=None) module
            mod.load_state_dict({"center": 0.05 * torch.randn(d, dtype=torch.float64)})
        m = mod.center.clone()
        out = mod(fi, ft, pi, pt, output_dict=output_dict)
        if output_dict:
            assert set(out) == {"dive_avl_loss", "dive_pvl_loss"}
            loss = out["dive_avl_loss"] + out["dive_pvl_loss"]
        else:
            loss = out
        loss.backward()
        e_avl, e_pvl, e_du, e_dv, _ = dive_formula(fi, ft, pi, pt, m)
        if output_dict:
            assert_close_rel(out["dive_avl_loss"], weight * e_avl, tol(dtype), "weighted AVL")
            assert_close_rel(out["dive_pvl_loss"], weight * e_pvl, tol(dtype), "weighted PVL")
        assert_close_rel(loss, weight * (e_avl + e_pvl), tol(dtype), "weighted AVL + PVL")
        assert_close_rel(fi.grad, weight * e_du, tol(dtype), "d image_ft")
        assert_close_rel(ft.grad, weight * e_dv, tol(dtype), "d text_ft")
        assert pi.grad is None and pt.grad is None, "pre-trained features got a gradient"
        assert not mod.center.requires_grad and mod.center.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dive_ema_matches_closed_form(backend, dtype):
    require_backend(backend, "cpu", dtype)
    n, d, beta, steps = 6, 24, 0.9, 5
    mod = rft.DiVELoss(weight=2.0, momentum=beta, backend=backend)
    assert mod.training and mod.center.numel() == 0
    means = []
    m = torch.zeros(d, dtype=torch.float64)
    for k in range(steps):
        fi, ft, pi, pt = dive_batch(n, d, dtype, seed=100 + k)
        loss = mod(fi, ft, pi, pt)
        e_avl, e_pvl, _, _, mean_k = dive_formula(fi, ft, pi, pt, m)
        # the loss of step k uses the centre after k - 1 updates
        assert_close_rel(loss, 2.0 * (e_avl + e_pvl), tol(dtype), f"loss at step {k}")
        means.append(mean_k)
        m = beta * m + (1 - beta) * mean_k
        # closed form: m_K = (1 - beta) sum_k beta^(K - 1 - k) mean_k
        closed = sum((1 - beta) * beta ** (len(means) - 1 - i) * x for i, x in enumerate(means))
        assert_close_rel(mod.center, closed, tol(dtype), f"centre after step {k}")
        assert mod.center.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dive_momentum_zero_is_last_batch_mean(backend):
    require_backend(backend, "cpu", torch.float64)
    mod = rft.DiVELoss(momentum=0.0, backend=backend)
    for k in range(2):
        fi, ft, pi, pt = dive_batch(5, 8, seed=k)
        mod(fi, ft, pi, pt)
    assert_close_rel(mod.center, dive_formula(fi, ft, pi, pt, torch.zeros(8))[4], 1e-12, "centre")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dive_batch_center_mode(backend, dtype):
    require_backend(backend, "cpu", dtype)
    n, d, weight = 9, 40, 10.0
    mod = rft.DiVELoss(weight=weight, center_mode="batch", dim=d, backend=backend)
    assert mod.center.dtype == torch.float32      # a sized buffer is float32, as nn buffers are
    if dtype == torch.float64:
        mod.double()
    for k in range(2):
        fi, ft, pi, pt = dive_batch(n, d, dtype, seed=7 + k, pre_grad=True)
        m = dive_formula(fi, ft, pi, pt, torch.zeros(d))[4]
        out = mod(fi, ft, pi, pt, output_dict=True)
        (out["dive_avl_loss"] + out["dive_pvl_loss"]).backward()
        # the loss uses this batch's mean, as a constant
        e_avl, e_pvl, e_du, e_dv, _ = dive_formula(fi, ft, pi, pt, m)
        assert_close_rel(out["dive_avl_loss"], weight * e_avl, tol(dtype), "AVL")
        assert_close_rel(out["dive_pvl_loss"], weight * e_pvl, tol(dtype), "PVL")
        assert_close_rel(fi.grad, weight * e_du, tol(dtype), "d image_ft")
        assert_close_rel(ft.grad, weight * e_dv, tol(dtype), "d text_ft")
        assert pi.grad is None and pt.grad is None
        assert_close_rel(mod.center, m, tol(dtype), "stored centre")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("center_mode", ["ema", "batch"])
def test_dive_eval_mode_does_not_update(backend, center_mode):
    require_backend(backend, "cpu", torch.float64)
    n, d = 4, 12
    mod = rft.DiVELoss(weight=1.0, center_mode=center_mode, backend=backend)
    fi, ft, pi, pt = dive_batch(n, d, seed=1)
    mod(fi, ft, pi, pt)                                    # training: sets the centre
    before = mod.center.clone()
    assert before.abs().sum() > 0
    mod.eval()
    fi, ft, pi, pt = dive_batch(n, d, seed=2)
    loss = mod(fi, ft, pi, pt)
    assert torch.equal(mod.center, before), "the centre changed in eval mode"
    m = before if center_mode == "ema" else dive_formula(fi, ft, pi, pt, before)[4]
    e_avl, e_pvl = dive_formula(fi, ft, pi, pt, m)[:2]
    assert_close_rel(loss, e_avl + e_pvl, 1e-10, "eval loss")
    mod.train()
    mod(fi, ft, pi, pt)
    assert not torch.equal(mod.center, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dive_state_dict_resume(backend):
    require_backend(backend, "cpu", torch.float32)
    n, d = 5, 16
    batches = [dive_batch(n, d, torch.float32, seed=50 + k) for k in range(5)]
    a = rft.DiVELoss(momentum=0.8, backend=backend)
    fresh_state = a.state_dict()
    assert fresh_state["center"].numel() == 0
    for batch in batches[:3]:
        a(*batch)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert state["center"].shape == (d,)
    b = rft.DiVELoss(momentum=0.8, backend=backend)        # fresh, dim=None
    b.load_state_dict(state)
    assert torch.equal(b.center, a.center)
    for batch in batches[3:]:
        la = a(*[x.detach().requires_grad_(x.requires_grad) for x in batch])
        lb = b(*[x.detach().requires_grad_(x.requires_grad) for x in batch])
        assert torch.equal(la, lb)
        assert torch.equal(a.center, b.center)
    # a module with dim given loads as any module does; a wrong size is refused
    c = rft.DiVELoss(dim=d, backend=backend)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.center, a.center)
    with pytest.raises(RuntimeError, match="center"):
        rft.DiVELoss(dim=d + 1).load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="center"):
        a.load_state_dict({"center": torch.zeros(d + 1)})
    # a never-stepped state loads into a fresh module, which then sizes itself
    e = rft.DiVELoss(backend=backend)
    e.load_state_dict(fresh_state)
    e(*batches[0])
    assert e.center.shape == (d,)


def test_dive_module_follows_to_and_double():
    mod = rft.DiVELoss(dim=6).double()
    assert mod.center.dtype == torch.float64
    lazy = rft.DiVELoss()
    lazy.load_state_dict({"center": torch.ones(6, dtype=torch.float64)})
    assert lazy.center.dtype == torch.float64 and lazy.center.shape == (6,)
    assert "center" in dict(lazy.named_buffers())


# ---- DiVE: bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=-1.0), "weight"), (dict(weight=float("nan")), "weight"),
    (dict(weight=float("inf")), "weight"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"), (dict(momentum=float("nan")), "momentum"),
    (dict(center_mode="mean"), "center_mode"), (dict(dim=0), "dim"), (dict(dim=2.5), "dim"),
    (dict(dim=True), "dim"),
])
def test_dive_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rft.DiVELoss(**kwargs)


def test_dive_bad_inputs():
    fi, ft, pi, pt = dive_batch(4, 8)
    mod = rft.DiVELoss(backend="reference")
    with pytest.raises(ValueError, match="text_ft"):
        mod(fi, ft[:3], pi, pt)
    with pytest.raises(ValueError, match="image_pre"):
        mod(fi, ft, torch.randn(4, 9, dtype=torch.float64), pt)
    with pytest.raises(ValueError, match="text_pre"):
        mod(fi, ft, pi, pt[0])
    with pytest.raises(TypeError, match="image_ft"):
        mod(fi.tolist(), ft, pi, pt)
    with pytest.raises(ValueError, match="empty"):
        mod(fi[:0], ft[:0], pi[:0], pt[:0])
    assert mod.center.numel() == 0, "a refused input sized the centre"
    mod(fi, ft, pi, pt)
    big = dive_batch(4, 10)
    with pytest.raises(ValueError, match="center has size 8"):
        mod(*big)
    with pytest.raises(ValueError, match=r"dim=8\) got features of dim 10"):
        rft.DiVELoss(dim=8)(*big)


# ---- DiVE: 2 processes (gloo) ----------------------------------------------------------------
WORLD, N_LOCAL, DIM = 2, 4, 10


def _dist_batches(step):
    """The global batch of a step, float64: rank r owns rows [r N_LOCAL, (r + 1) N_LOCAL)."""
    return dive_batch(WORLD * N_LOCAL, DIM, seed=900 + step)


def _dist_single_process(backend, center_mode, steps):
    mod = rft.DiVELoss(weight=3.0, momentum=0.5, center_mode=center_mode, backend=backend)
    losses, centers = [], []
    for step in range(steps):
        losses.append(mod(*_dist_batches(step)).detach())
        centers.append(mod.center.clone())
    return losses, centers


def _dist_worker(rank):
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for backend in BACKENDS:
        for center_mode in ("ema", "batch"):
            what = f"{backend} {center_mode}"
            full_losses, full_centers = _dist_single_process(backend, center_mode, 3)
            mod = rft.DiVELoss(weight=3.0, momentum=0.5, center_mode=center_mode,
                               backend=backend)
            for step in range(3):
                local = [x[sl].detach().requires_grad_(x.requires_grad)
                         for x in _dist_batches(step)]
                loss = mod(*local).detach()
                centers = [torch.empty_like(mod.center) for _ in range(WORLD)]
                dist.all_gather(centers, mod.center)
                assert torch.equal(centers[0], centers[1]), f"{what}: ranks' centres differ"
                assert torch.allclose(mod.center, full_centers[step], rtol=1e-12, atol=1e-14), \
                    f"{what} step {step}: centre {mod.center} vs single process " \
                    f"{full_centers[step]}"
                # equal local batch sizes: the mean of the ranks' losses is the full loss
                dist.all_reduce(loss)
                assert torch.allclose(loss / WORLD, full_losses[step], rtol=1e-12), \
                    f"{what} step {step}: mean loss {loss / WORLD} vs {full_losses[step]}"


@pytest.mark.distributed
def test_dive_two_process_gloo_center_matches_single_process():
    require_backend("native", "cpu", torch.float64)
    run_gloo(_dist_worker, WORLD)


# ---- Lipsum-FT: values and gradients ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(1, 1, 5), (3, 80, 33), (16, 7, 64), (5, 80, 512)])
def test_lipsum_function_and_module_vs_formula(backend, dtype, n, k, d):
    require_backend(backend, "cpu", dtype)
    g = torch.Generator().manual_seed(n + k + d)
    f0 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    f = F.normalize(f0 + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    G = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    s0 = 100.0
    e_r, e_df = lipsum_formula(f, f0, G, s0)
    for weight, scale, use_module in ((1.0, s0, False), (2.5, torch.tensor(s0), True)):
        fi = f.to(dtype).clone().requires_grad_()
        f0i = f0.to(dtype).clone().requires_grad_()
        Gi = G.to(dtype).clone().requires_grad_()
        if use_module:
            mod = rft.LipsumLoss(weight=weight, backend=backend)
            r = mod(fi, f0i, Gi, scale)
        else:
            r = weight * rft.lipsum_loss(fi, f0i, Gi, scale, backend=backend)
        assert r.shape == ()
        r.backward()
        assert_close_rel(r, weight * e_r, tol(dtype), "R")
        assert_close_rel(fi.grad, weight * e_df, tol(dtype), "d image_ft")
        assert f0i.grad is None and Gi.grad is None, "image_pre / random_text_features got a gradient"


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=-0.5), "weight"), (dict(weight=float("inf")), "weight"),
    (dict(num_texts=0), "num_texts"), (dict(num_texts=2.0), "num_texts"),
    (dict(num_texts=True), "num_texts"), (dict(text_length=0), "text_length"),
    (dict(text_length=-3), "text_length"),
])
def test_lipsum_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rft.LipsumLoss(**kwargs)


def test_lipsum_bad_inputs():
    mod = rft.LipsumLoss(backend="reference")
    f = torch.randn(4, 8)
    with pytest.raises(ValueError, match="image_pre"):
        mod(f, torch.randn(3, 8), torch.randn(5, 8), 10.0)
    with pytest.raises(ValueError, match="random_text_features"):
        mod(f, f, torch.randn(5, 7), 10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        mod(f, f, torch.randn(5, 8), float("nan"))


# ---- Lipsum-FT: random texts -----------------------------------------------------------------
def _check_tokens(tokens, k, length, context, start, end, pad, vocab, special):
    assert tokens.shape == (k, context) and tokens.dtype == torch.long
    col = 0
    if start is not None:
        assert (tokens[:, 0] == start).all()
        col = 1
    body = tokens[:, col:col + length]
    assert ((body >= 0) & (body < vocab)).all(), "ids outside the vocabulary"
    assert not torch.isin(body, torch.tensor(special)).any(), "a special token among the ids"
    assert (tokens[:, col + length] == end).all()
    assert (tokens[:, col + length + 1:] == pad).all()


def test_random_tokens_simple_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    mod = rft.LipsumLoss()
    special = list(tok.all_special_ids)
    a = mod.random_tokens(tok, torch.Generator().manual_seed(3))
    _check_tokens(a, 80, 8, tok.context_length, tok.sot_token_id, tok.eot_token_id, 0,
                  len(tok.encoder), special)
    b = mod.random_tokens(tok, torch.Generator().manual_seed(3))
    c = mod.random_tokens(tok, torch.Generator().manual_seed(4))
    assert torch.equal(a, b), "not reproducible from a seeded generator"
    assert not torch.equal(a, c), "another seed drew the same texts"
    # the default generator, a device, other sizes
    torch.manual_seed(11)
    d1 = mod.random_tokens(tok, device="cpu")
    torch.manual_seed(11)
    assert torch.equal(d1, mod.random_tokens(tok))
    small = rft.LipsumLoss(num_texts=3, text_length=1).random_tokens(tok)
    _check_tokens(small, 3, 1, 77, tok.sot_token_id, tok.eot_token_id, 0, len(tok.encoder), special)
    full = rft.LipsumLoss(num_texts=2, text_length=75).random_tokens(tok)   # fills the context
    _check_tokens(full, 2, 75, 77, tok.sot_token_id, tok.eot_token_id, 0, len(tok.encoder), special)
    with pytest.raises(ValueError, match="text_length=76"):
        rft.LipsumLoss(text_length=76).random_tokens(tok)
    # uniform over the whole vocabulary (below the special ids): both ends are reached
    many = rft.LipsumLoss(num_texts=4000, text_length=8).random_tokens(
        tok, torch.Generator().manual_seed(0))[:, 1:9]
    assert many.min() < 100 and many.max() > len(tok.encoder) - 100
    with pytest.raises(TypeError, match="generator"):
        mod.random_tokens(tok, generator=3)


class _FakeHF:
    """Stands in for a transformers tokenizer: HFTokenizer reads only these attributes here."""

    def __init__(self, vocab_size, special, bos=None, eos=None, cls=None, sep=None, pad=None):
        self.vocab_size = vocab_size
        self.all_special_ids = special
        self.bos_token_id, self.eos_token_id = bos, eos
        self.cls_token_id, self.sep_token_id = cls, sep
        self.pad_token_id = pad


def _hf_tokenizer(hf, context_length):
    """An open_clip HFTokenizer around `hf`, built without transformers (not installed here,
    and AutoTokenizer.from_pretrained would need the network)."""
    open_clip = pytest.importorskip("open_clip")
    tok = object.__new__(open_clip.tokenizer.HFTokenizer)
    tok.tokenizer = hf
    tok.context_length = context_length
    tok.tokenizer_mode = ""
    return tok


@pytest.mark.parametrize("kind", ["bert", "roberta", "t5"])
def test_random_tokens_hf_tokenizer(kind):
    if kind == "bert":      # [CLS] ids [SEP] [PAD]...
        hf = _FakeHF(50, [0, 10, 11, 12, 13], cls=11, sep=12, pad=0)
        start, end, pad = 11, 12, 0
    elif kind == "roberta":  # <s> ids </s> <pad>...
        hf = _FakeHF(50, [0, 1, 2, 3, 49], bos=0, eos=2, cls=0, sep=2, pad=1)
        start, end, pad = 0, 2, 1
    else:                    # no start token: ids </s> <pad>...
        hf = _FakeHF(50, [0, 1, 2], eos=1, pad=0)
        start, end, pad = None, 1, 0
    tok = _hf_tokenizer(hf, 16)
    mod = rft.LipsumLoss(num_texts=300, text_length=8)
    a = mod.random_tokens(tok, torch.Generator().manual_seed(1))
    _check_tokens(a, 300, 8, 16, start, end, pad, 50, hf.all_special_ids)
    assert torch.equal(a, mod.random_tokens(tok, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, mod.random_tokens(tok, torch.Generator().manual_seed(2)))
    body = a[:, (0 if start is None else 1):][:, :8]
    allowed = set(range(50)) - set(hf.all_special_ids)
    assert set(body.unique().tolist()) == allowed, "not every allowed id is drawn"
    longest = 16 - (1 if start is None else 2)
    rft.LipsumLoss(text_length=longest).random_tokens(tok)
    with pytest.raises(ValueError, match="context length 16"):
        rft.LipsumLoss(text_length=longest + 1).random_tokens(tok)


def test_random_tokens_bad_tokenizers():
    mod = rft.LipsumLoss()
    with pytest.raises(TypeError, match="SimpleTokenizer or HFTokenizer"):
        mod.random_tokens(object())
    with pytest.raises(TypeError, match="SimpleTokenizer or HFTokenizer"):
        mod.random_tokens(lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))
    with pytest.raises(ValueError, match="end token"):
        mod.random_tokens(_hf_tokenizer(_FakeHF(50, [0], pad=0), 16))
    with pytest.raises(ValueError, match="context_length"):
        mod.random_tokens(_hf_tokenizer(_FakeHF(50, [0, 1], eos=1, pad=0), None))


def _tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return model.eval()


def test_random_text_features_tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")
    model = _tiny_clip()
    tok = open_clip.get_tokenizer("ViT-B-32")
    mod = rft.LipsumLoss(num_texts=6, text_length=8)
    G = mod.random_text_features(model, tok, torch.Generator().manual_seed(5))
    assert G.shape == (6, 16) and not G.requires_grad
    assert torch.allclose(G.norm(dim=1), torch.ones(6), atol=1e-5)
    tokens = mod.random_tokens(tok, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expect = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(G, expect, atol=1e-6)
    assert torch.equal(G, mod.random_text_features(model, tok, torch.Generator().manual_seed(5)))
    assert not torch.allclose(G, mod.random_text_features(model, tok,
                                                          torch.Generator().manual_seed(6)))
    # G feeds the loss: the fine-tuned image features get a gradient, nothing else
    f0 = F.normalize(torch.randn(3, 16), dim=1)
    f = F.normalize(f0 + 0.1 * torch.randn(3, 16), dim=1).requires_grad_()
    r = mod(f, f0, G, model.logit_scale.exp().detach())
    r.backward()
    assert_close_rel(r, lipsum_formula(f, f0, G, model.logit_scale.exp())[0], 1e-4, "R")
    assert model.logit_scale.grad is None
    with pytest.raises(TypeError, match="encode_text"):
        mod.random_text_features(torch.nn.Linear(2, 2), tok)


def test_exported():
    assert "DiVELoss" in rft.__all__ and "LipsumLoss" in rft.__all__
    assert rft.DiVELoss is rft.modules.dive.DiVELoss
