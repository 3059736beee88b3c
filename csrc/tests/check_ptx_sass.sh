#!/usr/bin/env bash
# Compiles the kernels of csrc/tests/cuda_emulation/mma_test_kernels.cuh, which use every
# wrapper of csrc/cuda/mma_ptx.cuh, with nvcc for sm_80 and sm_90 (no GPU needed) and checks
# in the SASS that the wrappers became the tensor-core and async-copy instructions:
#   HMMA.16816.F32.BF16 (mma m16n8k16 bf16), HMMA.16816.F32 (f16), HMMA.1688.F32.TF32 (tf32),
#   LDSM.16.M88{,.2,.4} (ldmatrix x1/x2/x4), LDSM.16.MT88{.2,.4} (.trans), LDGSTS (cp.async),
#   LDGDEPBAR (cp.async.commit_group), DEPBAR (cp.async.wait_group)
# and prints their counts per architecture, with the register / shared-memory use of the
# kernels. Exits nonzero when nvcc fails or an instruction is missing.
#
# Environment: CUDA_HOME (default /usr/local/cuda); CUOBJDUMP (default $CUDA_HOME/bin/cuobjdump,
# else the one shipped with triton); KEEP_TMP=1 keeps the object and the SASS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
if [ -z "${CUOBJDUMP:-}" ]; then
  if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
    CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
  else
    CUOBJDUMP="$(python3 -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
  fi
fi
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC (set CUDA_HOME)" >&2; exit 2; }
[ -x "${CUOBJDUMP:-}" ] || { echo "no cuobjdump (set CUOBJDUMP)" >&2; exit 2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/rft_sass.XXXXXX")"
cleanup() { [ "${KEEP_TMP:-0}" = 1 ] && echo "kept $TMP" || rm -rf "$TMP"; }
trap cleanup EXIT

echo "== $("$NVCC" --version | tail -1); cuobjdump: $CUOBJDUMP"
"$NVCC" -std=c++17 -O3 -Icsrc -Icsrc/tests \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -c csrc/tests/check_mma_ptx.cu -o "$TMP/check_mma_ptx.o"

# name|regex (extended, over the SASS text)
CHECKS=(
  "HMMA.16816.F32.BF16  (mma bf16)|HMMA\.16816\.F32\.BF16 "
  "HMMA.16816.F32       (mma f16)|HMMA\.16816\.F32 "
  "HMMA.1688.F32.TF32   (mma tf32)|HMMA\.1688\.F32\.TF32 "
  "LDSM.16.M88          (ldmatrix x1)|LDSM\.16\.M88 "
  "LDSM.16.M88.2        (ldmatrix x2)|LDSM\.16\.M88\.2 "
  "LDSM.16.M88.4        (ldmatrix x4)|LDSM\.16\.M88\.4 "
  "LDSM.16.MT88.2       (x2 .trans)|LDSM\.16\.MT88\.2 "
  "LDSM.16.MT88.4       (x4 .trans)|LDSM\.16\.MT88\.4 "
  "LDGSTS               (cp.async)|LDGSTS"
  "LDGSTS...ZFILL       (src_bytes < 16)|LDGSTS[.A-Z0-9]*\.ZFILL"
  "LDGDEPBAR            (commit_group)|LDGDEPBAR"
  "DEPBAR.LE            (wait_group)|DEPBAR\.LE"
  "F2FP...PACK_AB       (pack2)|F2FP[.A-Z0-9]*PACK_AB"
)
missing=0
for arch in sm_80 sm_90; do
  "$CUOBJDUMP" --dump-sass -arch "$arch" "$TMP/check_mma_ptx.o" 2>/dev/null >"$TMP/$arch.sass"
  echo "== $arch: $(grep -c 'Function :' "$TMP/$arch.sass") kernels"
  for c in "${CHECKS[@]}"; do
    name="${c%%|*}" re="${c#*|}"
    n=$(grep -cE "$re" "$TMP/$arch.sass" || true)
    status=ok
    [ "$n" -gt 0 ] || { status=MISSING; missing=$((missing + 1)); }
    printf '   %-40s %5d  %s\n' "$name" "$n" "$status"
  done
  echo "   resource usage of the GEMM tile kernels:"
  "$CUOBJDUMP" --dump-resource-usage -arch "$arch" "$TMP/check_mma_ptx.o" 2>/dev/null |
    grep -A1 'gemm_tile_kernel' | grep -oE 'REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+' | sed 's/^/     /' || true
done
if [ "$missing" -gt 0 ]; then
  echo "== $missing instruction(s) missing"
  exit 1
fi
echo "== every wrapper compiles to its instruction on sm_80 and sm_90"
