"""ClipLoss / SigLipLoss under torch.distributed: 2 CPU processes (gloo), every combination of
local_loss and gather_with_grad, against open_clip's classes in the same processes and against
the single-process loss on the whole batch; and ClipLoss and RobustFTLoss in processes that
import nothing beyond torch and robustft_ext (tests/distributed_clean_worker.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from helpers import run_gloo

WORLD = 2
N_LOCAL, DIM = 5, 12


def _global_batch():
    g = torch.Generator().manual_seed(1234)
    img = torch.nn.functional.normalize(torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def _close(x, y, what, tol=1e-9):
    assert torch.allclose(x, y, rtol=tol, atol=tol), f"{what}: {x} vs {y}"


def _local_inputs(rank):
    img, txt = _global_batch()
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    a = img[sl].clone().requires_grad_()
    b = txt[sl].clone().requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return a, b, scale, bias


def _ours_vs_open_clip(ours_fn, theirs_fn, rank, what):
    """Run both losses on fresh copies of this rank's inputs; assert loss and the four
    gradients agree; return our loss and gradients."""
    a, b, scale, bias = _local_inputs(rank)
    ours = ours_fn(a, b, scale, bias)
    g_ours = torch.autograd.grad(ours, [a, b, scale, bias])
    a2, b2, scale2, bias2 = _local_inputs(rank)
    theirs = theirs_fn(a2, b2, scale2, bias2)
    g_theirs = torch.autograd.grad(theirs, [a2, b2, scale2, bias2])
    _close(ours, theirs, f"{what}: loss vs open_clip")
    for x, y, name in zip(g_ours, g_theirs, ["image", "text", "scale", "bias"]):
        _close(x, y, f"{what}: d{name} vs open_clip")
    return ours, g_ours


def _full_batch(kind, backend):
    import robustft_ext as rft

    img, txt = _global_batch()
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    fn = rft.clip_loss if kind == "clip" else rft.siglip_loss
    loss = fn(img, txt, scale, bias, backend=backend)
    gi, gt = torch.autograd.grad(loss, [img, txt])
    return loss.detach(), gi, gt


def _worker(rank, backends):
    from open_clip import loss as oc

    import robustft_ext as rft

    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for backend in backends:
        full_loss, full_gi, full_gt = _full_batch("clip", backend)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                what = f"{backend} local_loss={local_loss} gather_with_grad={gather_with_grad}"
                kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad,
                          rank=rank, world_size=WORLD)
                ours_module = rft.ClipLoss(**kw, backend=backend)
                ours, g_ours = _ours_vs_open_clip(
                    lambda *x: ours_module(*x, output_dict=True)["contrastive_loss"],
                    oc.ClipLoss(**kw), rank, what)
                # Against the single-process loss on the whole batch.
                mean_loss = ours.detach().clone()
                dist.all_reduce(mean_loss)
                _close(mean_loss / WORLD, full_loss, f"{what}: mean loss vs single process")
                if not local_loss:
                    _close(ours.detach(), full_loss, f"{what}: loss vs single process")
                if gather_with_grad:
                    _close(g_ours[0] / WORLD, full_gi[sl], f"{what}: d image vs single process")
                    _close(g_ours[1] / WORLD, full_gt[sl], f"{what}: d text vs single process")
                elif not local_loss:
                    _close(g_ours[0], full_gi[sl], f"{what}: d image vs single process")
                    _close(g_ours[1], full_gt[sl], f"{what}: d text vs single process")

        # SigLIP: local block with positives + negative-only blocks of the other ranks.
        full_loss, full_gi, full_gt = _full_batch("siglip", backend)
        ours, g_ours = _ours_vs_open_clip(
            rft.SigLipLoss(rank=rank, world_size=WORLD, backend=backend),
            oc.SigLipLoss(rank=rank, world_size=WORLD), rank, f"{backend} siglip")
        total = ours.detach().clone()
        dist.all_reduce(total)
        # Each rank's loss is its rows' share of the full sum, normalised by the local batch.
        _close(total / WORLD, full_loss, f"{backend} siglip: mean loss vs single process")
        _close(g_ours[0] / WORLD, full_gi[sl], f"{backend} siglip: d image vs single process")
        _close(g_ours[1] / WORLD, full_gt[sl], f"{backend} siglip: d text vs single process")


@pytest.mark.distributed
def test_two_process_gloo_matches_open_clip_and_single_process():
    pytest.importorskip("open_clip")
    from conftest import require_backend

    require_backend("native", "cpu", torch.float64)
    run_gloo(_worker, WORLD, ("reference", "native"))


@pytest.mark.distributed
def test_two_process_gloo_without_open_clip_matches_single_process():
    """ClipLoss (every local_loss / gather_with_grad) and RobustFTLoss (every combination of
    terms in every mode) on 2 gloo ranks against one process on the whole batch, in worker
    processes that never import open_clip, so nothing loads torch.distributed.nn behind the
    library's back (each rank asserts it is not loaded before the first gather)."""
    from conftest import require_backend

    require_backend("native", "cpu", torch.float64)
    script = os.path.join(os.path.dirname(__file__), "distributed_clean_worker.py")
    done = subprocess.run([sys.executable, script, "reference,native"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        done.stdout[-4000:] + done.stderr[-4000:])
