"""What a result row records about where it was measured: the device, the library versions,
the time."""
from __future__ import annotations

import datetime as _dt
import os

import torch


def cpu_model() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform
        name = platform.processor() or name
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{name} ({cores} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def versions() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure: report it as absent
        triton_version = "none"
    try:
        import robustft_ext
        rft_version = robustft_ext.__version__
    except Exception:  # noqa: BLE001
        rft_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "robustft_ext": rft_version}


def utc_stamp() -> str:
    """The current UTC time as 20261201T013000Z (sorts as time, safe in file names)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def utc_iso() -> str:
    """The current UTC time as a row's timestamp, 2026-12-01T01:30:00+00:00."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
