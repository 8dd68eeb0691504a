# The multiplication task (python prepare_mult.py), CE only: the baseline of the paper's OOD experiment.
# Identical to mult_gapt.py and mult_always.py but for gapt_mode and out_dir (model, data, batch, optimizer,
# steps: the defaults of train.py).
out_dir = "out-mult-baseline"
data_dir = "data/mult"
gapt_mode = "off"
