"""robustft-train's built-in example (the driver itself is a later issue)."""
from __future__ import annotations

import subprocess
import sys

from robustft_train.cli import main


def test_example_runs_and_agrees(capsys):
    assert main(["--n", "33", "--d", "16"]) == 0
    out = capsys.readouterr().out
    assert "not implemented yet" in out
    for loss in ("clip", "siglip"):
        assert any(line.startswith(loss) and "native" in line and line.endswith("ok")
                   for line in out.splitlines()), out


def test_module_entry_point_and_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "robustft_train", "--n", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--n and --d must be positive" in done.stderr
