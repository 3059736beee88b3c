"""robustft-train: for now, a short built-in example of the fused losses.

The fine-tuning driver (open_clip models, methods, evaluation, WiSE-FT) is not implemented yet;
this command says so and, instead of training, checks every usable backend of robustft_ext
against the reference on random CLIP-like features and times them. It uses only the
library's public API.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _example(n: int, d: int, device: str, dtype: torch.dtype) -> list[dict[str, object]]:
    import robustft_ext as rft

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(n, d, generator=gen), dim=1)
    rows = []
    report = rft.available_backends()
    for loss_name, fn, bias in (("clip", rft.clip_loss, None), ("siglip", rft.siglip_loss, -10.0)):
        ref = None
        for backend in ("reference", "native", "triton"):
            reason = report[backend]["cuda" if device == "cuda" else "cpu"]
            if reason is not None:
                rows.append({"loss": loss_name, "backend": backend, "status": f"unavailable: {reason}"})
                continue
            a = img.to(device=device, dtype=dtype).clone().requires_grad_()
            b = txt.to(device=device, dtype=dtype).clone().requires_grad_()
            scale = torch.tensor(100.0 if loss_name == "clip" else 10.0, device=device, requires_grad=True)
            start = time.perf_counter()
            loss = fn(a, b, scale, bias, backend=backend)
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            grads = torch.cat([a.grad.float().flatten(), b.grad.float().flatten()])
            if ref is None:
                ref = (loss.item(), grads)
            err = (grads - ref[1]).abs().max().item() / ref[1].abs().max().item()
            rows.append({"loss": loss_name, "backend": backend, "value": loss.item(),
                         "grad_rel_err_vs_reference": err, "ms": ms, "status": "ok"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="robustft-train",
        description="robustft_ext driver. The fine-tuning driver is not implemented yet: this "
                    "runs a built-in example of the fused losses on random features.")
    parser.add_argument("--n", type=int, default=1024, help="batch size of the example")
    parser.add_argument("--d", type=int, default=512, help="feature dimension of the example")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    if args.n < 1 or args.d < 1:
        parser.error("--n and --d must be positive")
    print("robustft-train: the fine-tuning driver is not implemented yet (see README); "
          "running the built-in example of the losses instead.")
    rows = _example(args.n, args.d, args.device, getattr(torch, args.dtype))
    print(f"N={args.n} D={args.d} device={args.device} dtype={args.dtype}")
    print(f"{'loss':8s} {'backend':10s} {'value':>10s} {'grad rel err':>13s} {'ms':>9s}  status")
    failed = False
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['loss']:8s} {r['backend']:10s} {'':>10s} {'':>13s} {'':>9s}  {r['status']}")
            continue
        print(f"{r['loss']:8s} {r['backend']:10s} {r['value']:10.5f} "
              f"{r['grad_rel_err_vs_reference']:13.2e} {r['ms']:9.1f}  ok")
        tol = 1e-4 if args.dtype == "float32" else 5e-2
        failed |= not (r["grad_rel_err_vs_reference"] <= tol)
    if failed:
        print("a backend disagreed with the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
