# The multiplication task with GAPT (compression on every step) as this project ran it until 2026-12-01: its own rules
# (gapt_version="project", docs/gapt_versions.md) and one micro-batch of 64 sequences per step. Every mult_always row
# of docs/multiplication.md was measured with this file. The author's rules: config/mult_baseline.py followed by
# config/gapt_paper_era.py (or gapt_algorithm1.py, gapt_later.py), with --gapt_mode=always.
out_dir = "out-mult-always"
data_dir = "data/mult"
batch_size = 64
gradient_accumulation_steps = 1
gapt_mode = "always"
gapt_version = "project"
mbe_weight = 0.1
gapt_patience_compress = 75
