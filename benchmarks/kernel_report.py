"""What the GPU kernels would execute, shown without a GPU.

    python benchmarks/kernel_report.py [--side cuda|triton|both] [--arch 90 80]
                                       [--dtype bf16 fp16 tf32 fp32] [--kernel NAME ...]
                                       [--so PATH] [--jobs N] [--json FILE] [--strict]

CUDA side: every kernel in the built extension (robustft_ext/_C*.so, or --so), per
architecture, from cuobjdump (--dump-resource-usage and --dump-sass): registers, local memory
(spills), static shared memory and the SASS counts of HGMMA / HMMA (tensor cores) and FFMA.

Triton side: every configuration of robustft_ext/triton_backend/configs.py TABLE (each kernel
variant, architecture, dtype and D class) and the row kernels of the slerp, compiled offline
for sm_90 / sm_80 with Triton's compiler (robustft_ext/triton_backend/offline.py) as the ops
launch them, each D class at its largest D and at a D that is not a multiple of 16 (the
launch then has the padded feature dimension, shown in brackets): registers and spill bytes
(ptxas -v), shared memory, wgmma / mma.sync in the PTX and HGMMA / HMMA / FFMA in the SASS.

Flags: NO-TC, a 16-bit tile kernel without a tensor-core instruction; SPILL (Triton),
register spills reported by ptxas; SMEM (Triton), more shared memory than the configs entry
records (the selection by device trusts the record); SMEM (CUDA), a kernel whose static
shared memory exceeds its family's budget in csrc/cuda/tile_plan.h, or whose static plus
dynamic shared memory exceeds the opt-in of the devices that launch its tile shape (99 KB
for the small shapes, 163 KB on sm_80 and 227 KB on sm_90 for the large); LMEM (CUDA),
local-memory traffic (STL/LDL or a local segment), which is how spills show in a binary, but
also how local arrays do (ptxas -v at build time tells them apart); ERROR, a configuration
that does not compile. --strict exits with status 1 when a 16-bit CUDA tile kernel or any
Triton configuration is flagged, when any CUDA kernel is flagged SMEM, or when a requested
side has nothing to examine (a CPU-only build).

The Triton compile cache (~/.triton/cache) makes reruns fast; a cold run of the whole table
compiles about 210 kernels for its 416 rows (a D that is not a multiple of 16 launches its
class's kernel; minutes per core: --jobs runs them in parallel).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIXTEEN_BIT = re.compile(r"BFloat16|Half\b|__nv_bfloat16|__half\b|\bhalf\b")


# ----------------------------------------------------------------------------- CUDA side
def _cuda_tool(name: str) -> str:
    from robustft_ext.triton_backend.offline import cuda_tool

    return cuda_tool(name)


def default_so() -> str | None:
    found = sorted(glob.glob(str(ROOT / "robustft_ext" / "_C*.so")))
    return found[0] if found else None


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    """A kernel's name without its namespaces and argument list, keeping template args."""
    name = re.sub(r"\(.*\)$", "", demangled)
    name = re.sub(r"\brobustft::(\w+::)*", "", name)
    name = re.sub(r"\bc10::", "", name)
    return name


# The opt-in shared memory per block a kernel's shape must fit on every device it can run on
# (csrc/cuda/tile_plan.h chooses the shape by it): the small tensor-core shapes must fit the
# 99 KB GPUs of any architecture (sm_86, sm_89, sm_120), the large ones the GPUs that get
# them (an A100's 163 KB on sm_80; 227 KB on sm_90).
SMALLEST_OPTIN = 101376
LARGEST_OPTIN = {"sm_80": 166912, "sm_90": 232448}
FAMILIES = {"clip_lse_kernel": "contrastive", "softplus_sum_kernel": "contrastive",
            "dlogits_kernel": "contrastive", "step_lse_kernel": "step",
            "step_dlogits_kernel": "step", "gram_lse_kernel": "step", "gram_strip_kernel": "step"}


def _tile_plan() -> dict | None:
    """The native CUDA kernels' tile plan (csrc/cuda/tile_plan.h) from the built extension."""
    try:
        import torch

        import robustft_ext  # noqa: F401  (loads the compiled ops)
        return json.loads(torch.ops.robustft_ext.native_cuda_tile_plan())
    except Exception:  # noqa: BLE001 - an extension without the plan: nothing to check
        return None


def _shared_memory_problem(row: dict, demangled: str, plan: dict | None) -> str | None:
    """Why a kernel's shared memory breaks the plan, or None: its static bytes over its
    family's budget, or static plus the dynamic bytes of its tile shape over the opt-in of
    the devices that launch that shape."""
    if plan is None:
        return None
    name = re.sub(r"<.*", "", _short(demangled)).split()[-1]
    family = plan["families"].get(FAMILIES.get(name, ""))
    if family is None:  # row passes and merges: static memory only, within the default 48 KB
        return f"static {row['shared']} B > 49152 B" if row["shared"] > 49152 else None
    if row["shared"] > family["static_budget"]:
        return (f"static {row['shared']} B > the {FAMILIES[name]} budget "
                f"{family['static_budget']} B (csrc/cuda/tile_plan.h)")
    shape = re.search(r"MmaShape<(\d+), (\d+), (\d+), (\d+), (\d+)", demangled)
    if shape is None:  # the FMA engine: a few KB of dynamic memory
        return None
    bm, bn, stages = int(shape[1]), int(shape[2]), int(shape[5])
    rows, cols = family["row_slabs"], family["col_slabs"]
    terms = re.search(r"step_\w+_kernel<.*?, (true|false), (true|false)", demangled)
    if terms is not None:  # the step's slabs: I, T rows with m^2; M with m^2, T with CLIP
        m2, clip = terms[1] == "true", terms[2] == "true"
        rows, cols = (2 if m2 else 1), int(m2) + int(clip)
    dynamic = stages * (rows * bm + cols * bn) * plan["row_bytes"]
    small = (bm, bn, stages) == tuple(family["small"][k] for k in ("bm", "bn", "stages"))
    limit = SMALLEST_OPTIN if small else LARGEST_OPTIN.get(row["arch"], SMALLEST_OPTIN)
    total = row["shared"] + dynamic
    if total > limit:
        return (f"{row['shared']} B static + {dynamic} B dynamic = {total} B > {limit} B "
                f"({'small' if small else 'large'} shape on {row['arch']})")
    return None


def cuda_kernels(so: str) -> tuple[list[dict], str | None]:
    """Rows for every (architecture, kernel) in the extension, or ([], why not)."""
    cuobjdump = _cuda_tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True,
                           text=True)
    text = usage.stdout + usage.stderr
    if "does not contain device code" in text or "Function" not in text:
        return [], (f"{so} contains no device code (a CPU-only build); build the CUDA "
                    "kernels: CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST='8.0;9.0' "
                    "pip install --no-build-isolation -e .")
    rows: dict[tuple[str, str], dict] = {}
    arch = None
    fn = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+\w?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn is not None and arch is not None:
            rows[(arch, fn)] = dict(arch=arch, mangled=fn, registers=int(m.group(1)),
                                    stack=int(m.group(2)), shared=int(m.group(3)),
                                    local=int(m.group(4)), sass_hgmma=0, sass_hmma=0,
                                    sass_ffma=0, sass_local_ops=0)
            fn = None
    sass = subprocess.run([cuobjdump, "--dump-sass", so], capture_output=True, text=True,
                          check=True).stdout
    arch = None
    fn = None
    for line in sass.splitlines():
        m = re.match(r"\s*code for (sm_\d+\w?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        row = rows.get((arch, fn))
        if row is None or "/*" not in line:
            continue
        if re.search(r"\bHGMMA\.", line):
            row["sass_hgmma"] += 1
        elif re.search(r"\bHMMA\.", line):
            row["sass_hmma"] += 1
        elif re.search(r"\bFFMA\b", line):
            row["sass_ffma"] += 1
        elif re.search(r"\b(STL|LDL)\b", line):
            row["sass_local_ops"] += 1
    names = _demangle([r["mangled"] for r in rows.values()])
    plan = _tile_plan()
    out = []
    for row in rows.values():
        row["kernel"] = _short(names[row["mangled"]])
        row["sixteen_bit"] = bool(SIXTEEN_BIT.search(names[row["mangled"]]))
        row["tensor_core"] = row["sass_hgmma"] + row["sass_hmma"] > 0
        # A compiled binary does not say which local-memory traffic is spilling (ptxas -v
        # does, at build time) and which is a local array (e.g. the slow path of sin/cos
        # argument reduction): flag every kernel that has any.
        lmem = row["local"] > 0 or row["sass_local_ops"] > 0
        smem = _shared_memory_problem(row, names[row["mangled"]], plan)
        row["smem_problem"] = smem or ""
        # The row passes (the slerp prologue, DiVE, merges) have no tile products: tensor
        # cores are not theirs, and their local memory is the double sin/cos slow path's.
        tile = re.sub(r"<.*", "", row["kernel"]).split()[-1] in FAMILIES
        flags = [f for f, on in (("NO-TC", tile and row["sixteen_bit"] and not row["tensor_core"]),
                                 ("LMEM", lmem), ("SMEM", smem is not None)) if on]
        row["flags"] = ",".join(flags)
        row["failing"] = (tile and row["sixteen_bit"] and bool(flags)) or smem is not None
        out.append(row)
    out.sort(key=lambda r: (r["arch"], r["kernel"]))
    return out, None


# ----------------------------------------------------------------------------- Triton side
def _compile_one(entry: tuple) -> dict:
    from robustft_ext.triton_backend import configs, offline

    kernel, variant, arch, dtype, D = entry
    try:
        r = offline.compile_config(kernel, variant, arch, dtype, D)
    except Exception as exc:  # a configuration that does not compile is a finding
        return dict(kernel=kernel, variant=variant, arch=arch, dtype=dtype, D=D,
                    error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}",
                    flags="ERROR", failing=True)
    row = r.as_dict()
    tile_kernel = kernel not in configs.ROW_KERNELS  # (the row kernels have no tile products)
    flags = [f for f, on in (("NO-TC", tile_kernel and dtype in ("bf16", "fp16")
                              and not r.tensor_core),
                             ("SPILL", r.spills), ("SMEM", r.shared_over_record)) if on]
    row["flags"] = ",".join(flags)
    row["failing"] = bool(flags)
    return row


def triton_kernels(archs, dtypes, kernels, jobs: int) -> list[dict]:
    from robustft_ext.triton_backend import offline

    entries = list(offline.table_entries(archs=archs, dtypes=dtypes, kernels_=kernels))
    rows = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as pool:
        for i, row in enumerate(pool.map(_compile_one, entries), 1):
            print(f"[{i}/{len(entries)}] {row['kernel']} {row['variant']} sm_{row['arch']} "
                  f"{row['dtype']} D={row['D']}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


class _Serial:
    """The executor interface, in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


# ----------------------------------------------------------------------------- output
def _print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for line in [headers] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def print_cuda(rows: list[dict], so: str) -> None:
    print(f"== CUDA kernels in {so} (cuobjdump) ==")
    _print_table(
        ["arch", "kernel", "16bit", "regs", "stack", "local", "STL/LDL", "smem", "HGMMA",
         "HMMA", "FFMA", "flags"],
        [[r["arch"], r["kernel"], "y" if r["sixteen_bit"] else "-", r["registers"],
          r["stack"], r["local"], r["sass_local_ops"], r["shared"], r["sass_hgmma"],
          r["sass_hmma"], r["sass_ffma"], r["flags"]] for r in rows])


def print_triton(rows: list[dict]) -> None:
    print("== Triton kernels compiled offline (configs.TABLE) ==")
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["kernel"], r["variant"], f"sm_{r['arch']}", r["dtype"], r["D"],
                        "-", "-", "-", "-", "-", "-", "-", "-", "-", "ERROR " + r["error"]])
            continue
        c = r["config"]
        tile = (f"{c['block_m']}x{c['block_n']}x{c['block_d']} "
                f"w{c['num_warps']} s{c['num_stages']}")
        dim = r["D"] if r["launch_D"] == r["D"] else f"{r['D']} ({r['launch_D']})"
        out.append([r["kernel"], r["variant"], f"sm_{r['arch']}", r["dtype"], dim, tile,
                    r["registers"], f"{r['spill_stores']}/{r['spill_loads']}", r["shared"],
                    r["ptx_wgmma"], r["ptx_mma"], r["sass_hgmma"], r["sass_hmma"],
                    r["sass_ffma"], r["flags"]])
    _print_table(["kernel", "variant", "arch", "dtype", "D", "tile BMxBNxBD", "regs",
                  "spill st/ld", "smem", "wgmma", "mma", "HGMMA", "HMMA", "FFMA", "flags"], out)


def summary(rows: list[dict], what: str) -> int:
    """Prints the flag counts; returns the number of failing rows (--strict)."""
    by_flag: dict[str, int] = {}
    for r in rows:
        for f in filter(None, r["flags"].split(",")):
            by_flag[f] = by_flag.get(f, 0) + 1
    failing = sum(1 for r in rows if r["failing"])
    detail = ", ".join(f"{n} {f}" for f, n in sorted(by_flag.items())) or "none flagged"
    print(f"{what}: {len(rows)} kernels, {detail}; {failing} failing")
    return failing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("cuda", "triton", "both"), default="both")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=(90, 80))
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "tf32", "fp32"],
                   choices=("bf16", "fp16", "tf32", "fp32"), help="Triton side")
    p.add_argument("--kernel", nargs="+", default=None, help="Triton side: kernel names")
    p.add_argument("--so", default=None, help="the extension to examine (default: "
                   "robustft_ext/_C*.so)")
    p.add_argument("--jobs", type=int, default=1, help="parallel offline compilations")
    p.add_argument("--json", default=None, help="also write every row to this file")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a row is flagged or a side has nothing to examine")
    args = p.parse_args(argv)
    # Offline compilation needs Triton's JIT kernels, not the interpreter's (triton is
    # imported below, after this).
    os.environ.pop("TRITON_INTERPRET", None)
    problems = 0
    result: dict[str, object] = {}
    if args.side in ("cuda", "both"):
        so = args.so or default_so()
        if so is None:
            print("== CUDA kernels: no robustft_ext/_C*.so (not built; or pass --so) ==")
            problems += 1
        else:
            rows, why = cuda_kernels(so)
            wanted = {f"sm_{a}" for a in args.arch}
            rows = [r for r in rows if r["arch"].rstrip("a") in wanted]
            if why is not None:
                print(f"== CUDA kernels: {why} ==")
                problems += 1
            else:
                print_cuda(rows, so)
                problems += summary(rows, "CUDA")
            result["cuda"] = {"so": so, "rows": rows, "skipped": why}
        print()
    if args.side in ("triton", "both"):
        from robustft_ext.triton_backend import configs

        known = configs.KERNELS + configs.ROW_KERNELS
        kernels = tuple(args.kernel) if args.kernel else known
        unknown = set(kernels) - set(known)
        if unknown:
            p.error(f"unknown Triton kernels {sorted(unknown)}; known: {known}")
        rows = triton_kernels(tuple(args.arch), tuple(args.dtype), kernels, args.jobs)
        print_triton(rows)
        problems += summary(rows, "Triton")
        result["triton"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 1 if (args.strict and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
