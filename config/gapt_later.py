# GAPT with the rules of the author's later code (fangyuan-ksgk/mod_gpt src/gapt.py + train_iblm.py, weight and
# patience from run_iblm.sh: w = 20, mean over the middle layers, patience 125 / 75 micro-batches). Follows any task
# config: python train.py config/mult_baseline.py config/gapt_later.py (docs/gapt_versions.md).
gapt_mode = "gapt"
gapt_version = "later"
mbe_weight = 20.0
gapt_delta = 0.01
gapt_delta_mbe = 0.01
gapt_tau = 0.1
gapt_patience_memorize = 125
gapt_patience_compress = 75
mbe_layers = "auto"
# the project version's options, off (a preset may follow a config that set them)
gapt_ema = 0.0
mbe_floor = 0.0
gapt_delta_mbe_abs = 0.0
