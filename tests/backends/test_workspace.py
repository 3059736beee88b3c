"""The backward's dlogit workspace: its limit (robustft_ext.set_workspace_limit,
$ROBUSTFT_WORKSPACE_MB) and the chunked backward it bounds, which must give the same numbers as
one chunk. Memory bounds themselves are measured in test_memory.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import robustft_ext as rft
from robustft_ext import workspace
from helpers import DEVICES, require_backend
from helpers import assert_close_rel, features


@pytest.fixture
def small_workspace():
    """One byte: every chunk is a single row block (128 rows), the fewest the kernels take."""
    rft.set_workspace_limit(1)
    yield
    rft.set_workspace_limit(None)


def test_default_limit_is_512_mib():
    """The default reaches both sides in a fresh process: the Python decision to keep the CPU's
    dot products (512 MiB of float32, not a byte more), and the compiled ops' own copy of the
    limit, which refuses to keep products one row over it, naming the limit."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import types, torch, robustft_ext as rft
        from robustft_ext import backends
        rft.set_step_design("products")  # whose kept products take the limit whole
        ctx = types.SimpleNamespace(needs_input_grad=(True,))
        a = torch.zeros(1, 1)
        entries = 512 * 2**20 // 4
        assert backends.keeps_products(ctx, "native", True, a, entries)
        assert not backends.keeps_products(ctx, "native", True, a, entries + 1)
        n = 6689  # three 6689 x 6689 float32 products: 536,912,652 bytes, over 512 MiB
        x = torch.nn.functional.normalize(torch.randn(n, 4), dim=1)
        s, lam = torch.tensor(1.0), torch.tensor(0.3)
        try:
            torch.ops.robustft_ext.m2mix_fwd_keep(x, x, s, lam, s, True)
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
    """)
    env = {k: v for k, v in os.environ.items() if k != workspace.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "more than the workspace limit of 536870912 bytes" in out, out
    assert workspace.DEFAULT_WORKSPACE_BYTES == 512 * 2**20


def test_set_and_restore():
    rft.set_workspace_limit(12345)
    assert rft.workspace_limit() == 12345
    rft.set_workspace_limit(None)
    assert rft.workspace_limit() == workspace._from_env()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError),
                                        (True, TypeError), ("8", TypeError)])
def test_bad_limits_are_refused(bad, error):
    with pytest.raises(error, match="nbytes"):
        rft.set_workspace_limit(bad)


@pytest.mark.parametrize("value, ok", [("64", True), ("0.5", True), ("0", False), ("-1", False),
                                       ("lots", False)])
def test_environment_variable(value, ok):
    code = "import robustft_ext as r; print(r.workspace_limit())"
    env = dict(os.environ, ROBUSTFT_WORKSPACE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.strip().splitlines()[-1]) == int(float(value) * 2**20)
    else:
        assert out.returncode != 0 and "ROBUSTFT_WORKSPACE_MB" in out.stderr


def _grads(fn, inputs):
    out = fn(*inputs)
    return [out.detach()] + list(torch.autograd.grad(out, inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["clip", "clip_rows", "siglip", "clip_m2mix", "robust_step"])
def test_chunked_backward_matches_one_chunk(device, dtype, kind, small_workspace):
    """300 rows in chunks of 128 against the default (one chunk): the chunks' GEMMs add the
    same products in another order, so results agree to rounding."""
    require_backend("native", device, dtype)
    n, d = 300, 24
    I, T = features(n, d, dtype, device), features(n, d, dtype, device)
    s = torch.tensor(9.0, device=device, dtype=torch.float64 if dtype == torch.float64 else
                     torch.float32, requires_grad=True)
    if kind == "clip":
        fn = lambda I, T, s: rft.clip_loss(I, T, s, backend="native")  # noqa: E731
    elif kind == "clip_rows":
        Tall = features(2 * n, d, dtype, device)
        fn = lambda I, T, s: rft.clip_rows_loss(I, torch.cat([T, Tall]), s,  # noqa: E731
                                                 diag_offset=n, backend="native")
    elif kind == "siglip":
        fn = lambda I, T, s: rft.siglip_loss(I, T, s, -2.0, backend="native")  # noqa: E731
    elif kind == "clip_m2mix":
        fn = lambda I, T, s: sum(rft.clip_m2mix_loss(I, T, s, 0.3, backend="native"))  # noqa: E731
    else:
        P, G = features(n, d, dtype, device).detach(), features(80, d, dtype, device).detach()
        loss = rft.RobustFTLoss(clip_weight=1.0, m2_weight=0.1, lipsum_weight=1.0, m2_lam=0.3,
                                backend="native")
        fn = lambda I, T, s: loss(I, T, s, image_pre=P, random_text_features=G,  # noqa: E731
                                  pre_logit_scale=12.0)
    chunked = _grads(fn, (I, T, s))
    rft.set_workspace_limit(None)
    whole = _grads(fn, (I, T, s))
    bound = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, x, y in zip(("loss", "grad_image", "grad_text", "grad_scale"), chunked, whole):
        assert_close_rel(x, y, bound, f"{kind} {name}")
