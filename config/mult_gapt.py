# The multiplication task (python prepare_mult.py) with GAPT; identical to mult_baseline.py and mult_always.py but
# for gapt_mode and out_dir. These values are train.py's defaults: `python train.py` runs this configuration.
out_dir = "out-mult-gapt"
data_dir = "data/mult"
gapt_mode = "gapt"
