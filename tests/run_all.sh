#!/usr/bin/env bash
# The whole test suite: the C++ unit tests (CMake + ctest against libtorch), then pytest
# (Triton kernels under TRITON_INTERPRET=1 when no GPU is visible; CUDA-only tests skip
# cleanly without a GPU). Exits nonzero when any test fails or when no test ran.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

bash csrc/tests/run_ctest.sh

# pytest exits 5 when it collected no test: that fails here too (set -e).
"$PYTHON" -m pytest -q -ra tests "$@"
