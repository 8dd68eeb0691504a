# The multiplication task (python prepare_mult.py) with CE + λ·MBE at every step: the static regulariser the paper
# argues against, as an ablation. Identical to mult_baseline.py and mult_gapt.py but for gapt_mode and out_dir.
out_dir = "out-mult-always"
data_dir = "data/mult"
gapt_mode = "always"
