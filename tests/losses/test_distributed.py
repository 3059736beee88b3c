"""ClipLoss / SigLipLoss under torch.distributed: 2 and 4 CPU processes (gloo), every combination
of local_loss and gather_with_grad, against open_clip's classes in the same processes and against
the single-process loss on the whole batch, and RobustFTLoss with every term in the mode the
training driver uses (gathered with gradient) against one process; and ClipLoss and RobustFTLoss
in processes that import nothing beyond torch and robustft_ext
(tests/losses/distributed_clean_worker.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from helpers import run_gloo

WORLDS = (2, 4)
N_LOCAL, DIM = 5, 12


def _global_batch(world):
    g = torch.Generator().manual_seed(1234)
    img = torch.nn.functional.normalize(torch.randn(world * N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(world * N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def _close(x, y, what, tol=1e-9):
    assert torch.allclose(x, y, rtol=tol, atol=tol), f"{what}: {x} vs {y}"


def _local_inputs(rank, world):
    img, txt = _global_batch(world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    a = img[sl].clone().requires_grad_()
    b = txt[sl].clone().requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return a, b, scale, bias


def _ours_vs_open_clip(ours_fn, theirs_fn, rank, world, what):
    """Run both losses on fresh copies of this rank's inputs; assert loss and the four
    gradients agree; return our loss and gradients."""
    a, b, scale, bias = _local_inputs(rank, world)
    ours = ours_fn(a, b, scale, bias)
    g_ours = torch.autograd.grad(ours, [a, b, scale, bias])
    a2, b2, scale2, bias2 = _local_inputs(rank, world)
    theirs = theirs_fn(a2, b2, scale2, bias2)
    g_theirs = torch.autograd.grad(theirs, [a2, b2, scale2, bias2])
    _close(ours, theirs, f"{what}: loss vs open_clip")
    for x, y, name in zip(g_ours, g_theirs, ["image", "text", "scale", "bias"]):
        _close(x, y, f"{what}: d{name} vs open_clip")
    return ours, g_ours


def _full_batch(kind, backend, world):
    import robustft_ext as rft

    img, txt = _global_batch(world)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    fn = rft.clip_loss if kind == "clip" else rft.siglip_loss
    loss = fn(img, txt, scale, bias, backend=backend)
    gi, gt = torch.autograd.grad(loss, [img, txt])
    return loss.detach(), gi, gt


def _robust_ft_vs_single_process(rank, world, backend):
    """RobustFTLoss with the CLIP, m^2, Lipsum-FT and DiVE terms, gathered with gradient (the
    training driver's mode): each term's mean over the ranks is the one-process term of the whole
    batch (the gathered ones are it on every rank), and each rank's feature gradient is world x
    the whole batch's."""
    import robustft_ext as rft

    img, txt = _global_batch(world)
    g = torch.Generator().manual_seed(77)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    pre, texts, refs = torch.nn.functional.normalize(img + 0.3 * unit(*img.shape), dim=1), unit(6, DIM), \
        [unit(world * 3, DIM) for _ in range(4)]

    def step(rows, ref_rows, **kw):
        leaves = [img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_(),
                  refs[0][ref_rows].clone().requires_grad_(), refs[1][ref_rows].clone().requires_grad_()]
        loss_fn = rft.RobustFTLoss(1.0, m2_weight=0.3, lipsum_weight=2.0, dive_weight=5.0, m2_logit_scale=10.0,
                                   dive_momentum=0.5, backend=backend, generator=torch.Generator().manual_seed(3),
                                   **kw)
        terms = loss_fn(leaves[0], leaves[1], 14.3, image_pre=pre[rows], random_text_features=texts,
                        pre_logit_scale=20.0, ref_image_ft=leaves[2], ref_text_ft=leaves[3],
                        ref_image_pre=refs[2][ref_rows], ref_text_pre=refs[3][ref_rows], output_dict=True)
        return terms, torch.autograd.grad(sum(terms.values()), leaves)

    single, single_grads = step(slice(None), slice(None))
    rows, ref_rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL), slice(rank * 3, (rank + 1) * 3)
    terms, grads = step(rows, ref_rows, rank=rank, world_size=world, local_loss=False, gather_with_grad=True)
    what = f"RobustFTLoss {backend} on {world} processes"
    assert terms.keys() == single.keys(), what
    for k, v in terms.items():
        mean = v.detach().clone()
        dist.all_reduce(mean)
        _close(mean / world, single[k].detach(), f"{what}: mean {k} vs one process")
        if k in ("contrastive_loss", "m2mix_loss", "lipsum_loss"):  # terms of the gathered batch
            _close(v.detach(), single[k].detach(), f"{what}: {k} vs one process")
    for ours, whole, sl, name in zip(grads, single_grads, (rows, rows, ref_rows, ref_rows),
                                     ("image", "text", "reference image", "reference text")):
        _close(ours / world, whole[sl], f"{what}: d {name} vs one process")


def _worker(rank, world, backends):
    from open_clip import loss as oc

    import robustft_ext as rft

    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for backend in backends:
        _robust_ft_vs_single_process(rank, world, backend)
        full_loss, full_gi, full_gt = _full_batch("clip", backend, world)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                what = f"{backend} local_loss={local_loss} gather_with_grad={gather_with_grad}"
                kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad,
                          rank=rank, world_size=world)
                ours_module = rft.ClipLoss(**kw, backend=backend)
                ours, g_ours = _ours_vs_open_clip(
                    lambda *x: ours_module(*x, output_dict=True)["contrastive_loss"],
                    oc.ClipLoss(**kw), rank, world, what)
                # Against the single-process loss on the whole batch.
                mean_loss = ours.detach().clone()
                dist.all_reduce(mean_loss)
                _close(mean_loss / world, full_loss, f"{what}: mean loss vs single process")
                if not local_loss:
                    _close(ours.detach(), full_loss, f"{what}: loss vs single process")
                if gather_with_grad:
                    _close(g_ours[0] / world, full_gi[sl], f"{what}: d image vs single process")
                    _close(g_ours[1] / world, full_gt[sl], f"{what}: d text vs single process")
                elif not local_loss:
                    _close(g_ours[0], full_gi[sl], f"{what}: d image vs single process")
                    _close(g_ours[1], full_gt[sl], f"{what}: d text vs single process")

        # SigLIP: local block with positives + negative-only blocks of the other ranks.
        full_loss, full_gi, full_gt = _full_batch("siglip", backend, world)
        ours, g_ours = _ours_vs_open_clip(
            rft.SigLipLoss(rank=rank, world_size=world, backend=backend),
            oc.SigLipLoss(rank=rank, world_size=world), rank, world, f"{backend} siglip")
        total = ours.detach().clone()
        dist.all_reduce(total)
        # Each rank's loss is its rows' share of the full sum, normalised by the local batch.
        _close(total / world, full_loss, f"{backend} siglip: mean loss vs single process")
        _close(g_ours[0] / world, full_gi[sl], f"{backend} siglip: d image vs single process")
        _close(g_ours[1] / world, full_gt[sl], f"{backend} siglip: d text vs single process")


@pytest.mark.distributed
@pytest.mark.parametrize("world", WORLDS)
def test_gloo_processes_match_open_clip_and_single_process(world):
    pytest.importorskip("open_clip")
    from helpers import require_backend

    require_backend("native", "cpu", torch.float64)
    run_gloo(_worker, world, world, ("reference", "native"))


def _expanded_gradient_worker(rank, world):
    """The gather with gradient under a reduction whose gradient autograd hands over expanded
    (stride 0): the reduce-scatter needs a dense one (torch's functional all-gather, given
    such a gradient directly, fails with "Expected input.is_contiguous()")."""
    from robustft_ext.distributed import gather_rows

    x = torch.full((3, 4), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = gather_rows(x, gather_with_grad=True, put_back=False, rank=rank, world_size=world)
    assert gathered.shape == (3 * world, 4)
    expected = torch.arange(1, world + 1, dtype=torch.float64).repeat_interleave(3)[:, None]
    _close(gathered.detach(), expected.expand(-1, 4), "gathered rows by rank")
    gathered.sum().backward()
    _close(x.grad, torch.full_like(x, float(world)), "d x: every rank's ones, summed")


@pytest.mark.distributed
def test_gather_with_grad_takes_an_expanded_gradient():
    run_gloo(_expanded_gradient_worker, 2, 2)


@pytest.mark.distributed
def test_two_process_gloo_without_open_clip_matches_single_process():
    """ClipLoss (every local_loss / gather_with_grad) and RobustFTLoss (every combination of
    terms in every mode) on 2 gloo ranks against one process on the whole batch, in worker
    processes that never import open_clip, so nothing loads torch.distributed.nn behind the
    library's back (each rank asserts it is not loaded before the first gather)."""
    from helpers import require_backend

    require_backend("native", "cpu", torch.float64)
    script = os.path.join(os.path.dirname(__file__), "distributed_clean_worker.py")
    done = subprocess.run([sys.executable, script, "reference,native"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        done.stdout[-4000:] + done.stderr[-4000:])
