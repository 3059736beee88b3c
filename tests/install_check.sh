#!/usr/bin/env bash
# Install robustft_ext as a user would, away from this checkout, and test what got installed.
#
#   tests/install_check.sh torch   the newest torch on the registry (or $TORCH_SPEC, e.g.
#                                  "torch==2.6.0" for the floor) in a throwaway venv without the
#                                  system site-packages; `pip install -v .` (not editable): the
#                                  CUDA kernels where nvcc can build against that torch, else the
#                                  CPU kernels and a warning; then a smoke subset of the tests.
#   tests/install_check.sh package `python -m build` (an sdist, then a wheel built from the unpacked
#                                  sdist, which proves the sdist holds what the build needs) with
#                                  the installed torch; the wheel installed into a fresh venv over
#                                  the system site-packages (torch, open_clip): import, clip_loss
#                                  on the native kernels, robustft-train --help,
#                                  robustft-open-clip-train --help. (Installing the sdist too
#                                  would compile the same sources a second time.)
# Works on a copy of the tracked files (what a clone holds), in a temporary folder it removes.
# Environment: PYTHON (default python3), TORCH_SPEC (default: torch, the newest), KEEP=1 keeps
# the temporary folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/robustft_install_check.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

copy_source() {  # the tracked files, as a clone would have them
  mkdir -p "$1"
  (cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$1")
}

check_installed() {  # $1: a venv with robustft_ext installed; $2=cli: also the console commands
  local venv="$1" help
  (cd "$WORK" && "$venv/bin/python" - "$venv" <<'EOF'
import os, sys, torch
import robustft_ext as rft
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(rft.__file__)
assert where.startswith(venv), f"robustft_ext imported from {where}, not from {venv}"
g = torch.Generator().manual_seed(0)
img = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=1).requires_grad_()
txt = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=1)
native = rft.clip_loss(img, txt, 14.3, backend="native")
reference = rft.clip_loss(img, txt, 14.3, backend="reference")
torch.testing.assert_close(native, reference)
native.backward()
assert torch.isfinite(img.grad).all()
print(f"robustft_ext {rft.__version__} from {where} with torch {torch.__version__}: "
      f"clip_loss native {native.item():.6f} = reference {reference.item():.6f}")
print(rft.available_backends())
EOF
  )
  if [ "${2:-}" = cli ]; then  # the driver and open_clip's trainer need open_clip installed
    help="$("$venv/bin/robustft-train" --help)"
    echo "${help%%$'\n'*}"
    help="$("$venv/bin/robustft-open-clip-train" --help)"
    echo "${help%%$'\n'*}"
  fi
}

newest_torch() {
  local spec="${TORCH_SPEC:-torch}" venv="$WORK/venv-torch" start=$SECONDS
  echo "== install check: $spec in a throwaway venv (no system site-packages)"
  "$PYTHON" -m venv "$venv"
  # Ignore pip config files: they may cap torch (this project's machines cap it at 2.14.1).
  PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "$spec" numpy ninja "setuptools>=64" wheel pytest
  echo "   torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') installed in $((SECONDS - start)) s"
  copy_source "$WORK/src"
  (cd "$WORK/src" && PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -v --no-build-isolation --no-deps . \
    > "$WORK/build.log" 2>&1) || { tail -n 60 "$WORK/build.log"; exit 1; }
  grep "robustft_ext: building" "$WORK/build.log"  # the build says what it compiles
  grep -A1 "WARNING: robustft_ext" "$WORK/build.log" || true
  echo "   built and installed in $((SECONDS - start)) s so far"
  check_installed "$venv"
  # The smoke subset, against the installed package (tests copied outside the source tree).
  mkdir -p "$WORK/smoke"
  cp -r "$ROOT/tests" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/smoke/"
  (cd "$WORK/smoke" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -ra \
    tests/backends/test_build_config.py tests/losses/test_bad_input.py tests/backends/test_backend_selection.py \
    tests/losses/test_gradcheck_opcheck_compile.py -m "not triton and not cuda" -k "not triton")
  echo "== install check: $spec done in $((SECONDS - start)) s"
}

package() {
  local start=$SECONDS builder="$WORK/venv-build"
  echo "== install check: python -m build (sdist, then a wheel from it), CPU kernels"
  copy_source "$WORK/src-package"
  "$PYTHON" -m venv --system-site-packages "$builder"
  "$builder/bin/pip" install -q build
  # Build against the torch already installed (as pip install --no-build-isolation does).
  ROBUSTFT_FORCE_CPU=1 "$builder/bin/python" -m build --no-isolation --outdir "$WORK/dist" \
    "$WORK/src-package" > "$WORK/package.log" 2>&1 || { tail -n 60 "$WORK/package.log"; exit 1; }
  grep "robustft_ext: building" "$WORK/package.log"
  ls -l "$WORK/dist"
  echo "   sdist and wheel built in $((SECONDS - start)) s"
  local wheels=("$WORK"/dist/*.whl) sdists=("$WORK"/dist/*.tar.gz)
  if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ] ||
     [ "${#sdists[@]}" -ne 1 ] || [ ! -f "${sdists[0]}" ]; then
    echo "install check: expected one sdist and one wheel in $WORK/dist" >&2
    exit 1
  fi
  local venv="$WORK/venv-wheel"
  echo "== install check: $(basename "${wheels[0]}") into a fresh venv"
  "$PYTHON" -m venv --system-site-packages "$venv"
  # with the extra that open_clip's trainer needs (robustft-open-clip-train)
  "$venv/bin/pip" install -q --no-build-isolation "${wheels[0]}[open-clip-train]"
  check_installed "$venv" cli
  echo "== install check: packaging done in $((SECONDS - start)) s"
}

case "${1:-}" in
  torch) newest_torch ;;
  package) package ;;
  *) echo "usage: $0 torch|package" >&2; exit 2 ;;
esac
