"""A script, not a test module: `python tests/distributed_clean_worker.py BACKEND[,BACKEND...]`
spawns 2 gloo processes that import nothing beyond the standard library, torch and
robustft_ext, and checks in them ClipLoss and RobustFTLoss under torch.distributed against one
process on the whole batch. tests/losses/test_distributed.py runs it.

Why a separate script: importing open_clip (as the other distributed tests do) imports
torch.distributed.nn, and that hid a gather that worked only where something else had loaded
that submodule. Here each rank asserts that neither is loaded before the first gather.
Prints "ok" and exits 0 when every check passes.
"""
from __future__ import annotations

import faulthandler
import itertools
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import robustft_ext as rft

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import assert_process_group_released  # noqa: E402 (tests/ is not a package)

WORLD, N_LOCAL, DIM, K, N_REF = 2, 4, 8, 5, 3
TOL = 1e-9
MODES = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)
COMBOS = [c for c in itertools.product([0.0, 1.0], [0.0, 0.3], [0.0, 2.0], [0.0, 5.0]) if any(c)]
LAM_SEED = 11  # rank r seeds its m^2 generator with LAM_SEED + r: rank 0's draw must win


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _global_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    n, r = WORLD * N_LOCAL, WORLD * N_REF
    image, text = _unit(g, n, DIM), _unit(g, n, DIM)
    return dict(I=image, T=text, I_pre=F.normalize(image + 0.3 * _unit(g, n, DIM), dim=1),
                G=_unit(g, K, DIM), rfi=_unit(g, r, DIM), rft=_unit(g, r, DIM),
                rpi=_unit(g, r, DIM), rpt=_unit(g, r, DIM))


def _leaves(x: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """Fresh leaves: this rank's shard of every batch tensor (the whole batch when rank is None);
    G is shared by every rank."""
    out = {}
    for k, v in x.items():
        rows = N_REF if k.startswith("r") else N_LOCAL
        if k != "G" and rank is not None:
            v = v[rank * rows:(rank + 1) * rows]
        out[k] = v.clone().requires_grad_(k in ("I", "T", "rfi", "rft"))
    out["scale"] = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.allclose(a, b, rtol=TOL, atol=TOL):
        raise AssertionError(f"{what}: {a} vs {b}")


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / WORLD


def _robust(weights, backend, lam_rank, x, **kw):
    clip, m2, lip, dive = weights
    loss_fn = rft.RobustFTLoss(clip, m2_weight=m2, lipsum_weight=lip, dive_weight=dive,
                               m2_logit_scale=10.0, dive_momentum=0.5, backend=backend,
                               generator=torch.Generator().manual_seed(LAM_SEED + lam_rank), **kw)
    terms = loss_fn(x["I"], x["T"], x["scale"], image_pre=x["I_pre"], random_text_features=x["G"],
                    pre_logit_scale=20.0, ref_image_ft=x["rfi"], ref_text_ft=x["rft"],
                    ref_image_pre=x["rpi"], ref_text_pre=x["rpt"], output_dict=True)
    names = ["I", "T", "scale", "rfi", "rft"]
    grads = torch.autograd.grad(sum(terms.values()), [x[n] for n in names], allow_unused=True)
    grads = {n: (torch.zeros_like(x[n]) if g is None else g) for n, g in zip(names, grads)}
    return loss_fn, terms, grads


def _check_robust_ft(rank: int, backend: str) -> None:
    full = _global_inputs()
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    refs = slice(rank * N_REF, (rank + 1) * N_REF)
    for weights in COMBOS:
        single_fn, single, single_grads = _robust(weights, backend, 0, _leaves(full, None))
        batch_terms = weights[0] > 0 or weights[1] > 0  # CLIP or m^2 on: the batch is gathered
        for local_loss, with_grad in MODES:
            what = f"RobustFTLoss {backend} {weights} local_loss={local_loss} gather_with_grad={with_grad}"
            loss_fn, terms, grads = _robust(weights, backend, rank, _leaves(full, rank), rank=rank,
                                            world_size=WORLD, local_loss=local_loss,
                                            gather_with_grad=with_grad)
            if set(terms) != set(single):
                raise AssertionError(f"{what}: terms {sorted(terms)} vs {sorted(single)}")
            for k, v in terms.items():
                _close(_mean_over_ranks(v), single[k].detach(), f"{what}: mean {k} vs one process")
                gathered = k in ("m2mix_loss", "lipsum_loss") or (k == "contrastive_loss" and not local_loss)
                if batch_terms and gathered:  # a term of the whole gathered batch on every rank
                    _close(v.detach(), single[k].detach(), f"{what}: {k} vs one process")
            if weights[1] > 0:
                _close(torch.tensor(loss_fn.last_lam), torch.tensor(single_fn.last_lam),
                       f"{what}: lam is rank 0's draw")
            if weights[3] > 0:
                _close(loss_fn.dive.center, single_fn.dive.center, f"{what}: DiVE centre")
            if with_grad or not batch_terms:
                # every rank's feature gradient is world_size x the whole batch's gradient
                for name, sl in (("I", rows), ("T", rows), ("rfi", refs), ("rft", refs)):
                    _close(grads[name] / WORLD, single_grads[name][sl], f"{what}: d{name}")
                _close(_mean_over_ranks(grads["scale"]), single_grads["scale"], f"{what}: dscale")
            elif not local_loss and weights[3] == 0:
                # no gradient through the gather: this rank's rows carry the whole batch's gradient
                for name in ("I", "T"):
                    _close(grads[name], single_grads[name][rows], f"{what}: d{name}")


def _check_clip_loss(rank: int, backend: str) -> None:
    full = _global_inputs()
    single = rft.clip_loss(full["I"].requires_grad_(), full["T"].requires_grad_(), 14.3,
                           backend=backend)
    single_gi, single_gt = torch.autograd.grad(single, [full["I"], full["T"]])
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for local_loss, with_grad in MODES:
        what = f"ClipLoss {backend} local_loss={local_loss} gather_with_grad={with_grad}"
        x = _leaves({k: v.detach() for k, v in full.items()}, rank)
        loss = rft.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                            world_size=WORLD, backend=backend)(x["I"], x["T"], 14.3)
        gi, gt = torch.autograd.grad(loss, [x["I"], x["T"]])
        _close(_mean_over_ranks(loss), single.detach(), f"{what}: mean loss vs one process")
        if with_grad:
            _close(gi / WORLD, single_gi[rows], f"{what}: d image")
            _close(gt / WORLD, single_gt[rows], f"{what}: d text")
        elif not local_loss:
            _close(gi, single_gi[rows], f"{what}: d image")


def _rank(rank: int, store: str, backends: list[str], errors) -> None:
    faulthandler.enable()  # a C++ abort still prints every thread's Python stack
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        for name in ("open_clip", "torch.distributed.nn"):
            if name in sys.modules:
                raise AssertionError(f"{name} is imported: this check must run without it")
        for backend in backends:
            _check_clip_loss(rank, backend)
            _check_robust_ft(rank, backend)
        if "open_clip" in sys.modules:
            raise AssertionError("something imported open_clip")
        dist.barrier()
        dist.destroy_process_group()
        assert_process_group_released()
    except Exception:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str]) -> int:
    backends = argv[0].split(",") if argv else ["reference", "native"]
    store = os.path.join(tempfile.mkdtemp(prefix="rft_clean_gloo_"), "store")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_rank, args=(store, backends, errors), nprocs=WORLD, join=True)
    except Exception as exc:  # noqa: BLE001 - report every rank's traceback
        print(f"failed: {exc}")
        while not errors.empty():
            print(errors.get())
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
