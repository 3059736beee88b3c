"""The practical ceilings of the machine, for gpu_check.sh's summary.

  matmul  the bf16 rate of a large torch.mm (8192 x 8192 x 8192) on random data: the
          ceiling the summary's "% of ceiling" divides by;
  clip    torch.mm of the CLIP logits' shape, [16384, 768] x [768, 16384]: what one
          cuBLAS call reaches at the benchmark's own inner dimension (for reference);
  copy    a device-to-device copy of 2 GiB, counting the bytes read and written.
Each: 3 warm-up calls, then the median (and best) of 20 timed with CUDA events. --toy: small
sizes on the CPU (timed with perf_counter), so that the dry run goes through the same code.
Writes a JSON file (--json) and prints one line per measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = dict(gpu=dict(matmul=(8192, 8192, 8192), clip=(16384, 768, 16384), copy_bytes=2 << 30),
              toy=dict(matmul=(512, 512, 512), clip=(256, 32, 256), copy_bytes=16 << 20))
WARMUP, REPS = 3, 20


def time_ms(fn, device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> list[float]:
    """Times of `reps` calls of fn in ms, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def matmul_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> dict:
    """TFLOP/s (2 m k n per product) of torch.mm on random (not zero) inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = time_ms(lambda: torch.mm(a, b, out=out), device)
    flop = 2.0 * m * k * n
    med, best = statistics.median(times), min(times)
    return dict(shape=[m, k, n], dtype=str(dtype).replace("torch.", ""), ms_median=med,
                ms_best=best, tflops_median=flop / (med * 1e-3) / 1e12,
                tflops_best=flop / (best * 1e-3) / 1e12, reps=len(times))


def copy_rate(device: torch.device, nbytes: int) -> dict:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device)
    med = statistics.median(times)
    return dict(bytes=nbytes, ms_median=med, gbps_median=2 * nbytes / (med * 1e-3) / 1e9,
                reps=len(times))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--toy", action="store_true", help="small sizes on the CPU (dry run)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    shapes = SHAPES["toy" if args.toy else "gpu"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = dict(device=name, torch=torch.__version__)
    out["matmul"] = matmul_rate(device, dtype, *shapes["matmul"])
    out["clip_shaped"] = matmul_rate(device, dtype, *shapes["clip"])
    out["copy"] = copy_rate(device, shapes["copy_bytes"])
    mm, cs, cp = out["matmul"], out["clip_shaped"], out["copy"]
    out["ceiling_tflops"] = mm["tflops_median"]
    out["summary"] = (f"{args.dtype} torch.mm {'x'.join(map(str, mm['shape']))}: "
                      f"{mm['tflops_median']:.4g} TFLOP/s (best {mm['tflops_best']:.4g}); "
                      f"CLIP-shaped {'x'.join(map(str, cs['shape']))}: "
                      f"{cs['tflops_median']:.4g} TFLOP/s; copy {cp['gbps_median']:.4g} GB/s")
    print(out["summary"])
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
