"""The method registry and its grammar: what each method trains and which loss terms it adds.

A method is one component or a '+' combination. Bases: `ft` (cross-entropy through a head
initialised from the zero-shot text embeddings; image tower and head train) and `flyp` (the CLIP
loss on image / class-prompt pairs; everything trains). Regularisers add a term to a base:
`m2mix` and `dive` need flyp's paired text features (default base flyp), `lipsum` works on either
(default base ft, as in the paper). `zeroshot` trains nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

@dataclass(frozen=True)
class Component:
    name: str
    kind: str                       # "base", "regulariser" or "none"
    allowed_bases: tuple[str, ...] = ()
    default_base: str | None = None
    needs_reference: bool = False   # reference image-caption pairs each step (DiVE)
    needs_frozen: bool = False      # the frozen pre-trained encoders during training
    summary: str = ""               # what it does, for --help


COMPONENTS: dict[str, Component] = {c.name: c for c in [
    Component("zeroshot", "none", summary="the zero-shot model, no training"),
    Component("ft", "base", summary="cross-entropy, head initialised from zero-shot text embeddings"),
    Component("flyp", "base", summary="CLIP loss on image / caption or class-prompt pairs (FLYP)"),
    Component("m2mix", "regulariser", ("flyp",), "flyp",
              summary="+ w * geodesic multi-modal mixup term (m^2-mix)"),
    Component("dive", "regulariser", ("flyp",), "flyp", needs_reference=True, needs_frozen=True,
              summary="+ lambda (AVL + PVL) on reference pairs (DiVE)"),
    Component("lipsum", "regulariser", ("ft", "flyp"), "ft", needs_frozen=True,
              summary="+ lambda * random-text logit regulariser (Lipsum-FT)"),
]}
METHOD_HELP = ("comma-separated methods, each one component or a '+' combination (e.g. "
               "'zeroshot,ft,flyp,flyp+m2mix+dive'); components: "
               + "; ".join(f"{c.name}: {c.summary}" for c in COMPONENTS.values()))


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


def _base_for(regs: list[str]) -> str | None:
    """The base every regulariser accepts, preferring flyp when one of them defaults to it."""
    options = [b for b in ("flyp", "ft") if all(b in COMPONENTS[r].allowed_bases for r in regs)]
    defaults = [COMPONENTS[r].default_base for r in regs]
    return next((b for b in ("flyp", "ft") if b in defaults and b in options),
                options[0] if options else None)


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
    base = bases[0] if bases else _base_for(regs)
    for r in regs:
        if base not in COMPONENTS[r].allowed_bases:
            raise ConfigError(f"--methods: {r} needs the {' or '.join(COMPONENTS[r].allowed_bases)} base "
                              f"(paired text features), not {base} ({spec!r})")
    regs = sorted(regs, key=list(COMPONENTS).index)
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
