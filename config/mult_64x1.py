# The batch layout of every multiplication run before 2026-12-01: one micro-batch of 64 sequences per step (train.py's
# default is now 4 micro-batches of 16: the same 2,048 tokens per step). Put it first to rerun those runs under their
# names: python experiment.py --out_root runs/mult --configs config/mult_64x1.py,config/mult_baseline.py ...
batch_size = 64
gradient_accumulation_steps = 1
