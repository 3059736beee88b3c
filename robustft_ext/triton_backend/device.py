"""The device every Triton op body launches on, and what a device allows.

`wrap_triton(kernel)[grid](...)` launches on the *current* CUDA device and its current
stream, and torch.library.triton_op adds no guard of its own: with the inputs on cuda:1 and
the current device cuda:0 a launch would read cuda:1 memory from a cuda:0 kernel (a fault) or
race with cuda:1's stream. `triton_op` below is the one way the backend registers an op: it
runs the body under `device_guard(inputs_device(args))`, so every launch of every op runs on
its inputs' device and stream, and it gives the op its schema (the step ops' arguments from
robustft_ext.ops.robust_step.StepArgs). tests/backends/triton/test_triton_launch.py checks,
op by op, that the guard is entered with the inputs' device and that the schema is the
native op's.

`DeviceLimits` are the figures of a CUDA device that decide which tile configurations can
launch there (configs.select, configs.device_unavailable_reason).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.library import triton_op as _torch_triton_op


# ----------------------------------------------------------------------------- the guard
def inputs_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device the op's launches belong on: that of its first CUDA tensor argument, else
    of its first tensor argument (None without one). The ops check that their tensors share
    one device; a CUDA tensor among CPU ones is then refused by those checks."""
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)]
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return tensors[0].device if tensors else None


def device_guard(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Makes `device` (and its current stream) the current CUDA device for the block; no-op
    for other devices and where no CUDA device is visible (fake CUDA tensors traced without a
    GPU launch nothing)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def triton_op(name: str) -> Callable:
    """torch.library.triton_op(name, mutates_args=()) of a body that runs under
    device_guard(inputs_device(...)). (The guard is looked up at each call, so that a test can
    replace it.)

    triton_op infers the schema from the registered function's signature (torch 2.11 ignores
    its schema= argument), so the signature is the schema's one home on the Python side. A
    parameter of the body annotated with a NamedTuple class (the step ops' StepArgs) stands
    for that tuple's fields: the schema lists them in its place, named and typed by the
    tuple, and the body receives them as one tuple."""

    def register(body: Callable):
        signature, groups = _registered_signature(body)

        @functools.wraps(body)
        def on_inputs_device(*args, **kwargs):
            if kwargs:
                args, kwargs = signature.bind(*args, **kwargs).args, {}
            with device_guard(inputs_device(args, kwargs)):
                return body(*_grouped(args, groups))

        on_inputs_device.__signature__ = signature
        return _torch_triton_op(name, mutates_args=())(on_inputs_device)

    return register


def _is_named_tuple(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields")


def _registered_signature(body: Callable) -> tuple[inspect.Signature, list]:
    """The signature triton_op infers the schema from: the body's, with its annotations
    resolved (string annotations would be evaluated in this module) and each NamedTuple
    parameter replaced by the tuple's fields; and, per parameter of the body, the NamedTuple
    class whose fields stand for it (None for a plain parameter)."""
    hints = typing.get_type_hints(body)
    signature = inspect.signature(body)
    params, groups = [], []
    for p in signature.parameters.values():
        hint = hints[p.name]
        if _is_named_tuple(hint):
            fields = typing.get_type_hints(hint)
            params += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         annotation=fields[f]) for f in hint._fields]
            groups.append(hint)
        else:
            params.append(p.replace(annotation=hint))
            groups.append(None)
    return signature.replace(parameters=params, return_annotation=hints["return"]), groups


def _grouped(args: tuple, groups: list) -> list:
    """The body's arguments from the registered op's: each NamedTuple's fields as one tuple."""
    out, i = [], 0
    for group in groups:
        if group is None:
            out.append(args[i])
            i += 1
        else:
            out.append(group(*args[i:i + len(group._fields)]))
            i += len(group._fields)
    return out


# ----------------------------------------------------------------------------- limits
class DeviceLimits(NamedTuple):
    """What a CUDA device allows a kernel launch."""

    name: str
    capability: tuple[int, int]
    shared_per_block: int  # bytes of shared memory a block may use (the opt-in maximum)


@functools.lru_cache(maxsize=None)
def cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    return DeviceLimits(props.name, (props.major, props.minor),
                        props.shared_memory_per_block_optin)


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of a CUDA device (its current device when it has no index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_limits(index)
