#!/usr/bin/env bash
# The whole test suite: the C++ unit tests (CMake + ctest against libtorch, and a mutation
# sample of the emulated CUDA kernel tests), then pytest
# (Triton kernels under TRITON_INTERPRET=1 when no GPU is visible; CUDA-only tests skip
# cleanly without a GPU). Exits nonzero when any test fails or when no test ran.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

bash csrc/tests/run_ctest.sh
# A sample of the CUDA kernels' mutants (a wrong fragment index, dropped barriers) must each
# make the emulated kernel test fail (csrc/tests/mutations_kernels.sh has all of them).
bash csrc/tests/mutation_check.sh csrc/tests/mutations_ci.sh

# pytest exits 5 when it collected no test: that fails here too (set -e). The tests run in
# one worker process per core (pytest-xdist; PYTEST_WORKERS overrides, 0 runs them in this
# process): most of the time goes to single-threaded work (the Triton interpreter, offline
# compiles, cuobjdump, the driver's and gpu_check's subprocesses), so two workers on two cores
# take about two thirds of the serial time.
"$PYTHON" -m pytest -q -ra -n "${PYTEST_WORKERS:-auto}" tests "$@"
