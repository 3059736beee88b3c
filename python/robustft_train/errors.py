"""The driver's one error type for bad input found while preparing a run (before training)."""


class DriverError(ValueError):
    """Bad input (a path, a data set, a model, weights): the message names the flag and the problem."""
