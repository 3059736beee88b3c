#!/usr/bin/env bash
# The whole GPU validation of robustft_ext in one command, stage by stage, each under its own
# time cap, inside an overall budget (default 500 s: under 8.5 minutes on an H100/H200):
#
#   wheels     install the wheels carried in .whl/ (bash benchmarks/gpu_wheels.sh fills it)
#   env        what the machine has (GPU, driver, nvcc, ninja, compute-sanitizer, packages)
#   build      build the extension for sm_90 only with all cores, in a temporary copy of the
#              checkout (the checkout itself is left as it is); the build time is reported
#   ceiling    the bf16 rate of a large torch.mm, the practical ceiling (gpu_ceiling.py)
#   nanfill    every public loss with each fresh tensor NaN-filled: what cuBLAS writes with
#              beta = 0 must come out finite (gpu_nanfill.py)
#   memcheck   compute-sanitizer memcheck and racecheck over every public op on the native
#   racecheck    CUDA backend at a small and an odd shape (benchmarks/gpu_sanitize.py)
#   tests      pytest -m "cuda or triton": every device-parametrised test on cuda, every
#              cuda-marked test, the Triton tests compiled for real (TRITON_INTERPRET unset);
#              a module that cannot be imported is reported, the others still run
#   bench      the bf16 subset: CLIP, SigLIP, CLIP + m^2, a RobustFTLoss step (gpu_bench.py)
#   summary    summary.md (stages, ceiling, tables per loss and mode) and plots.png
#
# A failing, hanging or skipped stage never stops the next one; each stage's outcome (ok,
# failed (rc N), skipped: why, timed out) is printed and written to status.tsv, also for a
# stage its cap killed (from what it left: the tests written so far, the sanitizer's output).
# Everything lands in one folder: --out DIR, else $OUT/<device>_<UTC time> when $OUT is set,
# else benchmarks/gpu_results/<device>_<UTC time> (meant to be committed). At most 8 files,
# none deeper than the folder itself: summary.md, status.tsv, results.csv, plots.png,
# ceiling.json, env.txt, tests.tsv (one row per test, written as each ends), log.txt (every
# stage's full output).
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run          # on any CPU machine, toy sizes, < 3 min;
#                                                   #   writes under benchmarks/results/ (ignored)
#   bash benchmarks/gpu_check.sh --stages build,bench --budget 300
#
# Options: --dry-run, --out DIR, --budget SECONDS, --stages LIST (comma-separated; the summary
# always runs), --verbose (stream every stage's output), --keep-work (keep the temporary copy).
# Environment: PYTHON (default python3), CUDA_HOME (else /usr/local/cuda, else the nvcc on
# PATH: setup.py's search), GPU_CHECK_ARCH (default 9.0: TORCH_CUDA_ARCH_LIST of the build).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SELF="$HERE/gpu_check.sh"
PYTHON="${PYTHON:-python3}"
# The short, certain stages first, then the sanitizers, then the long ones (tests, bench).
ALL_STAGES="wheels env build ceiling nanfill memcheck racecheck tests bench summary"

# Stage caps (seconds), and the time that the stages before each one keep back for it: a slow
# build or sanitizer run shortens the stages after it, but none below what is kept for it.
declare -A CAP=([wheels]=60 [env]=40 [build]=240 [ceiling]=40 [nanfill]=45 [memcheck]=100
                [racecheck]=100 [tests]=150 [bench]=220 [summary]=30)
declare -A RESERVE=([wheels]=0 [env]=0 [build]=0 [ceiling]=15 [nanfill]=15 [memcheck]=45
                    [racecheck]=45 [tests]=45 [bench]=90 [summary]=25)
declare -A DRY_CAP=([wheels]=10 [env]=30 [build]=10 [ceiling]=20 [nanfill]=40 [memcheck]=40
                    [racecheck]=40 [tests]=60 [bench]=80 [summary]=25)
declare -A DRY_RESERVE=([wheels]=0 [env]=0 [build]=0 [ceiling]=5 [nanfill]=10 [memcheck]=0
                        [racecheck]=0 [tests]=30 [bench]=30 [summary]=15)
MIN_STAGE_S=8        # a stage left with less than this is skipped, not started
SKIP_RC=77           # a stage's "skipped" exit code (its reason in $NOTE)
INCOMPLETE_RC=75     # a stage that stopped itself at its deadline with work left ("timed out")
TEST_MARGIN_S=25     # the tests stage's pytest starts no test this close to the stage's cap
TEST_TIMEOUT_S=60    # one test's limit (pytest-timeout, where installed)
DRY_TEST_RUN_S=30    # the dry run's pytest starts no test after this many seconds

# --------------------------------------------------------------------------- stage bodies
# Each runs as `bash gpu_check.sh __stage NAME` under `timeout`, with MODE, SRC, WORK, OUTDIR,
# NOTE, CAP_S, PYTHON and PYTHONPATH exported by the parent; it writes one line to $NOTE.

note() { printf '%s\n' "$*" > "$NOTE"; }

need_cuda() {  # a real run's GPU stages skip, saying why, where no CUDA device is visible
    if [ "$MODE" = real ] && [ "$HAVE_CUDA" != 1 ]; then
        note "no CUDA device visible to torch (on a machine without a GPU, use --dry-run)"
        exit $SKIP_RC
    fi
}

stage_env() {
    {
        echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
        echo "host: $(uname -srm); cores: $(nproc)"
        command -v free >/dev/null && free -g | sed -n 2p | awk '{print "memory: " $2 " GiB"}'
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
                --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
        else
            echo "gpu: nvidia-smi not found"
        fi
        if [ -n "${CUDA_HOME:-}" ]; then
            echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1) ($CUDA_HOME)"
        else echo "nvcc: not found (CUDA_HOME, /usr/local/cuda, PATH)"; fi
        if command -v ninja >/dev/null; then echo "ninja: $(ninja --version) ($(command -v ninja))"
        else echo "ninja: not found (the build would compile one file at a time)"; fi
        local san; san="$(sanitizer_path)"
        if [ -n "$san" ]; then echo "compute-sanitizer: $("$san" --version 2>&1 | tail -n 1)"
        else echo "compute-sanitizer: not found"; fi
        echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
    } > "$OUTDIR/env.txt"
    "$PYTHON" - "$SRC" >> "$OUTDIR/env.txt" <<'EOF' || { note "python environment check failed (see log.txt)"; exit 1; }
import os, sys
src = os.path.realpath(sys.argv[1])
import torch
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); cuda available: "
      f"{torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
# Looked up, not imported (open_clip's import alone takes seconds); a package that is there
# but broken shows in the rows of the stage that uses it.
from importlib import metadata, util
for module, dist in (("triton", "triton"), ("numpy", "numpy"), ("open_clip", "open_clip_torch"),
                     ("inf_cl", "inf_cl"), ("matplotlib", "matplotlib"), ("pytest", "pytest"),
                     ("xdist", "pytest-xdist"), ("pytest_timeout", "pytest-timeout")):
    if util.find_spec(module) is None:
        print(f"{module}: missing")
        continue
    try:
        print(f"{module}: {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"{module}: present")
import robustft_ext
where = os.path.realpath(robustft_ext.__file__)
print(f"robustft_ext: {robustft_ext.__version__} from {where}")
if not where.startswith(src + os.sep):
    sys.exit(f"robustft_ext resolves to {where}, not to the work copy {src}")
EOF
    cat "$OUTDIR/env.txt"
    note "$(grep -m1 '^device:' "$OUTDIR/env.txt" || echo 'no CUDA device visible')"
}

stage_wheels() {
    local wheels=("$ROOT"/.whl/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        note "no wheels in .whl/ (bash benchmarks/gpu_wheels.sh fills it on a machine with network)"
        exit $SKIP_RC
    fi
    if [ "$MODE" = dry ]; then
        note "dry run: this machine's own packages are used (${#wheels[@]} wheels in .whl/ not installed)"
        exit $SKIP_RC
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "${wheels[@]}" || { note "pip install of .whl/*.whl failed"; exit 1; }
    note "installed: $(cd "$ROOT/.whl" && ls ./*.whl | sed 's|^\./||; s/-[0-9].*//' | tr '\n' ' ')"
}

stage_build() {
    if [ "$MODE" = dry ]; then
        local so; so="$(cd "$SRC/robustft_ext" && ls _C*.so 2>/dev/null | head -n 1)"
        if [ -n "$so" ]; then so="the extension already built here ($so) is used"
        else so="no built extension found here: the native rows say so"; fi
        note "dry run: the sm_90 build (nvcc, minutes) is not run; $so"
        exit $SKIP_RC
    fi
    [ -n "${CUDA_HOME:-}" ] || { note "nvcc not found in \$CUDA_HOME, /usr/local/cuda or PATH"; exit 1; }
    local jobs; jobs="$(nproc)"
    command -v ninja >/dev/null || jobs="1 (no ninja: one file at a time)"
    local t0=$SECONDS
    ( cd "$SRC" && unset ROBUSTFT_FORCE_CPU && TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCH:-9.0}" \
        MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace ) \
        || { note "build failed after $((SECONDS - t0)) s (see log.txt)"; exit 1; }
    local took=$((SECONDS - t0))
    local sass=""
    local so; so="$(ls "$SRC"/robustft_ext/_C*.so 2>/dev/null | head -n 1)"
    if [ -n "$so" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
        sass="; SASS: $("$CUDA_HOME/bin/cuobjdump" --list-elf "$so" 2>/dev/null \
            | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')"
    fi
    local check
    check="$("$PYTHON" -c "
import torch
from robustft_ext.backends import unavailable_reason
print(unavailable_reason('native', torch.device('cuda'), torch.bfloat16) or 'ok')" 2>&1 | tail -n 1)"
    if [ "$check" != ok ]; then
        note "built in ${took} s, but the native CUDA kernels are unavailable: $check"
        exit 1
    fi
    local arch="${GPU_CHECK_ARCH:-9.0}"
    note "built for sm_${arch//./} (TORCH_CUDA_ARCH_LIST=$arch, nvcc in $CUDA_HOME)" \
        "with $jobs jobs in ${took} s${sass}"
}

stage_tests() {
    need_cuda
    # The dry run selects the cuda-marked tests only: on a CPU each skips at once, so the same
    # command line and test log are exercised in seconds (an interpreted Triton test can take
    # half a minute, past any deadline checked between tests).
    local args=() run_s="$DRY_TEST_RUN_S" sel="cuda"
    if [ "$MODE" = real ]; then
        sel="cuda or triton"
        run_s=$((CAP_S - TEST_MARGIN_S))
        # Workers in parallel: the Triton tests spend most of their time compiling, on the CPU.
        local workers=$(( $(nproc) < 12 ? $(nproc) : 12 ))
        "$PYTHON" -c "import xdist" 2>/dev/null && args+=(-n "$workers")
        "$PYTHON" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout "$TEST_TIMEOUT_S")
    fi
    # Each outcome goes to tests.tsv as it happens (benchmarks/gpu_pytest_log.py), and no test
    # starts after the deadline, so that pytest ends by itself before the cap kills it; a
    # module that cannot be imported is reported and the others still run.
    local pytest_rc=0 rc=0
    ( cd "$SRC" && env -u TRITON_INTERPRET PYTHONPATH="$SRC/benchmarks:$PYTHONPATH" \
        "$PYTHON" -m pytest -q -ra -p no:cacheprovider -p gpu_pytest_log \
        --gpu-test-log "$OUTDIR/tests.tsv" --gpu-deadline "$(( $(date +%s) + run_s ))" \
        --continue-on-collection-errors -m "$sel" "${args[@]}" tests ) || pytest_rc=$?
    report_tests || rc=$?
    case "$pytest_rc" in
        0|1|2|5) ;;  # passed, failed, stopped (the deadline), nothing selected
        *) note "pytest ended with rc $pytest_rc (see log.txt): $(cat "$NOTE")"; exit 1 ;;
    esac
    if [ "$MODE" = dry ]; then  # test outcomes on the CPU are the ordinary suite's business
        [ "$rc" -eq 3 ] && exit 1
        note "no CUDA device visible: -m $sel on the CPU: $(cat "$NOTE")"
        exit $SKIP_RC
    fi
    note "$(cat "$NOTE") (${args[*]:-serial})"
    case "$rc" in 0) exit 0 ;; 2) exit $INCOMPLETE_RC ;; *) exit 1 ;; esac
}

report_tests() {  # the note, and every failing test to the log, from tests.tsv; returns
    # gpu_summary.py's status: 0 all ran and passed, 1 a failure, 2 not all ran, 3 no log
    local out rc=0
    out="$("$PYTHON" "$SRC/benchmarks/gpu_summary.py" --tests "$OUTDIR/tests.tsv")" || rc=$?
    printf '%s\n' "$out" | tail -n +2
    note "$(printf '%s\n' "$out" | head -n 1)"
    return "$rc"
}

stage_nanfill() {
    need_cuda
    local device=cuda out="$WORK/nanfill.out"
    [ "$MODE" = dry ] && device=cpu
    "$PYTHON" "$SRC/benchmarks/gpu_nanfill.py" --device "$device" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]} done first
    done="$(grep '^RFT_NANFILL done: ' "$out" | tail -n 1)"
    first="$(grep -m1 '^RFT_NANFILL FAIL ' "$out")"
    note "${done:-the check did not finish (rc $rc)}${first:+; first: ${first#RFT_NANFILL FAIL }}"
    [ "$rc" -eq 0 ] || exit 1
    if [ "$MODE" = dry ]; then
        note "no CUDA device visible: it ran on the CPU (${done#RFT_NANFILL done: })"
        exit $SKIP_RC
    fi
}

sanitizer_path() {
    if command -v compute-sanitizer >/dev/null; then command -v compute-sanitizer
    elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
        echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
    fi
}

stage_sanitizer() {  # $1: memcheck or racecheck
    local tool="$1" out="$WORK/$1.out"
    need_cuda
    if [ "$MODE" = dry ]; then
        if [ "$tool" = racecheck ] && tail -n 1 "$WORK/memcheck.out" 2>/dev/null | grep -q '^RFT_SANITIZE done'; then
            note "no CUDA device visible: compute-sanitizer not run; the op driver's CPU run is memcheck's ($(tail -n 1 "$WORK/memcheck.out"))"
            exit $SKIP_RC
        fi
        "$PYTHON" "$SRC/benchmarks/gpu_sanitize.py" --device cpu 2>&1 | tee "$out"
        local rc=${PIPESTATUS[0]}
        [ "$rc" -eq 0 ] || { note "the op driver failed on CPU (rc $rc): $(grep -m1 'RFT_SANITIZE FAIL' "$out")"; exit 1; }
        note "no CUDA device visible: compute-sanitizer not run; the op driver ran on CPU ($(tail -n 1 "$out"))"
        exit $SKIP_RC
    fi
    local san; san="$(sanitizer_path)"
    [ -n "$san" ] || { note "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"; exit $SKIP_RC; }
    local why
    why="$("$PYTHON" -c "
import torch
from robustft_ext.backends import unavailable_reason
print(unavailable_reason('native', torch.device('cuda'), torch.float32) or '')" 2>&1 | tail -n 1)"
    [ -z "$why" ] || { note "native CUDA kernels unavailable: $why"; exit $SKIP_RC; }
    # Without the caching allocator every tensor is its own allocation, so an access past a
    # tensor's end is caught instead of landing in a neighbour inside a cached block.
    # The print limit leaves room for reports inside torch or cuBLAS (counted apart) without
    # hiding ours behind them.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 66 --print-limit 200 \
        "$PYTHON" "$SRC/benchmarks/gpu_sanitize.py" --device cuda 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    case "$(report_sanitizer "$tool" "$rc")" in
        ok) exit 0 ;;
        skipped) exit $SKIP_RC ;;
        *) exit 1 ;;
    esac
}

report_sanitizer() {  # $1: the tool, $2: its exit code; writes the note, prints the verdict
    local verdict
    verdict="$("$PYTHON" "$SRC/benchmarks/gpu_sanitize.py" --classify "$WORK/$1.out" --rc "$2" \
        --tool "$1")" || { note "could not read the $1 output (rc $2)"; echo failed; return; }
    note "${verdict#*$'\t'}"
    echo "${verdict%%$'\t'*}"
}

after_kill() {  # the note of a stage its cap killed, from what the stage left
    case "$1" in
        tests) report_tests ;;
        memcheck|racecheck) report_sanitizer "$1" 124 >/dev/null ;;
        *) ;;
    esac
}

stage_ceiling() {
    need_cuda
    "$PYTHON" "$SRC/benchmarks/gpu_ceiling.py" --json "$OUTDIR/ceiling.json" \
        $([ "$MODE" = dry ] && echo --toy) || { note "ceiling measurement failed"; exit 1; }
    note "$("$PYTHON" -c "
import json, sys
c = json.load(open(sys.argv[1]))
print(c['summary'])" "$OUTDIR/ceiling.json")"
}

stage_bench() {
    need_cuda
    local deadline=$((CAP_S - 10))
    "$PYTHON" "$SRC/benchmarks/gpu_bench.py" --csv "$OUTDIR/results.csv" --deadline-s "$deadline" \
        --note-file "$NOTE" $([ "$MODE" = dry ] && echo --toy --device cpu) \
        || { [ -s "$NOTE" ] || note "benchmark driver failed"; exit 1; }
}

stage_summary() {
    "$PYTHON" "$SRC/benchmarks/gpu_summary.py" --dir "$OUTDIR" --title "$LABEL" \
        $([ "$MODE" = dry ] && echo --dry-run) || { note "summary failed"; exit 1; }
    note "summary.md and plots.png written"
}

run_stage_body() {
    case "$1" in
        env) stage_env ;;
        wheels) stage_wheels ;;
        build) stage_build ;;
        tests) stage_tests ;;
        nanfill) stage_nanfill ;;
        memcheck|racecheck) stage_sanitizer "$1" ;;
        ceiling) stage_ceiling ;;
        bench) stage_bench ;;
        summary) stage_summary ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
}

if [ "${1:-}" = "__stage" ]; then
    run_stage_body "$2"
    exit $?
fi
if [ "${1:-}" = "__killed" ]; then
    after_kill "$2"
    exit 0
fi

# --------------------------------------------------------------------------- the parent

# The CUDA toolkit as setup.py finds it ($CUDA_HOME or $CUDA_PATH where it holds nvcc, else
# /usr/local/cuda, else where the nvcc on PATH lives), exported as CUDA_HOME for every stage;
# and ninja, which torch's build looks for on PATH only: where PATH has none, the folder of
# the one installed with this Python (a venv's bin, or the ninja package's) goes first on it.
find_toolchain() {
    local home dir
    home="$("$PYTHON" -c 'import setup; print(setup._find_cuda_home() or "")' 2>/dev/null)"
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then export CUDA_HOME="$home"; else unset CUDA_HOME; fi
    command -v ninja >/dev/null && return
    dir="$("$PYTHON" -c '
import os, sys, sysconfig
dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
try:
    import ninja
    dirs.append(ninja.BIN_DIR)
except Exception:  # no ninja package: the folders above only
    pass
print(next((d for d in dirs if d and os.access(os.path.join(d, "ninja"), os.X_OK)), ""))' 2>/dev/null)"
    if [ -n "$dir" ]; then export PATH="$dir:$PATH"; fi
}

MODE=real OUTARG="" BUDGET="" STAGES="$ALL_STAGES" VERBOSE=0 KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --out) OUTARG="${2:?--out needs a folder}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        --stages) STAGES="$(echo "${2:?--stages needs a list}" | tr ',' ' ') summary"; shift ;;
        --verbose) VERBOSE=1 ;;
        --keep-work) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for s in $STAGES; do
    case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_check.sh: unknown stage $s; known: $ALL_STAGES" >&2; exit 2 ;; esac
done
if [ "$MODE" = dry ]; then
    BUDGET="${BUDGET:-175}"
    for s in "${!DRY_CAP[@]}"; do CAP[$s]=${DRY_CAP[$s]} RESERVE[$s]=${DRY_RESERVE[$s]}; done
fi
BUDGET="${BUDGET:-500}"
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$MODE" = dry ]; then
    DEVICE_SLUG="dryrun_cpu"
else
    DEVICE_SLUG="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    DEVICE_SLUG="$(echo "${DEVICE_SLUG:-no_gpu}" | sed 's/[^A-Za-z0-9.+-]\{1,\}/_/g; s/^_//; s/_$//')"
fi
LABEL="${DEVICE_SLUG}_${STAMP}"
if [ -n "$OUTARG" ]; then OUTDIR="$OUTARG"
elif [ -n "${OUT:-}" ]; then OUTDIR="$OUT/$LABEL"
elif [ "$MODE" = dry ]; then OUTDIR="$ROOT/benchmarks/results/$LABEL"
else OUTDIR="$ROOT/benchmarks/gpu_results/$LABEL"; fi
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
# A folder used before holds nothing of this run but what this run writes (results.csv is
# appended to as the benchmark goes).
rm -f "$OUTDIR"/{summary.md,plots.png,results.csv,ceiling.json,env.txt,tests.tsv}
LOG="$OUTDIR/log.txt" STATUS="$OUTDIR/status.tsv"
: > "$LOG"
printf 'stage\tstatus\tseconds\tcap_s\tdetail\n' > "$STATUS"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rft_gpu_check.XXXXXX")"
SRC="$WORK/src"
cleanup() { [ "$KEEP" = 1 ] && echo "work copy kept: $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT

say() { printf '[gpu_check %4ds] %s\n' "$SECONDS" "$*" | tee -a "$LOG"; }
say "mode=$MODE budget=${BUDGET}s out=$OUTDIR"

# The work copy: what git tracks plus untracked files it does not ignore (no build outputs,
# no .venv, no earlier results); without git, the tree less those folders.
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z -co --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$ROOT/$f" ] && printf '%s\0' "$f"; done \
        | tar -C "$ROOT" --null -T - -cf - | tar -C "$SRC" -xf -
else
    tar -C "$ROOT" --exclude=./.git --exclude=./.whl --exclude=./.venv --exclude=./build \
        --exclude=./benchmarks/results --exclude=./benchmarks/gpu_results --exclude='*.so' \
        --exclude=./robustft_ext/_build_info.py --exclude='__pycache__' -cf - . | tar -C "$SRC" -xf -
fi
if [ ! -f "$SRC/setup.py" ]; then
    say "setup failed: could not copy the checkout to $SRC"
    printf 'setup\tfailed\t0\t0\tcould not copy the checkout\n' >> "$STATUS"
    exit 2
fi
if [ "$MODE" = dry ]; then
    # The dry run uses the extension already built: in this checkout (an editable install),
    # else that of the installed package.
    built="$ROOT/robustft_ext"
    if ! ls "$built"/_C*.so >/dev/null 2>&1; then
        built="$(cd / && "$PYTHON" -c 'import importlib.util, os
spec = importlib.util.find_spec("robustft_ext")
print(os.path.dirname(spec.origin) if spec and spec.origin else "")' 2>/dev/null)"
    fi
    if [ -n "$built" ] && ls "$built"/_C*.so >/dev/null 2>&1; then
        cp "$built"/_C*.so "$SRC/robustft_ext/"
        [ -f "$built/_build_info.py" ] && cp "$built/_build_info.py" "$SRC/robustft_ext/"
    fi
fi
export MODE SRC WORK OUTDIR PYTHON LABEL
cd "$SRC" || exit 2   # every stage runs in the work copy: `python -c`/`-m` put the cwd first
find_toolchain
export PYTHONPATH="$SRC:$SRC/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# A real run measures the defaults: Triton compiled for real, automatic backend selection,
# a build with CUDA (tests/conftest.py sets TRITON_INTERPRET=1 itself where no GPU is seen).
[ "$MODE" = real ] && unset TRITON_INTERPRET ROBUSTFT_BACKEND ROBUSTFT_FORCE_CPU
HAVE_CUDA=""

FAILED=0
run_stage() {
    local name="$1" reserve_after=0 seen=0 s
    for s in $ALL_STAGES; do
        [ "$seen" = 1 ] && case " $STAGES " in *" $s "*) reserve_after=$((reserve_after + RESERVE[$s])) ;; esac
        [ "$s" = "$name" ] && seen=1
    done
    local left=$((BUDGET - SECONDS)) cap=${CAP[$name]}
    [ "$name" = summary ] || { [ $((left - reserve_after)) -lt "$cap" ] && cap=$((left - reserve_after)); }
    local t0=$SECONDS status detail rc=0
    export NOTE="$WORK/note.$name" CAP_S="$cap"
    : > "$NOTE"
    if [ "$cap" -lt "$MIN_STAGE_S" ]; then
        status="skipped: time budget spent"
        detail="${left} s of the ${BUDGET} s budget left, ${reserve_after} s kept for the stages after it"
    else
        say "$name: start (cap ${cap} s)"
        printf '\n===== stage %s (cap %s s) =====\n' "$name" "$cap" >> "$LOG"
        if [ "$VERBOSE" = 1 ]; then
            timeout --kill-after=10 "$cap" bash "$SELF" __stage "$name" 2>&1 | tee -a "$LOG"
            rc=${PIPESTATUS[0]}
        else
            timeout --kill-after=10 "$cap" bash "$SELF" __stage "$name" >> "$LOG" 2>&1
            rc=$?
        fi
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            timeout 30 bash "$SELF" __killed "$name" >> "$LOG" 2>&1
        fi
        detail="$(head -c 600 "$NOTE" | head -n 1)"
        case "$rc" in
            0) status=ok ;;
            "$SKIP_RC") status="skipped: ${detail:-no reason given}"; detail="" ;;
            "$INCOMPLETE_RC") status="timed out" ;;
            124|137) status="timed out"; detail="killed at its ${cap} s cap${detail:+; $detail}" ;;
            *) status="failed (rc $rc)" ;;
        esac
    fi
    case "$status" in failed*|timed*) FAILED=$((FAILED + 1))
        [ "$VERBOSE" = 1 ] || { echo "----- last lines of $name -----"; tail -n 15 "$LOG"; echo "-----"; } ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$cap" \
        "$(echo "$detail" | tr '\t' ' ')" >> "$STATUS"
    say "$name: $status ($((SECONDS - t0)) s)${detail:+ - $detail}"
}

for s in $ALL_STAGES; do
    if [ -z "$HAVE_CUDA" ] && [ "$s" != wheels ] && [ "$s" != env ]; then
        # Whether torch sees a GPU: from the env stage's report, else asked here.
        if grep -q '^torch: .*cuda available: True' "$OUTDIR/env.txt" 2>/dev/null; then HAVE_CUDA=1
        elif grep -q '^torch: ' "$OUTDIR/env.txt" 2>/dev/null; then HAVE_CUDA=0
        else HAVE_CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
        fi
        export HAVE_CUDA
    fi
    case " $STAGES " in *" $s "*) run_stage "$s" ;; *) ;; esac
    # The carried wheels (open_clip, inf_cl, ...) serve every later stage.
    [ "$s" = wheels ] && [ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site:$PYTHONPATH"
done

if [ ! -s "$OUTDIR/summary.md" ]; then  # the summary stage failed: keep the stage table at least
    { echo "# GPU check $LABEL (the summary stage failed: stage table only)"; echo
      echo '| stage | status | seconds | cap (s) | detail |'; echo '| --- | --- | --- | --- | --- |'
      tail -n +2 "$STATUS" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}'
    } > "$OUTDIR/summary.md"
fi
say "done in ${SECONDS} s (budget ${BUDGET} s); ${FAILED} stage(s) failed or timed out; results in $OUTDIR"
echo
sed '/^<!-- DETAILS/,$d' "$OUTDIR/summary.md"
echo "(every table: $OUTDIR/summary.md)"
[ "$FAILED" -eq 0 ]
