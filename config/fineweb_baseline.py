# GPT-2 124M on FineWeb, CE only: the baseline of the paper's headline experiment (it reports MBE -50% and CE -4.8%
# for GAPT against this). Expects one node of 8 GPUs with 80 GB each (A100/H100; on 40 GB cards add
# --batch_size=8 --gradient_accumulation_steps=64), bf16 and torch.compile:
#   python prepare_fineweb.py --num_tokens=2100000000     # ~2.1B tokens of sample-10BT into data/fineweb
#   torchrun --standalone --nproc_per_node=8 train.py config/fineweb_baseline.py
# 524,288 tokens per optimizer step (16 sequences x 1024 tokens x 32 micro-batches over the 8 GPUs), 3815 steps:
# 2.0B tokens, about the 1.8B the paper's code trained on. Roughly 40 minutes on 8 A100s, less on H100s (estimated
# from nanoGPT's reported 4 days for 300B tokens on 8 A100s; not measured here).
# Optimizer: AdamW, nanoGPT's tested GPT-2 recipe, so the baseline is the familiar one; the paper's code trained
# with Muon: add --optimizer=muon to follow it (Muon on the blocks' matrices, AdamW on the rest).
out_dir = "out-fineweb-baseline"
data_dir = "data/fineweb"
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = True
batch_size = 16
gradient_accumulation_steps = 4 * 8  # global: 4 micro-batches on each of 8 GPUs
max_iters = 3815
lr_decay_iters = 3815
warmup_iters = 250
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
optimizer = "adamw"
eval_interval = 250
eval_iters = 16
log_interval = 10
always_save_checkpoint = True
compile = True
dtype = "auto"  # bfloat16 where the GPU has it
gapt_mode = "off"
mbe_patch_size = 8
# GAPT: the default, gapt_version="paper_era" (the author's train_pcgrad.py rules, docs/gapt_versions.md)
