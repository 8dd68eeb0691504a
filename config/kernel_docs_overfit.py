# Where generalisation is at stake (docs/text_lm_overfit.md): applied after config/kernel_docs_baseline.py, the same
# 4-layer GPT-2 trained for many passes over a 100k-token training subset of the Linux kernel docs, so that the
# CE-only baseline overfits (its validation CE reaches a minimum well before the end, then rises). Validation chooses
# everything (the early-stopping step, the dropout rate, mbe_floor); the test split and the Python docs are only
# reported. Rows are overrides: python experiment.py --configs config/kernel_docs_baseline.py,config/kernel_docs_
# overfit.py config/kernel_docs_baseline.py,config/kernel_docs_overfit.py+dropout=0.1 ... (see the report).
# Prepare the data once (seconds; the Python docs as in kernel_docs_baseline.py):
#   python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs_100k \
#       --shard_size=10000000 --val_tokens=400000 --test_tokens=400000 --num_tokens=905000 --shuffle_seed=0
# 4,096 tokens per step, 500 steps: 2.05M tokens, 20 passes over the 100k training tokens (how it was sized: the
# report).
out_dir = "out-kernel-docs-overfit"
data_dir = "data/kernel_docs_100k"
max_iters = 500
eval_interval = 25
