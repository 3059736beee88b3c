"""open_clip's own trainer on robustft_ext's losses, in one call (as Liger-Kernel patches models).

`patch_open_clip()` points the names that `open_clip.create_loss` builds its losses from,
`open_clip.factory.ClipLoss` and `open_clip.factory.SigLipLoss`, at robustft_ext's drop-in
`ClipLoss` and `SigLipLoss`. `create_loss` looks these names up when it is called, so every
caller of it, wherever it imported `create_loss` from (open_clip_train does so at import),
gets the fused losses. open_clip's other losses (distillation, CoCa) and `open_clip.loss` itself
are untouched. The returned `OpenClipPatch` undoes it, also as a context manager.

`main` is the console command `robustft-open-clip-train`: `python -m open_clip_train.main`
with the patch applied and every argument passed through (docs/open_clip.md).
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType, TracebackType

from .backends import BACKENDS
from .modules.contrastive import ClipLoss, SigLipLoss

LOG = logging.getLogger("robustft_ext")
FACTORY_MODULE = "open_clip.factory"


def _for_open_clip(base: type, backend: str | None) -> type:
    """`base` with `backend` as its default backend, saying in the log that it was built (so a
    training log shows which loss ran)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("backend", backend)
        base.__init__(self, *args, **kwargs)
        LOG.info("robustft_ext: open_clip's create_loss built robustft_ext.%s (backend: %s)",
                 base.__name__, self.backend or "automatic")

    return type(base.__name__, (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": base.__qualname__,
        "__doc__": f"robustft_ext.{base.__name__}, as installed into open_clip by patch_open_clip."})


class OpenClipPatch:
    """What `patch_open_clip` replaced in open_clip; `undo()` (or leaving a `with` block) puts
    open_clip's classes back."""

    def __init__(self, module: ModuleType, replaced: dict[str, tuple[type, type]]) -> None:
        self._module = module
        self._replaced = replaced  # name -> (open_clip's original, what we installed)

    @property
    def names(self) -> tuple[str, ...]:
        """The open_clip.factory names this patch replaced."""
        return tuple(self._replaced)

    @property
    def active(self) -> bool:
        """Whether the patch is still in place."""
        return any(getattr(self._module, name) is ours
                   for name, (_, ours) in self._replaced.items())

    def undo(self) -> None:
        """Restore open_clip's classes. Undoing twice does nothing; patches applied on top of
        this one must be undone first (RuntimeError otherwise)."""
        for name, (original, ours) in self._replaced.items():
            current = getattr(self._module, name)
            if current is ours:
                continue
            if current is not original:
                raise RuntimeError(
                    f"{FACTORY_MODULE}.{name} was replaced again after this patch; undo the later "
                    "patch first")
        for name, (original, _) in self._replaced.items():
            setattr(self._module, name, original)

    def __enter__(self) -> OpenClipPatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"OpenClipPatch({', '.join(self.names)}; {state})"


def patch_open_clip(*, clip: bool = True, siglip: bool = True,
                    backend: str | None = None) -> OpenClipPatch:
    """Make `open_clip.create_loss` build robustft_ext's `ClipLoss` (clip=True) and
    `SigLipLoss` (siglip=True), with `backend` as their backend (None: automatic selection).

    Returns an `OpenClipPatch`; call `.undo()` or use it as a context manager to restore
    open_clip's classes. Raises ImportError when open_clip is not installed, ValueError for an
    unknown backend or when neither loss is chosen.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if not (clip or siglip):
        raise ValueError("patch_open_clip: clip and siglip are both False; nothing to patch")
    try:
        factory = importlib.import_module(FACTORY_MODULE)
    except ImportError as exc:
        raise ImportError(f"patch_open_clip needs open_clip (pip install open_clip_torch): {exc}"
                          ) from exc
    chosen = {"ClipLoss": ClipLoss} if clip else {}
    if siglip:
        chosen["SigLipLoss"] = SigLipLoss
    replaced = {}
    for name, ours in chosen.items():
        if not hasattr(factory, name) or not hasattr(factory, "create_loss"):
            raise RuntimeError(f"this open_clip has no {FACTORY_MODULE}.{name} / create_loss to "
                               "patch (robustft_ext supports open_clip_torch >= 2.24)")
        installed = _for_open_clip(ours, backend)
        replaced[name] = (getattr(factory, name), installed)
        setattr(factory, name, installed)
    return OpenClipPatch(factory, replaced)


def main(argv: Sequence[str] | None = None) -> int | None:
    """robustft-open-clip-train: open_clip_train's `main` with `patch_open_clip()` applied.

    Every argument goes to open_clip_train unchanged (`--help` prints open_clip_train's flags);
    the return value is open_clip_train's.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        train_main = importlib.import_module("open_clip_train.main")
    except ImportError as exc:
        raise SystemExit(
            "robustft-open-clip-train needs open_clip_train (open_clip_torch >= 2.26) and its "
            "training requirements (pip install -r requirements.txt, or the open-clip-train "
            f"extra): {exc}") from exc
    with patch_open_clip():
        return train_main.main(argv)


if __name__ == "__main__":  # torchrun ... -m robustft_ext.open_clip_patch
    sys.exit(main())
