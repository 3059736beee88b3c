"""The whole CPU benchmark run behind docs/benchmarks.md, as one command.

  python benchmarks/cpu_report.py            # the run: N = 256 ... 8192 (about 17-20 minutes
                                             #   on the 2-core machine, see docs/benchmarks.md)
  python benchmarks/cpu_report.py --trial    # a trial at small N (N = 256 ... 2048)

It times CLIP, SigLIP, CLIP + m^2 and a whole RobustFTLoss step in fp32, forward + backward,
D = 512, 2 threads, with the providers native (the "gram" step design), native-products (the
"products" design), reference, reference + torch.compile and the floor, interleaved round-robin
in one process per group of N (benchmarks/cpu_compare.py, with harness/isolation.py's fixed
glibc mmap threshold so that its peak memory shows), and then, from that run's rows alone:

  benchmarks/cpu_results/compare.csv   cpu_compare.py's rows: each provider's minimum and
                                       median ms and peak MB per (loss, N)
  benchmarks/cpu_results/targets.csv   the targets table (harness/targets.py)
  benchmarks/cpu_results/run.json      date, machine (CPU model, torch's CPU capability, cores,
                                       threads), load average
                                       before and after, torch and robustft_ext versions,
                                       commit, the command, N and rounds, duration
  benchmarks/cpu_results/report.md     the tables in Markdown
  benchmarks/cpu_results/plots/        <loss>_fp32_D512_full.png, every provider against N
  docs/benchmarks.md                   the block between its "cpu-report" markers: report.md
                                       with the page's relative links

The run is measured into a new folder under the ignored benchmarks/results/ and copied over
benchmarks/cpu_results/ only when every group has finished, so the tracked files are always
one whole run. Nothing is committed. --out and --docs (or --no-docs) redirect the outputs
(the tests run it at toy sizes that way).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import targets  # noqa: E402
from harness.environment import utc_iso, utc_stamp  # noqa: E402
from harness.isolation import WORKER_ENV  # noqa: E402

ROOT = HERE.parent
OUT = HERE / "cpu_results"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cpu-report begin -->", "<!-- cpu-report end -->"

LOSSES = ["clip", "siglip", "clip_m2mix", "robust_step"]
PROVIDERS = ["native", "native-products", "reference", "reference+compile", "floor"]
# (N of a group, rounds): every loss and provider of one N interleaved; fewer rounds where a
# round takes minutes.
GROUPS = [([256, 512, 1024, 2048], 7), ([4096], 5), ([8192], 3)]
TRIAL_GROUPS = [([256, 512, 1024, 2048], 5)]
PLOT_NAMES = {"clip": "CLIP", "siglip": "SigLIP", "clip_m2mix": "CLIP + 0.01 m^2",
              "robust_step": "a RobustFTLoss step"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trial", action="store_true",
                    help="N = 256 ... 2048 in one group of 5 rounds, marked as a trial")
    ap.add_argument("--n", nargs="+", type=int, default=None,
                    help="N, all in one group (default: the groups of GROUPS)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of a --n group")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--out", type=Path, default=OUT, help="the results folder (replaced)")
    docs = ap.add_mutually_exclusive_group()
    docs.add_argument("--docs", type=Path, default=DOCS,
                      help="the page whose cpu-report block is rewritten")
    docs.add_argument("--no-docs", dest="docs", action="store_const", const=None)
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument("--render", type=Path, default=None, metavar="DIR",
                    help="measure nothing: redraw the plots, report.md and the docs block from "
                         "the run in DIR (a folder this script wrote: run.json, compare.csv)")
    return ap.parse_args(argv)


def groups_of(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    if args.n:
        return [(sorted(args.n), args.rounds or 3)]
    return TRIAL_GROUPS if args.trial else GROUPS


def machine() -> dict:
    """The CPU model, torch's CPU capability (the widest vector instructions torch's own
    kernels take on this CPU, e.g. AVX512 or AVX2), the cores this process may run on, and the
    library versions."""
    import torch

    from harness.environment import cpu_model, versions
    model = cpu_model().rsplit(" (", 1)[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    v = versions()
    return dict(cpu=model, cpu_capability=torch.backends.cpu.get_cpu_capability(), cores=cores,
                torch=torch.__version__, robustft_ext=v["robustft_ext"],
                commit=_git("rev-parse", "--short", "HEAD"),
                uncommitted=bool(_git("status", "--porcelain", "--untracked-files=no")))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_groups(args: argparse.Namespace, work: Path) -> int:
    """cpu_compare.py per group, its rows into work/compare.csv and its output into
    work/log.txt (and the console). The first non-zero exit status, or 0."""
    env = dict(os.environ, **WORKER_ENV)
    status = 0
    with open(work / "log.txt", "a") as log:
        for ns, rounds in groups_of(args):
            cmd = [sys.executable, str(HERE / "cpu_compare.py"), "--threads", str(args.threads),
                   "--n", *map(str, ns), "--d", str(args.d), "--losses", *args.losses,
                   "--providers", *args.providers, "--modes", "full", "--rounds", str(rounds),
                   "--csv", str(work / "compare.csv"), "--table-n", *map(str, ns)]
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            print(f"[{utc_iso()}] N = {ns}, {rounds} rounds", flush=True)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                log.write(line)
                if not _noise(line):
                    print(line, end="", flush=True)
            status = status or proc.wait()
    return status


def _noise(line: str) -> bool:
    """torch's warnings (dynamo's graph breaks and the like): in log.txt, not on the console."""
    return (line.startswith(("W1", "I1", " ", "If it is", "/")) or "Warning" in line
            or "torch._dynamo" in line)


def read_compare(path: Path) -> list[dict]:
    import csv
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def providers_table(rows: list[dict], providers: list[str]) -> str:
    """Every loss, N and provider of the run: minimum ms over the rounds, and the load."""
    head = " | ".join(p.replace("+", " + ") for p in providers)
    lines = [f"| loss | N | {head} | load (1 min) |",
             "| --- | --- |" + " --- |" * len(providers) + " --- |"]
    order = {loss: i for i, loss in enumerate(LOSSES)}
    for r in sorted(rows, key=lambda r: (order.get(r["loss"], 99), int(r["N"]))):
        if r["mode"] != "full":
            continue
        cells = [targets.fmt_ms(targets.num(r, f"{p}_min_ms")) for p in providers]
        lines.append(f"| {PLOT_NAMES.get(r['loss'], r['loss'])} | {r['N']} | "
                     + " | ".join(cells) + f" | {r['load1']} |")
    return "\n".join(lines) + "\n"


def report_markdown(run: dict, rows: list[dict], trows: list[dict], plots: list[Path],
                    link_prefix: str) -> str:
    """The report: what ran where and when, the targets tables, every provider, the plots."""
    rounds = ", ".join(f"{r} rounds at N = {', '.join(map(str, ns))}" for ns, r in run["groups"])
    loads = sorted(float(r["load1"]) for r in rows if r.get("load1") not in (None, ""))
    # (A run.json from before the capability was recorded has none.)
    capability = f" ({run['cpu_capability']})" if run.get("cpu_capability") else ""
    per_config = ("-" if not loads else f"{loads[0]:g}" if loads[0] == loads[-1]
                  else f"{loads[0]:g}-{loads[-1]:g}")
    ns = sorted({n for group, _ in run["groups"] for n in group})
    trial = (f"**A trial run at N = {', '.join(map(str, ns))}**, not the run the targets are "
             "set for (N = 1024 ... 8192, `python benchmarks/cpu_report.py`): its table holds "
             "every N it measured, and the full run replaces it.\n\n" if run["trial"] else "")
    lines = [
        trial + f"Run of {run['start'][:16].replace('T', ' ')} to {run['end'][11:16]} UTC "
        f"({run['duration_s'] / 60:.0f} min) on {run['cpu']}{capability}, {run['cores']} cores, "
        f"{run['threads']} threads; torch {run['torch']}, robustft_ext {run['robustft_ext']} "
        f"(commit {run['commit'] or '?'}"
        f"{', with uncommitted changes' if run['uncommitted'] else ''}"
        f"). Load average (1, 5, 15 min): {' '.join(map(str, run['load_before']))} before, "
        f"{' '.join(map(str, run['load_after']))} after; 1-minute load at the end of each N: "
        f"{per_config}. fp32, D = {run['d']}, forward + backward, minimum over the rounds "
        f"({rounds}), every loss and provider of one N interleaved in one process. Command: "
        f"`{run['command']}`.",
        "",
        targets.format_tables(trows) if trows else "No targets table: fused CLIP or the native "
        "provider is missing from the run.\n",
        "Every loss and provider, minimum ms over the rounds (`compare.csv` adds the medians and "
        "the peak memory):",
        "",
        providers_table(rows, run["providers"]),
    ]
    def loss_of(p: Path) -> str:
        return re.sub(r"_(fp32|bf16|fp16)_D\d+_\w+\.png$", "", p.name)
    order = {loss: i for i, loss in enumerate(LOSSES)}
    for p in sorted(plots, key=lambda p: (order.get(loss_of(p), 99), p.name)):
        loss = loss_of(p)
        lines.append(f"![{PLOT_NAMES.get(loss, loss)} on CPU]({link_prefix}{p.name})")
    return "\n".join(lines).rstrip() + "\n"


def update_docs(page: Path, block: str) -> None:
    """Replace what lies between the page's cpu-report markers by `block`."""
    text = page.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"cpu_report.py: {page} has no {BEGIN} ... {END} block")
    page.write_text(pattern.sub(lambda _m: f"{BEGIN}\n{block}{END}", text, count=1))


def finish(args: argparse.Namespace, work: Path, run: dict) -> None:
    """From the run in `work` (run.json's facts, compare.csv's rows): targets.csv, the plots,
    report.md; then work copied over args.out (unless it is args.out) and the docs block."""
    rows = read_compare(work / "compare.csv")
    trows = targets.target_rows(rows, None if run["trial"] else targets.TARGET_NS)
    targets.write_csv(trows, work / "targets.csv")
    plots: list[Path] = []
    if args.plots and rows:
        import plot
        shutil.rmtree(work / "plots", ignore_errors=True)
        plots = plot.main(["--csv", str(work / "compare.csv"), "--out", str(work / "plots"),
                           "--no-device-in-name"])
    (work / "report.md").write_text(report_markdown(run, rows, trows, plots, "plots/"))
    if work.resolve() != args.out.resolve():
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(work, args.out, ignore=shutil.ignore_patterns("log.txt"))
        print(f"\nwrote {args.out}", flush=True)
    if args.docs is not None:
        rel = os.path.relpath(args.out / "plots", args.docs.parent) + "/"
        update_docs(args.docs, report_markdown(run, rows, trows, plots, rel))
        print(f"rewrote the cpu-report block of {args.docs}", flush=True)
    print("\n" + (work / "report.md").read_text(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        finish(args, args.render, json.loads((args.render / "run.json").read_text()))
        return 0
    if args.trial and args.n:
        sys.exit("cpu_report.py: --trial and --n exclude each other")
    given = sys.argv[1:] if argv is None else argv
    work = HERE / "results" / f"cpu_report_{utc_stamp()}"
    work.mkdir(parents=True)
    run = dict(machine(), threads=args.threads, d=args.d, trial=args.trial or bool(args.n),
               providers=args.providers, losses=args.losses,
               groups=[[ns, r] for ns, r in groups_of(args)],
               command=" ".join(["python benchmarks/cpu_report.py", shlex.join(given)]).strip(),
               load_before=_load(), start=utc_iso())
    print(f"cpu_report: {run['cpu']}, {run['cores']} cores, {args.threads} threads, torch "
          f"{run['torch']}, load {run['load_before']}; measuring into {work}", flush=True)
    t0 = time.monotonic()
    status = run_groups(args, work)
    run.update(load_after=_load(), end=utc_iso(), duration_s=round(time.monotonic() - t0),
               status=status)
    (work / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    if status != 0:
        print(f"cpu_report: a group failed (exit {status}); what it measured stays in {work}, "
              f"{args.out} is unchanged", file=sys.stderr)
        return status
    finish(args, work, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
