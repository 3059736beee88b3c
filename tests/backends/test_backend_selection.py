"""Backend selection: argument, environment variable, automatic order, stated reasons."""
from __future__ import annotations

import pytest
import torch

import robustft_ext as rft
from robustft_ext import backends
from helpers import features


def test_available_backends_reports_every_backend():
    report = rft.available_backends()
    assert set(report) == {"reference", "native", "triton"}
    assert report["reference"]["cpu"] is None and report["reference"]["available"]
    assert report["native"]["cpu"] is None, report["native"]
    for entry in report.values():
        assert set(entry) == {"cpu", "cuda", "available"}
        for key in ("cpu", "cuda"):
            assert entry[key] is None or isinstance(entry[key], str) and entry[key]
    if not torch.cuda.is_available():
        assert "no CUDA device visible" in report["native"]["cuda"]


def test_automatic_cpu_prefers_native():
    assert backends.select_backend(None, torch.device("cpu"), torch.float32) == "native"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select_backend(None, torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.select_backend(None, torch.device("cpu"), torch.float32)


def test_explicit_backend_that_cannot_serve_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(rft.BackendUnavailableError, match="CPU tensors only under TRITON_INTERPRET"):
        backends.select_backend("triton", torch.device("cpu"), torch.float32)
    with pytest.raises(rft.BackendUnavailableError, match="not torch.float64"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backends.select_backend("triton", torch.device("cpu"), torch.float64)


def test_native_missing_is_explained_and_auto_falls_through(monkeypatch):
    from robustft_ext import _extension

    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "not built (test)")
    assert backends.unavailable_reason("native", torch.device("cpu"), torch.float32) == "not built (test)"
    assert backends.select_backend(None, torch.device("cpu"), torch.float32) == "reference"
    a = features(3, 4)
    with pytest.raises(rft.BackendUnavailableError, match="native: not built"):
        rft.clip_loss(a, a, 1.0, backend="native")


def test_cuda_unavailable_in_cpu_only_build(monkeypatch):
    from robustft_ext import _extension

    monkeypatch.setattr(_extension, "WITH_CUDA", False)
    reason = backends.unavailable_reason("native", torch.device("cuda"), torch.float32)
    assert "without CUDA kernels" in reason


def test_version_mismatch_message():
    from robustft_ext import _extension

    info = {"TORCH_VERSION": "0.0.1", "TORCH_CUDA_VERSION": None, "WITH_CUDA": False}
    assert "built against torch 0.0.1" in _extension._mismatch(info)
    info = {"TORCH_VERSION": torch.__version__, "TORCH_CUDA_VERSION": "9.9", "WITH_CUDA": True}
    msg = _extension._mismatch(info)
    assert "built for CUDA 9.9" in msg and "rebuild" in msg


def test_cuda_kernels_were_built_when_they_could_be():
    """With nvcc and a CUDA build of torch present, the install must have compiled the CUDA
    kernels (a silent CPU-only fallback would hide a compile error)."""
    import os
    import re
    import shutil
    import subprocess

    from robustft_ext import _extension

    info = _extension._build_info()
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    forced_cpu = info.get("CUDA_REASON") == "ROBUSTFT_FORCE_CPU is set"
    if torch.version.cuda is None or not nvcc or forced_cpu:
        pytest.skip(f"CUDA kernels not expected here (torch CUDA {torch.version.cuda}, "
                    f"nvcc {'found' if nvcc else 'missing'}, forced CPU: {forced_cpu})")
    if info.get("CUDA_SKIPPED"):  # only for a toolkit that cannot build against this torch
        nvcc_path = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        release = subprocess.run([nvcc_path, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"release (\d+)\.(\d+)", release)
        have = (int(found.group(1)), int(found.group(2)))
        built = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
        assert have < built or have[0] != built[0], info
        pytest.skip(f"nvcc {have} cannot build against torch's CUDA {torch.version.cuda}: "
                    "CPU kernels only, as the build said")
    assert info.get("WITH_CUDA") is True, info
    assert _extension.WITH_CUDA


def test_available_backends_reads_plainly():
    report = rft.available_backends()
    assert isinstance(report, dict) and isinstance(report, rft.BackendReport)
    lines = str(report).splitlines()
    assert [line.split(":")[0] for line in lines] == list(report)
    for line, (name, entry) in zip(lines, report.items()):
        for device in ("cpu", "cuda"):
            expected = f"{device} ok" if entry[device] is None else f"{device}: {entry[device]}"
            assert expected in line
    assert lines[0] == "reference: cpu ok; cuda: no CUDA device visible" or \
        torch.cuda.is_available()
    assert lines[1].startswith("native: cpu ok; cuda: ")
    fake = rft.BackendReport(native={"cpu": None, "cuda": "no CUDA device visible",
                                     "available": True})
    assert str(fake) == "native: cpu ok; cuda: no CUDA device visible"


# ---- The native CUDA kernels on GPUs this machine does not have -------------------------
# (compute capability, opt-in shared memory per block in bytes, the tile configurations of
# csrc/cuda/tile_plan.h: contrastive, step)
GPUS = {
    "A100": ((8, 0), 166912, ("large", "large")),
    "RTX 4090": ((8, 9), 101376, ("small", "small")),
    "H100": ((9, 0), 232448, ("large", "large")),
    "B200": ((10, 0), 232448, ("large", "large")),
    "RTX 5090": ((12, 0), 101376, ("small", "small")),
}


def _mock_gpu(monkeypatch, name: str, optin: int | None = None, archs: str = "8.0;9.0+PTX"):
    """torch sees one CUDA device with `name`'s figures, and the extension has CUDA kernels
    built for `archs`."""
    from types import SimpleNamespace

    from robustft_ext import _extension

    (major, minor), default_optin, _ = GPUS.get(name, ((8, 7), 65536, None))
    props = SimpleNamespace(name=f"NVIDIA {name}", major=major, minor=minor,
                            shared_memory_per_block_optin=optin or default_optin,
                            multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(_extension, "WITH_CUDA", True)
    monkeypatch.setattr(_extension, "CUDA_ARCH_LIST", archs)


def _require_cuda_build():
    from robustft_ext import _extension

    if _extension._C is None or not _extension._build_info().get("WITH_CUDA"):
        pytest.skip("a CPU-only build has no native CUDA kernels to plan")


@pytest.mark.parametrize("name", GPUS)
def test_native_tile_configuration_follows_the_shared_memory(name):
    """The configuration each GPU's kernels launch with, from its opt-in shared memory."""
    _require_cuda_build()
    _, optin, tiles = GPUS[name]
    contrastive, step, need = torch.ops.robustft_ext.native_cuda_tiles(optin)
    assert (contrastive, step) == tiles
    assert need <= 101376  # the small configurations fit the 99 KB GPUs


@pytest.mark.parametrize("name", GPUS)
def test_native_serves_every_current_gpu(monkeypatch, name):
    """The default build's sm_80 and sm_90 code and its compute_90 PTX reach every GPU above."""
    _require_cuda_build()
    _mock_gpu(monkeypatch, name)
    assert backends.unavailable_reason("native", torch.device("cuda"), torch.bfloat16) is None


@pytest.mark.parametrize("name", ["B200", "RTX 5090"])
def test_native_without_ptx_says_which_architecture_to_build(monkeypatch, name):
    _require_cuda_build()
    _mock_gpu(monkeypatch, name, archs="8.0;9.0")
    reason = backends.unavailable_reason("native", torch.device("cuda"), torch.bfloat16)
    major, minor = GPUS[name][0]
    assert reason is not None and f'TORCH_CUDA_ARCH_LIST="{major}.{minor}"' in reason


def test_native_with_too_little_shared_memory_is_skipped_with_the_numbers(monkeypatch):
    """A device offering 64 KB a block: the native kernels cannot launch; automatic selection
    passes them over, and naming them says why in bytes."""
    _require_cuda_build()
    _mock_gpu(monkeypatch, "a small GPU", optin=65536)
    reason = backends.unavailable_reason("native", torch.device("cuda"), torch.bfloat16)
    _, _, need = torch.ops.robustft_ext.native_cuda_tiles(65536)
    assert reason is not None and str(need) in reason and "65536" in reason
    assert backends.select_backend(None, torch.device("cuda"), torch.bfloat16) != "native"
    with pytest.raises(backends.BackendUnavailableError, match="shared memory"):
        backends.select_backend("native", torch.device("cuda"), torch.bfloat16)
