"""The device every Triton op body launches on, and what a device allows.

`wrap_triton(kernel)[grid](...)` launches on the *current* CUDA device and its current
stream, and torch.library.triton_op adds no guard of its own: with the inputs on cuda:1 and
the current device cuda:0 a launch would read cuda:1 memory from a cuda:0 kernel (a fault) or
race with cuda:1's stream. `triton_op` below is the one way the backend registers an op: it
runs the body under `device_guard(inputs_device(args))`, so every launch of every op runs on
its inputs' device and stream. tests/backends/triton/test_triton_launch.py checks, op by op,
that the guard is entered with the inputs' device.

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
    replace it.)"""

    def register(body: Callable):
        @functools.wraps(body)
        def on_inputs_device(*args, **kwargs):
            with device_guard(inputs_device(args, kwargs)):
                return body(*args, **kwargs)

        # triton_op infers the schema from the signature; string annotations would be
        # evaluated in this module, so the wrapper carries them resolved.
        hints = typing.get_type_hints(body)
        signature = inspect.signature(body)
        on_inputs_device.__signature__ = signature.replace(
            parameters=[p.replace(annotation=hints[p.name])
                        for p in signature.parameters.values()],
            return_annotation=hints["return"])
        return _torch_triton_op(name, mutates_args=())(on_inputs_device)

    return register


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
