"""Checkpoints: written atomically (files.atomic_write) with a checksum of their contents, read
with torch.load(weights_only=True) and the checksum verified, and the RNG states a resumed run
restores, kept as tensors and primitives so that no checkpoint needs unpickling arbitrary objects.

A file that cannot be used (empty, truncated, random bytes, a flipped bit inside a tensor, one
that needs more than tensors and primitives to load) raises CheckpointError naming the file and
what to do about it.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .files import TMP_PREFIX, atomic_write

FORMAT = "robustft-train checkpoint 2"


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Hash `obj` by content: tensors by dtype, shape and bytes; containers in order; the rest
    (int, float, str, bool, None) by repr, which round-trips exactly."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode() + b":")
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(obj: Any) -> str:
    """The sha256 of `obj`'s contents (see _feed)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def atomic_save(state: dict, path: str) -> None:
    """torch.save {state, its checksum} to `path` through a temporary file and os.replace."""
    payload = {"format": FORMAT, "sha256": checksum(state), "state": state}
    atomic_write(path, lambda f: torch.save(payload, f), suffix=".pt")


def load(path: str, device: torch.device | str = "cpu", *, advice: str) -> dict:
    """The state saved by atomic_save, its checksum verified. `advice` says what to do when the
    file cannot be used (it ends the CheckpointError's message)."""
    payload = load_weights_only(path, device, advice=advice)
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path}: not a robustft-train checkpoint of this version; {advice}")
    return verified_state(payload, path, advice=advice)


def is_checkpoint(payload: Any) -> bool:
    """Whether a loaded object is what atomic_save writes."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT and "state" in payload


def verified_state(payload: dict, path: str, *, advice: str) -> dict:
    """The state of a loaded checkpoint payload, once its checksum matches."""
    if checksum(payload["state"]) != payload.get("sha256"):
        raise CheckpointError(f"{path}: its contents do not match the checksum stored with them (the file "
                              f"was altered or damaged after it was written); {advice}")
    return payload["state"]


def load_weights_only(path: str, device: torch.device | str = "cpu", *, advice: str) -> Any:
    """torch.load(weights_only=True) with clear errors: an empty, truncated or unreadable file,
    or one that needs unpickling arbitrary Python objects (refused: that can run code)."""
    try:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: the file is empty (0 bytes); {advice}")
        return torch.load(path, map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused: loading it would need unpickling arbitrary Python objects, which can run "
                "code (robustft-train reads tensors and plain values only: torch.load(weights_only=True)); "
                f"if you trust the file, re-save its tensors as a plain state dict. {advice}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or not a checkpoint); "
                              f"{advice}") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first}): the file is truncated or corrupt; "
                              f"{advice}") from None


def remove_orphans(folder: str) -> int:
    """Delete the temporary files an interrupted atomic write left in `folder`; their count."""
    removed = 0
    for path in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
        if os.path.isfile(path):
            os.unlink(path)
            removed += 1
    return removed


def rng_states() -> dict:
    """torch's, numpy's and Python's RNG states (and CUDA's), as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
