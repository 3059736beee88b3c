"""robustft_train: the training driver of robustft_ext (console command robustft-train).

Fine-tunes open_clip models with ft / FLYP / m^2-mix / DiVE / Lipsum-FT (losses from robustft_ext's
public API), evaluates in-distribution, under shift and zero-shot, sweeps WiSE-FT, and writes a
run folder. See docs/driver.md; entry point robustft_train.cli.main.
"""
from .cli import main

__all__ = ["main"]
