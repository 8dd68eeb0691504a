# GAPT on a text language model on one GPU: an 8-layer, 512-wide GPT-2 (51M parameters, 25M of them in the blocks:
# 32x the blocks of config/kernel_docs_gapt.py, the CPU model) on the Linux kernel documentation, evaluated on
# held-out kernel documents and on the Python docs (a corpus it never trains on). docs/text_lm_gpu.md reports the
# experiment and how it was sized. Prepare the data as config/kernel_docs_gapt.py says, then:
#   python train.py config/kernel_docs_gpu.py                                # GAPT, this project's rules
#   python experiment.py --out_root runs/text-lm-gpu --jobs 8 --threads 1 --seeds 0 1 --configs \
#       config/kernel_docs_gpu.py+gapt_mode=off config/kernel_docs_gpu.py config/kernel_docs_gpu.py+gapt_ema=0.9 \
#       config/kernel_docs_gpu.py+gapt_mode=always
# 16,384 tokens per optimizer step (2 x 16 x 512), 500 steps: 8.2M tokens, about one pass over the 7.9M training tokens.
out_dir = "out-kernel-docs-gpu"
data_dir = "data/kernel_docs"
eval_data_dirs = ["data/python_docs_eval"]
vocab_size = 50304
n_layer = 8
n_head = 8
n_embd = 512
block_size = 512
batch_size = 16
gradient_accumulation_steps = 2  # 2 micro-batches of 16 x 512: 8 runs fit one 80 GB GPU side by side
max_iters = 500
warmup_iters = 50
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.95
optimizer = "adamw"
eval_interval = 100
eval_iters = 8
log_interval = 1
device = "cuda"
dtype = "auto"
compile = True
gapt_mode = "gapt"
mbe_patch_size = 8
# GAPT: this project's own rules until 2026-12-01 (gapt_version="project", docs/gapt_versions.md), with which every
# result of this config in docs/ was measured; config/gapt_paper_era.py after this file runs the author's rules
gapt_version = "project"
mbe_weight = 0.1
gapt_patience_compress = 75
