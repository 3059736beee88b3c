"""Benchmark the SigLIP loss: providers x modes x N x D.

Rows go to a new benchmarks/results/<device>_<UTC time>_siglip.csv (ignored by git) and its
plots beside it; --append adds them to the tracked benchmarks/results.csv instead.

  python benchmarks/bench_siglip.py                  # device defaults (GPU: bf16, N 1k..64k, D 512/768/1024;
                                                 #   CPU: fp32, N 1k..8k, D 512)
  python benchmarks/bench_siglip.py --quick          # two small sizes, few repeats
  python benchmarks/bench_siglip.py --n 8192 --d 512 --providers reference native --modes full

harness/ holds what is measured and how (its __init__.py says which module holds
what); python benchmarks/plot.py draws the CSV.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    main("siglip")
