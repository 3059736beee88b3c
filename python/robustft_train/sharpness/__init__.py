"""Layer-wise sharpness along the WiSE-FT path (docs/sharpness.md): `estimators` (layer groups, the
random and worst-case estimators, stragglers, the sparsity intervention), `analysis` (the CLIP
classification problem, the sweep over alpha, correlations, outputs, the training hook), `plots`,
and `command` (the analyze-sharpness subcommand)."""
