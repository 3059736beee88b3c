"""setup.py's decisions: the C++ standard follows torch's headers, an nvcc that cannot build
against torch's CUDA gives a CPU-only build with a message naming both versions, and that
message reaches import time (backend reasons; a warning when a GPU is visible)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from robustft_ext import _extension, backends

ROOT = Path(__file__).resolve().parents[2]


def _setup_module():
    """setup.py as a module: under a name other than __main__ it defines and does not build."""
    spec = importlib.util.spec_from_file_location("robustft_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cxx_standard_from_aten_header():
    setup = _setup_module()
    torch_2_11 = "#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17 or later ...\n"
    torch_2_15 = "#if !defined(_MSC_VER) && __cplusplus < 202002L\n#error C++20 or later ...\n"
    assert setup.cxx_standard_required(torch_2_11) == 17
    assert setup.cxx_standard_required(torch_2_15) == 20
    assert setup.cxx_standard_required("#pragma once\n") == setup.DEFAULT_CXX_STANDARD
    # the installed torch: what its own header demands
    header = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    assert setup._torch_cxx_standard() == setup.cxx_standard_required(header.read_text())


def test_nvcc_version_and_toolkit_mismatch():
    setup = _setup_module()
    assert setup.parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == (13, 0)
    assert setup.parse_nvcc_version("no version here") is None
    assert setup.toolkit_mismatch((13, 0), "13.0", "2.11.0", "/cuda") is None
    assert setup.toolkit_mismatch((13, 2), "13.0", "2.11.0", "/cuda") is None
    older = setup.toolkit_mismatch((13, 0), "13.2", "2.15.0+cu132", "/usr/local/cuda")
    assert "nvcc 13.0 (at /usr/local/cuda) is older than CUDA 13.2" in older
    assert "torch 2.15.0+cu132" in older and "CUDA_HOME" in older
    assert "pip install -v --no-build-isolation --force-reinstall --no-deps ." in older
    newer_major = setup.toolkit_mismatch((13, 0), "12.8", "2.9.0", "/cuda")
    assert "of another major version than CUDA 12.8" in newer_major


def test_build_info_records_the_standard_and_the_cuda_decision():
    info = _extension._build_info()
    assert info, "robustft_ext/_build_info.py is missing: build the extension first"
    assert info["CXX_STANDARD"] == _setup_module()._torch_cxx_standard()
    assert isinstance(info["CUDA_REASON"], str) and info["CUDA_REASON"]
    assert info["WITH_CUDA"] == _extension.WITH_CUDA


def test_no_cuda_reason_reaches_backend_selection():
    skipped = "nvcc 13.0 (at /cuda) is older than CUDA 13.2, which torch 2.15.0 was built with"
    reason = _extension._no_cuda_reason({"CUDA_REASON": skipped, "CUDA_SKIPPED": True})
    assert reason == f"the extension was built without CUDA kernels: {skipped}"
    forced = _extension._no_cuda_reason({"CUDA_REASON": "ROBUSTFT_FORCE_CPU is set",
                                         "CUDA_SKIPPED": False})
    assert forced.endswith("ROBUSTFT_FORCE_CPU is set")
    if _extension._C is not None and not _extension.WITH_CUDA:
        assert backends.unavailable_reason("native", torch.device("cuda"), torch.float32) == \
            _extension.NO_CUDA_REASON


def test_import_warns_on_a_gpu_when_cuda_was_skipped(tmp_path: Path):
    """A build that skipped CUDA warns at import when a GPU is visible, with the build's
    reason; a CPU-only build by choice does not."""
    script = textwrap.dedent("""
        import sys, warnings, torch
        torch.cuda.is_available = lambda: True
        from robustft_ext import _extension
        info = {"TORCH_VERSION": torch.__version__, "TORCH_CUDA_VERSION": torch.version.cuda,
                "WITH_CUDA": False, "CUDA_REASON": sys.argv[1],
                "CUDA_SKIPPED": sys.argv[2] == "1"}
        _extension._build_info = lambda: info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _extension._load()
        print("|".join(str(w.message) for w in caught))
        print(_extension.NO_CUDA_REASON)
    """)
    skipped = "nvcc 13.0 (at /cuda) is older than CUDA 13.2, which torch 2.15.0 was built with"
    runs = {}
    for flag in ("1", "0"):
        done = subprocess.run([sys.executable, "-c", script, skipped, flag], capture_output=True,
                              text=True, timeout=300, env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        runs[flag] = done.stdout.splitlines()
    assert runs["1"][0] == f"robustft_ext: the extension was built without CUDA kernels: {skipped}"
    assert runs["0"][0] == ""
    assert runs["0"][1] == runs["1"][1] == f"the extension was built without CUDA kernels: {skipped}"
