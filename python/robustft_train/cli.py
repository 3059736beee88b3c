"""robustft-train: the command line. Parses the flags into a Config and hands over to the runner,
or to a subcommand: `study` (the method comparison over seeds) and `analyze-sharpness`.

Exit status: 0 done; 2 bad input (a clear message on stderr naming the flag or the file); 3
stopped by --stop-after-steps (a checkpoint was written; continue with --resume); 4 training
diverged (a non-finite loss: the message names the step, the term, the likely cause and what to
change; the run folder keeps its checkpoints).
"""
from __future__ import annotations

import dataclasses
import sys

from . import runner, study
from .config import check_resume_flags, config_path, resolve, resumed
from .errors import EXIT_BAD_INPUT, EXIT_DIVERGED, DivergedError, DriverError
from .flags import PROG, SHARPNESS_COMMAND, STUDY_COMMAND, given_flags, training_parser
from .sharpness import command as sharpness_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == SHARPNESS_COMMAND:
            return sharpness_command.main(argv[1:])
        if argv and argv[0] == STUDY_COMMAND:
            return study.main(argv[1:])
        return train(argv)
    except DivergedError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED


def train(argv: list[str]) -> int:
    parser = training_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume and args.run_dir:
            cfg = resumed(args.run_dir, vars(args))
            check_resume_flags(given_flags(parser, argv), dataclasses.asdict(cfg), config_path(args.run_dir))
        else:
            cfg = resolve(vars(args))
        return runner.run(cfg)
    except DriverError as e:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
