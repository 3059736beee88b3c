"""The Triton tile configurations (robustft_ext/triton_backend/configs.py): the table's shape
and invariants, and how a launch selects from it. (Whether each entry compiles for its
architecture without spills and with tensor-core instructions:
tests/tooling/test_kernel_report.py.)
"""
import pytest
import torch

from helpers import import_triton_backend

pytestmark = pytest.mark.triton
tb = import_triton_backend()
configs = tb.configs
CPU = torch.device("cpu")


def test_table_covers_every_launch():
    for arch in configs.ARCHS:
        assert set(configs.TABLE[arch]) == set(configs.DTYPE_CLASSES)
        for cls in configs.DTYPE_CLASSES:
            table = configs.TABLE[arch][cls]
            assert set(table) == set(configs.KERNELS), (arch, cls)
            for kernel, entries in table.items():
                assert set(entries) == set(configs.KERNEL_D_CLASSES[kernel]), (arch, cls, kernel)


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("cls", configs.DTYPE_CLASSES)
def test_entries_are_valid_tiles(arch, cls):
    for kernel, entries in configs.TABLE[arch][cls].items():
        for dclass, cfg in entries.items():
            what = (arch, cls, kernel, dclass, cfg)
            # tl.dot needs power-of-2 tiles of at least 16.
            for size in (cfg.block_m, cfg.block_n, cfg.block_d):
                assert size >= 16 and size & (size - 1) == 0, what
            assert cfg.num_warps in (1, 2, 4, 8) and cfg.num_stages >= 1, what
            # The register-resident backward kernels hold the whole D in one feature block.
            if kernel in ("grad_rows", "step_grad_rows", "step_grad_cols"):
                assert cfg.block_d >= {"d64": 64, "d128": 128}[dclass], what


def test_sm90_16bit_tiles_fit_wgmma():
    # wgmma works on 64-row slices, one warpgroup (4 warps) each.
    for kernel, entries in configs.TABLE[90]["16bit"].items():
        for dclass, cfg in entries.items():
            assert cfg.block_m % 64 == 0 and cfg.num_warps in (4, 8), (kernel, dclass, cfg)


def test_select_on_the_interpreter(monkeypatch):
    if not tb.interpreting():
        pytest.skip("interpreter selection")
    assert configs.select("dlogit", CPU, torch.bfloat16, 768) == configs.INTERPRETER_CONFIG
    assert configs.fused_backward("contrastive", CPU, 16)
    assert not configs.fused_backward("contrastive", CPU, 17)
    monkeypatch.setattr(configs, "interpreter_arch", 90)
    assert configs.select("dlogit", CPU, torch.bfloat16, 768) == \
        configs.TABLE[90]["16bit"]["dlogit"]["large"]
    # One-chunk entries narrow their feature block to D (a power of 2 >= 16).
    assert configs.select("grad_rows", CPU, torch.float16, 40).block_d == 64
    assert configs.select("grad_rows", CPU, torch.float16, 72).block_d == 128
    assert configs.select("grad_rows", CPU, torch.float16, 5).block_d == 16
    assert configs.fused_backward("contrastive", CPU, 128)
    assert not configs.fused_backward("contrastive", CPU, 129)
    assert configs.fused_backward("step", CPU, 64)
    assert not configs.fused_backward("step", CPU, 65)
    with pytest.raises(ValueError, match="unknown kernel"):
        configs.select("nope", CPU, torch.float16, 64)


def test_float32_follows_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert configs.dtype_class(torch.float32) == "fp32"
        assert configs.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert configs.dtype_class(torch.float32) == "tf32"
        assert configs.dot_precision(torch.float32) == "tf32"
        assert configs.dtype_class(torch.bfloat16) == "16bit"
    finally:
        torch.set_float32_matmul_precision(before)


def test_d_class():
    assert [configs.d_class(d) for d in (1, 64, 65, 128, 129, 1024)] == \
        ["d64", "d64", "d128", "d128", "large", "large"]


# ----------------------------------------------------------------------------- by device
# Compute capability and opt-in shared memory per block (bytes) of real devices.
GPUS = {
    "A100": ((8, 0), 166912),
    "RTX 4090": ((8, 9), 101376),
    "H100": ((9, 0), 232448),
    "B200": ((10, 0), 232448),
    "RTX 5090": ((12, 0), 101376),
}
CUDA0 = torch.device("cuda", 0)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PRECISIONS = ("highest", "high")  # float32: "ieee" dots, TF32


@pytest.fixture
def gpu(monkeypatch):
    """use(name, capability, shared) makes cuda:0 look like that device to the selection (no
    GPU needed: the interpreter switched off for configs, the device's properties mocked)."""
    from types import SimpleNamespace

    from robustft_ext.triton_backend import device as device_module

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def use(name, capability, shared):
        props = SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                shared_memory_per_block_optin=shared)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        device_module.cuda_limits.cache_clear()

    yield use
    device_module.cuda_limits.cache_clear()


def _every_selection(dtype):
    for kernel in configs.KERNELS:
        for dclass in configs.KERNEL_D_CLASSES[kernel]:
            D = {"d64": 64, "d128": 128, "large": 768}[dclass]
            yield kernel, dclass, configs.select(kernel, CUDA0, dtype, D)


@pytest.mark.parametrize("name", list(GPUS))
def test_selection_fits_each_devices_shared_memory(gpu, name):
    capability, shared = GPUS[name]
    gpu(name, capability, shared)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in PRECISIONS:
            torch.set_float32_matmul_precision(precision)
            for dtype in DTYPES:
                assert tb.device_unavailable_reason(CUDA0, dtype) is None, (name, dtype)
                cls = configs.dtype_class(dtype)
                for kernel, dclass, cfg in _every_selection(dtype):
                    assert cfg.shared <= shared, (name, kernel, dclass, cfg)
                    # Hopper and datacenter Blackwell take the sm_90 table (every entry fits
                    # 227 KiB); Ampere, Ada and consumer Blackwell (mma.sync) the sm_80 one.
                    arch = 90 if name in ("H100", "B200") else 80
                    assert cfg == configs.TABLE[arch][cls][kernel][dclass], (name, kernel)
    finally:
        torch.set_float32_matmul_precision(before)


def test_entries_too_large_for_a_device_fall_back_to_smaller_ones(gpu):
    # An sm_90 part with 99 KiB per block: the sm_90 entries that fit, the sm_80 ones else.
    gpu("small Hopper", (9, 0), 101376)
    for kernel, dclass, cfg in _every_selection(torch.bfloat16):
        sm90 = configs.TABLE[90]["16bit"][kernel][dclass]
        want = sm90 if sm90.shared <= 101376 else configs.TABLE[80]["16bit"][kernel][dclass]
        assert cfg == want and cfg.shared <= 101376, (kernel, dclass)
    assert tb.device_unavailable_reason(CUDA0, torch.bfloat16) is None


def test_a_device_nothing_fits_is_unavailable_with_the_numbers(gpu, monkeypatch):
    from robustft_ext import backends

    gpu("small Ampere", (8, 7), 49152)
    reason = tb.device_unavailable_reason(CUDA0, torch.bfloat16)
    assert reason is not None and "49152" in reason and "sm_87" in reason
    need = max(configs.TABLE[80]["16bit"][k][d].shared for k in configs.KERNELS
               for d in configs.KERNEL_D_CLASSES[k])
    assert str(need) in reason
    with pytest.raises(RuntimeError, match="49152"):
        configs.select("siglip_sum", CUDA0, torch.bfloat16, 64)
    # The backend choice: a request for Triton says why not; the automatic choice skips it.
    # (The native backend's reasons are not this test's: left out.)
    monkeypatch.setattr(backends, "BACKENDS", ("reference", "triton"))
    monkeypatch.setattr(backends, "AUTO_ORDER", {"cuda": ("triton", "reference")})
    assert backends.unavailable_reason("triton", CUDA0, torch.bfloat16) == reason
    with pytest.raises(backends.BackendUnavailableError, match="49152"):
        backends.select_backend("triton", CUDA0, torch.bfloat16)
    assert backends.select_backend(None, CUDA0, torch.bfloat16) == "reference"
    # fp32 "ieee" entries (at most 36 KiB) still fit.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tb.device_unavailable_reason(CUDA0, torch.float32) is None
    finally:
        torch.set_float32_matmul_precision(before)


def test_pre_ampere_devices_are_unavailable(gpu):
    gpu("Tesla T4", (7, 5), 65536)
    reason = tb.device_unavailable_reason(CUDA0, torch.float16)
    assert reason is not None and "7.5" in reason


def test_sm80_entries_fit_99_kib():
    # The sm_80 table serves sm_86, sm_89 and sm_120 (101376 bytes per block) as it is.
    for cls in configs.DTYPE_CLASSES:
        for kernel, entries in configs.TABLE[80][cls].items():
            for dclass, cfg in entries.items():
                assert 0 < cfg.shared <= 101376, (cls, kernel, dclass, cfg)
    assert all(0 < cfg.shared <= 232448 for cls in configs.DTYPE_CLASSES
               for entries in configs.TABLE[90][cls].values() for cfg in entries.values())
