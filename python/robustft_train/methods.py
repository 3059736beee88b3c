"""The method registry: what each method trains, which loss terms it adds, what those terms need
(the batch's texts, reference pairs, the frozen pre-trained encoders), and which robustft_ext names
must exist for it. A method whose loss has not landed in robustft_ext is reported as unavailable.

A method is one component or a '+' combination. Bases: `ft` (cross-entropy through a head
initialised from the zero-shot text embeddings; image tower and head train) and `flyp` (the CLIP
loss on image / class-prompt pairs; everything trains). Regularisers add a term to a base:
`m2mix` and `dive` need flyp's paired text features (default base flyp), `lipsum` works on either
(default base ft, as in the paper). `zeroshot` trains nothing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ConfigError


@dataclass(frozen=True)
class Component:
    name: str
    kind: str                       # "base", "regulariser" or "none"
    library_attrs: tuple[str, ...]  # robustft_ext names the component calls
    allowed_bases: tuple[str, ...] = ()
    default_base: str | None = None
    needs_reference: bool = False   # reference image-caption pairs each step (DiVE)
    needs_frozen: bool = False      # the frozen pre-trained encoders during training
    summary: str = ""


COMPONENTS: dict[str, Component] = {c.name: c for c in [
    Component("zeroshot", "none", (), summary="the zero-shot model, no training"),
    Component("ft", "base", (), summary="cross-entropy, head initialised from zero-shot text embeddings"),
    Component("flyp", "base", ("ClipLoss",), summary="CLIP loss on image / class-prompt pairs (FLYP)"),
    Component("m2mix", "regulariser", ("M2MixLoss",), ("flyp",), "flyp",
              summary="+ w * geodesic multi-modal mixup term (m^2-mix)"),
    Component("dive", "regulariser", ("DiVELoss",), ("flyp",), "flyp", needs_reference=True,
              needs_frozen=True, summary="+ lambda (AVL + PVL) on reference pairs (DiVE)"),
    Component("lipsum", "regulariser", ("LipsumLoss",), ("ft", "flyp"), "ft", needs_frozen=True,
              summary="+ lambda * random-text logit regulariser (Lipsum-FT)"),
]}


@dataclass(frozen=True)
class Method:
    """A parsed method: its base and its regularisers, in canonical order."""

    spec: str
    base: str | None
    regularisers: tuple[str, ...] = ()

    @property
    def components(self) -> list[Component]:
        names = ([self.base] if self.base else ["zeroshot"]) + list(self.regularisers)
        return [COMPONENTS[n] for n in names]

    @property
    def trains(self) -> bool:
        return self.base is not None

    @property
    def needs_reference(self) -> bool:
        return any(c.needs_reference for c in self.components)

    @property
    def needs_frozen(self) -> bool:
        return any(c.needs_frozen for c in self.components)

    def unavailable_reason(self) -> str | None:
        """Why this method cannot run with the installed robustft_ext, or None."""
        import robustft_ext

        missing = [(c.name, a) for c in self.components for a in c.library_attrs
                   if not hasattr(robustft_ext, a)]
        if missing:
            return "unavailable: " + "; ".join(f"robustft_ext has no {a} yet (needed by {name})"
                                               for name, a in missing)
        return None


def parse_method(spec: str) -> Method:
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise ConfigError(f"--methods: empty method in {spec!r}")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r} in {spec!r}; known: {list(COMPONENTS)}")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"--methods: {spec!r} repeats a component")
    if "zeroshot" in parts:
        if len(parts) > 1:
            raise ConfigError(f"--methods: zeroshot cannot be combined ({spec!r})")
        return Method("zeroshot", None)
    bases = [p for p in parts if COMPONENTS[p].kind == "base"]
    regs = [p for p in parts if COMPONENTS[p].kind == "regulariser"]
    if len(bases) > 1:
        raise ConfigError(f"--methods: {spec!r} combines two bases {bases}; pick ft or flyp")
    if bases:
        base = bases[0]
    else:  # the base every regulariser accepts, preferring flyp when one of them needs it
        options = [b for b in ("flyp", "ft") if all(b in COMPONENTS[r].allowed_bases for r in regs)]
        defaults = [COMPONENTS[r].default_base for r in regs]
        base = next((b for b in ("flyp", "ft") if b in defaults and b in options),
                    options[0] if options else None)
    for r in regs:
        if base not in COMPONENTS[r].allowed_bases:
            raise ConfigError(f"--methods: {r} needs the {' or '.join(COMPONENTS[r].allowed_bases)} base "
                              f"(paired text features), not {base} ({spec!r})")
    order = list(COMPONENTS)
    regs = sorted(regs, key=order.index)
    return Method("+".join([base] + regs) if regs else base, base, tuple(regs))


def parse_methods(text: str) -> list[Method]:
    """Parse --methods ('a,b,c'); duplicates (after canonical ordering) are an error."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--methods: give at least one method")
    methods = [parse_method(s) for s in specs]
    names = [m.spec for m in methods]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"--methods: {dups} given twice")
    return methods


@dataclass
class StepInputs:
    """What one training step feeds the model beyond the batch (DiVE's reference pairs)."""

    extra_images: torch.Tensor | None = None
    extra_texts: torch.Tensor | None = None


@dataclass
class MethodLoss:
    """The loss of one method for one training run, from robustft_ext's public modules (ClipLoss,
    M2MixLoss, DiVELoss, LipsumLoss). Per-step randomness (m^2-mix lam, Lipsum texts, DiVE
    reference pairs) is seeded by (seed, step, rank), so a resumed run draws what an
    uninterrupted one would. `state_dict` holds DiVE's centre (the DiVELoss buffer)."""

    method: Method
    cfg: object
    rank: int
    world_size: int
    frozen: object | None = None          # models.FrozenEncoders
    tokenizer: object | None = None
    reference: object | None = None       # data.TrainView for DiVE's reference pairs
    device: torch.device = torch.device("cpu")
    _modules: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import robustft_ext as rft

        cfg = self.cfg
        if self.method.base == "flyp":
            self._modules["clip"] = rft.ClipLoss(local_loss=self.world_size > 1, gather_with_grad=True,
                                                 rank=self.rank, world_size=self.world_size)
        if "m2mix" in self.method.regularisers:
            self._generator = torch.Generator()
            self._modules["m2mix"] = rft.M2MixLoss(
                alpha=cfg.m2mix_alpha, generator=self._generator, m2_weight=cfg.m2mix_weight,
                clip_weight=0.0, m2_logit_scale=cfg.m2mix_logit_scale)
        if "dive" in self.method.regularisers:
            # the centre: an EMA (momentum) of the batch mean of (u + v) / 2, averaged over ranks
            self._modules["dive"] = rft.DiVELoss(weight=cfg.dive_lambda, momentum=cfg.dive_momentum,
                                                 center_mode="ema").to(self.device)
        if "lipsum" in self.method.regularisers:
            self._modules["lipsum"] = rft.LipsumLoss(weight=cfg.lipsum_lambda, num_texts=cfg.lipsum_num_texts,
                                                     text_length=cfg.lipsum_text_length)

    def _seed(self, step: int, salt: int) -> int:
        return (self.cfg.seed * 1_000_003 + step * 7_919 + self.rank * 104_729 + salt) % (2**63 - 1)

    def step_inputs(self, step: int, device: torch.device) -> StepInputs:
        if not self.method.needs_reference:
            return StepInputs()
        rnd = random.Random(self._seed(step, 17))
        idx = [rnd.randrange(len(self.reference)) for _ in range(self.cfg.dive_ref_batch_size)]
        items = [self.reference[(-1 - step, i)] for i in idx]
        images = torch.stack([it[0] for it in items]).to(device)
        texts = self.tokenizer([it[2] for it in items]).to(device)
        return StepInputs(images, texts)

    def __call__(self, out: dict[str, torch.Tensor], labels: torch.Tensor, images: torch.Tensor,
                 inputs: StepInputs, step: int) -> dict[str, torch.Tensor]:
        """The weighted loss terms of this step (their sum is the loss)."""
        terms = {}
        img, scale = out["image_features"], out["logit_scale"]
        if self.method.base == "flyp":
            terms["clip"] = self._modules["clip"](img, out["text_features"], scale)
        elif self.method.base == "ft":
            terms["ce"] = F.cross_entropy(out["logits"].float(), labels)
        for reg in self.method.regularisers:
            if reg == "m2mix":
                self._generator.manual_seed(self._seed(step, 29))
                terms["m2mix"] = self._modules["m2mix"](img, out["text_features"], scale)
            elif reg == "dive":
                image_pre = self.frozen.image_features(inputs.extra_images)
                text_pre = self.frozen.text_features(inputs.extra_texts)
                terms["dive"] = self._modules["dive"](out["extra_image_features"], out["extra_text_features"],
                                                      image_pre, text_pre)
            elif reg == "lipsum":
                lipsum = self._modules["lipsum"]
                g = torch.Generator().manual_seed(self._seed(step, 43))
                texts = lipsum.random_text_features(self.frozen.clip, self.tokenizer, g).float()
                image_pre = self.frozen.image_features(images)
                terms["lipsum"] = lipsum(img, image_pre, texts, self.frozen.logit_scale)
        return terms

    def after_step(self) -> None:
        """Hook after each optimiser step (DiVELoss updates its centre in its own forward)."""

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self._modules.items() if name == "dive"}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if "dive" in state and "dive" in self._modules:
            self._modules["dive"].load_state_dict(state["dive"])
            self._modules["dive"].to(device)

    @property
    def dive_center(self) -> torch.Tensor | None:
        return self._modules["dive"].center if "dive" in self._modules else None
