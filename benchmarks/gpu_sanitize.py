"""Run every public loss of robustft_ext on the native backend, forward and backward, at a
small and an odd shape, in float32 and bfloat16: the program that gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck) so that every compiled op's kernels are checked.

  compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py --device cuda
  python benchmarks/gpu_sanitize.py --device cpu          # the dry run: the same calls on CPU

Cases: clip_loss, clip_rows_loss (more columns than rows, a diagonal offset), siglip_loss,
siglip_loss(negative_only) (another column count), slerp, m2mix_loss, clip_m2mix_loss,
dive_loss, lipsum_loss and a RobustFTLoss step with every term on. Shapes: N = 64, D = 64
(tile-aligned) and N = 131, D = 67 (no dimension a multiple of a tile or of a vector width).
Each case checks that the loss and every gradient are finite. On the CPU every case runs again
at a one-byte workspace limit (CLIP and SigLIP keep their dot products only within the limit).
The compiled ops each case reaches are recorded through a dispatch mode; every op registered
under robustft_ext:: for the device that takes a tensor must be reached by some case, so that a new op cannot go unchecked. Prints one
line per case ("RFT_SANITIZE ok ..." or "RFT_SANITIZE FAIL ..."), then "RFT_SANITIZE done: ..."; exits 1
when a case fails or an op is never reached.

  python benchmarks/gpu_sanitize.py --classify OUTPUT_FILE --rc RC --tool memcheck

reads what a compute-sanitizer run printed and its exit code (--error-exitcode 66; 124 or 137
when the stage's cap killed it) and prints gpu_check.sh's verdict: "ok", "failed", "timed out"
or "skipped" (the tool does not work on this machine), a tab, and the detail, which counts the
errors in our kernels apart from those inside torch or cuBLAS (see classify).
"""
from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robustft_ext as rft

SANITIZER_ERROR_RC = 66   # gpu_check.sh passes --error-exitcode 66

SHAPES = ((64, 64), (131, 67))
DTYPES = (torch.float32, torch.bfloat16)
NAMESPACE = "robustft_ext"


# What names our code in a report: our kernels and host functions (namespace robustft), our
# library (robustft_ext/_C...so) and our sources (csrc/cuda/..., not torch's torch/csrc/).
OURS = re.compile(r"robustft|(?<!torch/)\bcsrc/cuda/")
PREFIX = "========="
# Header lines that open no error record.
NOT_ERRORS = re.compile(r"(COMPUTE-SANITIZER|(ERROR|RACECHECK|LEAK) SUMMARY|Warning|Note|"
                        r"Target application)\b")
KILLED_RCS = (124, 137)   # timeout's: the stage's cap stopped the run


def error_records(output: str) -> list[list[str]]:
    """The sanitizer's error records, each its header line and the indented lines under it
    (where, which thread, the host backtrace), without the "=========" prefix."""
    records: list[list[str]] = []
    current: list[str] | None = None
    for line in output.splitlines():
        if not line.startswith(PREFIX):
            continue
        text = line[len(PREFIX):]
        if not text.strip():
            current = None
        elif not text[:2].isspace():
            current = None if NOT_ERRORS.match(text.strip()) else [text.strip()]
            if current is not None:
                records.append(current)
        elif current is not None:
            current.append(text.strip())
    return records


def attribute(record: list[str]) -> str:
    """"ours" (the faulting kernel is ours), "launched by ours" (a torch or cuBLAS kernel, or a
    CUDA call, that our code launched: its host backtrace passes through our library),
    "outside" (located, and nowhere near our code) or "unknown" (no location given)."""
    host_at = next((i for i, ln in enumerate(record) if ln.startswith("Saved host backtrace")),
                   len(record))
    device, host = "\n".join(record[:host_at]), "\n".join(record[host_at:])
    if OURS.search(device):
        return "ours"
    if OURS.search(host):
        return "launched by ours"
    located = (re.search(r"(^|\n)at |Race reported .* at |Program hit ", device)
               or "Host Frame" in host)
    return "outside" if located else "unknown"


def short(text: str) -> str:
    """A report line without template arguments, parameter lists or folders."""
    previous = None
    while previous != text:
        previous, text = text, re.sub(r"<[^<>]*>", "", text)
    text = re.sub(r"\([^()]*\)(?=\+0x)", "", text)
    return re.sub(r"(?<=\s)/\S*/", "", text)


def where(record: list[str]) -> str:
    """The record's header and the line that says where, shortened, for the stage's detail."""
    at = next((ln for ln in record[1:] if ln.startswith("at ")), "")
    return short(f"{record[0]} {at}".strip())[:200]


def classify(output: str, rc: int, tool: str = "memcheck") -> tuple[str, str]:
    """(verdict, detail) of a compute-sanitizer run of this program: "ok" when every case
    passed and no error was reported in our code; "failed" when a case failed, or an error was
    reported in one of our kernels, in a torch or cuBLAS kernel that our code launched (under
    memcheck: a bad access there most likely comes from our arguments), or without a location;
    "timed out" for a run that the stage's cap stopped (rc 124 or 137: what it had seen so
    far); "skipped" when the tool itself could not run the program (no case started: e.g.
    "Device not supported" under some virtual machines). Errors inside torch or cuBLAS that
    our code did not launch, and racecheck's reports inside kernels that are not ours, are
    counted apart in the detail and fail nothing."""
    summaries = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: [^\n]*", output)
    summary = summaries[-1].strip() if summaries else ""
    errors = sum(int(x) for x in re.findall(r"ERROR SUMMARY: (\d+) error", output))
    errors += sum(int(x) for x in re.findall(r"RACECHECK SUMMARY: .*?\((\d+) error", output))
    ran = len(re.findall(r"^RFT_SANITIZE (?:ok|FAIL) ", output, re.M))
    fails = re.findall(r"^RFT_SANITIZE FAIL [^\n]*", output, re.M)
    done = re.findall(r"^RFT_SANITIZE done: ([^\n]*)", output, re.M)
    tail = done[-1] if done else f"{ran} cases ran"
    records = error_records(output)
    kinds = [attribute(r) for r in records]
    count = {k: kinds.count(k) for k in ("ours", "launched by ours", "outside", "unknown")}
    blamed = ["ours", "unknown"] + (["launched by ours"] if tool == "memcheck" else [])
    words = {"ours": "in robustft_ext kernels",
             "launched by ours": "in library kernels or CUDA calls launched by robustft_ext",
             "outside": "in torch/cuBLAS code that robustft_ext did not launch",
             "unknown": "without a location"}
    found = [f"{count[k]} {words[k]}" for k in words if count[k]]
    if errors > len(records):
        found.append(f"{errors - len(records)} not printed")
    first = next((where(r) for r, k in zip(records, kinds) if k in blamed),
                 next((where(r) for r in records), ""))
    report = "; ".join(x for x in (summary, ", ".join(found), first and f"first: {first}") if x)
    if rc in KILLED_RCS:
        return "timed out", f"{ran} cases ran before the cap" + (f"; {report}" if report else "")
    if rc != 0 and ran == 0 and set(kinds) <= {"unknown"}:  # the tool's own errors only
        tool_lines = [ln.strip("= ").strip() for ln in output.splitlines()
                      if ln.startswith(PREFIX) and re.search(r"error|not supported", ln, re.I)]
        why = tool_lines[0] if tool_lines else (output.strip().splitlines() or ["no output"])[-1]
        return "skipped", f"compute-sanitizer could not run the program here: {why[:200]}"
    if fails:
        return "failed", f"exit {rc}; {fails[0][len('RFT_SANITIZE FAIL '):][:200]}" + (
            f"; {report}" if found else "")
    if any(count[k] for k in blamed) or (errors and not records):
        return "failed", f"{report or 'errors reported'}; {tail}"
    if "(never:" in tail:  # an op no case reached (the program's exit 1, hidden by rc 66)
        return "failed", f"exit {rc}; {tail}"
    if rc == 0 or (rc == SANITIZER_ERROR_RC and done):
        return "ok", f"{report or 'no sanitizer summary line'}; {tail}"
    return "failed", f"exit {rc}; {tail}"


class OpRecorder(TorchDispatchMode):
    """Names the robustft_ext ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == NAMESPACE:
            self.seen.add(func._schema.name.split("::", 1)[1])
        return func(*args, **(kwargs or {}))


def registered_ops(device: torch.device) -> set[str] | None:
    """Every op registered under robustft_ext:: for the device's dispatch key that takes a
    tensor (an op without one launches no kernel), or None when torch cannot list them."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        names = torch._C._dispatch_get_all_op_names()
    except Exception:  # noqa: BLE001 - a torch without the listing: no coverage check
        return None
    ops = set()
    for full in names:
        if not full.startswith(NAMESPACE + "::"):
            continue
        short = full.split("::", 1)[1]
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(full, key):
                continue
        except Exception:  # noqa: BLE001 - a torch without the query: count the op
            pass
        packet = getattr(getattr(torch.ops, NAMESPACE), short, None)
        schemas = [str(getattr(packet, o)._schema) for o in packet.overloads()] if packet else []
        if not schemas or any("Tensor" in sch.split("->")[0] for sch in schemas):
            ops.add(short)
    return ops


def unit(n: int, d: int, dtype: torch.dtype, device: torch.device, g: torch.Generator,
         grad: bool = True) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return x.to(device=device, dtype=dtype).requires_grad_(grad)


def cases(n: int, d: int, dtype: torch.dtype, device: torch.device
          ) -> dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]]:
    """name -> fn() returning (loss, leaves whose gradients must be finite)."""
    g = torch.Generator(device="cpu").manual_seed(n * 1000 + d)

    def scale(v: float) -> torch.Tensor:
        return torch.tensor(v, device=device, requires_grad=True)

    def clip():
        a, b, s = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g), scale(14.3)
        return rft.clip_loss(a, b, s, backend="native"), [a, b, s]

    def clip_rows():
        a, b, s = unit(n, d, dtype, device, g), unit(n + 5, d, dtype, device, g), scale(14.3)
        return rft.clip_rows_loss(a, b, s, diag_offset=3, backend="native"), [a, b, s]

    def siglip():
        a, b = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g)
        s, bias = scale(10.0), scale(-10.0)
        return rft.siglip_loss(a, b, s, bias, backend="native"), [a, b, s, bias]

    def siglip_negative_only():
        a, b = unit(n, d, dtype, device, g), unit(n + 7, d, dtype, device, g)
        s, bias = scale(10.0), scale(-10.0)
        return (rft.siglip_loss(a, b, s, bias, negative_only=True, backend="native"),
                [a, b, s, bias])

    def slerp():
        a, b = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g)
        w = torch.randn(n, d, generator=g).to(device=device, dtype=torch.float32)
        out = rft.slerp(a, b, 0.3, backend="native")
        return (out.float() * w).sum(), [a, b]

    def m2mix():
        a, b, s = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g), scale(14.3)
        return rft.m2mix_loss(a, b, s, 0.3, backend="native"), [a, b, s]

    def clip_m2mix():
        a, b, s = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g), scale(100.0)
        clip_l, m2_l = rft.clip_m2mix_loss(a, b, s, 0.3, m2_logit_scale=14.3, backend="native")
        return clip_l + 0.5 * m2_l, [a, b, s]

    def dive():
        fi, ft = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g)
        pi, pt = unit(n, d, dtype, device, g, False), unit(n, d, dtype, device, g, False)
        center = 0.01 * torch.randn(d, generator=g).to(device)
        avl, pvl = rft.dive_loss(fi, ft, pi, pt, center, backend="native")
        return avl + pvl, [fi, ft]

    def lipsum():
        f, f0 = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g, False)
        texts = unit(7, d, dtype, device, g, False)
        return rft.lipsum_loss(f, f0, texts, 100.0, backend="native"), [f]

    def robust_step():
        a, b, s = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g), scale(100.0)
        rfi, rft_ = unit(n, d, dtype, device, g), unit(n, d, dtype, device, g)
        extra = dict(image_pre=unit(n, d, dtype, device, g, False),
                     random_text_features=unit(7, d, dtype, device, g, False),
                     ref_image_ft=rfi, ref_text_ft=rft_,
                     ref_image_pre=unit(n, d, dtype, device, g, False),
                     ref_text_pre=unit(n, d, dtype, device, g, False))
        module = rft.RobustFTLoss(m2_weight=0.01, lipsum_weight=1.0, dive_weight=1.0, m2_lam=0.3,
                                  m2_logit_scale=14.3, backend="native")
        return module(a, b, s, pre_logit_scale=100.0, **extra), [a, b, s, rfi, rft_]

    return dict(clip_loss=clip, clip_rows_loss=clip_rows, siglip_loss=siglip,
                siglip_negative_only=siglip_negative_only, slerp=slerp, m2mix_loss=m2mix,
                clip_m2mix_loss=clip_m2mix, dive_loss=dive, lipsum_loss=lipsum,
                robust_step=robust_step)


def run_case(fn, device: torch.device) -> str | None:
    """None when the loss and every gradient are finite, else what went wrong."""
    loss, leaves = fn()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not bool(torch.isfinite(loss.detach()).all()):
        return f"loss is {loss.item()}"
    for i, t in enumerate(leaves):
        if t.grad is None:
            return f"input {i} got no gradient"
        if not bool(torch.isfinite(t.grad).all()):
            return f"input {i}'s gradient is not finite"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (under compute-sanitizer) or cpu")
    p.add_argument("--classify", metavar="OUTPUT_FILE", default=None,
                   help="print the verdict on a compute-sanitizer run's output instead")
    p.add_argument("--rc", type=int, default=0, help="that run's exit code (with --classify)")
    p.add_argument("--tool", default="memcheck", choices=["memcheck", "racecheck"],
                   help="the tool that run used (with --classify)")
    args = p.parse_args(argv)
    if args.classify is not None:
        with open(args.classify, errors="replace") as f:
            verdict, detail = classify(f.read(), args.rc, args.tool)
        print(f"{verdict}\t{detail}")
        return 0
    device = torch.device(args.device)
    failures, ran = 0, 0
    recorder = OpRecorder()
    # On the CPU, CLIP and SigLIP keep their dot products for the backward when they fit the
    # workspace limit; a second round at a one-byte limit reaches the ops that recompute them.
    limits = (None, 1) if device.type == "cpu" else (None,)
    rounds = [(limit, shape, dt) for limit in limits for shape in SHAPES for dt in DTYPES]
    for limit, (n, d), dtype in rounds:
        rft.set_workspace_limit(limit)
        for name, fn in cases(n, d, dtype, device).items():
            label = (f"{name} {str(dtype).replace('torch.', '')} N={n} D={d}"
                     + (f" workspace {limit} B" if limit else ""))
            try:
                with recorder:
                    why = run_case(fn, device)
            except Exception as exc:  # noqa: BLE001 - record, go on with the next case
                why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                traceback.print_exc()
            ran += 1
            if why is None:
                print(f"RFT_SANITIZE ok {label}", flush=True)
            else:
                failures += 1
                print(f"RFT_SANITIZE FAIL {label}: {why}", flush=True)
    rft.set_workspace_limit(None)
    registered = registered_ops(device)
    coverage = f"{len(recorder.seen)} ops reached"
    missing: set[str] = set()
    if registered is not None:
        missing = registered - recorder.seen
        coverage = (f"{len(registered & recorder.seen)}/{len(registered)} registered ops reached"
                    + (f" (never: {', '.join(sorted(missing))})" if missing else ""))
    print(f"RFT_SANITIZE done: {ran - failures}/{ran} cases ok on {device.type}; {coverage}",
          flush=True)
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
