#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine that has no network, for its Python 3.12 on x86-64 Linux. Run it here, where pip
# reaches the registry; then carry .whl/ with the checkout to the GPU machine.
#
#   bash benchmarks/gpu_wheels.sh                  # the default set below (about 2.4 MB)
#   bash benchmarks/gpu_wheels.sh NAME==VERSION    # one more (its own needs are not fetched)
#
# The GPU machine's image already holds torch, triton, numpy, pytest, pytest-benchmark,
# pytest-xdist, pytest-timeout, scikit-learn, matplotlib, timm, torchvision, regex, tqdm,
# huggingface-hub and safetensors; what the benchmarks' providers need beyond that is
#   open_clip_torch   the open_clip provider (and its ftfy -> wcwidth)
#   inf-cl            the Inf-CL provider (needs only triton and numpy)
# Versions are pinned to those the benchmarks were written against. Set PYTHON_VERSION or
# PLATFORMS to fetch for another interpreter or platform.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}"
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 inf-cl==1.2.1 "$@")

platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp "${platform_args[@]}" -d .whl "${WHEELS[@]}"

# gpu_check.sh installs every wheel in .whl/ at once: two versions of one package would stop
# that install, so say so here.
dupes="$(ls .whl/*.whl | sed 's|.*/||; s/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [ -n "$dupes" ]; then
    echo "gpu_wheels.sh: .whl/ holds more than one version of: $dupes; remove the older" >&2
    exit 1
fi
size_kb="$(du -sk .whl | cut -f1)"
echo "gpu_wheels.sh: .whl/ holds $(ls .whl/*.whl | wc -l) wheels, ${size_kb} KiB" \
     "(the device machine takes at most 64 MiB of working tree per call)"
echo "next, the device call (docs/benchmarks.md, Running the GPU check):" \
     'run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)'
