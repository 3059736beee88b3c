"""benchmarks/gpu_check.sh: its dry run end to end on this CPU machine (so that the GPU check
cannot rot between the rare GPU loans), also with an open_clip that fails to import or hangs
and with a PATH without ninja; the test log that survives a kill, the benchmark subset it
plans, the predictions that skip absurd cases, the sanitizer verdicts and the arithmetic of
its summary."""
from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.sh"
STAGES = ["wheels", "env", "build", "ceiling", "nanfill", "memcheck", "racecheck", "tests",
          "bench", "summary"]
# What the device tool brings back from $OUT: at most 8 files, plain names, no deeper folders.
OUT_FILES = {"summary.md", "status.tsv", "results.csv", "plots.png", "ceiling.json", "env.txt",
             "tests.tsv", "log.txt"}


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

def run_dry(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, env=dict(env or os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module's tests: (its folder, its stdout, the checkout's git status
    before and after)."""
    out = tmp_path_factory.mktemp("gpu_check") / "run"
    before = git_status()
    proc = run_dry(out)
    assert proc.returncode == 0, (f"gpu_check.sh --dry-run exited {proc.returncode}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return out, proc.stdout, before, git_status()


def shadowed_open_clip(tmp_path: Path, body: str) -> dict:
    """The environment of a run in which `import open_clip` executes `body` instead."""
    (tmp_path / "shadow" / "open_clip").mkdir(parents=True)
    (tmp_path / "shadow" / "open_clip" / "__init__.py").write_text(body)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(tmp_path / "shadow") + (f":{path}" if path else ""))


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
    for stage in ("build", "nanfill", "tests", "memcheck", "racecheck"):
        assert status[stage]["status"].startswith("skipped: "), status[stage]
    assert "dry run" in status["build"]["status"]
    # The tests ran on the CPU until the dry run's deadline, each outcome in tests.tsv.
    counts = re.search(r"(\d+) passed, (\d+) failed, (\d+) errors, (\d+) skipped of (\d+) "
                       r"selected", status["tests"]["status"])
    assert counts and int(counts.group(5)) > 0, status["tests"]
    ran = sum(int(counts.group(i)) for i in range(1, 5))
    assert 0 < ran <= int(counts.group(5))
    with open(out / "tests.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows[0]["outcome"] == "collected" and rows[0]["message"] == counts.group(5)
    assert len({r["nodeid"] for r in rows[1:]}) == ran
    finite = re.search(r"(\d+)/(\d+) cases finite on cpu with every fresh tensor NaN-filled",
                       status["nanfill"]["status"])
    assert finite and finite.group(1) == finite.group(2) and int(finite.group(2)) > 0
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
    assert {"summary.md", "status.tsv", "results.csv", "ceiling.json", "env.txt", "tests.tsv",
            "log.txt"} <= names
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if before is None:
        pytest.skip("not a git checkout: the checkout's cleanliness cannot be read")
    assert after == before


@pytest.mark.slow
def test_an_open_clip_that_fails_to_import_stops_no_test_module(tmp_path):
    """The modules that need open_clip skip, saying why; every other module's tests run."""
    env = shadowed_open_clip(tmp_path, 'raise ImportError("shadowed for the test")\n')
    proc = run_dry(tmp_path / "run", "--stages", "tests", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    detail = _status(tmp_path / "run")["tests"]["status"]
    skipped = re.search(r"(\d+) modules skipped whole \((\d+) of them: could not import "
                        r"'open_clip[.a-z]*': shadowed for the test\)", detail)
    assert skipped and int(skipped.group(2)) >= 8, detail
    counts = re.search(r"(\d+) passed, 0 failed, 0 errors, (\d+) skipped of (\d+) selected",
                       detail)
    assert counts and int(counts.group(1)) + int(counts.group(2)) > 0, detail


@pytest.mark.slow
def test_a_stage_killed_at_its_cap_leaves_its_status_and_the_next_stages_run(tmp_path):
    """An open_clip whose import hangs holds the tests stage's collection until its cap kills
    it: the stage is recorded as timed out, with what it left, and the summary is written."""
    env = shadowed_open_clip(tmp_path, "import time\ntime.sleep(600)\n")
    out = tmp_path / "run"
    proc = run_dry(out, "--stages", "tests", "--budget", "35", env=env)
    assert proc.returncode != 0  # a stage timed out
    status = _status(out)
    assert status["tests"]["status"] == "timed out", status["tests"]
    assert re.fullmatch(r"killed at its \d+ s cap; 0 passed, 0 failed, 0 errors, 0 skipped; "
                        r"collection did not finish", status["tests"]["detail"]), status["tests"]
    assert int(status["tests"]["seconds"]) < 35 and status["summary"]["status"] == "ok"
    assert "| tests | timed out |" in (out / "summary.md").read_text()


def path_without(tmp_path: Path, program: str) -> str:
    """A PATH of one folder that links every program on PATH but `program`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for entry in (os.scandir(folder) if os.path.isdir(folder) else ()):
            link = bin_dir / entry.name
            if entry.name != program and not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(bin_dir)


@pytest.mark.slow
def test_ninja_and_nvcc_are_found_off_path(tmp_path):
    """ninja beside this Python (or in its package) is put on PATH when PATH has none, and a
    CUDA_HOME without nvcc gives way to the toolkit setup.py finds (/usr/local/cuda, PATH)."""
    has_ninja = any(os.access(os.path.join(d, "ninja"), os.X_OK) for d in (
        os.path.dirname(sys.executable), sysconfig.get_path("scripts")))
    if not has_ninja and importlib.util.find_spec("ninja") is None:
        pytest.skip("no ninja installed with this Python")
    path = path_without(tmp_path, "ninja")
    env = dict(os.environ, PATH=path, CUDA_HOME=str(tmp_path / "no_toolkit"))
    proc = run_dry(tmp_path / "run", "--stages", "env", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = dict(ln.split(": ", 1) for ln in (tmp_path / "run" / "env.txt").read_text()
                 .splitlines() if ": " in ln)
    assert not lines["ninja"].startswith("not found"), lines["ninja"]
    toolkit = os.path.exists("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc", path=path)
    assert lines["nvcc"].startswith("not found") != bool(toolkit), lines["nvcc"]
    assert "no_toolkit" not in lines["nvcc"]


# --------------------------------------------------------------------------- the test log

TEST_MODULES = {
    "test_runs.py": """
import os, signal
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

def test_killed_here():  # the stage's cap, as timeout's SIGKILL would
    os.kill(os.getpid(), signal.SIGKILL)

def test_never_runs():
    pass
""",
    "test_broken.py": "raise ImportError('a broken dependency')\n",
    "test_needs_missing.py": "import pytest\npytest.importorskip('no_such_module_here')\n",
}


def run_pytest_with_log(tmp_path: Path, modules: dict[str, str], *args: str) -> Path:
    """pytest over `modules` (file name -> text) with the test log on; the log's path."""
    for name, text in modules.items():
        (tmp_path / name).write_text(text)
    log = tmp_path / "tests.tsv"
    env = dict(os.environ, PYTHONPATH=str(BENCH))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "gpu_pytest_log", "--gpu-test-log", str(log), "--continue-on-collection-errors",
                    # in file order (no pytest-randomly): the kill comes after the others
                   *args, "-p", "no:randomly", str(tmp_path)], cwd=tmp_path, env=env,
                   capture_output=True, text=True, timeout=300)
    return log


def test_the_test_log_survives_a_kill_and_names_every_failure(tmp_path):
    s = _load("gpu_summary")
    log = run_pytest_with_log(tmp_path, TEST_MODULES)
    line, failing, status = s.tests_report(log)
    assert line.startswith("1 passed, 1 failed, 0 errors, 1 skipped of 5 selected; 2 not run; "
                           "1 modules could not be collected (1 of them: ImportError: a broken "
                           "dependency); 1 modules skipped whole (1 of them: could not import "
                           "'no_such_module_here'"), line
    assert line.endswith("failing: test_broken.py, test_runs.py::test_fails"), line
    assert failing == ["ERROR test_broken.py: ImportError: a broken dependency",
                       "FAILED test_runs.py::test_fails: AssertionError: one is not two"]
    assert status == 1


def test_the_deadline_stops_pytest_between_tests(tmp_path):
    s = _load("gpu_summary")
    two = {"test_two.py": "def test_a():\n    pass\n\ndef test_b():\n    pass\n"}
    log = run_pytest_with_log(tmp_path, two, "--gpu-deadline", "1")  # long past
    assert s.tests_report(log) == ("1 passed, 0 failed, 0 errors, 0 skipped of 2 selected; "
                                   "1 not run", [], 2)


def test_of_a_tests_rows_the_worst_counts(tmp_path):
    s = _load("gpu_summary")
    log = tmp_path / "tests.tsv"
    log.write_text("outcome\tnodeid\tseconds\tmessage\ncollected\t\t0\t3\n"
                   "passed\tt.py::a\t0.1\t\nerror\tt.py::a\t0.1\tteardown broke\n"
                   "xfailed\tt.py::b\t0.1\tknown\npassed\tt.py::c\t0.1\t\n")
    assert s.tests_report(log) == (
        "1 passed, 0 failed, 1 errors, 0 skipped, 1 xfailed of 3 selected; failing: t.py::a",
        ["ERROR t.py::a: teardown broke"], 1)
    assert s.tests_report(tmp_path / "missing.tsv")[2] == 3


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
