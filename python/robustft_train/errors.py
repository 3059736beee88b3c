"""The driver's error types: bad input found before or during a run. The command line turns each
into exit status 2 with its message, which names the flag or the file and what to do."""


class DriverError(ValueError):
    """Bad input (a path, a data set, a model, weights, a run folder): the message names the flag
    or the file and the problem."""


class ConfigError(DriverError):
    """A bad flag value; the message names the flag."""


class CheckpointError(DriverError):
    """A checkpoint or run file that cannot be used (truncated, corrupt, not a robustft-train
    file, or one that would need unsafe unpickling); the message names the file and what to do."""
