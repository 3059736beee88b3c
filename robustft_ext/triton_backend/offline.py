"""Offline compilation of the Triton kernels for a CUDA target, without a GPU.

benchmarks/kernel_report.py uses this to show, for every configuration of configs.TABLE, what
the GPU would run: registers, spills, shared memory and tensor-core instruction counts.
triton.compile with an ASTSource (signature, constexprs, divisibility hints) and a
GPUTarget("cuda", arch, 32) runs the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas to
a cubin) on the CPU; the counts come from the PTX (wgmma / mma.sync) and from the cubin's
SASS (HGMMA / HMMA, through cuobjdump), the registers and spills from ptxas -v.

The kernels must be JIT functions: run this in a process without TRITON_INTERPRET=1.

Argument types follow the kernels' naming convention (contrastive_kernels.py,
step_kernels.py, slerp_kernels.py):
  * upper-case feature matrices (P, Q, I, T, M, G, FI, FT, PI, PT, and the gradients DI, DT):
    the input dtype;
  * the dS workspace (DS, DSA, DSB, DSC): the workspace dtype (ds_workspace.ds_dtype);
  * names ending in _f64: float64 buffers; in _ptr: float32 buffers;
  * every other runtime argument: a 32-bit integer.
Divisibility hints are those of the launch the ops make: every pointer is 16-byte aligned,
and D and the strides carry Triton's divisibility-by-16 hint exactly when the launched
feature dimension (configs.aligned_dim of the inputs' D) is a multiple of 16, as Triton's JIT
would specialise them. table_entries also compiles each D class at a D that is not a multiple
of 16, so the report shows what such inputs launch.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs, contrastive_kernels, gram_kernels, slerp_kernels, step_kernels
from .ds_workspace import ds_dtype

FEATURE_ARGS = frozenset({"P", "Q", "I", "T", "M", "G", "FI", "FT", "PI", "PT", "DI", "DT"})

_ALL_STEP_TERMS = dict(WITH_M2=True, WITH_CLIP=True, WITH_TILES=True, WITH_LIPSUM=True,
                       WITH_DIVE=True)
_CLIP = dict(SIGLIP=False, HAS_ROW=True, HAS_COL=True, POS_COEF=2)
_SIGLIP = dict(SIGLIP=True, HAS_ROW=False, HAS_COL=False, POS_COEF=1)

# kernel name -> (JIT function, {variant name: its compile-time flags}). The variants are
# the launches the ops make that differ most in code: symmetric CLIP (both LSE terms and the
# column partials, the heaviest CLIP code) and one-sided CLIP forward, SigLIP, the step
# with every term on, and the Gram formulation's kernels with CLIP (its heaviest epilogue).
KERNEL_VARIANTS = {
    "clip_lse": (contrastive_kernels.clip_lse_kernel,
                 {"symmetric": dict(WITH_COL=True), "one_sided": dict(WITH_COL=False)}),
    "siglip_sum": (contrastive_kernels.siglip_softplus_sum_kernel,
                   {"positives": dict(HAS_POS=True)}),
    "grad_rows": (contrastive_kernels.contrastive_grad_rows_kernel,
                  {"clip": dict(_CLIP, WANT_STATS=True),
                   "siglip": dict(_SIGLIP, WANT_STATS=True)}),
    "dlogit": (contrastive_kernels.contrastive_dlogit_kernel,
               {"clip": dict(_CLIP, GROUP_M=8), "siglip": dict(_SIGLIP, GROUP_M=8)}),
    "step_fwd": (step_kernels.step_fwd_kernel, {"all_terms": dict(_ALL_STEP_TERMS)}),
    "step_grad_rows": (step_kernels.step_grad_rows_kernel, {"all_terms": dict(_ALL_STEP_TERMS)}),
    "step_grad_cols": (step_kernels.step_grad_cols_kernel,
                       {"m2_clip": dict(WITH_M2=True, WITH_CLIP=True)}),
    "step_dlogit": (step_kernels.step_dlogit_kernel,
                    {"all_terms": dict(_ALL_STEP_TERMS, GROUP_M=8)}),
    "gram_lse": (gram_kernels.gram_lse_kernel, {"m2_clip": dict(WITH_CLIP=True)}),
    "gram_strip": (gram_kernels.gram_strip_kernel, {"m2_clip": dict(WITH_CLIP=True, GROUP_M=8)}),
    "pair_dots": (slerp_kernels.pair_dots_kernel, {"rows": {}}),
    "slerp_mix": (slerp_kernels.slerp_mix_kernel, {"rows": {}}),
    "slerp_bwd": (slerp_kernels.slerp_bwd_kernel,
                  {"step": dict(WITH_MIX=True, WITH_STEP=True),
                   "slerp": dict(WITH_MIX=True, WITH_STEP=False),
                   "pair": dict(WITH_MIX=False, WITH_STEP=True)}),
}

# The D each D class is compiled at: its largest (the one-chunk classes' widest feature
# block), and one that is not a multiple of 16 (what the host launches for such inputs).
REPRESENTATIVE_D = {"d64": 64, "d128": 128, "large": 768}
UNALIGNED_D = {"d64": 60, "d128": 67, "large": 200}

# The D classes each kernel is compiled for: the row kernels' configuration does not depend
# on the class, so they are compiled once.
REPORT_D_CLASSES = {**configs.KERNEL_D_CLASSES, **{k: ("large",) for k in configs.ROW_KERNELS}}

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class CompiledKernel:
    """What one compiled configuration uses and executes (static counts of the code)."""

    kernel: str
    variant: str
    arch: int
    dtype: str          # "bf16", "fp16", "fp32" (ieee) or "tf32"
    D: int              # the inputs' feature dimension
    launch_D: int       # the feature dimension launched (configs.aligned_dim(D))
    hinted: bool        # D and the strides carry the divisibility-by-16 hint
    config: configs.Config
    registers: int      # per thread (ptxas)
    spill_stores: int   # bytes (ptxas)
    spill_loads: int
    stack: int          # stack frame bytes (ptxas)
    shared: int         # shared memory bytes per program (Triton's allocation)
    ptx_wgmma: int      # wgmma.mma_async instructions in the PTX
    ptx_mma: int        # mma.sync instructions in the PTX
    sass_hgmma: int     # HGMMA instructions in the SASS
    sass_hmma: int      # HMMA instructions in the SASS
    sass_ffma: int      # FFMA instructions in the SASS

    @property
    def tensor_core(self) -> bool:
        return self.sass_hgmma + self.sass_hmma + self.ptx_wgmma + self.ptx_mma > 0

    @property
    def spills(self) -> bool:
        return self.spill_stores + self.spill_loads > 0

    @property
    def shared_over_record(self) -> bool:
        """Needs more shared memory than its configs entry records (which the selection by
        device trusts)."""
        return self.shared > self.config.shared

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config._asdict()
        d["tensor_core"] = self.tensor_core
        return d


def cuda_tool(name: str) -> str:
    """Path of a CUDA binary tool (ptxas, cuobjdump): Triton's bundled copy, else
    /usr/local/cuda/bin, else PATH."""
    for base in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"),
                 "/usr/local/cuda/bin"):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (Triton's bin dir, /usr/local/cuda/bin, PATH)")
    return found


def _signature(fn, dtype: torch.dtype, constexprs: dict,
               hinted: bool) -> tuple[dict, dict]:
    """(signature, attrs) of an ASTSource per the module docstring's convention; hinted: D
    and the strides are multiples of 16."""
    feat = "*" + _TRITON_TYPES[dtype]
    ws = "*" + _TRITON_TYPES[ds_dtype(dtype)]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in FEATURE_ARGS:
            sig[name] = feat
        elif name.startswith("DS"):
            sig[name] = ws
        elif name.endswith("_f64"):
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
        feature_sized = name == "D" or name.startswith("stride")
        if sig[name].startswith("*") or (hinted and feature_sized):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """registers, spill bytes and stack of the PTX's entry, from ptxas -v."""
    gpu = "sm_90a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([cuda_tool("ptxas"), "-v", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                spill_loads=int(spill.group(2)), stack=int(stack.group(1)) if stack else 0)


def sass_text(cubin: bytes) -> str:
    """The SASS of a cubin (cuobjdump --dump-sass)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([cuda_tool("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout


def sass_counts(sass: str) -> dict:
    """Tensor-core and FMA instruction counts of SASS text."""
    return dict(sass_hgmma=_count(r"\bHGMMA\.", sass), sass_hmma=_count(r"\bHMMA\.", sass),
                sass_ffma=_count(r"\bFFMA\b", sass))


def compile_config(kernel: str, variant: str, arch: int, dtype_name: str, D: int,
                   config: configs.Config | None = None) -> CompiledKernel:
    """Compile one kernel variant for sm_`arch` as the ops launch it for inputs of feature
    dimension D (at configs.aligned_dim(D)), with `config` (default: configs.TABLE's entry
    for this arch, dtype and D), and measure it.

    dtype_name: "bf16", "fp16", "fp32" (float32 "ieee" dots) or "tf32" (float32 on TF32
    tensor cores)."""
    if configs.interpreting():
        raise RuntimeError("offline compilation needs JIT kernels: run without "
                           "TRITON_INTERPRET=1")
    fn, variants = KERNEL_VARIANTS[kernel]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "tf32": torch.float32}[dtype_name]
    cls = {"bf16": "16bit", "fp16": "16bit", "fp32": "fp32", "tf32": "tf32"}[dtype_name]
    launch_D = configs.aligned_dim(D)
    dclass = configs.d_class(launch_D)
    if config is None:
        config = configs.lookup(kernel, arch, dclass, cls, launch_D)
    constexprs = dict(variants[variant], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_D=config.block_d, DOT_PREC="ieee" if cls == "fp32" else "tf32",
                      UPCAST=False, ROUND_BF16=False, ONE_CHUNK=launch_D <= config.block_d)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    hinted = launch_D % 16 == 0
    sig, attrs = _signature(fn, dtype, constexprs, hinted)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    ptx = compiled.asm["ptx"]
    return CompiledKernel(
        kernel=kernel, variant=variant, arch=arch, dtype=dtype_name, D=D,
        launch_D=launch_D, hinted=hinted, config=config,
        shared=int(compiled.metadata.shared),
        ptx_wgmma=_count(r"^\s*wgmma\.mma_async", ptx), ptx_mma=_count(r"^\s*mma\.sync", ptx),
        **_ptxas_usage(ptx, arch), **sass_counts(sass_text(compiled.asm["cubin"])))


def table_entries(archs=configs.ARCHS, dtypes=("bf16", "fp16", "tf32", "fp32"),
                  kernels_=configs.KERNELS + configs.ROW_KERNELS):
    """(kernel, variant, arch, dtype name, D) of every configuration in configs.TABLE (and
    the row kernels' configs.ROW_CONFIG) that the ops can launch, each D class at its
    REPRESENTATIVE_D and its UNALIGNED_D."""
    for kernel in kernels_:
        for variant in KERNEL_VARIANTS[kernel][1]:
            for arch in archs:
                for dtype_name in dtypes:
                    for dclass in REPORT_D_CLASSES[kernel]:
                        for D in (REPRESENTATIVE_D[dclass], UNALIGNED_D[dclass]):
                            yield kernel, variant, arch, dtype_name, D
