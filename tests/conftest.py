"""pytest's configuration of the suite: Triton runs under its interpreter when no GPU is visible,
CUDA-marked tests skip without a GPU, every test starts from one seed. The tests' shared code
is in helpers.py."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402

import pytest  # noqa: E402

import robustft_ext  # noqa: E402,F401  (loads the compiled ops before any test module)


class _DropMutationAnalysisWarning(logging.Filter):
    """On CPU, wrap_triton's mutation analysis cannot lower a kernel to TTIR (no GPU driver)
    and logs a long traceback before assuming every tensor argument is mutated (correct, only
    conservative: the Triton ops copy their inputs under the interpreter). Keep output readable."""

    def filter(self, record):
        return "identify_mutated_tensors" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addFilter(
    _DropMutationAnalysisWarning())


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
