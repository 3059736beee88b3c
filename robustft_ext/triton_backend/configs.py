"""Tile configurations of the Triton kernels, per GPU architecture, dtype and feature dimension.

One table, TABLE[arch][dtype class][kernel][D class], holds every configuration a launch can
get; `select` picks from it and `fused_backward` says which backward design a problem gets.
benchmarks/kernel_report.py compiles every entry offline (no GPU needed) and prints its
registers, spills, shared memory and tensor-core instruction counts; docs/backends.md
tabulates them. Each entry records the shared memory its compile allocates, and a device
takes, per entry, the first table of `table_archs(its capability)` whose entry fits its
opt-in shared memory per block (`device_config`); where none fits, the backend is
unavailable there and says why (`device_unavailable_reason`).

Keys:
  arch          90 (written for Hopper's wgmma and 227 KiB of shared memory) or 80 (for
                mma.sync and the 99 KiB per block of sm_86 / sm_89 / sm_120).
  dtype class   "16bit" (bfloat16 / float16: tensor cores, wgmma on sm_90, mma.sync on sm_80),
                "fp32" (float32 with torch.get_float32_matmul_precision() == "highest": true
                fp32 "ieee" products on the FMA units) or "tf32" (float32 otherwise: TF32
                tensor cores, as torch's own matmuls then do).
  D class       "d64" (D <= 64), "d128" (64 < D <= 128), "large" (D > 128).
  kernel        clip_lse, siglip_sum (forward statistics), grad_rows (the register-resident
                contrastive backward, small D), dlogit (the dS pass of the large-D contrastive
                backward), step_fwd, step_grad_rows, step_grad_cols (the register-resident
                step backward, D <= 64), step_dlogit (the dS pass of the large-D step
                backward), gram_lse (the Gram formulation's forward over the triangle of
                tiles; square tiles, BLOCK_M == BLOCK_N), gram_strip (its backward strips,
                where the step's backward takes the dS workspace: D > 64).

How the sizes were chosen (the numbers behind them: docs/backends.md, "Tile configurations"):
  * 16-bit on sm_90: BLOCK_M a multiple of 64 with 4 warps per 64 rows (one warpgroup per
    wgmma m64 slice), BLOCK_K = 64 (one 128-byte swizzled row of bfloat16) and 3 stages of
    (BLOCK_M + BLOCK_N) x 64 x 2 bytes in shared memory. The GEMM-like passes (the forward
    statistics and the dS pass at large D) use 128 x 128 tiles with 8 warps, the step kernels
    (three logit tiles at once) 128 x 64 or 64-row tiles. The register-resident backward keeps
    [BLOCK_M, D] accumulators, so its tiles shrink with D. The Gram kernels hold four Gram
    blocks of a tile pair at once (one 2 BLOCK_M x 2 BLOCK_N product of [I; T] slabs), hence
    64 x 64 tiles forward and 64 x 32 in the backward strips, whose epilogue (both
    orientations' dlogits, S and the column sums u) needs the most registers.
  * 16-bit on sm_80 (mma.sync m16n8k16, fragments in registers): BLOCK_K = 32, at most
    97 KiB of shared memory (within the 99 KiB per block of sm_86 / sm_89), and smaller
    tiles for the register-bound kernels.
  * tf32: fp32 operands take twice the shared memory and registers: smaller tiles and chunks.
  * fp32 ("ieee"): FMA-unit dots with their operands in registers: 8 warps, 16-wide chunks.
  Each entry is the largest candidate that compiles for its arch without register spills and
  within the shared memory (benchmarks/kernel_report.py --strict checks the whole table); none
  is timed yet (no GPU was available).

Under TRITON_INTERPRET=1 (CPU) every kernel uses 16 x 16 x 16 tiles, so that the small test
problems still cover masking, several feature chunks and several programs; setting
`interpreter_arch` to 80 or 90 makes the interpreter use that architecture's table instead
(the tests do, to run the GPU tile shapes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import contrastive_kernels
from .device import DeviceLimits, device_limits


class Config(NamedTuple):
    """Launch parameters of one kernel."""

    block_m: int      # rows per tile (programs own BLOCK_M rows)
    block_n: int      # columns per tile
    block_d: int      # feature chunk of the tile products (>= D: one chunk, kept in registers)
    num_warps: int
    num_stages: int   # software-pipelining depth of the feature / column loops
    shared: int = 0   # shared memory per block in bytes (TABLE: as compiled; see device_config)


KERNELS = ("clip_lse", "siglip_sum", "grad_rows", "dlogit",
           "step_fwd", "step_grad_rows", "step_grad_cols", "step_dlogit",
           "gram_lse", "gram_strip")
ARCHS = (90, 80)
DTYPE_CLASSES = ("16bit", "tf32", "fp32")
D_CLASSES = ("d64", "d128", "large")

# The register-resident (fused) backward serves D up to these; above, the dS workspace
# pass and library GEMMs do (see fused_backward).
FUSED_BWD_MAX_D = {"contrastive": 128, "step": 64}
INTERPRETER_FUSED_BWD_MAX_D = 16

# Which D classes each kernel serves (the others never launch it).
KERNEL_D_CLASSES = {
    "clip_lse": D_CLASSES, "siglip_sum": D_CLASSES, "step_fwd": D_CLASSES,
    "grad_rows": ("d64", "d128"), "dlogit": ("large",),
    "step_grad_rows": ("d64",), "step_grad_cols": ("d64",), "step_dlogit": ("d128", "large"),
    "gram_lse": D_CLASSES, "gram_strip": ("d128", "large"),
}


C = Config

# The last field of each entry is its shared memory per block in bytes, as
# benchmarks/kernel_report.py measured it (the largest over the kernel's variants and, 16-bit,
# over bfloat16 / float16): what a device must allow for the entry to launch (device_config).

# 16-bit inputs on sm_90 (wgmma). Register-bound kernels (the step's three logit tiles and
# accumulators) take 64-row tiles.
_SM90_16BIT = {
    "clip_lse": {"d64": C(128, 128, 64, 8, 3, 65536), "d128": C(128, 64, 128, 8, 3, 81920),
                 "large": C(128, 128, 64, 8, 3, 98304)},
    "siglip_sum": {"d64": C(128, 128, 64, 8, 3, 65536),
                   "d128": C(128, 64, 128, 8, 3, 81920),
                   "large": C(128, 128, 64, 8, 3, 98304)},
    "grad_rows": {"d64": C(128, 64, 64, 8, 3, 41472), "d128": C(64, 64, 128, 4, 3, 66048)},
    "dlogit": {"large": C(128, 128, 64, 8, 3, 98304)},
    "step_fwd": {"d64": C(64, 64, 64, 4, 3, 73728), "d128": C(64, 64, 128, 8, 3, 151552),
                 "large": C(128, 64, 64, 8, 3, 147456)},
    "step_grad_rows": {"d64": C(64, 32, 64, 4, 3, 61440)},
    "step_grad_cols": {"d64": C(64, 64, 64, 4, 3, 67072)},
    "step_dlogit": {"d128": C(128, 64, 64, 8, 3, 147456),
                    "large": C(128, 64, 64, 8, 3, 147456)},
    "gram_lse": {d: C(64, 64, 64, 8, 3, 98304) for d in D_CLASSES},
    "gram_strip": {d: C(64, 32, 64, 8, 3, 73728) for d in ("d128", "large")},
}

# 16-bit inputs on sm_80 - sm_89 (mma.sync m16n8k16): 32-wide feature chunks and at most
# 97 KiB of shared memory, so that the same entries fit sm_86 / sm_89 (99 KiB per block). The
# mma.sync fragments live in registers, so the register-bound kernels take smaller tiles
# than on sm_90.
_SM80_16BIT = {
    "clip_lse": {"d64": C(128, 128, 64, 8, 2, 34816), "d128": C(64, 64, 128, 4, 3, 49664),
                 "large": C(128, 128, 32, 8, 2, 16384)},
    "siglip_sum": {"d64": C(128, 128, 64, 8, 3, 51200),
                   "d128": C(128, 64, 128, 8, 2, 50176),
                   "large": C(128, 128, 32, 8, 4, 49152)},
    "grad_rows": {"d64": C(128, 64, 64, 8, 3, 32768), "d128": C(64, 64, 128, 8, 2, 37120)},
    "dlogit": {"large": C(128, 128, 32, 8, 4, 49152)},
    "step_fwd": {"d64": C(64, 64, 64, 4, 2, 32768), "d128": C(32, 64, 128, 4, 2, 49152),
                 "large": C(128, 64, 32, 8, 3, 49152)},
    "step_grad_rows": {"d64": C(32, 64, 64, 4, 2, 26880)},
    "step_grad_cols": {"d64": C(32, 64, 64, 4, 2, 27392)},
    "step_dlogit": {"d128": C(128, 64, 32, 8, 3, 49152),
                    "large": C(128, 64, 32, 8, 3, 49152)},
    "gram_lse": {d: C(32, 32, 64, 4, 3, 32768) for d in D_CLASSES},
    "gram_strip": {d: C(64, 32, 32, 8, 3, 24576) for d in ("d128", "large")},
}

# float32 on TF32 tensor cores: fp32 operands take twice the shared memory and (sm_80)
# twice the fragment registers of 16-bit ones, so smaller tiles and feature chunks.
_SM90_TF32 = {
    "clip_lse": {"d64": C(128, 128, 64, 8, 2, 98304), "d128": C(128, 64, 128, 8, 3, 163840),
                 "large": C(128, 128, 32, 8, 3, 98304)},
    "siglip_sum": {"d64": C(128, 128, 64, 8, 3, 131072),
                   "d128": C(128, 64, 128, 8, 3, 163840),
                   "large": C(128, 128, 32, 8, 3, 98304)},
    "grad_rows": {"d64": C(128, 64, 64, 8, 3, 66048), "d128": C(64, 64, 128, 4, 2, 98560)},
    "dlogit": {"large": C(128, 128, 32, 8, 3, 98304)},
    "step_fwd": {"d64": C(64, 64, 64, 8, 3, 114688), "d128": C(16, 32, 128, 4, 3, 65536),
                 "large": C(128, 64, 32, 8, 3, 147456)},
    "step_grad_rows": {"d64": C(32, 32, 64, 4, 3, 53248)},
    "step_grad_cols": {"d64": C(64, 32, 64, 4, 3, 66304)},
    "step_dlogit": {"d128": C(128, 64, 32, 8, 3, 147456),
                    "large": C(128, 64, 32, 8, 3, 147456)},
    "gram_lse": {d: C(64, 64, 32, 8, 3, 98304) for d in D_CLASSES},
    "gram_strip": {d: C(64, 32, 32, 8, 3, 73728) for d in ("d128", "large")},
}

_SM80_TF32 = {
    "clip_lse": {"d64": C(64, 32, 64, 4, 3, 33280), "d128": C(64, 64, 128, 4, 2, 66048),
                 "large": C(128, 64, 16, 8, 4, 36864)},
    "siglip_sum": {"d64": C(128, 128, 64, 8, 2, 67584),
                   "d128": C(128, 64, 128, 8, 2, 99328),
                   "large": C(128, 128, 16, 8, 4, 49152)},
    "grad_rows": {"d64": C(64, 32, 64, 4, 3, 33024), "d128": C(64, 64, 128, 8, 2, 82176)},
    "dlogit": {"large": C(128, 128, 16, 8, 4, 49152)},
    "step_fwd": {"d64": C(64, 32, 64, 4, 2, 49152), "d128": C(16, 32, 128, 4, 2, 49152),
                 "large": C(64, 32, 16, 4, 3, 24576)},
    "step_grad_rows": {"d64": C(16, 32, 64, 4, 2, 32896)},
    "step_grad_cols": {"d64": C(16, 32, 64, 4, 2, 33152)},
    "step_dlogit": {"d128": C(64, 32, 16, 4, 3, 24576), "large": C(64, 32, 16, 4, 3, 24576)},
    "gram_lse": {d: C(32, 32, 32, 4, 3, 32768) for d in D_CLASSES},
    "gram_strip": {d: C(32, 64, 16, 4, 3, 24576) for d in ("d128", "large")},
}

# float32 "ieee" dots run on the FMA units with their operands in registers: 8 warps, and the
# forward / dS passes loop over D in 16-wide chunks (no resident row tile); the step kernels
# (three tiles) take 32 x 32 tiles. (The same entries and shared memory on both
# architectures.)
_FP32_IEEE = {
    "clip_lse": {d: C(128, 64, 16, 8, 3, 24576) for d in D_CLASSES},
    "siglip_sum": {d: C(32, 32, 16, 8, 2, 4096) for d in D_CLASSES},
    "grad_rows": {"d64": C(32, 32, 64, 4, 2, 20608), "d128": C(32, 32, 128, 4, 2, 36992)},
    "dlogit": {"large": C(32, 32, 16, 8, 2, 4096)},
    "step_fwd": {d: C(32, 32, 16, 8, 2, 8192) for d in D_CLASSES},
    "step_grad_rows": {"d64": C(16, 32, 64, 8, 2, 30848)},
    "step_grad_cols": {"d64": C(16, 32, 64, 8, 2, 31104)},
    "step_dlogit": {"d128": C(32, 32, 16, 8, 2, 8192), "large": C(32, 32, 16, 8, 2, 8192)},
    "gram_lse": {d: C(32, 32, 16, 8, 2, 8192) for d in D_CLASSES},
    "gram_strip": {d: C(32, 32, 16, 8, 2, 8192) for d in ("d128", "large")},
}

TABLE: dict[int, dict[str, dict[str, dict[str, Config]]]] = {
    90: {"16bit": _SM90_16BIT, "tf32": _SM90_TF32, "fp32": _FP32_IEEE},
    80: {"16bit": _SM80_16BIT, "tf32": _SM80_TF32, "fp32": _FP32_IEEE},
}

INTERPRETER_CONFIG = Config(16, 16, 16, 1, 1)

# Under the interpreter: None (16-wide tiles) or 80 / 90 (that architecture's table).
interpreter_arch: int | None = None

# The row-wise kernels of the slerp (slerp_kernels.py): one program per BLOCK_M rows, looping
# over D in BLOCK_D chunks with float64 arithmetic; no tile products, so one configuration
# serves every architecture and dtype.
ROW_KERNELS = ("pair_dots", "slerp_mix", "slerp_bwd")
ROW_CONFIG = Config(16, 16, 64, 4, 1, 128)

# The feature dimension and every row stride of a launch are multiples of this (aligned_dim).
ALIGN = 16

# The Triton tables are written for tensor-core MMA (mma.sync from sm_80, wgmma on sm_90).
MIN_CAPABILITY = (8, 0)

# The limits assumed where a device cannot be asked (tracing with fake CUDA tensors and no
# GPU: nothing launches): an H100's.
TRACING_LIMITS = DeviceLimits("no device (tracing)", (9, 0), 232448)


# ----------------------------------------------------------------------------- selection
def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 was set
    before triton was imported, so @triton.jit made interpreted functions, not JIT ones."""
    return not isinstance(contrastive_kernels.clip_lse_kernel, triton.runtime.jit.JITFunction)


def aligned_dim(size: int) -> int:
    """size rounded up to a multiple of ALIGN: the feature dimension the kernels are launched
    with (the op bodies pad the features with zero columns, which change no dot product, and
    cut the gradients back to D), and the row stride of the dS workspace's blocks. Why:
    Triton specialises an integer argument that is a multiple of 16 ("tt.divisibility");
    without that hint on D and the row strides the masked loads and stores do not vectorise,
    and the step kernels sit at 255 registers and spill (benchmarks/kernel_report.py compiles
    the kernels as launched; tests/backends/triton/test_triton_launch.py checks every launch's
    arguments)."""
    return -(-size // ALIGN) * ALIGN


def d_class(D: int) -> str:
    """The feature-dimension class of D: "d64", "d128" or "large"."""
    return "d64" if D <= 64 else ("d128" if D <= 128 else "large")


def dtype_class(dtype: torch.dtype) -> str:
    """The dtype class of the inputs: "16bit", "tf32" or "fp32" (float32 follows
    torch.get_float32_matmul_precision(), as torch's matmuls do)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of this dtype ("ieee" or "tf32"; 16-bit dots
    ignore it)."""
    return "ieee" if dtype_class(dtype) == "fp32" else "tf32"


def table_archs(capability: tuple[int, int]) -> tuple[int, ...]:
    """The tables a device of this compute capability may take, preferred first. sm_90 to
    sm_11x (Hopper, datacenter Blackwell: large shared memory, warpgroup MMA): the sm_90
    table, then the sm_80 one for the entries that do not fit. sm_80 to sm_89 and sm_12x
    (consumer Blackwell runs mma.sync, as Ampere and Ada, with 99 KiB per block): the sm_80
    table only, whose register-bound tiles were sized for mma.sync fragments."""
    return (90, 80) if 9 <= capability[0] < 12 else (80,)


def device_config(kernel: str, limits: DeviceLimits, cls: str, dclass: str) -> Config | None:
    """The first entry for (kernel, dtype class, D class) in the tables of table_archs whose
    shared memory fits the device (its opt-in maximum per block), or None: a launch needing
    more would fail with OutOfResources."""
    for arch in table_archs(limits.capability):
        cfg = TABLE[arch][cls][kernel][dclass]
        if cfg.shared <= limits.shared_per_block:
            return cfg
    return None


def limits_reason(limits: DeviceLimits, cls: str) -> str | None:
    """Why the kernels cannot launch on a device with these limits for inputs of this dtype
    class (None: every kernel has an entry that fits)."""
    major, minor = limits.capability
    if limits.capability < MIN_CAPABILITY:
        return (f"the Triton tile configurations need compute capability 8.0 or newer "
                f"(tensor-core mma.sync / wgmma); {limits.name} has {major}.{minor}")
    needs = {}
    for kernel in KERNELS:
        for dclass in KERNEL_D_CLASSES[kernel]:
            if device_config(kernel, limits, cls, dclass) is None:
                needs[kernel, dclass] = min(TABLE[arch][cls][kernel][dclass].shared
                                            for arch in table_archs(limits.capability))
    if not needs:
        return None
    (kernel, dclass), need = max(needs.items(), key=lambda item: item[1])
    return (f"{limits.name} (sm_{major}{minor}) allows {limits.shared_per_block} bytes of "
            f"shared memory per block, and {len(needs)} Triton tile configuration(s) for "
            f"{cls} inputs need more, up to {need} bytes ({kernel}, D class {dclass})")


def device_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot launch on this device for inputs of this dtype, or None
    (CPU tensors, the interpreter, or no CUDA device to ask: nothing to refuse here)."""
    if device.type != "cuda" or interpreting() or not torch.cuda.is_available():
        return None
    return limits_reason(device_limits(device), dtype_class(dtype))


def _limits(device: torch.device) -> DeviceLimits:
    try:
        return device_limits(device)
    except Exception:  # tracing with fake CUDA tensors and no device
        return TRACING_LIMITS


def narrowed(cfg: Config, dclass: str, D: int) -> Config:
    """A one-chunk entry (D class d64 / d128) with its feature block narrowed to D (a power
    of 2 >= 16)."""
    if dclass != "large" and cfg.block_d >= D:
        cfg = cfg._replace(block_d=min(cfg.block_d, max(16, triton.next_power_of_2(int(D)))))
    return cfg


def lookup(kernel: str, arch: int, dclass: str, cls: str, D: int) -> Config:
    """TABLE's entry for this architecture, narrowed to D (ROW_CONFIG for the row kernels)."""
    if kernel in ROW_KERNELS:
        return narrowed(ROW_CONFIG, dclass, D)
    return narrowed(TABLE[arch][cls][kernel][dclass], dclass, D)


def select(kernel: str, device: torch.device, dtype: torch.dtype, D: int) -> Config:
    """The configuration of `kernel` for inputs of this device, dtype and feature dimension:
    on a GPU, device_config's entry (RuntimeError, with limits_reason, when none fits)."""
    if kernel not in KERNELS + ROW_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    dclass, cls = d_class(D), dtype_class(dtype)
    if device.type != "cuda" or interpreting():
        if interpreter_arch is None:
            return INTERPRETER_CONFIG
        return lookup(kernel, interpreter_arch, dclass, cls, D)
    if kernel in ROW_KERNELS:
        return narrowed(ROW_CONFIG, dclass, D)
    limits = _limits(device)
    cfg = device_config(kernel, limits, cls, dclass)
    if cfg is None:
        raise RuntimeError(f"robustft_triton: {limits_reason(limits, cls)}")
    return narrowed(cfg, dclass, D)


def fused_backward(group: str, device: torch.device, D: int) -> bool:
    """Does a backward of this group ("contrastive" or "step") keep its gradient rows in
    registers (small D), rather than writing dS into the workspace for library GEMMs?

    Why (the numbers: docs/backends.md, "The Triton backward: two designs"): for CLIP the
    register-resident backward recomputes the logit tiles once per gradient it forms, 8 N^2 D
    FLOP, and moves nothing of size N^2 through HBM. The dS design makes three GEMM-shaped
    passes (dS, then dI = dS T and dT = dS^T I), 6 N^2 D FLOP, each moving 2 N^2 bytes of
    16-bit dS: a pass costs max(2 N^2 D / F, 2 N^2 / B) at F FLOP/s and B bytes/s. Above the
    ridge point D = F / B (295 on an H100, 206 on an H200) the passes are compute-bound and
    the dS design does 25% less work; below it they are memory-bound, and the fused kernel
    wins for D < 0.75 F / B (about 220 / 155). The fused kernel also needs register room for its
    [BLOCK_M, D] accumulators: D <= 128 for the contrastive kernels, D <= 64 for the step
    kernels (three accumulators). So the fused kernel serves those D, the dS workspace design
    every larger one.
    """
    if (device.type != "cuda" or interpreting()) and interpreter_arch is None:
        return D <= INTERPRETER_FUSED_BWD_MAX_D
    return D <= FUSED_BWD_MAX_D[group]
