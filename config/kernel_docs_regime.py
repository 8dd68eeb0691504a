# The paper's regime in miniature, on one GPU (issue #38): applied after config/kernel_docs_baseline.py, the same
# 4-layer, 128-wide GPT-2 (0.8M parameters outside the embeddings) trained for about 2.25 passes over the kernel docs'
# training split, as the paper trained GPT-2 124M on 1.8B tokens drawn from a 0.8B-token set (~2.25 passes, ~21
# tokens per non-embedding parameter; here 16.9M tokens, ~21 per non-embedding parameter too). Validation, test
# (held-out documents) and the Python docs are evaluated; validation alone chooses (early stopping, the dropout rate).
# Prepare the data once (seconds; the Python docs as config/kernel_docs_baseline.py says):
#   python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs_heldout \
#       --shard_size=10000000 --val_tokens=400000 --test_tokens=400000 --shuffle_seed=0
# 16,384 tokens per step (4 micro-batches of 16 x 256: paper_era compresses with 2 or more), 1,030 steps: 16.9M
# tokens, 2.25 passes over the 7.52M training tokens. gpu_checks.sh runs the sweep (docs/regime_miniature.md).
out_dir = "out-kernel-docs-regime"
data_dir = "data/kernel_docs_heldout"
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 1030
warmup_iters = 50
eval_interval = 50
eval_iters = 16
device = "cuda"
dtype = "auto"
compile = True
num_threads = 0
