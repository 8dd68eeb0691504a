# GAPT exactly as the paper specifies it, on the multiplication task: every GAPT setting written out (they equal
# train.py's defaults, the foundation's reference). Kept beside config/mult_gapt.py so the paper's behaviour stays
# one command away whatever the recommended settings become; model, data, batch and steps as in mult_baseline.py.
out_dir = "out-mult-gapt-paper"
data_dir = "data/mult"
gapt_mode = "gapt"
mbe_weight = 0.1  # λ
mbe_alpha = 2.0
mbe_patch_size = 8
mbe_layers = "auto"  # every block but the first and the last
mbe_center = False
mbe_floor = 0.0
gapt_delta = 0.01  # relative δ, for CE and MBE
gapt_delta_mbe_abs = 0.0
gapt_tau = 0.1
gapt_patience_memorize = 125
gapt_patience_compress = 75
