# GAPT on a text language model that fits one CPU thread: a 4-layer GPT-2 (BPE vocabulary) on the Linux kernel
# documentation, evaluated on held-out kernel documents and on the Python docs (a corpus it never trains on).
# Identical to kernel_docs_baseline.py and kernel_docs_always.py but for gapt_mode and out_dir. docs/text_lm.md
# reports the experiment and says how this was sized. Prepare the data once (about 30 s):
#   python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs \
#       --shard_size=10000000 --val_tokens=400000 --shuffle_seed=0
#   python prepare_fineweb.py --local_files ../shared/corpora/python_docs.jsonl --out_dir=data/python_docs_eval \
#       --shard_size=10000000 --val_tokens=10000000 --shuffle_seed=0
#   python train.py config/kernel_docs_gapt.py          # about 45 minutes on one CPU thread
# 4,096 tokens per optimizer step (4 micro-batches of 4 x 256), 600 steps: 2.46M tokens, under a third of one pass
# over the 7.9M training tokens.
out_dir = "out-kernel-docs-always"
data_dir = "data/kernel_docs"
eval_data_dirs = ["data/python_docs_eval"]
vocab_size = 50304
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 4
gradient_accumulation_steps = 4
max_iters = 600
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
optimizer = "adamw"
eval_interval = 50
eval_iters = 16
log_interval = 1
num_threads = 1
device = "cpu"
gapt_mode = "always"
mbe_patch_size = 8
# GAPT: this project's own rules until 2026-12-01 (gapt_version="project", docs/gapt_versions.md), with which every
# result of this config in docs/ was measured; config/gapt_paper_era.py after this file runs the author's rules
gapt_version = "project"
mbe_weight = 0.1
gapt_patience_compress = 75
