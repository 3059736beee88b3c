"""Build robustft_ext: the C++ CPU kernels always, the CUDA kernels when they can be built.

Environment switches
  ROBUSTFT_FORCE_CPU=1     build the CPU kernels only, even where CUDA could be built.
  CUDA_HOME                the CUDA toolkit to build with (else inferred, see _find_cuda_home).
  TORCH_CUDA_ARCH_LIST     architectures to build for (default "8.0;9.0+PTX": sm_80 and sm_90
                           machine code, and compute_90 PTX that the driver compiles for newer
                           GPUs such as sm_100 and sm_120; the kernels need sm_80 or newer,
                           older entries are dropped).
  MAX_JOBS                 parallel compile jobs for ninja.
The CUDA kernels compile without a GPU: only nvcc and a CUDA build of torch are needed. An nvcc
older than the CUDA that torch was built with cannot compile against torch's CUDA headers: then
the CPU kernels are built and the build says why and how to get the CUDA kernels.
The C++ standard is the one the installed torch's headers require (C++17 up to torch 2.14,
C++20 from torch 2.15).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
DEFAULT_CXX_STANDARD = 17
REBUILD = "pip install -v --no-build-isolation --force-reinstall --no-deps ."


def cxx_standard_required(aten_header: str) -> int:
    """The C++ standard (17, 20, ...) that ATen.h's `__cplusplus < NNNNNNL` guard demands, or
    DEFAULT_CXX_STANDARD when the header states none."""
    years = [int(y) for y in re.findall(r"__cplusplus\s*<\s*(\d{4})\d{2}L", aten_header)]
    return max((y - 2000 for y in years), default=DEFAULT_CXX_STANDARD)


def _torch_cxx_standard() -> int:
    import torch

    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(header) as f:
            return cxx_standard_required(f.read())
    except OSError:
        return DEFAULT_CXX_STANDARD


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc's real location.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that nvcc is a wrapper
    script; so we resolve it ourselves before torch.utils.cpp_extension is imported.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # ask nvcc where it lives: robust to wrapper scripts and symlinks
        out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.abspath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `nvcc --version` output ("... release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _nvcc_version(home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_version(out.stdout + out.stderr)


def toolkit_mismatch(nvcc: tuple[int, int], torch_cuda: str, torch_version: str,
                     home: str) -> str | None:
    """Why this nvcc cannot build against this torch, with how to get the CUDA kernels; None
    when it can. torch's CUDA headers need an nvcc at least as new as the CUDA torch was built
    with, and torch refuses a toolkit of another major version."""
    built = tuple(int(x) for x in torch_cuda.split(".")[:2])
    have = f"{nvcc[0]}.{nvcc[1]}"
    if nvcc[0] == built[0] and nvcc >= built:
        return None
    relation = "older than" if nvcc < built else "of another major version than"
    return (f"nvcc {have} (at {home}) is {relation} CUDA {torch_cuda}, which torch "
            f"{torch_version} was built with, so only the CPU kernels are built. To get the CUDA "
            f"kernels, install CUDA toolkit {torch_cuda} or a newer {built[0]}.x and set "
            f"CUDA_HOME to it, or install a torch built for CUDA {have}; then rebuild: {REBUILD}")


def _cuda_decision() -> tuple[bool, str, bool]:
    """(build the CUDA kernels?, why, is the reason worth a warning?)."""
    import torch

    if os.environ.get("ROBUSTFT_FORCE_CPU", "0") not in ("", "0"):
        return False, "ROBUSTFT_FORCE_CPU is set", False
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build", False
    home = _find_cuda_home()
    if home is None:
        return False, ("nvcc not found, so only the CPU kernels are built. To get the CUDA "
                       f"kernels, install a CUDA toolkit {torch.version.cuda} (or newer "
                       f"{torch.version.cuda.split('.')[0]}.x), set CUDA_HOME to it and "
                       f"rebuild: {REBUILD}"), True
    nvcc = _nvcc_version(home)
    if nvcc is None:
        return False, (f"{home}/bin/nvcc --version did not report a version, so only the CPU "
                       "kernels are built; set CUDA_HOME to a working CUDA toolkit "
                       f"{torch.version.cuda} or newer and rebuild: {REBUILD}"), True
    mismatch = toolkit_mismatch(nvcc, torch.version.cuda, torch.__version__, home)
    if mismatch is not None:
        return False, mismatch, True
    os.environ["CUDA_HOME"] = home
    if _cublas_link() is None:
        return False, (f"cuBLAS was found neither in the CUDA toolkit at {home} nor in the nvidia "
                       "pip packages, so only the CPU kernels are built. To get the CUDA kernels, "
                       f"pip install nvidia-cublas (a CUDA build of torch brings it) and rebuild: "
                       f"{REBUILD}"), True
    return True, f"nvcc {nvcc[0]}.{nvcc[1]} at {home}", False


def _extra_cuda_includes() -> list[str]:
    """Headers that ATen's CUDA headers include and that ship in the nvidia pip packages."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cublas_link() -> tuple[list[str], list[str]] | None:
    """(library_dirs, link args) for cuBLAS, which the backward's GEMMs call directly.

    A toolkit without cuBLAS (a minimal one) is completed by the nvidia-cublas pip package
    that a CUDA build of torch depends on; it ships only versioned libraries (libcublas.so.N),
    so the file is named exactly (-l:libcublas.so.N). At run time torch has already loaded
    the same soname.
    """
    import site

    home = os.environ["CUDA_HOME"]
    dirs = [os.path.join(home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "lib"))
        dirs += glob.glob(os.path.join(base, "nvidia", "cublas", "lib"))
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcublas.so")):
            return [d], ["-lcublas"]
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.*")), key=len)
        if versioned:
            return [d], [f"-l:{os.path.basename(versioned[0])}"]
    return None


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST (default 8.0;9.0) without the architectures below 8.0: the kernels
    use mma.sync m16n8k16 and cp.async, which sm_80 introduced."""
    old_names = {"kepler", "kepler+tesla", "maxwell", "pascal", "volta", "turing"}

    def supported(arch: str) -> bool:
        try:
            return float(arch.split("+")[0].rstrip("af")) >= 8.0
        except ValueError:  # a name: Ampere, Ada, Hopper, ... (torch's own list)
            return arch.lower().split("+")[0] not in old_names

    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    archs = [a for a in requested.replace(",", ";").replace(" ", ";").split(";") if a]
    kept = [a for a in archs if supported(a)]
    if len(kept) < len(archs):
        print(f"robustft_ext: WARNING: the CUDA kernels need sm_80 or newer; dropping "
              f"{sorted(set(archs) - set(kept))} from TORCH_CUDA_ARCH_LIST", file=sys.stderr)
    return ";".join(kept) if kept else DEFAULT_ARCH_LIST


def _write_build_info(with_cuda: bool, reason: str, warn: bool, cxx_standard: int) -> None:
    import torch

    path = os.path.join(ROOT, "robustft_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time: what the extension was built against."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_REASON = {reason!r}\n")
        # CUDA was wanted but could not be built (import repeats CUDA_REASON on a GPU)
        f.write(f"CUDA_SKIPPED = {warn!r}\n")
        f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}\n")
        f.write(f"CXX_STANDARD = {cxx_standard!r}\n")


def _extensions():
    with_cuda, reason, warn = _cuda_decision()
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    std = _torch_cxx_standard()
    _write_build_info(with_cuda, reason, warn, std)
    sources = ["csrc/schemas.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", f"-std=c++{std}", "-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []
    if with_cuda:
        cublas_dirs, cublas_args = _cublas_link()  # found: _cuda_decision checked
        ext = CUDAExtension(
            "robustft_ext._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _extra_cuda_includes(),
            define_macros=[("RFT_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", f"-std=c++{std}", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            },
            library_dirs=cublas_dirs,
            extra_link_args=["-fopenmp"] + cublas_args,
        )
    else:
        ext = CppExtension(
            "robustft_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )

    class Build(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, saying first what it builds and why (the compile lines that
        follow are ninja's; pip shows them with -v)."""

        def run(self):
            kind = "CPU+CUDA" if with_cuda else "CPU-only"
            arch = f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""
            print(f"robustft_ext: building {kind} kernels, C++{std}{arch}: {len(sources)} C++ "
                  f"and {len(cuda_sources)} CUDA sources ({reason if not warn else 'see below'})",
                  file=sys.stderr, flush=True)
            if warn:
                print(f"\nWARNING: robustft_ext: {reason}\n", file=sys.stderr, flush=True)
            super().run()

    return [ext], {"build_ext": Build}


if __name__ == "__main__":  # also how setuptools' build backend runs this file
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["robustft_ext", "robustft_ext.*"])
        + find_packages("python", include=["robustft_train", "robustft_train.*"]),
        package_dir={"robustft_train": "python/robustft_train"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
