# The FineWeb pipeline on a laptop CPU: a tiny GPT-2 (BPE vocabulary) trained with GAPT on a few MB of local text.
# About 3 minutes on 2 cores (the 50k-token output layer dominates). Prepare the data from any local parquet or
# jsonl files with a `text` column, e.g.:
#   python prepare_fineweb.py --local_files ../shared/corpora/python_docs.jsonl --out_dir=data/python_docs \
#       --shard_size=1000000 --val_tokens=200000
#   python train.py config/fineweb_cpu.py
#   python sample.py --out_dir=out-fineweb-cpu --start="The"
out_dir = "out-fineweb-cpu"
data_dir = "data/python_docs"
vocab_size = 50304
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
optimizer = "adamw"
eval_interval = 100
eval_iters = 10
log_interval = 20
device = "cpu"
compile = False
gapt_mode = "gapt"
mbe_patch_size = 8
# GAPT: this project's own rules until 2026-12-01 (gapt_version="project", docs/gapt_versions.md), with which every
# result of this config in docs/ was measured; config/gapt_paper_era.py after this file runs the author's rules
gapt_version = "project"
mbe_weight = 0.1
gapt_patience_compress = 75
