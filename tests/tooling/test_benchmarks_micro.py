"""pytest-benchmark micro-benchmarks: the providers of benchmarks/ at a small size on CPU.

N=256, D=64, float32, one thread, full mode (forward + backward, the scale's gradient included), for the
CLIP and SigLIP losses with the reference, native and open_clip providers, for m^2-mix alone,
CLIP + m^2 (one fused pass, or two fused calls: native-separate) and a whole RobustFTLoss step
(CLIP + m^2 + Lipsum-FT + DiVE: one fused pass, or one fused call per term), the fused ones
under both step designs (native: gram, native-products: products). The loss functions and
inputs are those of benchmarks/harness/. Each benchmark also checks that the loss it
timed is finite. `pytest tests/tooling/test_benchmarks_micro.py --benchmark-only` shows the table;
under --benchmark-disable each runs once, as a smoke test.

Also where the benchmark scripts write: by default a new CSV and plot folder under the ignored
benchmarks/results/, leaving the checkout as it was; --append adds to the tracked results.csv.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import require_backend

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _harness(module: str):
    """benchmarks/harness/<module>.py (benchmarks/ put on sys.path, as the scripts do)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(f"harness.{module}")


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
         + [(loss, p) for loss in ("m2mix", "clip_m2mix", "robust_step")
            for p in ("reference", "native", "native-products")]
         + [("clip_m2mix", "native-separate"), ("robust_step", "native-separate")])


@pytest.mark.parametrize("loss,provider", CASES)
def test_micro_full(benchmark, one_thread, loss, provider):
    providers, losses = _harness("providers"), _harness("losses")
    if provider == "open_clip":
        pytest.importorskip("open_clip.loss")
    else:
        require_backend(provider.split("-")[0], "cpu")
    fn = providers.make_loss_fn(loss, provider, D)
    a, b, scale, bias = losses.make_inputs(loss, N, D, torch.float32, torch.device("cpu"))
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


# --------------------------------------------------------------------------- step designs

@pytest.fixture
def default_design():
    """The process's step design restored after the test (the providers pin theirs)."""
    import robustft_ext as rft
    yield
    rft.set_step_design(None)


@pytest.mark.parametrize("loss", ["m2mix", "clip_m2mix", "robust_step"])
def test_design_providers_pin_their_design_per_call(one_thread, default_design, loss):
    """native and native-products take turns in one process, each call under its own design,
    and give the same loss and gradients (to rounding)."""
    import robustft_ext as rft
    require_backend("native", "cpu")
    providers, losses = _harness("providers"), _harness("losses")
    inputs = losses.make_inputs(loss, 32, 16, torch.float32, torch.device("cpu"))
    got = {}
    for provider, design in [("native-products", "products"), ("native", "gram"),
                             ("native-products", "products")]:
        fn = providers.make_loss_fn(loss, provider, 16)
        for t in inputs:
            if t is not None:
                t.grad = None
        rft.set_step_design("gram" if design == "products" else "products")  # the other one
        out = fn(*inputs)
        assert rft.step_design() == design
        out.backward()
        got[provider] = (out.detach(), inputs[0].grad.clone(), inputs[1].grad.clone())
    for a, b in zip(got["native"], got["native-products"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("provider", ["reference", "native", "native-separate"])
def test_a_robust_step_starts_from_cleared_extra_gradients(one_thread, monkeypatch, provider):
    """Each timed robust_step call is a training step: the DiVE reference rows' gradients are
    its own, not added onto the previous call's (the timing loop clears only a, b and the
    scale)."""
    if provider != "reference":
        require_backend("native", "cpu")
    providers, losses = _harness("providers"), _harness("losses")
    made = []

    def extras(a):
        made.append(losses.robust_step_extras(a))
        return made[-1]

    monkeypatch.setattr(providers, "robust_step_extras", extras)
    fn = providers.make_loss_fn("robust_step", provider, 16)
    inputs = losses.make_inputs("robust_step", 32, 16, torch.float32, torch.device("cpu"))
    firsts = []
    for _ in range(2):
        for t in inputs:
            if t is not None:
                t.grad = None
        fn(*inputs).backward()
        if not firsts:  # the first step's gradient tensors, and their values
            firsts = [(t.grad, t.grad.clone()) for t in made[0].values() if t.requires_grad]
    assert len(made) == 1 and len(firsts) == 2
    for grad, values in firsts:
        assert float(values.abs().max()) > 0
        # (A step that added into it would have changed it in place: autograd accumulates
        # into an existing .grad.)
        assert torch.equal(grad, values)


def test_native_products_is_for_the_m2_losses_only():
    providers = _harness("providers")
    cpu = torch.device("cpu")
    for loss in ("clip", "siglip"):
        assert not providers.has_loss(loss, "native-products")
        assert "native-products" in providers.skip_reason(loss, "native-products", cpu,
                                                          torch.float32, 16)
        with pytest.raises(ValueError, match="native-products"):
            providers.make_loss_fn(loss, "native-products", 16)
    for loss in providers.M2_LOSSES:
        assert providers.has_loss(loss, "native-products")
    cli = _harness("cli")
    assert "native-products" in cli.CPU_DEFAULTS["providers"]
    args = cli.build_parser("clip_m2mix").parse_args(["--device", "cpu"])
    assert "native-products" in cli.sweep_from_args("clip_m2mix", args).providers
    args = cli.build_parser("clip").parse_args(["--device", "cpu"])
    assert "native-products" not in cli.sweep_from_args("clip", args).providers


# --------------------------------------------------------------------------- output paths

TINY = ["--device", "cpu", "--n", "16", "--d", "8", "--modes", "full", "--warmup", "1",
        "--min-reps", "1", "--max-reps", "1", "--budget", "0", "--no-isolate", "--threads", "1"]


def _git_status() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                              "--untracked-files=all"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def test_default_output_is_a_new_file_and_plot_folder_and_leaves_the_checkout_clean():
    before = _git_status()
    if before is None:
        pytest.skip("not a git checkout: the checkout's cleanliness cannot be read")
    results = ROOT / "benchmarks" / "results"
    existing = set(results.iterdir()) if results.exists() else set()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_clip.py"), *TINY,
                           "--providers", "reference", "native"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    made = (set(results.iterdir()) if results.exists() else set()) - existing
    try:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        csvs = [p for p in made if p.suffix == ".csv"]
        assert len(csvs) == 1, made
        assert re.fullmatch(r".+_\d{8}T\d{6}Z_clip\.csv", csvs[0].name), csvs[0].name
        with open(csvs[0], newline="") as f:
            rows = list(csv.DictReader(f))
        assert {(r["provider"], r["status"]) for r in rows} == {("reference", "ok"), ("native", "ok")}
        if importlib.util.find_spec("matplotlib") is not None:
            plots = csvs[0].with_name(csvs[0].stem + "_plots")
            assert plots in made and any(plots.glob("*.png"))
        assert _git_status() == before
    finally:
        for p in made:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_append_adds_rows_to_the_tracked_csv(tmp_path, monkeypatch, one_thread):
    cli, results = _harness("cli"), _harness("results")
    tracked = tmp_path / "results.csv"
    monkeypatch.setattr(results, "TRACKED_CSV", tracked)
    for _ in range(2):
        cli.main("clip", TINY + ["--providers", "reference", "--append"])
    with open(tracked, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == results.CSV_COLUMNS and len(lines) == 3  # one header, a row per run
    assert not any(tmp_path.glob("*_plots"))  # --append draws no plots
    with pytest.raises(SystemExit):
        cli.build_parser("clip").parse_args(["--append", "--csv", str(tmp_path / "x.csv")])


def test_plot_paths_write_tracked_plots_only_when_asked():
    _harness("results")  # puts benchmarks/ on sys.path
    import plot
    assert plot.resolve_paths(None, None, True) == (plot.TRACKED_CSV, plot.TRACKED_PLOTS)
    csv_path = Path("/somewhere/NVIDIA_H200_20261201T000000Z_clip.csv")
    assert plot.resolve_paths(csv_path, None, False) == (
        csv_path, Path("/somewhere/NVIDIA_H200_20261201T000000Z_clip_plots"))
    _, out = plot.resolve_paths(plot.TRACKED_CSV, None, False)
    assert out.parent == plot.RESULTS_DIR and out.name.startswith("tracked_")
