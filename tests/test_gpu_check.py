"""benchmarks/gpu_check.sh: its dry run end to end on this CPU machine (so that the GPU check
cannot rot between the rare GPU loans), the benchmark subset it plans, the predictions that
skip absurd cases, and the arithmetic of its summary."""
from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.sh"
STAGES = ["wheels", "env", "build", "tests", "memcheck", "racecheck", "ceiling", "bench", "summary"]
# What the device tool brings back from $OUT: at most 8 files, plain names, no deeper folders.
OUT_FILES = {"summary.md", "status.tsv", "results.csv", "plots.png", "ceiling.json", "env.txt",
             "log.txt"}


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"robustft_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def git_status() -> str | None:
    """`git status --porcelain` of the checkout (None when this is not a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                              "--untracked-files=all"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


# --------------------------------------------------------------------------- the dry run

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module's tests: (its folder, its stdout, the checkout's git status
    before and after)."""
    out = tmp_path_factory.mktemp("gpu_check") / "run"
    before = git_status()
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"gpu_check.sh --dry-run exited {proc.returncode}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return out, proc.stdout, before, git_status()


def _status(out: Path) -> dict[str, dict]:
    with open(out / "status.tsv", newline="") as f:
        return {r["stage"]: r for r in csv.DictReader(f, delimiter="\t")}


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(dry_run):
    out, _, _, _ = dry_run
    status = _status(out)
    assert list(status) == STAGES
    for stage in ("env", "ceiling", "bench", "summary"):
        assert status[stage]["status"] == "ok", status[stage]
    # The GPU-only stages say why they did not run, and still ran what a CPU can run.
    for stage in ("build", "tests", "memcheck", "racecheck"):
        assert status[stage]["status"].startswith("skipped: "), status[stage]
    assert "dry run" in status["build"]["status"]
    collected = re.search(r"the (\d+) tests of -m 'cuda or triton' were collected",
                          status["tests"]["status"])
    assert collected and int(collected.group(1)) > 0, status["tests"]
    for stage in ("memcheck", "racecheck"):
        reached = re.search(r"(\d+)/(\d+) cases ok on cpu; (\d+)/(\d+) registered ops reached",
                            status[stage]["status"])
        assert reached, status[stage]
        assert reached.group(1) == reached.group(2) and reached.group(3) == reached.group(4)
        assert int(reached.group(4)) > 0
    assert status["wheels"]["status"].startswith("skipped: ")


@pytest.mark.slow
def test_dry_run_measures_every_loss_and_writes_the_summary(dry_run):
    out, stdout, _, _ = dry_run
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["loss"], r["provider"], r["N"], r["D"], r["mode"]): r for r in rows}
    for loss in ("clip", "siglip", "clip_m2mix", "robust_step"):
        for provider in ("native", "reference") + (("open_clip",) if loss in ("clip", "siglip") else ()):
            for n in ("64", "128"):
                for mode in ("forward", "backward", "full"):
                    r = by_key[(loss, provider, n, "32", mode)]
                    # Measured; on a machine too busy for the stage's deadline later cases
                    # are skipped, saying so (on a quiet one every case runs).
                    assert r["status"] == "ok" or (
                        r["status"] == "skipped" and "deadline" in r["note"]), r
    for mode in ("forward", "backward", "full"):  # the first case always runs
        assert by_key[("clip", "native", "64", "32", mode)]["status"] == "ok"
    assert {r["D"] for r in rows if r["loss"] == "clip" and r["N"] == "64"} == {"16", "32", "64"}
    # Providers that cannot run on CPU have rows that say why.
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["status"] == "skipped" and r["note"] for r in triton)
    text = (out / "summary.md").read_text()
    for heading in ("## Stages", "## Ceiling", "## Key numbers", "## Work counts",
                    "### CLIP: full (work 8 N^2 D", "### CLIP: forward (work 2 N^2 D",
                    "### CLIP: backward (work 6 N^2 D", "### SigLIP: full",
                    "### CLIP + m^2 (one fused pass): full (TFLOP/s are CLIP-equivalent",
                    "### RobustFTLoss step", "## Not measured"):
        assert heading in text, heading
    for stage in STAGES[:-1]:
        assert f"| {stage} |" in text
    assert "## Key numbers" in stdout and "DETAILS" not in stdout  # the console part


@pytest.mark.slow
def test_dry_run_output_fits_the_device_tool_and_leaves_the_checkout_clean(dry_run):
    out, _, before, after = dry_run
    names = set(os.listdir(out))
    assert names <= OUT_FILES and len(names) <= 8, names
    assert all((out / n).is_file() for n in names)
    assert {"summary.md", "status.tsv", "results.csv", "ceiling.json", "env.txt", "log.txt"} <= names
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if before is None:
        pytest.skip("not a git checkout: the checkout's cleanliness cannot be read")
    assert after == before


# --------------------------------------------------------------------------- the bench plan

def test_plan_covers_every_loss_provider_and_size():
    b = _load("gpu_bench")
    cases = b.plan_cases(toy=False)
    keys = {(c["loss"], c["provider"], c["n"], c["d"]) for c in cases}
    assert len(keys) == len(cases)
    for n in (4096, 16384, 65536):
        for loss in ("clip", "siglip", "clip_m2mix", "robust_step"):
            for provider in ("native", "triton", "reference"):
                assert (loss, provider, n, 768) in keys
        for loss in ("clip", "siglip"):
            assert (loss, "open_clip", n, 768) in keys
        assert ("clip", "inf_cl", n, 768) in keys
        assert ("siglip", "inf_cl", n, 768) not in keys
        assert ("clip_m2mix", "open_clip", n, 768) not in keys
    for d in (512, 1024):
        assert {p for (loss, p, n, dd) in keys if loss == "clip" and n == 16384 and dd == d} == \
            {"native", "triton", "open_clip", "reference", "inf_cl"}
    # By N first, so that a deadline cuts the largest sizes.
    ns = [c["n"] for c in cases if c["d"] == 768]
    assert ns == sorted(ns)


def test_predictions_scale_as_n_squared_d_and_skip_what_cannot_fit():
    b = _load("gpu_bench")
    p = b.Predictor()
    assert p.full_call_s("clip", "native", 4096, 768) is None
    p.add("clip", "native", 4096, 768, 2.0)
    p.add("clip", "native", 16384, 768, 20.0)
    t, why = p.full_call_s("clip", "native", 65536, 768)
    assert t == pytest.approx(0.020 * 16) and "N=16384" in why
    t, _ = p.full_call_s("clip", "native", 16384, 1024)
    assert t == pytest.approx(0.020 * 1024 / 768)
    gib = 2.0 ** 30
    # The reference CLIP at N = 65536 holds about 5 float32 N x N matrices: 80 GiB.
    assert b.memory_skip("clip", "reference", 65536, 139 * gib) is None
    assert "80 GiB" in b.memory_skip("clip", "reference", 65536, 79 * gib)
    assert b.memory_skip("clip", "native", 65536, 1 * gib) is None
    slow = b.calls_per_case(b.SLOW_TIMING)
    assert 0 < slow < b.calls_per_case(b.TIMING["gpu"])


# --------------------------------------------------------------------------- the summary

def test_summary_arithmetic(tmp_path):
    s = _load("gpu_summary")
    cols = ["timestamp", "device", "torch", "triton", "robustft_ext", "loss", "provider", "mode",
            "dtype", "N", "D", "ms_median", "ms_p20", "ms_p80", "peak_mb", "status", "note"]
    n, d = 16384, 768

    def row(loss, provider, mode, ms, loss_value, status="ok"):
        return dict(timestamp="t", device="GPU", torch="2", triton="3", robustft_ext="0",
                    loss=loss, provider=provider, mode=mode, dtype="bf16", N=n, D=d,
                    ms_median=ms, ms_p20=ms, ms_p80=ms, peak_mb=10.0, status=status,
                    note=f"loss={loss_value}; reps=3")
    rows = [row("clip", "native", "full", 10.0, 5.0), row("clip", "open_clip", "full", 30.0, 5.01),
            row("clip", "inf_cl", "full", 40.0, 5.0), row("clip", "reference", "full", 50.0, 5.0),
            row("clip", "native", "forward", 2.5, 5.0),
            row("clip_m2mix", "native", "full", 16.0, 9.0)]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "ceiling.json").write_text('{"ceiling_tflops": 800.0, "summary": "c"}')
    (tmp_path / "status.tsv").write_text("stage\tstatus\tseconds\tcap_s\tdetail\n"
                                         "build\tok\t90\t300\tbuilt\n")
    idx = s.Index(s.load_rows(tmp_path / "results.csv"))
    native = idx.ok[("clip", "native", n, d, "full")]
    m = s.row_metrics(native, idx, 800.0)
    assert m["tflops"] == pytest.approx(8 * n * n * d / 10e-3 / 1e12)
    assert m["pct"] == pytest.approx(100 * m["tflops"] / 800.0)
    assert m["vs_open_clip"] == pytest.approx(3.0) and m["vs_inf_cl"] == pytest.approx(4.0)
    assert m["vs_ref"] == pytest.approx(0.0) and m["x_clip"] is None
    fwd = s.row_metrics(idx.ok[("clip", "native", n, d, "forward")], idx, 800.0)
    assert fwd["tflops"] == pytest.approx(2 * n * n * d / 2.5e-3 / 1e12)
    m2 = s.row_metrics(idx.ok[("clip_m2mix", "native", n, d, "full")], idx, 800.0)
    assert m2["x_clip"] == pytest.approx(1.6) and m2["vs_open_clip"] is None
    text = s.main(["--dir", str(tmp_path)])
    assert "| build | ok | 90 | 300 | built |" in text
    assert "open_clip / fused" in text and "| CLIP | 16384 | 768 | native | 10 |" in text


# --------------------------------------------------------------------------- stage verdicts

def test_sanitizer_verdicts():
    c = _load("gpu_sanitize").classify
    cases = "RFT_SANITIZE ok clip_loss float32 N=64 D=64\nRFT_SANITIZE done: 40/40 cases ok on cuda; 14/14 registered ops reached\n"
    verdict, detail = c(cases + "========= ERROR SUMMARY: 0 errors\n", 0)
    assert verdict == "ok" and "0 errors" in detail and "14/14" in detail
    verdict, _ = c(cases + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 1 warnings)\n", 0)
    assert verdict == "ok"
    bad = ("========= Invalid __global__ write of size 4 bytes\n" + cases
           + "========= ERROR SUMMARY: 3 errors\n")
    assert c(bad, 66) == ("failed", "ERROR SUMMARY: 3 errors; 1 without a location, 2 not "
                                    "printed; first: Invalid __global__ write of size 4 bytes; "
                                    "40/40 cases ok on cuda; 14/14 registered ops reached")
    race = cases + "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    assert c(race, 66)[0] == "failed"
    # The tool could not start the program (seen under gVisor): nothing ran, so a skip.
    verdict, detail = c("========= Error: Device not supported\nRuntimeError: CUDA error 999\n", 1)
    assert verdict == "skipped" and "Device not supported" in detail
    # The program itself failed a case: a failure even without a sanitizer report.
    verdict, detail = c("RFT_SANITIZE FAIL dive_loss bfloat16 N=131 D=67: loss is nan\n", 1)
    assert verdict == "failed" and "dive_loss" in detail
    # Killed at the stage's cap: what ran so far.
    assert c("RFT_SANITIZE ok a\nRFT_SANITIZE ok b\n", 124) == ("timed out",
                                                                 "2 cases ran before the cap")


def sanitizer_record(header: str, at: str, host_frames: list[tuple[str, str]]) -> str:
    """compute-sanitizer's lines for one error: where, then its host frames (function, library)."""
    lines = [header] + [f"    {at}", "    by thread (0,0,0) in block (0,0,0)",
                        "    Saved host backtrace up to driver entry point at kernel launch time"]
    for frame, lib in host_frames:
        lines += [f"        Host Frame: {frame} [0x1234]", f"               in {lib}"]
    return "".join(f"========= {ln}\n" for ln in lines) + "=========\n"


def test_sanitizer_errors_in_torch_or_cublas_are_counted_apart_from_ours():
    c = _load("gpu_sanitize").classify
    cases = ("RFT_SANITIZE ok clip_loss float32 N=64 D=64\nRFT_SANITIZE done: 40/40 cases ok on "
             "cuda; 14/14 registered ops reached\n")
    summary = "========= ERROR SUMMARY: 1 error\n"
    ours = sanitizer_record(
        "Invalid __global__ write of size 4 bytes",
        "at void robustft::cuda_tiles::dlogits_kernel<float, float, false>(robustft::cuda_tiles:"
        ":TileOperands<float>, float *)+0x1a0 in /tmp/w/src/csrc/cuda/contrastive_device.cuh:206",
        [("robustft::launch_dlogits", "/tmp/w/src/robustft_ext/_C.cpython-312-x86_64.so")])
    verdict, detail = c(ours + cases + summary, 66)
    assert verdict == "failed", detail
    assert ("1 in robustft_ext kernels; first: Invalid __global__ write of size 4 bytes at void "
            "robustft::cuda_tiles::dlogits_kernel+0x1a0 in contrastive_device.cuh:206") in detail
    cublas = ("Invalid __global__ read of size 16 bytes",
              "at void cutlass::Kernel2<cutlass_80_tensorop_bf16_gemm>(T1::Params)+0x4d0",
              [("", "/usr/lib/libcublasLt.so.13"),
               ("at::native::addmm_out_cuda_impl", "/opt/torch/lib/libtorch_cuda.so")])
    outside = sanitizer_record(*cublas)
    verdict, detail = c(outside + cases + summary, 66)
    assert verdict == "ok" and "1 in torch/cuBLAS code that robustft_ext did not launch" in detail
    # cuBLAS launched by our op: under memcheck, most likely our arguments; racecheck's reports
    # inside kernels that are not ours fail nothing.
    launched = sanitizer_record(cublas[0], cublas[1], cublas[2] + [
        ("robustft::gemm_acc_cuda", "/tmp/w/src/robustft_ext/_C.so")])
    verdict, detail = c(launched + cases + summary, 66, "memcheck")
    assert verdict == "failed"
    assert "1 in library kernels or CUDA calls launched by robustft_ext" in detail
    race_summary = "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
    assert c(launched + cases + race_summary, 66, "racecheck")[0] == "ok"
    race_ours = ("========= Error: Race reported between Write access at void robustft::"
                 "cuda_tiles::k<float>(float*)+0x60 in /w/src/csrc/cuda/tile_epilogue.cuh:41\n"
                 "=========     and Read access at void robustft::cuda_tiles::k<float>(float*)"
                 "+0xd0 in /w/src/csrc/cuda/tile_epilogue.cuh:51 [4 hazards]\n=========\n")
    assert c(race_ours + cases + race_summary, 66, "racecheck")[0] == "failed"
    # An op no case reached fails the run even when rc 66 hides the program's exit 1.
    never = cases.replace("14/14 registered ops reached", "13/14 registered ops reached (never: "
                          "slerp_bwd)")
    assert c(outside + never + summary, 66)[0] == "failed"


def test_junit_line(tmp_path):
    s = _load("gpu_summary")
    report = tmp_path / "junit.xml"
    report.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" '
        'errors="0" skipped="1"><testcase classname="tests.test_m2mix" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_m2mix" name="test_b[cuda]"><failure message="x"/>'
        '</testcase><testcase classname="tests.test_m2mix" name="test_c[cuda]"><skipped/>'
        '</testcase><testcase classname="tests.test_triton_ops" name="test_d"/></testsuite>'
        '</testsuites>')
    assert s.junit_line(report) == ("2 passed, 1 failed, 0 errors, 1 skipped; failing: "
                                    "test_m2mix::test_b[cuda]")
    assert s.junit_line(tmp_path / "missing.xml").startswith("no test report")


def test_a_hung_case_is_killed_and_the_next_case_runs(tmp_path):
    """The bench stage's watchdog: a case past its cap gets "timeout" rows and a fresh worker
    serves the next case (here the first case's cap is far too short for its calls)."""
    b = _load("gpu_bench")
    spec = dict(loss="clip", provider="reference", n=16, d=8, dtype="fp32", device="cpu",
                modes=["full"], timing=dict(warmup=1, warmup_next=0, min_reps=1, max_reps=1,
                                            budget_s=0.0), seed=0, threads=1)
    worker = b.Worker()
    try:
        assert worker.run(spec, timeout_s=0.01) == "timeout"
    finally:
        worker.stop()
    worker = b.Worker()
    try:
        rows = worker.run(spec, timeout_s=300)
    finally:
        worker.stop()
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["mode"] == "full"
