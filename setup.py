"""Build robustft_ext: the C++ CPU kernels always, the CUDA kernels when they can be built.

Environment switches
  ROBUSTFT_FORCE_CPU=1     build the CPU kernels only, even where CUDA could be built.
  CUDA_HOME                the CUDA toolkit to build with (else inferred, see _find_cuda_home).
  TORCH_CUDA_ARCH_LIST     architectures to build for (default "8.0;9.0": sm_80 and sm_90;
                           the kernels need sm_80 or newer, older entries are dropped).
  MAX_JOBS                 parallel compile jobs for ninja.
The CUDA kernels compile without a GPU: only nvcc and a CUDA build of torch are needed.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


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


def _want_cuda() -> tuple[bool, str]:
    import torch

    if os.environ.get("ROBUSTFT_FORCE_CPU", "0") not in ("", "0"):
        return False, "ROBUSTFT_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = _find_cuda_home()
    if home is None:
        warnings.warn("robustft_ext: nvcc not found (set CUDA_HOME); building the CPU kernels only")
        return False, "nvcc not found"
    os.environ["CUDA_HOME"] = home
    if _cublas_link() is None:
        warnings.warn(f"robustft_ext: cuBLAS was found neither in the CUDA toolkit at {home} nor "
                      "in the nvidia pip packages (pip install nvidia-cublas); building the CPU "
                      "kernels only")
        return False, "cuBLAS not found"
    return True, f"CUDA toolkit at {home}"


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
        warnings.warn(f"robustft_ext: the CUDA kernels need sm_80 or newer; dropping "
                      f"{sorted(set(archs) - set(kept))} from TORCH_CUDA_ARCH_LIST")
    return ";".join(kept) if kept else DEFAULT_ARCH_LIST


def _write_build_info(with_cuda: bool, reason: str) -> None:
    import torch

    path = os.path.join(ROOT, "robustft_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time: what the extension was built against."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_REASON = {reason!r}\n")
        f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}\n")


def _extensions():
    with_cuda, reason = _want_cuda()
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    _write_build_info(with_cuda, reason)
    sources = ["csrc/schemas.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cublas_dirs, cublas_args = _cublas_link()  # found: _want_cuda checked
        ext = CUDAExtension(
            "robustft_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _extra_cuda_includes(),
            define_macros=[("RFT_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo",
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
    print(f"robustft_ext: building {'CPU+CUDA' if with_cuda else 'CPU-only'} kernels ({reason})",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["robustft_ext", "robustft_ext.*"])
    + find_packages("python", include=["robustft_train", "robustft_train.*"]),
    package_dir={"robustft_train": "python/robustft_train"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
