#!/bin/bash
# Everything this project checks and measures on a GPU, in one command of about 9 minutes (a lent GPU gives a session
# 15 minutes, start-up included). docs/performance.md and docs/text_lm_gpu.md report what it printed.
#   bash gpu_checks.sh [RESULTS_DIR]        # default out-gpu; needs, prepared on any machine beforehand:
#     data/kernel_docs and data/python_docs_eval (the commands in config/kernel_docs_gapt.py), and
#     .gpu/nanoGPT/model.py (model.py of a github.com/karpathy/nanoGPT checkout, for bench.py's nanoGPT row).
#   data/ is ignored by git, so with the device tool name the shards in `carry` (they travel with the working tree,
#   22 MB; ../shared does not travel): carry=["data/kernel_docs", "data/python_docs_eval", ".gpu"].
# The sweep below is this project's earlier one (config/kernel_docs_gpu.py pins gapt_version="project"); the sweep with
# the author's versions (issue #38) is not written yet.
# 1. In parallel (the GPU shared): the 8 runs of the text-model sweep (config/kernel_docs_gpu.py: baseline, GAPT,
#    GAPT with gapt_ema=0.9, always; seeds 0 and 1), the train-level tests on CUDA (GAPT_TEST_DEVICE=cuda), and about
#    two minutes of config/fineweb_gapt.py on kernel-docs shards with a checkpoint and a resume.
# 2. Then, with the GPU to itself: bench.py at GPT-2 124M shapes (batch 16 x 1024, bf16, compile) with nanoGPT's row.
# Each part has a deadline, so the whole ends in time even when a part does not; the logs come back in one archive.
set -u
RESULTS=${1:-out-gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
PARTS=" ${GPU_PARTS:-sweep tests demo bench} "  # e.g. GPU_PARTS=sweep to run the sweep alone
want() { [[ "$PARTS" == *" $1 "* ]]; }

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  date -u; git log -1 --format='commit %H' 2>/dev/null; } > "$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt" | tail -3

# 1a. the text-model sweep: 8 runs at once; stopped at its deadline (its logs hold an eval every 100 steps)
SWEEP="runs/text-lm-gpu"
SEEDS=${SWEEP_SEEDS:-0 1}
CONFIGS=${SWEEP_CONFIGS:-config/kernel_docs_gpu.py+gapt_mode=off config/kernel_docs_gpu.py \
    config/kernel_docs_gpu.py+gapt_ema=0.9 config/kernel_docs_gpu.py+gapt_mode=always}
want sweep && timeout ${SWEEP_DEADLINE:-330} $PY experiment.py --out_root "$SWEEP" --jobs ${SWEEP_JOBS:-8} --threads 1 \
    --seeds $SEEDS --configs $CONFIGS > "$RESULTS/sweep.txt" 2>&1 &
SWEEP_PID=$!

# 1b. the train-level tests on CUDA (4 at a time where pytest-xdist is installed)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
want tests && GAPT_TEST_DEVICE=cuda timeout 300 $PY -m pytest -q $XDIST -p no:cacheprovider tests/test_train.py \
    tests/test_mult.py tests/test_mbe.py tests/test_gapt.py tests/test_gapt_versions.py > "$RESULTS/tests.txt" 2>&1 &
TESTS_PID=$!

# 1c. config/fineweb_gapt.py for 80 steps on one GPU (32,768 tokens per step), patience lowered so that phases switch;
#     the same run again stopped at its step-40 checkpoint and resumed to 80
DEMO="out-gpu-demo"
want demo && rm -rf "$DEMO" && (
  COMMON="config/fineweb_gapt.py --data_dir=data/kernel_docs --gradient_accumulation_steps=2 --max_iters=80
    --lr_decay_iters=80 --warmup_iters=10 --eval_interval=40 --eval_iters=4 --log_interval=1
    --gapt_patience_memorize=5 --gapt_patience_compress=5"
  timeout 150 $PY train.py $COMMON --out_dir=$DEMO/straight > "$RESULTS/demo.txt" 2>&1
  timeout 70 $PY train.py $COMMON --out_dir=$DEMO/resumed --max_iters=40 >> "$RESULTS/demo.txt" 2>&1
  timeout 80 $PY train.py $COMMON --out_dir=$DEMO/resumed --init_from=resume >> "$RESULTS/demo.txt" 2>&1
  echo "demo exit $?" >> "$RESULTS/demo.txt"
) &
DEMO_PID=$!

wait $TESTS_PID; rc=$?; want tests && echo "tests exit $rc at $(elapsed) s"
wait $DEMO_PID; want demo && echo "demo done at $(elapsed) s"
wait $SWEEP_PID; rc=$?; want sweep && echo "sweep exit $rc at $(elapsed) s"
pkill -TERM -f "train.py config/kernel_docs_gpu.py" 2>/dev/null; sleep 3
pkill -KILL -f "train.py config/kernel_docs_gpu.py" 2>/dev/null

# 2. bench.py with the GPU to itself
if want bench; then
  timeout 170 $PY bench.py config/fineweb_gapt.py --batch_size=16 --steps=20 --nanogpt_dir=.gpu/nanoGPT \
      > "$RESULTS/bench.txt" 2>&1
  echo "bench exit $? at $(elapsed) s"
fi

tar czf "$RESULTS/logs.tar.gz" $(ls "$SWEEP"/*/log.jsonl "$SWEEP"/*/stdout.txt "$DEMO"/*/log.jsonl 2>/dev/null)
want tests && tail -4 "$RESULTS/tests.txt"
want demo && grep -E "^(error|Traceback)|exit|^done" "$RESULTS/demo.txt"
want bench && grep -E "^\||x its time|MBE at|MBE alone" "$RESULTS/bench.txt"
want sweep && $PY experiment.py --table_only --out_root "$SWEEP" --seeds $SEEDS --configs $CONFIGS 2>&1 | head -9
echo "all done at $(elapsed) s"
