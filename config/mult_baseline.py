# The multiplication task (python prepare_mult.py), CE only: the baseline of the paper's OOD experiment. Model, data,
# batch (4 micro-batches of 16), optimizer and steps: the defaults of train.py. GAPT against it:
#   python train.py config/mult_baseline.py config/gapt_paper_era.py     (or gapt_algorithm1, gapt_later, gapt_project)
# Its runs before 2026-12-01 used one micro-batch of 64: config/mult_64x1.py,config/mult_baseline.py repeats them.
out_dir = "out-mult-baseline"
data_dir = "data/mult"
gapt_mode = "off"
