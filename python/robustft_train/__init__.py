"""robustft_train: the training driver of robustft_ext (console command robustft-train).

Fine-tunes open_clip models with ft / FLYP / m^2-mix / DiVE / Lipsum-FT (every loss term of a step
from one robustft_ext.RobustFTLoss call), evaluates in-distribution, under shift and zero-shot,
sweeps WiSE-FT, and writes a run folder; `robustft-train study` repeats the comparison over seeds
and tests the papers' claims. See docs/driver.md; entry point robustft_train.cli.main.

Modules, each importing only those listed before it: errors, files, checkpoint, methods, config,
flags, distributed, data, embedded, models, losses, feature_cache, memory, train, evaluate,
wise_ft, report, plots, sharpness (estimators, plots, analysis), runner, sharpness.command, stats,
claims, study, cli.
"""
from .cli import main

__all__ = ["main"]
