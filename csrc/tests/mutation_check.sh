#!/usr/bin/env bash
# Mutation check of the C++ tests: each mutant (a sed expression applied to one source file)
# must make its test binary FAIL. Shows that the tests are sensitive to the defects the
# mutants stand for (a wrong fragment index, a dropped barrier, a dropped cp.async wait, ...).
#
#   csrc/tests/mutation_check.sh [SPEC...]        (default: csrc/tests/mutations_mma.sh)
#
# A SPEC is a bash file of lines
#   mutant NAME FILE SED_EXPRESSION TARGET [TEST_ARGS...]
# FILE: relative to the repository root (under csrc/ or CMakeLists.txt); SED_EXPRESSION: one
# `sed -E` expression (s/// or /regex/d) that must change FILE; TARGET: a CMake target of
# CMakeLists.txt (a test binary, e.g. robustft_mma_emulated_tests); TEST_ARGS: its arguments
# (harness.h: the groups to run). The working tree is never modified: CMakeLists.txt and
# csrc/ are copied to a temporary folder, configured once (torch's CMake prefix, as
# run_ctest.sh), every TARGET is built and run unmutated first (it must pass), then each
# mutant is applied to the copy, its TARGET rebuilt and run, and the file restored.
#
# Result per mutant: KILLED (the binary exits nonzero: failed checks, an abort of the
# emulator, or a timeout), SURVIVED (it passed: the tests missed the defect), NOT APPLIED
# (the expression changed nothing) or NO BUILD (the mutant does not compile: fix the
# expression). Exits nonzero unless every mutant is KILLED.
#
# Environment: PYTHON (default python3), JOBS (default 2), CMAKE_BUILD_TYPE (default
# Release), MUTANT_TIMEOUT (seconds per run, default 600), KEEP_TMP=1 keeps the folder.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
TIMEOUT="${MUTANT_TIMEOUT:-600}"
SPECS=("$@")
[ ${#SPECS[@]} -eq 0 ] && SPECS=(csrc/tests/mutations_mma.sh)

NAMES=() FILES=() EXPRS=() TARGETS=() ARGSS=()
mutant() {
  if [ $# -lt 4 ]; then echo "mutant: need NAME FILE SED TARGET [ARGS...]: $*" >&2; exit 2; fi
  NAMES+=("$1") FILES+=("$2") EXPRS+=("$3") TARGETS+=("$4")
  shift 4
  ARGSS+=("$*")
}
for spec in "${SPECS[@]}"; do
  # shellcheck source=/dev/null
  source "$spec" || { echo "cannot read $spec" >&2; exit 2; }
done
[ ${#NAMES[@]} -gt 0 ] || { echo "no mutants in ${SPECS[*]}" >&2; exit 2; }

START=$SECONDS
TMP="$(mktemp -d "${TMPDIR:-/tmp}/rft_mutants.XXXXXX")"
cleanup() { [ "${KEEP_TMP:-0}" = 1 ] && echo "kept $TMP" || rm -rf "$TMP"; }
trap cleanup EXIT
mkdir -p "$TMP/src"
cp -r CMakeLists.txt csrc "$TMP/src/"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
echo "== configure in $TMP"
cmake -S "$TMP/src" -B "$TMP/build" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DROBUSTFT_PYTHON="$(command -v "$PYTHON")" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
  >"$TMP/configure.log" 2>&1 || { cat "$TMP/configure.log"; exit 2; }

build() { cmake --build "$TMP/build" --target "$1" -j "$JOBS" >"$TMP/build.log" 2>&1; }
run() {  # TARGET ARGS: the exit status of the test binary
  local target="$1" args="$2"
  # shellcheck disable=SC2086
  (cd "$TMP/build" && timeout "$TIMEOUT" "./$target" $args >"$TMP/run.log" 2>&1) 2>/dev/null
}

echo "== baseline: every target unmutated must pass"
for target in $(printf '%s\n' "${TARGETS[@]}" | sort -u); do
  t0=$SECONDS
  build "$target" || { echo "baseline build of $target failed:"; tail -30 "$TMP/build.log"; exit 2; }
  # Each distinct argument list once ("-" stands for none).
  for args in $(for i in "${!NAMES[@]}"; do
                  [ "${TARGETS[$i]}" = "$target" ] && a="${ARGSS[$i]// /,}" && printf '%s\n' "${a:--}"
                done | sort -u); do
    [ "$args" = "-" ] && args=""
    run "$target" "${args//,/ }" || { echo "baseline $target ${args//,/ } FAILS:"; tail -30 "$TMP/run.log"; exit 2; }
  done
  echo "   $target: ok ($((SECONDS - t0)) s)"
done

survived=0
printf '%-28s %-12s %6s  %s\n' MUTANT RESULT SECONDS HOW
for i in "${!NAMES[@]}"; do
  name="${NAMES[$i]}" file="${FILES[$i]}" expr="${EXPRS[$i]}" target="${TARGETS[$i]}" args="${ARGSS[$i]}"
  t0=$SECONDS
  copy="$TMP/src/$file"
  if [ ! -f "$copy" ]; then
    printf '%-28s %-12s %6s  %s\n' "$name" "NOT APPLIED" 0 "no file $file"; survived=$((survived + 1)); continue
  fi
  cp -p "$copy" "$TMP/pristine"
  sed -E -e "$expr" "$TMP/pristine" >"$copy"
  if cmp -s "$copy" "$TMP/pristine"; then
    result="NOT APPLIED" how="the expression matches nothing in $file"
  elif ! build "$target"; then
    result="NO BUILD" how="$(grep -m1 -E 'error' "$TMP/build.log")"
  else
    run "$target" "$args"
    rc=$?
    if [ $rc -eq 0 ]; then
      result="SURVIVED" how="$target $args passed"
    else
      result="KILLED"
      if [ $rc -eq 124 ]; then how="timeout"
      elif grep -q '^cuda_emu:' "$TMP/run.log"; then how="emulator: $(grep -m1 '^cuda_emu:' "$TMP/run.log" | cut -c11-)"
      else how="$(grep -m1 -E 'check failed' "$TMP/run.log" | sed -E 's/.*check failed: //' | cut -c1-90)"
      fi
    fi
  fi
  cp -p "$TMP/pristine" "$copy"
  touch "$copy"  # newer than the mutant's objects: the next build recompiles it
  [ "$result" = KILLED ] || survived=$((survived + 1))
  printf '%-28s %-12s %6s  %s\n' "$name" "$result" "$((SECONDS - t0))" "$how"
done
echo "== ${#NAMES[@]} mutants, $((${#NAMES[@]} - survived)) killed, $survived not; $((SECONDS - START)) s in all"
[ $survived -eq 0 ]
