"""The floor provider: the time of the library matrix products (torch.mm) that an exact
evaluation of a loss needs, and of nothing else: no softmax, no elementwise pass, no scale
gradient. Its definition, the GEMMs and FLOPs per loss and mode and why dS is preallocated
whole, is in benchmarks/README.md ("The floor"); gemm_shapes() below is that table in code,
and the products run are exactly those shapes.

CLIP and SigLIP: S = I T^T forward; dI = dS T, dT = dS^T I backward. m^2 alone, CLIP + m^2 and
the robust step, in the symmetric Gram formulation: G = X X^T of X = [I; T] as a lower
triangle of block rows forward, dX = (dG + dG^T) X backward, and for the robust step
Lipsum-FT's V = I Gk^T and dI += dV Gk.
"""
from __future__ import annotations

import torch

from harness.losses import LIPSUM_K

GRAM_BLOCK_ROWS = 16
CONTRASTIVE = ("clip", "siglip")   # the others are evaluated through the Gram matrix
DIRECTIONS = {"forward": ("forward",), "backward": ("backward",), "full": ("forward", "backward")}


def gram_block_rows(rows: int) -> list[tuple[int, int]]:
    """The row ranges [r0, r1) of G's block rows: block row r0:r1 is X[r0:r1] X[:r1]^T."""
    step = -(-rows // GRAM_BLOCK_ROWS)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def gemm_shapes(loss: str, n: int, d: int) -> dict[str, list[tuple[int, int, int]]]:
    """The floor's GEMMs per direction, each as (rows, columns, inner)."""
    if loss in CONTRASTIVE:
        return {"forward": [(n, n, d)], "backward": [(n, d, n), (n, d, n)]}
    forward = [(r1 - r0, r1, d) for r0, r1 in gram_block_rows(2 * n)]
    backward = [(2 * n, d, 2 * n)]
    if loss == "robust_step":
        forward.append((n, LIPSUM_K, d))
        backward.append((n, d, LIPSUM_K))
    return {"forward": forward, "backward": backward}


def floor_flop(loss: str, mode: str, n: int, d: int) -> float:
    """FLOPs of the floor's GEMMs in one mode (a multiply-add counts two)."""
    shapes = gemm_shapes(loss, n, d)
    return sum(2.0 * rows * cols * inner for direction in DIRECTIONS[mode]
               for rows, cols, inner in shapes[direction])


def floor_note(loss: str, mode: str, n: int, d: int, ms: float) -> str:
    """The note of a floor row: its GEMMs, their work and the rate they ran at."""
    count = sum(len(gemm_shapes(loss, n, d)[direction]) for direction in DIRECTIONS[mode])
    flop = floor_flop(loss, mode, n, d)
    rate = f", {flop / (ms * 1e-3) / 1e12:.3g} TFLOP/s" if ms > 0 else ""
    return f"floor: {count} GEMMs, {flop / 1e9:.4g} GFLOP{rate}; no loss computed"


def _random(shape: tuple[int, ...], std: float, like: torch.Tensor, generator) -> torch.Tensor:
    """A stand-in operand: random rather than constant, since a GPU's power draw, and with it
    its clock, depends on the values a GEMM multiplies (its arithmetic does not)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(0.0, std,
                                                                             generator=generator)


class ContrastiveFloor:
    """CLIP's and SigLIP's products: S = I T^T; dI = dS T, dT = dS^T I. S goes into a buffer
    allocated once and dS is preallocated whole: made on a shape's first call (a warm-up), so
    the memory probe counts them with the inputs."""

    def __init__(self, loss: str, image: torch.Tensor, text: torch.Tensor):
        n = image.shape[0]
        g = torch.Generator(device=image.device).manual_seed(0)
        self.logits = torch.empty(n, n, dtype=image.dtype, device=image.device)
        self.dlogits = _random((n, n), 1.0 / n, image, g)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        torch.mm(image, text.t(), out=self.logits)
        return self.logits[0, 0]

    def backward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.mm(self.dlogits, text), torch.mm(self.dlogits.t(), image)


class GramFloor:
    """The Gram formulation's products: G's triangle by block rows; dX = (dG + dG^T) X; for
    the robust step also Lipsum-FT's V = I Gk^T and dI += dV Gk. X = [I; T] is concatenated
    once (a Gram kernel reads I and T where they are); G's block rows, dG + dG^T (random, not
    formed from a dG) and Lipsum-FT's operands are allocated once, like ContrastiveFloor's."""

    def __init__(self, loss: str, image: torch.Tensor, text: torch.Tensor):
        n, d = image.shape
        g = torch.Generator(device=image.device).manual_seed(0)
        self.rows = torch.cat([image, text]).detach()
        self.blocks = gram_block_rows(2 * n)
        flat = torch.empty(sum((r1 - r0) * r1 for r0, r1 in self.blocks), dtype=image.dtype,
                           device=image.device)
        self.gram, start = [], 0
        for r0, r1 in self.blocks:   # one packed buffer: each block row contiguous
            self.gram.append(flat[start:start + (r1 - r0) * r1].view(r1 - r0, r1))
            start += (r1 - r0) * r1
        self.dgram_sym = _random((2 * n, 2 * n), 1.0 / n, image, g)
        self.lipsum = loss == "robust_step"
        if self.lipsum:
            self.texts = _random((LIPSUM_K, d), d ** -0.5, image, g)
            self.text_logits = torch.empty(n, LIPSUM_K, dtype=image.dtype, device=image.device)
            self.dtext_logits = _random((n, LIPSUM_K), 1.0 / n, image, g)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for (r0, r1), out in zip(self.blocks, self.gram):
            torch.mm(self.rows[r0:r1], self.rows[:r1].t(), out=out)
        if self.lipsum:
            torch.mm(image, self.texts.t(), out=self.text_logits)
        return self.gram[0][0, 0]

    def backward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = image.shape[0]
        grad_rows = torch.mm(self.dgram_sym, self.rows)
        if self.lipsum:
            grad_rows[:n].addmm_(self.dtext_logits, self.texts)   # beta = 1: in the GEMM
        return grad_rows[:n], grad_rows[n:]


class _FloorProducts(torch.autograd.Function):
    """The floor's GEMMs under autograd, so that the harness times them as it times a loss:
    the forward returns a 0-d view of its first product (no reduction), the backward the
    feature gradients (autograd takes them over without a copy) and reads nothing of the
    incoming 0-d gradient."""

    @staticmethod
    def forward(ctx, image, text, products):
        ctx.save_for_backward(image, text)
        ctx.products = products
        return products.forward(image, text)

    @staticmethod
    def backward(ctx, _grad):
        image, text = ctx.saved_tensors
        return (*ctx.products.backward(image, text), None)


def make_floor_fn(loss: str):
    """The floor of `loss` as a provider: fn(image, text, scale, bias); the scale and bias are
    not used (their gradients are elementwise work)."""
    kind = ContrastiveFloor if loss in CONTRASTIVE else GramFloor
    made: dict = {}

    def floor(image, text, scale, bias):
        key = (image.shape, image.dtype, image.device)
        if key not in made:
            made.clear()   # the old shape's buffers go before the new ones are allocated
            made[key] = kind(loss, image, text)
        return _FloorProducts.apply(image, text, made[key])
    return floor
