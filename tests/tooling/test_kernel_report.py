"""benchmarks/kernel_report.py: what the GPU kernels would execute, shown without a GPU.

The Triton side compiles configurations of robustft_ext/triton_backend/configs.py offline for
sm_90 / sm_80 (no device needed) and must find the tensor-core instructions there; the CUDA
side reads the built extension with cuobjdump. The report runs in a subprocess: it needs
Triton's JIT kernels, which a process with TRITON_INTERPRET=1 (as the test session on CPU)
cannot have.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "kernel_report.py"
sys.path.insert(0, str(REPORT.parent))
import kernel_report  # noqa: E402


def _run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _triton_rows(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "report.json"
    proc = _run("--side", "triton", "--json", str(out), *args)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())["triton"]


def test_triton_dlogit_sm90_uses_wgmma(tmp_path):
    # The dS pass of the large-D backward, both variants (CLIP and SigLIP epilogues), bf16,
    # compiled for sm_90: wgmma in the PTX, HGMMA in the SASS, no spills; --strict passes.
    proc, rows = _triton_rows(tmp_path, "--arch", "90", "--dtype", "bf16", "--kernel",
                              "dlogit", "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert {r["variant"] for r in rows} == {"clip", "siglip"}
    assert {r["D"] for r in rows} == {768, 200}
    for r in rows:
        assert "error" not in r, r
        assert r["arch"] == 90 and r["dtype"] == "bf16"
        assert r["ptx_wgmma"] > 0 and r["sass_hgmma"] > 0, r
        assert r["ptx_mma"] == 0 and r["sass_hmma"] == 0, r
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["config"]["block_m"] % 64 == 0 and r["registers"] <= 255
        assert r["shared"] > 0 and r["flags"] == ""
    assert "dlogit" in proc.stdout and "none flagged" in proc.stdout


def test_triton_unaligned_d_launches_the_hinted_kernel(tmp_path):
    # D = 60 is launched padded to 64 columns (configs.aligned_dim), so D and the strides
    # keep the divisibility hint: the same code as D = 64, without the 624 bytes of spills
    # the unhinted kernel had; --strict passes.
    proc, rows = _triton_rows(tmp_path, "--arch", "90", "--dtype", "bf16", "--kernel",
                              "step_grad_rows", "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    by_d = {r["D"]: r for r in rows}
    assert set(by_d) == {64, 60}
    assert by_d[60]["launch_D"] == 64 and by_d[60]["hinted"]
    assert by_d[60]["spill_stores"] == by_d[60]["spill_loads"] == 0
    assert by_d[60]["registers"] == by_d[64]["registers"]
    assert "60 (64)" in proc.stdout


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=1200, env=env, cwd=ROOT / "benchmarks")


def test_triton_report_flags_the_unhinted_launch_and_unrecorded_shared_memory():
    # What --strict would say if the host stopped padding D (the launch of D = 60 unhinted:
    # the step kernel spills) or an entry needed more shared memory than configs records
    # (the selection by device would let it launch where it does not fit).
    proc = _run_python("""
import json, kernel_report
from robustft_ext.triton_backend import configs
aligned_dim, configs.aligned_dim = configs.aligned_dim, lambda size: size
unhinted = kernel_report._compile_one(("step_grad_rows", "all_terms", 90, "bf16", 60))
configs.aligned_dim = aligned_dim
entry = configs.TABLE[90]["16bit"]["dlogit"]
entry["large"] = entry["large"]._replace(shared=1024)
unrecorded = kernel_report._compile_one(("dlogit", "clip", 90, "bf16", 768))
print(json.dumps([unhinted, unrecorded], default=str))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    unhinted, unrecorded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not unhinted["hinted"] and unhinted["launch_D"] == 60
    assert "SPILL" in unhinted["flags"] and unhinted["failing"], unhinted
    assert unrecorded["flags"] == "SMEM" and unrecorded["failing"], unrecorded


def test_triton_grad_rows_sm80_uses_mma_sync(tmp_path):
    # The register-resident backward compiled for sm_80: mma.sync / HMMA, no wgmma.
    proc, rows = _triton_rows(tmp_path, "--arch", "80", "--dtype", "fp16", "--kernel",
                              "grad_rows")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert {r["D"] for r in rows} == {64, 60, 128, 67}
    for r in rows:
        assert r["ptx_mma"] > 0 and r["sass_hmma"] > 0 and r["ptx_wgmma"] == 0, r
        assert r["spill_stores"] == 0, r


def test_fp32_ieee_kernels_pass_strict_without_tensor_cores(tmp_path):
    # float32 "ieee" kernels run on the FMA units by design: reported, not flagged.
    proc, rows = _triton_rows(tmp_path, "--arch", "90", "--dtype", "fp32", "--kernel",
                              "dlogit", "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for r in rows:
        assert r["ptx_wgmma"] == 0 and r["sass_ffma"] > 0 and r["flags"] == "", r


def _cuda_report(tmp_path) -> dict | None:
    """The CUDA side's report of a build of the extension with device code
    ($ROBUSTFT_CUDA_SO, robustft_ext/_C*.so or build/**/_C*.so), or None without one."""
    candidates = [os.environ.get("ROBUSTFT_CUDA_SO")] + sorted(
        glob.glob(str(ROOT / "robustft_ext" / "_C*.so"))
        + glob.glob(str(ROOT / "build" / "**" / "_C*.so"), recursive=True))
    out = tmp_path / "cuda.json"
    for so in filter(None, candidates):
        proc = _run("--side", "cuda", "--so", so, "--json", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(out.read_text())["cuda"]
        if report["skipped"] is None:
            return report
    return None


def test_cuda_side_needs_device_code():
    # A CPU-only build has nothing to examine: said so, and --strict fails on it.
    so = sorted(glob.glob(str(ROOT / "robustft_ext" / "_C*.so")))
    if not so:
        pytest.skip("the extension is not built")
    build_info = ROOT / "robustft_ext" / "_build_info.py"
    if build_info.exists() and "WITH_CUDA = True" in build_info.read_text():
        # The build beside it says CUDA: no need for a minute of cuobjdump to learn that.
        pytest.skip("robustft_ext/_C*.so is a CUDA build (test_cuda_side_reads_kernels)")
    proc = _run("--side", "cuda", "--so", so[0], "--strict")
    if "no device code" not in proc.stdout:
        pytest.skip("robustft_ext/_C*.so is a CUDA build (test_cuda_side_reads_kernels)")
    assert proc.returncode == 1
    assert "CPU-only build" in proc.stdout


@pytest.mark.slow
def test_cuda_side_reads_kernels(tmp_path):
    # (cuobjdump --dump-sass of the whole extension: about a minute.)
    report = _cuda_report(tmp_path)
    if report is None:
        pytest.skip("no CUDA build of the extension (set ROBUSTFT_CUDA_SO or build with "
                    "CUDA_HOME=/usr/local/cuda)")
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    sixteen = [r for r in rows if r["sixteen_bit"]]
    assert sixteen and all(r["registers"] > 0 for r in rows)
    # Each 16-bit tile kernel either does tensor-core work or is flagged for not doing it,
    # and every kernel's shared memory fits the tile plan.
    for r in sixteen:
        tile = any(f"{name}<" in r["kernel"] for name in kernel_report.FAMILIES)
        assert r["tensor_core"] or "NO-TC" in r["flags"] or not tile, r
    assert not [r for r in rows if "SMEM" in r["flags"]]
    assert any("clip_lse_kernel" in r["kernel"] for r in rows)


@pytest.mark.parametrize("kernel,shared,problem", [
    # the large contrastive shape on sm_90: 96 KB dynamic + 7 KB static fits 227 KB
    ("void clip_lse_kernel<MmaEngine<MmaShape<128, 128, 2, 4, 3, 1>, Bf16Mma>, BFloat16, true>",
     7168, None),
    # static shared memory grown past the contrastive family's budget
    ("void clip_lse_kernel<MmaEngine<MmaShape<128, 128, 2, 4, 3, 1>, Bf16Mma>, BFloat16, true>",
     9216, "budget"),
    # the small step shape (64 KB dynamic with every term) plus 40 KB static: over 99 KB
    ("void step_lse_kernel<MmaEngine<MmaShape<64, 64, 2, 2, 2, 1>, Bf16Mma>, BFloat16, true, "
     "true, true>", 40960, "budget"),
    ("void step_lse_kernel<MmaEngine<MmaShape<64, 64, 2, 2, 2, 1>, Bf16Mma>, BFloat16, true, "
     "true, true>", 3072, None),
    # a row pass: static memory only
    ("void mix_rows_kernel<BFloat16, BFloat16>", 1024, None),
])
def test_cuda_shared_memory_against_the_tile_plan(kernel, shared, problem):
    plan = kernel_report._tile_plan()
    if plan is None:
        pytest.skip("the extension has no native CUDA tile plan (a CPU-only build)")
    row = {"shared": shared, "arch": "sm_90", "kernel": kernel}
    found = kernel_report._shared_memory_problem(row, kernel, plan)
    assert (found is None) == (problem is None), found
    if problem is not None:
        assert problem in found


def test_cuda_plan_over_a_small_devices_shared_memory_is_flagged():
    """A small shape whose dynamic memory alone exceeds 99 KB (as three stages of the step's
    128 x 64 tiles would) is flagged, whatever its static memory."""
    plan = kernel_report._tile_plan()
    if plan is None:
        pytest.skip("the extension has no native CUDA tile plan (a CPU-only build)")
    plan = {**plan, "families": {**plan["families"]}}
    plan["families"]["step"] = {**plan["families"]["step"],
                                "small": {"bm": 128, "bn": 64, "stages": 3}}
    kernel = ("void step_lse_kernel<MmaEngine<MmaShape<128, 64, 4, 2, 3, 1>, Bf16Mma>, BFloat16, "
              "true, true, true>")
    found = kernel_report._shared_memory_problem({"shared": 4096, "arch": "sm_90"}, kernel, plan)
    assert found is not None and "101376" in found


@pytest.mark.slow
def test_triton_table_sm90_16bit_strict(tmp_path):
    # Every 16-bit configuration of the sm_90 table: tensor cores and no spills.
    proc, rows = _triton_rows(tmp_path, "--arch", "90", "--dtype", "bf16", "fp16", "--strict",
                              "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-6000:]
    row_kernels = ("pair_dots", "slerp_mix", "slerp_bwd")  # (no tile products)
    assert all(r["ptx_wgmma"] > 0 for r in rows if r["kernel"] not in row_kernels)
