"""The driver's error types and exit statuses. The command line turns a DriverError into exit
status 2 and a DivergedError into 4, each with its message, which names the flag or the file (or
the step and the loss term) and what to do."""
from __future__ import annotations

import re

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 4


class DriverError(ValueError):
    """Bad input (a path, a data set, a model, weights, a run folder): the message names the flag
    or the file and the problem."""


class ConfigError(DriverError):
    """A bad flag value; the message names the flag."""


class CheckpointError(DriverError):
    """A checkpoint or run file that cannot be used (truncated, corrupt, not a robustft-train
    file, one of another run, phase or model, or one that would need unsafe unpickling); the
    message names the file and what to do."""


class DivergedError(RuntimeError):
    """Training gave a non-finite loss; the message names the phase, the step, the terms, the
    likely cause and what to change."""


def excerpt(text: str, limit: int = 300) -> str:
    """`text` (another library's error message) on one line, shortened to whole lines, or failing
    that whole sentences, of at most `limit` characters in all; a first sentence longer than that
    is kept whole, never cut inside."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    kept = [lines[0]]
    for line in lines[1:]:
        if len(" ".join(kept + [line])) > limit:
            break
        kept.append(line)
    out = " ".join(kept)
    if len(out) <= limit:
        return out + (" ..." if len(kept) < len(lines) else "")
    sentences = re.split(r"(?<=[.;:!?])\s+", lines[0])
    short = sentences[0]
    for sentence in sentences[1:]:
        if len(short) + 1 + len(sentence) > limit:
            break
        short += " " + sentence
    return short + (" ..." if short != out else "")
