# GAPT with this project's own rules until 2026-12-01 (relative 1% thresholds, CE + 0.1 x mean MBE of the middle
# layers, patience 125 / 75 steps), the rules of every GAPT result in docs/ measured before that date. Follows any task
# config: python train.py config/mult_baseline.py config/gapt_project.py (docs/gapt_versions.md). Its options:
# gapt_ema, mbe_floor, gapt_delta_mbe_abs, mbe_layers="rotate" (docs/gapt_options.md).
gapt_mode = "gapt"
gapt_version = "project"
mbe_weight = 0.1
gapt_delta = 0.01
gapt_tau = 0.1
gapt_patience_memorize = 125
gapt_patience_compress = 75
mbe_layers = "auto"
