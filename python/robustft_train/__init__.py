"""robustft_train: the training driver of robustft_ext (console command robustft-train).

Until the driver lands (its own issue), `robustft-train` runs a short built-in example of the
library's losses: see robustft_train.cli.
"""
