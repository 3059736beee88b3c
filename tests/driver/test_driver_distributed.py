"""robustft-train under torchrun: 2 gloo processes on CPU with DistributedDataParallel and one
robustft_ext.RobustFTLoss(local_loss=False, gather_with_grad=True) call per step (the CLIP, m^2-mix
and Lipsum-FT terms of the gathered batch) train what one process does on the whole batch (same
loss terms step by step, same weights); so do two nodes of two processes each (torchrun
--nnodes 2, a local rendezvous) with --accum-freq 2, whose 4 x 2 micro-batches are one
contrastive batch."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint

pytestmark = pytest.mark.distributed

METHOD = "flyp+m2mix+lipsum"
ARGS = ["--embedded-fraction", "0.3", "--pretrain-epochs", "0", "--methods", METHOD, "--epochs", "1",
        "--wise-ft-alphas", "0,1", "--no-plots", "--lipsum-num-texts", "16"]


def _log(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", f"{METHOD}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _single_process(run_dir: str, env: dict, *flags: str) -> None:
    done = subprocess.run([sys.executable, "-m", "robustft_train", *ARGS, *flags, "--run-dir", run_dir],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_training(ddp: str, single: str) -> None:
    """Same loss terms at every step and the same final weights."""
    a, b = _log(ddp), _log(single)
    assert len(a) == len(b) >= 3
    # step 0: every term of the gathered batch is the single process's
    for key in ("loss", "loss_clip", "loss_m2mix", "loss_lipsum"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-7), key
    for ra, rb in zip(a, b):  # averaged DDP gradients = the whole batch's gradient: same steps
        for key in ("loss", "loss_clip", "loss_m2mix", "loss_lipsum"):
            assert math.isfinite(ra[key]) and ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-7), key
    wa = checkpoint.load(os.path.join(ddp, "checkpoints", METHOD, "final.pt"), advice="")["model"]
    wb = checkpoint.load(os.path.join(single, "checkpoints", METHOD, "final.pt"), advice="")["model"]
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


def test_two_process_gloo_run_matches_one_process(tmp_path):
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "robustft_train", *ARGS, "--batch-size", "8", "--run-dir", ddp],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _single_process(single, env, "--batch-size", "16")
    _assert_same_training(ddp, single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_two_processes_with_accum_freq_match_one_process(tmp_path):
    """torchrun on each of two "nodes" (here two launches on this machine, as on two hosts:
    --nnodes 2 --node_rank r, the rendezvous at node 0's address), two gloo processes each, each
    process 2 micro-batches of 8 per step (--accum-freq 2): one contrastive batch of 8 x 2 x 4 = 64
    per step, as one process with --batch-size 64."""
    ddp, single = str(tmp_path / "nodes"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    nodes = [subprocess.Popen(launch + ["--node_rank", str(rank), "-m", "robustft_train", *ARGS, "--batch-size", "8",
                                        "--accum-freq", "2", "--epochs", "4", "--run-dir", ddp],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    _single_process(single, env, "--batch-size", "64", "--epochs", "4")
    _assert_same_training(ddp, single)
