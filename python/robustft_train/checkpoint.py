"""Checkpoints: written atomically (files.atomic_write) with a checksum of their contents and the
identity of what wrote them (run settings, phase, method, model, processes), read with
torch.load(weights_only=True) and the checksum verified, and the RNG states a resumed run
restores, kept as tensors and primitives so that no checkpoint needs unpickling arbitrary objects.

A file that cannot be used (empty, truncated, random bytes, a flipped bit inside a tensor, one
that needs more than tensors and primitives to load, one of another run, phase, method or model)
raises CheckpointError naming the file and what to do about it.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import pickle
import pickletools
import random
import zipfile
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, excerpt
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


def check_identity(state: dict, expected: dict, path: str, *, advice: str) -> None:
    """Refuse a checkpoint that another run, phase, method, model or process count wrote: its
    `identity` (what `expected` holds: phase, method, model, processes, settings) must match; the
    message says which of them differ."""
    found = state.get("identity")
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: holds no record of the run that wrote it (an older robustft-train "
                              f"wrote it, or another program); {advice}")
    differences = [f"{key} {found.get(key)!r} (this run: {expected[key]!r})"
                   for key in ("phase", "method", "model", "processes") if found.get(key) != expected[key]]
    ours, theirs = expected["settings"], found.get("settings") or {}
    changed = [k for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k)]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)!r} (this run: {ours.get(k)!r})"
                          for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        differences.append(f"the run's settings: {shown}{more}")
    if differences:
        raise CheckpointError(f"{path}: this checkpoint belongs to another run or phase, not to phase "
                              f"{expected['phase']!r} of this run; it differs in {'; '.join(differences)}. It was "
                              f"copied or moved here. Put this phase's own checkpoint back, or {advice}")


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
    except pickle.UnpicklingError:
        refused = refusal(path)
        if refused is not None:
            raise CheckpointError(f"{refused} {advice}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or not a checkpoint); "
                              f"{advice}") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        first = excerpt(str(e)) or type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first}): the file is truncated or corrupt; "
                              f"{advice}") from None


def refusal(path: str) -> str | None:
    """Why torch's weights-only loader refused `path`, when it did: its pickle is well formed, so
    the refusal was of what it names (Python objects beyond tensors and plain values, whose
    unpickling can run code), whatever torch's wording; None when the pickle itself is damaged."""
    names = pickled_globals(path)
    if names is None:
        return None
    foreign = [n for n in names if not n.startswith(("torch.", "collections.OrderedDict", "builtins."))]
    named = f" (it names {', '.join(foreign[:4])})" if foreign else ""
    return (f"{path}: refused: loading it would need unpickling Python objects beyond tensors and plain "
            f"values{named}, and unpickling those can run code; robustft-train reads tensors and plain "
            "values only (torch.load(weights_only=True)). If you trust the file, re-save its tensors as a "
            "plain state dict.")


def pickled_globals(path: str) -> list[str] | None:
    """The module.name of every global the file's pickle imports (a torch zip's data.pkl, else the
    file as one pickle), in order; None when the pickle does not parse to its end."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read()
        ops = list(pickletools.genops(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - any failure to parse: the pickle is damaged
        return None
    names, strings, memo, top = [], [], {}, None  # top: the string on top of the stack, if any
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = top
            continue
        top = arg if isinstance(arg, str) and "UNICODE" in op.name else None
        if op.name in ("BINGET", "LONG_BINGET", "GET"):
            top = memo.get(arg)
        if top is not None:
            strings.append(top)
    return names


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
