"""robustft-train under torchrun: 2 gloo processes on CPU with DistributedDataParallel and
robustft_ext.ClipLoss(local_loss=True, gather_with_grad=True) train what one process does on the
whole batch (same losses step by step, same weights)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

ARGS = ["--embedded-fraction", "0.3", "--pretrain-epochs", "0", "--methods", "flyp", "--epochs", "1",
        "--wise-ft-alphas", "0,1", "--no-plots"]


def _log(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", "flyp.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_process_gloo_run_matches_one_process(tmp_path):
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "robustft_train", *ARGS, "--batch-size", "8", "--run-dir", ddp],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "robustft_train", *ARGS, "--batch-size", "16", "--run-dir", single],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _log(ddp), _log(single)
    assert len(a) == len(b) >= 3
    # step 0: the mean of the two local losses is the loss of the whole batch of 16
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    for ra, rb in zip(a, b):  # averaged DDP gradients = the whole batch's gradient: same steps
        assert math.isfinite(ra["loss"]) and ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
    wa = torch.load(os.path.join(ddp, "checkpoints", "flyp", "final.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(single, "checkpoints", "flyp", "final.pt"), weights_only=False)["model"]
    lr_sum = sum(r["lr"] for r in b)
    for k in wa:
        if k.endswith("attn.in_proj_bias"):
            # its key third has a zero gradient in exact arithmetic (softmax ignores a per-query
            # constant); Adam turns the rounding noise there into steps of up to lr each
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=lr_sum, msg=k)
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [json.loads(line) for line in open(os.path.join(ddp, "results.jsonl"))]
    assert rows and all(math.isfinite(r["top1"]) for r in rows)
    assert {r["alpha"] for r in rows} == {0.0, 1.0}
