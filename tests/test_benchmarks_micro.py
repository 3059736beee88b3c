"""pytest-benchmark micro-benchmarks: the providers of benchmarks/ at a small size on CPU.

N=256, D=64, float32, one thread, full mode (forward + backward, the scale's gradient included), for the
CLIP and SigLIP losses with the reference, native and open_clip providers, for m^2-mix alone,
CLIP + m^2 (one fused pass, or two fused calls: native-separate) and a whole RobustFTLoss step
(CLIP + m^2 + Lipsum-FT + DiVE: one fused pass, or one fused call per term). The loss functions
and inputs are those of benchmarks/_harness.py. Each benchmark also checks that the loss it
timed is finite. `pytest tests/test_benchmarks_micro.py --benchmark-only` shows the table;
under --benchmark-disable each runs once, as a smoke test.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_backend

_HARNESS_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_harness.py"


def _harness():
    name = "robustft_benchmarks_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HARNESS_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


N, D = 256, 64
ROUNDS, WARMUP_ROUNDS = 10, 2


@pytest.fixture
def one_thread():
    """One intra-op thread: at this size threading only adds noise (and the CI box is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = ([(loss, p) for loss in ("clip", "siglip") for p in ("reference", "native", "open_clip")]
         + [("m2mix", "reference"), ("m2mix", "native"), ("clip_m2mix", "reference"),
            ("clip_m2mix", "native"), ("clip_m2mix", "native-separate"),
            ("robust_step", "reference"), ("robust_step", "native"),
            ("robust_step", "native-separate")])


@pytest.mark.parametrize("loss,provider", CASES)
def test_micro_full(benchmark, one_thread, loss, provider):
    h = _harness()
    if provider == "open_clip":
        pytest.importorskip("open_clip.loss")
    else:
        require_backend(provider.split("-")[0], "cpu")
    fn = h.make_loss_fn(loss, provider, D)
    a, b, scale, bias = h.make_inputs(loss, N, D, torch.float32, torch.device("cpu"))
    leaves = [t for t in (a, b, scale, bias) if t is not None]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(a, b, scale, bias)
        out.backward()
        return out.detach()

    benchmark.group = f"{loss} N={N} D={D} fp32 full"
    value = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert value.dim() == 0
    assert math.isfinite(float(value)), f"{provider} {loss} loss is {float(value)}"
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in leaves)
