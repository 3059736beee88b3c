"""measure.py's measure_config in another Python process, two ways:

  run_config_isolated  a fresh process per configuration (the CLI's default on CPU): a fresh
                       peak RSS, and no state between configurations;
  Worker               one long-lived process serving configurations one at a time (the GPU
                       check's benchmark stage), watched so that a configuration past its
                       time-out is killed and a fresh worker takes the next.

Both run `python -m harness.isolation` with benchmarks/ first on PYTHONPATH; each
configuration's results come back as one tagged JSON line on its stdout.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULT_TAG = "RFT_BENCH_RESULT "
READY_TAG = "RFT_BENCH_READY"
# Fixed glibc mmap threshold for CPU workers: without it glibc raises the threshold after
# large frees and later buffers come from the heap, whose pages are not returned.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
WORKER_START_S = 120.0     # importing torch and the providers, creating the CUDA context


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.isolation", *args]


def _env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, **extra,
                PYTHONPATH=os.pathsep.join([str(BENCHMARKS)] + ([path] if path else [])))


# --------------------------------------------------------------------------- one per configuration

def run_config_isolated(spec: dict, timeout_s: float | None = None) -> list[dict]:
    """measure_config in a fresh Python process (fresh peak RSS, no state between configs)."""
    try:
        proc = subprocess.run(_command("--config", json.dumps(spec)), env=_env(**WORKER_ENV),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [dict(mode=m, status="error", note=f"worker timed out after {timeout_s:.0f} s")
                for m in spec["modes"]]
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            got.update((r["mode"], r) for r in json.loads(line[len(RESULT_TAG):]))
    out = []
    for m in spec["modes"]:
        if m in got:
            out.append(got[m])
        elif proc.returncode in (-9, 137):
            out.append(dict(mode=m, status="oom", note="worker killed by SIGKILL (likely the OOM killer)"))
        else:
            tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
            out.append(dict(mode=m, status="error",
                            note=f"worker exited {proc.returncode}: {tail}"[:300]))
    return out


# --------------------------------------------------------------------------- a long-lived worker

class Worker:
    """A worker process with a reader thread, so that a configuration can be waited on with a
    time-out. The worker's start-up (imports, CUDA context) is waited for apart from any
    configuration."""

    def __init__(self):
        self.proc = subprocess.Popen(_command("--serve"), env=_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                self.lines.put(json.loads(line[len(RESULT_TAG):]))
            elif line.strip() == READY_TAG:
                self.ready.set()
            else:
                sys.stdout.write(line)
        self.ready.set()
        self.lines.put(None)  # the worker exited

    def run(self, spec: dict, timeout_s: float, start_s: float = WORKER_START_S
            ) -> list[dict] | str:
        """The configuration's rows, or why there are none ("timeout" or the worker's exit); a
        worker not started within start_s seconds counts as a time-out too."""
        if not self.ready.wait(start_s):
            return "timeout"
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return f"worker exited {self.proc.poll()} before the case"
        try:
            got = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout"
        if got is None:
            code = self.proc.wait()
            return f"worker exited {code}" + (" (killed: likely out of host memory)"
                                               if code in (-9, 137) else "")
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------- the worker's side

def _measure(spec: dict) -> None:
    import torch

    from harness.measure import measure_config
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(RESULT_TAG + json.dumps(measure_config(spec)), flush=True)


def _serve() -> None:
    """Read one spec (JSON) per line from stdin; print its results, tagged."""
    import torch

    import harness.measure  # noqa: F401 - its imports are start-up, not a configuration's time
    # Start-up too: the CUDA context, and open_clip's long import.
    if torch.cuda.is_available():
        torch.cuda.init()
    try:
        import open_clip.loss  # noqa: F401
    except Exception:  # noqa: BLE001 - its rows say why when a case needs it
        pass
    print(READY_TAG, flush=True)
    for line in sys.stdin:
        _measure(json.loads(line))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--config":
        _measure(json.loads(sys.argv[2]))
    elif sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        sys.exit("usage: python -m harness.isolation --config SPEC_JSON | --serve")
