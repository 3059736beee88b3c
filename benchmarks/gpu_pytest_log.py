"""A pytest plugin for gpu_check.sh's tests stage: each outcome is written to a TSV file the
moment pytest learns it, so that a run killed at its time cap still leaves every result it
had; and a deadline after which no new test starts, so that pytest can stop by itself first.

  python -m pytest -p gpu_pytest_log --gpu-test-log FILE --gpu-deadline EPOCH_SECONDS ...

(benchmarks/ on PYTHONPATH). The file's columns are outcome, nodeid, seconds and message.
Outcomes: passed, failed, skipped, xfailed, xpassed for a test's call; error for a failed
setup or teardown, or a module that failed to collect; skipped also for a module skipped at
collection (pytest.importorskip). One row of outcome "collected" gives, in its message, the
number of tests selected to run. Under pytest-xdist the controller writes the file (it
receives every worker's reports) and each worker keeps the deadline.
"""
from __future__ import annotations

import time

import pytest

COLUMNS = ("outcome", "nodeid", "seconds", "message")


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--gpu-test-log", default=None, metavar="FILE",
                    help="write one TSV row per test outcome to FILE (made anew) as it happens")
    group.addoption("--gpu-deadline", type=float, default=None, metavar="EPOCH_SECONDS",
                    help="start no test after this time (seconds since the epoch)")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _message(report) -> str:
    """Why a test was skipped, or the first line of its error (the exception and message)."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return _one_line(longrepr[2].removeprefix("Skipped: "))
    lines = [ln for ln in str(longrepr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return _one_line((errors[:1] or lines[-1:] or [""])[0].removeprefix("E").strip())


def _outcome(report) -> str | None:
    """The row's outcome for a test report, or None for a phase that decides nothing (a setup
    or teardown that passed)."""
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            return "xfailed" if report.skipped else "xpassed"
        return report.outcome
    if report.failed:
        return "error"
    if report.skipped and report.when == "setup":
        return "xfailed" if xfail else "skipped"
    return None


class OutcomeLog:
    """Writes the rows (the controller, or the only process)."""

    def __init__(self, path: str):
        self.file = open(path, "w", buffering=1)
        self.file.write("\t".join(COLUMNS) + "\n")
        self.collected = False

    def row(self, outcome: str, nodeid: str, seconds: float, message: str) -> None:
        fields = (outcome, nodeid.replace("\t", " "), f"{seconds:.3f}", message.replace("\t", " "))
        self.file.write("\t".join(fields) + "\n")
        self.file.flush()

    def count(self, n: int) -> None:
        if not self.collected:  # every xdist worker reports the same collection
            self.collected = True
            self.row("collected", "", 0.0, str(n))

    def pytest_collection_finish(self, session):
        self.count(len(session.items))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        self.count(len(ids))

    def pytest_collectreport(self, report):
        if report.failed:
            self.row("error", report.nodeid, 0.0, _message(report))
        elif report.skipped:
            self.row("skipped", report.nodeid, 0.0, _message(report))

    def pytest_runtest_logreport(self, report):
        outcome = _outcome(report)
        if outcome is not None:
            message = _message(report) if outcome != "passed" else ""
            self.row(outcome, report.nodeid, report.duration, message)

    def pytest_unconfigure(self, config):
        self.file.close()


class Deadline:
    """Asks the session to stop once a test ends past the deadline (each xdist worker runs
    its own tests, so each keeps it)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        yield
        if time.time() > self.deadline and not item.session.shouldstop:
            item.session.shouldstop = "gpu_check's deadline for the tests stage passed"


def pytest_configure(config):
    is_worker = hasattr(config, "workerinput")
    path = config.getoption("gpu_test_log")
    if path and not is_worker:
        config.pluginmanager.register(OutcomeLog(path), "gpu_check_test_log")
    deadline = config.getoption("gpu_deadline")
    if deadline is not None:
        config.pluginmanager.register(Deadline(deadline), "gpu_check_deadline")
