"""Benchmark a whole robust fine-tuning step: RobustFTLoss with CLIP + w m^2 + Lipsum-FT + DiVE.

  python benchmarks/bench_robust_step.py            # reference (every term eager, full logits),
                                                    #   reference+compile, native (one fused pass),
                                                    #   native-separate (one fused call per term),
                                                    #   triton, floor (the GEMMs alone)
  python benchmarks/bench_robust_step.py --quick
  python benchmarks/bench_robust_step.py --n 8192 --providers reference native --modes full

Inputs: the training batch [N, D], its pre-trained image features, K = 80 random-text features,
and a DiVE reference batch of N pairs (their gradients are part of the backward). Rows (loss
"robust_step") go to a new CSV under benchmarks/results/, or with --append to the tracked
benchmarks/results.csv (see harness/results.py); compare with the "clip" rows of bench_clip.py
and with the floor's (the targets: docs/benchmarks.md). Every other flag is bench_clip.py's
(harness/cli.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    main("robust_step")
