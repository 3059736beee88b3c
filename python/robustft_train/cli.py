"""robustft-train: the command line. Parses the flags into a Config and hands over to the runner,
or to a subcommand: `study` (the method comparison over seeds) and `analyze-sharpness`.

Exit status: 0 done; 2 bad input (a clear message on stderr naming the flag or the file); 3
stopped by --stop-after-steps (a checkpoint was written; continue with --resume).
"""
from __future__ import annotations

import sys

from . import runner, study
from .config import resolve, resumed
from .errors import DriverError
from .flags import SHARPNESS_COMMAND, STUDY_COMMAND, training_parser
from .sharpness import command as sharpness_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == SHARPNESS_COMMAND:
        return sharpness_command.main(argv[1:])
    if argv and argv[0] == STUDY_COMMAND:
        return study.main(argv[1:])
    parser = training_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resumed(args.run_dir, vars(args)) if args.resume and args.run_dir else resolve(vars(args))
        return runner.run(cfg)
    except DriverError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
