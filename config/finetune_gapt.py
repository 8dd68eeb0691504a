# Fine-tune OpenAI's GPT-2 (124M) with GAPT on your own text, sized for one GPU: the cheapest way to try GAPT on a
# real language model. config/finetune_baseline.py is the same without GAPT. Here the text is the Linux kernel
# documentation (any --local_files text works the same way):
#   python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs \
#       --shard_size=10000000 --val_tokens=400000 --shuffle_seed=0
#   python train.py config/finetune_gapt.py            # downloads openai-community/gpt2 once (500 MB)
#   python sample.py --out_dir=out-finetune-gapt --start="The scheduler"
# Offline: --init_from=FOLDER with the Hub repository's config.json and model.safetensors in FOLDER.
# 8,192 tokens per step (8 x 1024), 1000 steps: 8.2M tokens, about one pass over the 7.9M training tokens, with
# enough steps for GAPT's patience (125 / 75 steps) to cycle. Not measured on a GPU yet (none was lent to the
# development sessions); on a CPU a 124M step of this size takes minutes (bench.py measured about 175 tokens/s on 2
# cores at these shapes), so the whole run would take about 13 hours: on a CPU, crop the context
# (--block_size=256) and shorten it (--max_iters=100) to try the path.
out_dir = "out-finetune-gapt"
init_from = "gpt2"  # or gpt2-medium, gpt2-large, gpt2-xl, or a local folder in the Hub's layout
data_dir = "data/kernel_docs"
eval_data_dirs = ["data/python_docs_eval"]  # optional: CE on text it never trains on (prepare as in kernel_docs_gapt.py)
block_size = 1024  # at most GPT-2's 1024; smaller crops the position embeddings
dropout = 0.0
batch_size = 2
gradient_accumulation_steps = 4  # 8 sequences per step; paper_era compresses on odd micro-batches
max_iters = 1000
warmup_iters = 50
learning_rate = 6e-5
min_lr = 6e-6
weight_decay = 0.1
beta2 = 0.95
optimizer = "adamw"
eval_interval = 100
eval_iters = 20
log_interval = 10
compile = True
gapt_mode = "gapt"
mbe_patch_size = 8
# GAPT: the default, gapt_version="paper_era" (the author's train_pcgrad.py rules, docs/gapt_versions.md)
