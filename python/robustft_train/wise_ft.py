"""WiSE-FT (docs/maths.md, section 7): theta(alpha) = (1 - alpha) theta_zeroshot + alpha
theta_finetuned for every floating-point state-dict entry; evaluate every alpha; pick the best by
ID validation."""
from __future__ import annotations

import copy
import math

import torch

from .models import TrainModule


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """Mix two state dicts with the same keys; non-floating entries are taken from `finetuned`."""
    if zeroshot.keys() != finetuned.keys():
        diff = sorted(set(zeroshot) ^ set(finetuned))
        raise ValueError(f"WiSE-FT: the two state dicts differ in keys: {diff[:5]}")
    out = {}
    for k, ft in finetuned.items():
        zs = zeroshot[k]
        if ft.is_floating_point():
            out[k] = (1 - alpha) * zs.to(device=ft.device, dtype=ft.dtype) + alpha * ft
        else:
            out[k] = ft.clone()
    return out


def sweep(zeroshot_module: TrainModule, finetuned_module: TrainModule, alphas: list[float],
          evaluate_fn) -> list[tuple[float, list[dict]]]:
    """Evaluate the interpolated model at every alpha: [(alpha, evaluate_fn(module) rows)]."""
    zs_state = {k: v.detach().clone() for k, v in zeroshot_module.state_dict().items()}
    ft_state = {k: v.detach().clone() for k, v in finetuned_module.state_dict().items()}
    work = copy.deepcopy(finetuned_module)
    results = []
    for alpha in alphas:
        work.load_state_dict(interpolate(zs_state, ft_state, alpha))
        results.append((alpha, evaluate_fn(work)))
    return results


def best_alpha(results: list[tuple[float, list[dict]]], id_set: str) -> float | None:
    """The alpha with the highest top-1 on the ID validation set (the larger alpha on ties)."""
    best, best_acc = None, -math.inf
    for alpha, rows in results:
        acc = next((r.get("top1") for r in rows if r["eval_set"] == id_set), None)
        if acc is not None and acc >= best_acc:
            best, best_acc = alpha, acc
    return best
