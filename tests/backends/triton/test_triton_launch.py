"""What every registered robustft_triton op and every launch of the Triton backend get:

* the native op's schema (robustft_ext/triton_backend/device.py registers each op from its
  body's signature, the step ops' arguments from StepArgs): every robustft_triton op has the
  schema of the robustft_ext op of its name, where the native ops are built;
* the device guard (robustft_ext/triton_backend/device.py): each op body runs under
  device_guard(its inputs' device), so that its kernels launch on that device and its current
  stream rather than on the current device's. Checked without a GPU by replacing the guard
  factory with a recorder: the real ops on CPU tensors, and the ops on fake tensors on cuda:1
  (the body is the ops' fake implementation too);
* the divisibility hints the kernels are compiled and checked for offline
  (configs.aligned_dim, triton_backend/offline.py, benchmarks/kernel_report.py): for inputs
  whose D is not a multiple of 16, every D and row stride a kernel receives is one, and every
  tensor it receives is 16-byte aligned (triton_backend/launch.py);
* the op modules share that launch code through public names only: no module of the backend
  imports another's private name.
"""
import ast
import contextlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import import_triton_backend

pytestmark = pytest.mark.triton
tb = import_triton_backend()

from robustft_ext.triton_backend import device as device_module  # noqa: E402

ops = torch.ops.robustft_triton


def _registered_ops() -> set[str]:
    prefix = "robustft_triton::"
    return {name[len(prefix):] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(prefix)}


def _op_calls(D: int, device: str) -> dict[str, tuple]:
    """{op name: arguments} of every op on small inputs of feature dimension D (the backward
    ops' statistics from their forwards)."""
    g = torch.Generator().manual_seed(0)

    def rows(r):
        return F.normalize(torch.randn(r, D, generator=g), dim=1).to(device)

    def scalar(x):
        return torch.tensor(x, device=device)

    n, K, B = 17, 7, 5
    I, T, P, G = rows(n), rows(n), rows(n), rows(K)
    refs = (rows(B), rows(B), rows(B), rows(B), 0.05 * torch.ones(D, device=device))
    s, bias, lam, one = scalar(14.3), scalar(-1.0), scalar(0.3), scalar(1.0)
    calls = {"clip_fwd": (I, T, s, bias, 0, True), "siglip_fwd": (I, T, s, bias, False),
             "siglip_bwd": (one, I, T, s, bias, False), "slerp": (I, T, lam),
             "slerp_bwd": (rows(n), I, T, lam), "m2mix_fwd": (I, T, s, lam, s, True),
             "lipsum_fwd": (I, P, G, s), "lipsum_bwd": (one, I, P, G, s),
             "dive_fwd": refs, "dive_bwd": (one, one, *refs),
             "robust_step_fwd": (I, T, s, s, lam, True, True, P, G, s, *refs)}
    _, row_lse, col_lse = ops.clip_fwd(*calls["clip_fwd"])
    calls["clip_bwd"] = (one, I, T, s, bias, row_lse, col_lse, 0, True)
    lse = ops.m2mix_fwd(*calls["m2mix_fwd"])[2]
    calls["m2mix_bwd"] = (one, one, I, T, s, lam, s, lse, True)
    lse = ops.robust_step_fwd(*calls["robust_step_fwd"])[2]
    calls["robust_step_bwd"] = (torch.ones(5, device=device), *calls["robust_step_fwd"], lse)
    return calls


# ----------------------------------------------------------------------------- registration
def _schema_text(op, namespace: str) -> str:
    return str(op.default._schema).replace(f"{namespace}::", "", 1)


@pytest.mark.parametrize("name", sorted(_registered_ops()))
def test_every_op_has_the_native_ops_schema(name):
    native = getattr(torch.ops.robustft_ext, name, None)
    if native is None:
        pytest.skip(f"robustft_ext::{name} is not registered: the native extension is not built")
    # triton_op can only spell an int argument SymInt (torch.library.infer_schema); SymInt
    # accepts every int, so the ops are called alike.
    want = re.sub(r"\bint\b", "SymInt", _schema_text(native, "robustft_ext"))
    assert _schema_text(getattr(ops, name), "robustft_triton") == want


def test_the_step_ops_schemas_list_step_args_fields():
    # device.triton_op lists StepArgs's fields where robust_step_fwd / _bwd's bodies take one
    # StepArgs.
    from robustft_ext.ops.robust_step import StepArgs

    fields = list(StepArgs._fields)
    assert [a.name for a in ops.robust_step_fwd.default._schema.arguments] == fields
    assert [a.name for a in ops.robust_step_bwd.default._schema.arguments] == \
        ["grad_terms", *fields, "lse"]


def test_the_step_ops_regroup_keyword_arguments():
    # The fields given by name (to the op, or to the registered function itself) reach the
    # body as the same StepArgs as given by position.
    from robustft_ext.ops.robust_step import StepArgs

    args = _op_calls(5, "cpu")["robust_step_fwd"]
    named = dict(zip(StepArgs._fields, args))
    want = ops.robust_step_fwd(*args)
    for got in (ops.robust_step_fwd(**named), tb.step_ops.robust_step_fwd._init_fn(**named)):
        for x, y in zip(got, want):
            assert torch.equal(x, y)


# ----------------------------------------------------------------------------- device guard
@pytest.mark.parametrize("device", ["cpu", "cuda:1"], ids=["cpu", "fake-cuda1"])
def test_every_op_body_runs_under_its_inputs_device_guard(monkeypatch, device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []

    def recording_guard(dev):
        entered.append(dev)
        return contextlib.nullcontext()

    monkeypatch.setattr(device_module, "device_guard", recording_guard)
    with FakeTensorMode() if device.startswith("cuda") else contextlib.nullcontext():
        calls = _op_calls(5, device)
        assert set(calls) == _registered_ops(), "an op without a sample call here"
        for name, args in calls.items():
            entered.clear()
            getattr(ops, name)(*args)
            assert entered == [torch.device(device)], (name, entered)


def test_the_guard_makes_a_cuda_inputs_device_current(monkeypatch):
    # torch.cuda.device(1) makes cuda:1 and its current stream current (entering it needs a
    # GPU; what the factory returns does not).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    guard = device_module.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_module.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_inputs_device_prefers_cuda_tensors():
    cpu, cuda1 = torch.device("cpu"), torch.device("cuda", 1)
    x = torch.empty(0)
    with torch.device("meta"):
        y = torch.empty(2)
    assert device_module.inputs_device((x, None, 3), {}) == cpu
    assert device_module.inputs_device((3,), {}) is None
    assert device_module.inputs_device((y, x), {}) == torch.device("meta")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(2, device=cuda1)
    assert device_module.inputs_device((x, z), {}) == cuda1


# ----------------------------------------------------------------------------- divisibility
def _interpreted_kernels():
    """Every kernel the op modules launch (their launch.traceable wrappers)."""
    return {name: kernel for module in (tb.contrastive_ops, tb.step_ops)
            for name, kernel in vars(module).items()
            if isinstance(kernel, tb.launch.InterpretedKernel)}


@pytest.mark.skipif(not tb.interpreting(), reason="records the interpreter's launches")
def test_every_launch_has_aligned_dims_and_pointers(monkeypatch):
    launches = []

    class Recording:
        def __init__(self, inner, name, arg_names):
            self.inner, self.name, self.arg_names = inner, name, arg_names

        def run(self, *args, **kwargs):
            launches.append((self.name, dict(zip(self.arg_names, args)) | kwargs))
            return self.inner.run(*args, **kwargs)

    kernels = _interpreted_kernels()
    for name, kernel in kernels.items():
        monkeypatch.setattr(kernel, "_interpreted",
                            Recording(kernel._interpreted, name, kernel.arg_names))
    for D in (5, 33):  # the register-resident and the dS-workspace backward
        for name, args in _op_calls(D, "cpu").items():
            getattr(ops, name)(*args)
    assert {name for name, _ in launches} == set(kernels)
    for name, args in launches:
        for arg, value in args.items():
            if arg == "D" or arg.startswith("stride"):
                assert value % 16 == 0, (name, arg, value)
            if isinstance(value, torch.Tensor):
                assert value.data_ptr() % 16 == 0, (name, arg)


def test_kernel_input_copies_a_misaligned_view(monkeypatch):
    monkeypatch.setattr(tb.launch, "interpreting", lambda: False)  # (the interpreter copies all)
    base = torch.randn(100)
    misaligned = base[3:35].view(2, 16)  # 12 bytes past a 64-byte aligned allocation
    aligned = base[4:36].view(2, 16)
    assert tb.launch.kernel_input(misaligned).data_ptr() % 16 == 0
    assert tb.launch.kernel_input(aligned).data_ptr() == aligned.data_ptr()


# ----------------------------------------------------------------------------- shared code
def test_modules_share_only_public_names():
    # What one module of the backend uses of another is public (launch.py's launch code,
    # contrastive_ops.check_features): no module imports another's private name.
    for path in sorted(Path(tb.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from .{node.module or ''}"
