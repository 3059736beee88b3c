"""The Triton tile configurations (robustft_ext/triton_backend/configs.py): the table's shape
and invariants, and how a launch selects from it. (Whether each entry compiles for its
architecture without spills and with tensor-core instructions: tests/test_kernel_report.py.)
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
