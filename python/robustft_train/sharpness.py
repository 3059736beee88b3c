"""Layer-wise sharpness (docs/maths.md, section 7, our operational reading of arXiv 2410.16476,
whose code is not public): layer groups from parameter names, the random adaptive perturbation and
the one-step worst-case (ASAM-style) variant, overall sharpness, straggler detection and the
sparsity intervention on the task vector.

The estimators work on any `Problem`: a set of named parameter tensors (changed in place while a
perturbation is applied, restored afterwards) and a loss of them. `ClassificationProblem` (in
sharpness_analysis) is the CLIP one; the tests use a quadratic.

Definitions (theta_l: the parameters of group l, flattened; N_l their count; L: the loss on a fixed
evaluation batch):

- random:  S_l = E_z[L(theta + eps_l)] - L(theta), eps_l = rho |theta_l| * z, z ~ N(0, I) elementwise,
  estimated with `samples` draws of z, each used antithetically (+eps and -eps; unbiased because
  eps is symmetric, and the first-order term cancels exactly), i.e. 2 x samples loss evaluations;
- worst:   S_l = L(theta + eps_l) - L(theta), eps_l = rho |theta_l|^2 * g_l / || |theta_l| * g_l ||,
  g_l = dL/dtheta_l: one normalised gradient-ascent step in ASAM's rescaled coordinates
  (theta / |theta|) of adaptive radius rho, || eps_l / |theta_l| || = rho (ASAM, Kwon et al. 2021,
  with eta = 0). It maximises the first-order increase over that adaptive ball. (The random
  perturbation is larger: its adaptive norm is about rho sqrt(N_l); the two measures are compared
  across alpha, never with each other);
- overall: the same with every group perturbed at once (all grouped parameters as one layer).

Entries at exactly zero are never perturbed (adaptive: the perturbation scales with |theta|).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch

# ---------------------------------------------------------------------------------------------
# layer groups

_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer|h|block)\.(\d+)\.")
_EMBED_WORDS = ("embed", "conv1", "class_embedding", "positional", "ln_pre", "patch", "cls_token", "pos_")
# scalars of the contrastive head: a temperature and a bias, not layers
EXCLUDED = ("logit_scale", "logit_bias")


def tower_of(name: str) -> str:
    if name.startswith("clip."):
        name = name[len("clip."):]
    if name.startswith("head."):
        return "head"
    if name.startswith("visual."):
        return "visual"
    return "text"


def group_of(name: str) -> str | None:
    """The layer group of a parameter (None: not grouped, see EXCLUDED).

    <tower>.embed  patch/token embeddings, class and positional embeddings, the pre-LayerNorm;
    <tower>.block<i>  everything inside transformer block i (attention, MLP, its LayerNorms);
    <tower>.proj  what follows the blocks: final LayerNorm and projection (ln_post/proj,
                  ln_final/text_projection, or anything else outside the blocks);
    head  the classification head of cross-entropy fine-tuning (ft).
    Towers: 'visual' for names under visual., 'head' for head., else 'text'. A leading 'clip.'
    (the driver's TrainModule) is ignored."""
    bare = name[len("clip."):] if name.startswith("clip.") else name
    if bare.split(".")[-1] in EXCLUDED or bare in EXCLUDED:
        return None
    tower = tower_of(name)
    if tower == "head":
        return "head"
    m = _BLOCK.search(bare)
    if m:
        return f"{tower}.block{int(m.group(1))}"
    if any(w in bare for w in _EMBED_WORDS):
        return f"{tower}.embed"
    return f"{tower}.proj"


def _group_key(group: str) -> tuple:
    tower, _, part = group.partition(".")
    t = {"visual": 0, "text": 1, "head": 2}.get(tower, 3)
    if part == "embed":
        return (t, 0, 0)
    if part.startswith("block"):
        return (t, 1, int(part[5:]))
    return (t, 2, 0)


def layer_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """{group: [parameter names]} in model order: visual (embed, blocks, proj), text, head."""
    groups: dict[str, list[str]] = {}
    for n in names:
        g = group_of(n)
        if g is not None:
            groups.setdefault(g, []).append(n)
    return {g: groups[g] for g in sorted(groups, key=_group_key)}


# ---------------------------------------------------------------------------------------------
# estimators


class Problem(Protocol):
    params: dict[str, torch.Tensor]   # the live parameters (changed in place, then restored)

    def loss(self, changed: list[str]) -> float:
        """L(theta) at the current parameter values; `changed` names the perturbed ones (a hint
        for caching: the others are at their base values)."""

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        """L(theta) and dL/dparam for every parameter (zeros where the loss does not depend on it)."""


class FunctionProblem:
    """A Problem from a plain function of the parameter dict (tests, small experiments)."""

    def __init__(self, params: dict[str, torch.Tensor], fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
        self.params = params
        self.fn = fn

    @torch.no_grad()
    def loss(self, changed: list[str]) -> float:
        return float(self.fn(self.params))

    def loss_and_grads(self) -> tuple[float, dict[str, torch.Tensor]]:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        with torch.enable_grad():
            value = self.fn(leaves)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return float(value.detach()), {k: (torch.zeros_like(v) if g is None else g)
                              for (k, v), g in zip(leaves.items(), grads)}


def noise_seed(seed: int, sample: int, index: int) -> int:
    """The generator seed of parameter `index` (its position in the problem) for draw `sample`:
    the same z for a parameter whether it is perturbed alone, with its group or with all groups,
    and at every alpha (common random numbers)."""
    return ((seed * 1_000_003 + sample) * 10_007 + index) % (2 ** 63 - 1)


def adaptive_noise(theta: torch.Tensor, rho: float, seed: int) -> torch.Tensor:
    """eps = rho |theta| * z, z ~ N(0, I) from a generator seeded with `seed` (on theta's device)."""
    g = torch.Generator(device=theta.device).manual_seed(seed)
    z = torch.randn(theta.shape, generator=g, device=theta.device, dtype=theta.dtype)
    return rho * theta.abs() * z


def worst_case_direction(thetas: list[torch.Tensor], grads: list[torch.Tensor],
                         rho: float) -> list[torch.Tensor]:
    """eps = rho |theta|^2 g / || |theta| g || over the tensors together (one normalised ascent step
    of adaptive radius rho in ASAM's coordinates); zeros when |theta| g vanishes."""
    norm = math.sqrt(sum(float((t.abs() * g).double().pow(2).sum()) for t, g in zip(thetas, grads)))
    if norm == 0.0 or not math.isfinite(norm):
        return [torch.zeros_like(t) for t in thetas]
    scale = rho / norm
    return [scale * t.pow(2) * g for t, g in zip(thetas, grads)]


@dataclass
class SharpnessResult:
    base_loss: float
    random: dict[str, float] = field(default_factory=dict)      # group (and OVERALL) -> S
    random_se: dict[str, float] = field(default_factory=dict)   # standard error of the random estimate
    worst: dict[str, float] = field(default_factory=dict)


OVERALL = "overall"


class _Perturbed:
    """Context: add eps to the named parameters, restore the exact originals on exit."""

    def __init__(self, problem: Problem, eps: dict[str, torch.Tensor]):
        self.problem, self.eps = problem, eps

    def __enter__(self):
        self.saved = {}
        with torch.no_grad():
            for k, e in self.eps.items():
                p = self.problem.params[k]
                self.saved[k] = p.detach().clone()
                p.add_(e.to(p.dtype))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.saved.items():
                self.problem.params[k].copy_(v)
        return False


def perturbed_loss(problem: Problem, eps: dict[str, torch.Tensor]) -> float:
    with _Perturbed(problem, eps):
        return problem.loss(list(eps))


def estimate(problem: Problem, groups: dict[str, list[str]], rho: float, samples: int, seed: int,
             worst: bool = True, overall: bool = True) -> SharpnessResult:
    """Random (and worst-case) sharpness of every group and of all groups at once (OVERALL)."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    index = {k: i for i, k in enumerate(problem.params)}
    base = problem.loss([])
    result = SharpnessResult(base)
    todo = dict(groups)
    if overall:
        todo[OVERALL] = [n for names in groups.values() for n in names]
    for name, members in todo.items():
        values = []
        for s in range(samples):
            eps = {k: adaptive_noise(problem.params[k].detach(), rho, noise_seed(seed, s, index[k]))
                   for k in members}
            plus = perturbed_loss(problem, eps)
            minus = perturbed_loss(problem, {k: -e for k, e in eps.items()})
            values.append(0.5 * (plus + minus) - base)
        result.random[name] = float(sum(values) / samples)
        result.random_se[name] = (float(torch.tensor(values, dtype=torch.float64).std() / math.sqrt(samples))
                                  if samples > 1 else float("nan"))
    if worst:
        _, grads = problem.loss_and_grads()
        for name, members in todo.items():
            eps_list = worst_case_direction([problem.params[k].detach() for k in members],
                                            [grads[k] for k in members], rho)
            result.worst[name] = perturbed_loss(problem, dict(zip(members, eps_list))) - base
    return result


# ---------------------------------------------------------------------------------------------
# stragglers


def parse_straggler_rule(text: str) -> tuple[str, float]:
    """'std:T' (z-score above mean + T std) or 'topk:K'."""
    kind, _, value = text.partition(":")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind == "std" and math.isfinite(v) and v >= 0:
        return kind, v
    if kind == "topk" and math.isfinite(v) and v >= 1 and v == int(v):
        return kind, v
    raise ValueError(f"expected 'std:T' (T >= 0) or 'topk:K' (integer K >= 1), got {text!r}")


def straggler_scores(table: list[dict[str, float]], groups: list[str]) -> dict[str, float]:
    """Per group: the mean over alpha of its z-score among the groups at that alpha
    ((S_l - mean_l S) / std_l S), which makes alphas with larger sharpness overall count no more
    than others. `table` holds one {group: S} per alpha."""
    scores = {g: 0.0 for g in groups}
    for row in table:
        vals = torch.tensor([row[g] for g in groups], dtype=torch.float64)
        sd = float(vals.std(unbiased=False)) if len(groups) > 1 else 0.0
        mean = float(vals.mean())
        for g in groups:
            scores[g] += ((row[g] - mean) / sd if sd > 0 else 0.0) / len(table)
    return scores


def select_stragglers(scores: dict[str, float], rule: str) -> tuple[list[str], str]:
    """The straggler groups and a note on how they were chosen. 'std:T': score > mean + T std of the
    scores (the top group when none qualifies, said in the note); 'topk:K': the K highest."""
    kind, value = parse_straggler_rule(rule)
    ranked = sorted(scores, key=lambda g: -scores[g])
    if kind == "topk":
        return ranked[: int(value)], f"top {int(value)} by score"
    vals = torch.tensor(list(scores.values()), dtype=torch.float64)
    thr = float(vals.mean() + value * (vals.std(unbiased=False) if len(vals) > 1 else 0.0))
    chosen = [g for g in ranked if scores[g] > thr]
    if chosen:
        return chosen, f"score > mean + {value:g} std ({thr:.3f})"
    return ranked[:1], f"no group above mean + {value:g} std ({thr:.3f}): the top group"


# ---------------------------------------------------------------------------------------------
# sparsity intervention


def sparsify_task_vector(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                         names: list[str], p: float) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero the smallest-|.| fraction p of the task vector tau = finetuned - zeroshot inside the
    tensors `names`, pooled: k = floor(p * N) entries of the N there (a stable sort of |tau|, so
    ties go to the earlier entry in name order, then memory order). Returns the new fine-tuned
    state (in `names`: the fine-tuned value where tau is kept, the zero-shot value where it is
    zeroed; elsewhere the fine-tuned tensors) and the counts."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    missing = [n for n in names if n not in finetuned or n not in zeroshot]
    if missing:
        raise KeyError(f"not in both state dicts: {missing[:5]}")
    taus = [(finetuned[n].double() - zeroshot[n].to(finetuned[n].device).double()).flatten() for n in names]
    total = sum(t.numel() for t in taus)
    k = math.floor(p * total)
    out = dict(finetuned)
    flat = torch.cat(taus) if taus else torch.zeros(0, dtype=torch.float64)
    mask = torch.ones(total, dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.argsort(flat.abs(), stable=True)
        mask[order[:k]] = False
    offset = 0
    for n, t in zip(names, taus):
        m = mask[offset: offset + t.numel()]
        offset += t.numel()
        zs = zeroshot[n].to(device=finetuned[n].device, dtype=finetuned[n].dtype)
        # kept entries keep their fine-tuned value exactly; zeroed ones take the zero-shot value
        out[n] = torch.where(m.view_as(finetuned[n]), finetuned[n], zs)
    info = {"p": p, "entries": total, "zeroed": k, "kept": total - k,
            "tau_nonzero_before": int((flat != 0).sum()), "tau_nonzero_after": int((flat * mask).ne(0).sum())}
    return out, info
