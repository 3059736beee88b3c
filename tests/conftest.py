"""Test configuration: Triton runs under its interpreter when no GPU is visible."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402

import pytest  # noqa: E402

import robustft_ext  # noqa: E402
from robustft_ext.backends import unavailable_reason  # noqa: E402



class _DropMutationAnalysisWarning(logging.Filter):
    """On CPU, wrap_triton's mutation analysis cannot lower a kernel to TTIR (no GPU driver)
    and logs a long traceback before assuming every tensor argument is mutated (correct, only
    conservative: the Triton ops copy their inputs under the interpreter). Keep output readable."""

    def filter(self, record):
        return "identify_mutated_tensors" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addFilter(
    _DropMutationAnalysisWarning())

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def require_backend(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip when a backend cannot serve this device (only ever for a missing GPU or build).

    A backend that *should* serve (native on CPU once built, triton under the interpreter)
    failing here is an error, not a skip.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    reason = unavailable_reason(backend, torch.device(device), dtype)
    if reason is None:
        return
    if device == "cpu" and backend in ("native", "triton") and dtype != torch.float64:
        pytest.fail(f"{backend} must serve CPU tensors in the test environment: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
