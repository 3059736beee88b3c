#!/usr/bin/env bash
# Configure, build and run the C++ unit tests (csrc/tests) with CMake against the libtorch
# of the installed torch, from the repository root. Exits nonzero when a step or a test
# fails. Needs cmake >= 3.18, a C++17 compiler and a Python with torch; no GPU, CUDA
# toolkit or built extension is needed.
#
# Environment: PYTHON (default python3), BUILD_DIR (default build/ctest), JOBS (default 2),
# CMAKE_BUILD_TYPE (default Release, i.e. -O2). Extra arguments go to the cmake configure
# step, e.g. csrc/tests/run_ctest.sh -G Ninja.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-build/ctest}"
JOBS="${JOBS:-2}"

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
PYTHON_PATH="$(command -v "$PYTHON")"

START=$SECONDS
echo "== configure ($BUILD_DIR, torch CMake prefix $TORCH_PREFIX)"
cmake -S . -B "$BUILD_DIR" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DROBUSTFT_PYTHON="$PYTHON_PATH" \
  -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
  "$@"

echo "== build (-j$JOBS), $((SECONDS - START)) s so far"
cmake --build "$BUILD_DIR" -j "$JOBS"

echo "== test, $((SECONDS - START)) s so far"
cd "$BUILD_DIR"
status=0
ctest --output-on-failure || status=$?
echo "== done in $((SECONDS - START)) s (ctest exit status $status)"
exit "$status"
