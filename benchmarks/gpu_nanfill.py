"""Every public loss of robustft_ext on the native backend, forward and backward, with every
fresh tensor filled with NaN: the outputs that cuBLAS writes with beta = 0 (each chunk's rows
of the first feature gradient, the Lipsum-FT products) and every other buffer that a kernel
must write in full start as NaN, so a single entry left unwritten, or read as beta * NaN,
shows as a non-finite loss or gradient.

  python benchmarks/gpu_nanfill.py --device cuda     # gpu_check.sh's nanfill stage
  python benchmarks/gpu_nanfill.py --device cpu      # the dry run: the same calls on the CPU

The fill is torch's own: with deterministic algorithms on, torch.utils.deterministic.
fill_uninitialized_memory makes every torch.empty (at::empty in our C++ too) return NaN; the
script first checks that it does on this device, else the check would prove nothing. The cases
are gpu_sanitize.py's (the same losses and shapes, float32 and bfloat16), each at the default
workspace limit and at a one-byte one (the backward in chunks of 128 rows); on CUDA also at
N = 2048, D = 64 (16 chunks) and N = 64, D = 4096 (a long inner dimension, where cuBLAS may
split K). Prints "RFT_NANFILL ok ..." or "RFT_NANFILL FAIL ..." per case, then
"RFT_NANFILL done: ..."; exits 1 when a case fails or the fill is not on.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

# torch checks this before a cuBLAS call in deterministic mode; any value that it accepts
# serves, since determinism is not what is checked here.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

import robustft_ext as rft  # noqa: E402
from gpu_sanitize import DTYPES, SHAPES, cases, run_case  # noqa: E402

CUDA_SHAPES = ((2048, 64), (64, 4096))
LIMITS = (None, 1)   # bytes of workspace: the default, then one chunk of rows at a time


def fill_with_nan() -> None:
    """Every later torch.empty returns NaN (integers: their largest value)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")


def fill_is_on(device: torch.device) -> bool:
    return bool(torch.empty(1000, device=device).isnan().all())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the dry run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fill_with_nan()
    if not fill_is_on(device):
        print("RFT_NANFILL FAIL torch.empty does not return NaN here: the check would prove "
              "nothing", flush=True)
        return 1
    shapes = SHAPES + (CUDA_SHAPES if device.type == "cuda" else ())
    failures, ran = 0, 0
    for limit in LIMITS:
        rft.set_workspace_limit(limit)
        for (n, d) in shapes:
            for dtype in DTYPES:
                for name, fn in cases(n, d, dtype, device).items():
                    label = (f"{name} {str(dtype).replace('torch.', '')} N={n} D={d}"
                             + (f" workspace {limit} B" if limit else ""))
                    try:
                        why = run_case(fn, device)
                    except Exception as exc:  # noqa: BLE001 - record, go on with the next case
                        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                        traceback.print_exc()
                    ran += 1
                    if why is None:
                        print(f"RFT_NANFILL ok {label}", flush=True)
                    else:
                        failures += 1
                        print(f"RFT_NANFILL FAIL {label}: {why}", flush=True)
    rft.set_workspace_limit(None)
    print(f"RFT_NANFILL done: {ran - failures}/{ran} cases finite on {device.type} with every "
          "fresh tensor NaN-filled", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
