# Where generalisation is at stake (docs/text_lm_overfit.md): applied after config/kernel_docs_baseline.py, the same
# 4-layer GPT-2 trained for many passes over a small training subset of the Linux kernel docs, so that the CE-only
# baseline overfits (its validation CE reaches a minimum well before the end, then rises). Validation chooses
# everything (the early-stopping step, the dropout rate, mbe_floor); the test split and the Python docs are only
# reported. Rows are overrides (experiment.py config/kernel_docs_baseline.py,config/kernel_docs_overfit.py+gapt_mode=
# gapt ...). Prepare the data once (seconds; the Python docs as in kernel_docs_baseline.py):
#   python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs_small \
#       --shard_size=10000000 --val_tokens=400000 --test_tokens=400000 --num_tokens=1200000 --shuffle_seed=0
# 4,096 tokens per step, 800 steps: 3.3M tokens, 8.3 passes over the 395k training tokens.
out_dir = "out-kernel-docs-overfit"
data_dir = "data/kernel_docs_small"
max_iters = 800
eval_interval = 25
