"""Benchmark m^2-mix: the paper's objective CLIP + w m^2 (default) or the m^2 term alone.

  python benchmarks/bench_m2mix.py                       # CLIP + m^2: reference (full mixed
                                                         #   logits, as the paper's code),
                                                         #   reference+compile, native (one fused
                                                         #   pass), native-separate (two fused
                                                         #   calls), triton, floor (the Gram
                                                         #   matrix's GEMMs alone)
  python benchmarks/bench_m2mix.py --objective m2        # the m^2 term alone
  python benchmarks/bench_m2mix.py --quick
  python benchmarks/bench_m2mix.py --n 8192 --providers reference native --modes full

Rows (loss "clip_m2mix" or "m2mix") go to a new CSV under benchmarks/results/, or with --append
to the tracked benchmarks/results.csv (see harness/results.py); compare them with the
"clip" rows of bench_clip.py and with the floor's (the targets: docs/benchmarks.md).
Every other flag is bench_clip.py's (harness/cli.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--objective", choices=["clip+m2", "m2"], default="clip+m2")
    known, rest = pre.parse_known_args()
    main("clip_m2mix" if known.objective == "clip+m2" else "m2mix", rest)
