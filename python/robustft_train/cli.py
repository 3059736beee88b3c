"""robustft-train: the command line. Parses and validates the flags, then hands over to runner.

Exit status: 0 done; 2 bad input (a clear message on stderr, before any training); 3 stopped by
--stop-after-steps (a checkpoint was written; continue with --resume).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from . import distributed as dist_utils
from .config import Config, ConfigError, build_parser, resolve, validate
from .errors import DriverError

# Flags that a resumed run takes from the command line rather than from the saved config.json.
RUNTIME_FLAGS = ("resume", "stop_after_steps", "workers", "threads", "device", "no_plots")


def _resumed_config(args, parser) -> Config:
    path = os.path.join(args.run_dir, "config.json")
    if not os.path.isfile(path):
        parser.error(f"--resume: {path} does not exist (not a run folder, or the run never started)")
    with open(path) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in known})
    for key in RUNTIME_FLAGS:
        setattr(cfg, key, getattr(args, key))
    cfg.run_dir = args.run_dir
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "analyze-sharpness":  # the subcommand (docs/sharpness.md)
        from .sharpness_cli import main as sharpness_main

        return sharpness_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _resumed_config(args, parser) if args.resume and args.run_dir else resolve(args)
    except ConfigError as e:
        parser.error(str(e))
    try:
        info = dist_utils.init(cfg.device)
    except ValueError as e:
        parser.error(str(e))
    try:
        from .runner import execute, prepare

        try:
            prepared = prepare(cfg, info)
        except DriverError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        return execute(prepared)
    finally:
        dist_utils.cleanup(info)


if __name__ == "__main__":
    sys.exit(main())
