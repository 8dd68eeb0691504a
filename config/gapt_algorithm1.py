# GAPT with the rules of the author's class in the notation of the paper's Algorithm 1 (fangyuan-ksgk/minimind
# src/sorl.py GatedPhaseTransition and its config's defaults), with the mean MBE of the regularised layers as the
# auxiliary loss at weight 1. Follows any task config: python train.py config/mult_baseline.py config/gapt_algorithm1.py
# (docs/gapt_versions.md).
gapt_mode = "gapt"
gapt_version = "algorithm1"
mbe_weight = 1.0
gapt_delta = 0.01
gapt_tau = 0.1
gapt_patience_memorize = 10
gapt_patience_compress = 10
mbe_layers = "auto"
# the project version's options, off (a preset may follow a config that set them)
gapt_ema = 0.0
mbe_floor = 0.0
gapt_delta_mbe_abs = 0.0
