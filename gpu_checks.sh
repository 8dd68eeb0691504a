#!/bin/bash
# Everything issue #38 asks of a GPU, in one command of at most 9.5 minutes (a lent GPU gives a session 15 minutes,
# start-up included: what is left after it fits a retry of one part, GPU_PARTS=...). Each part has a deadline (SIGTERM,
# then SIGKILL 15 s later); what it printed lands in RESULTS_DIR (7 files: the device tool brings back 8 at most).
#   bash gpu_checks.sh [RESULTS_DIR]              # default out-gpu; with the device tool: bash gpu_checks.sh $OUT
#   GPU_CHECKS_TINY=1 bash gpu_checks.sh DIR      # every part at toy sizes on the CPU (tests/test_gpu_checks.py)
# Prepared on any machine beforehand (data/ and .gpu/ are ignored by git, and ../shared does not travel to the GPU
# machine, so name them in the device tool's `carry`: carry=["data/kernel_docs_heldout", "data/python_docs_eval",
# ".gpu"], 23 MB):
#   data/kernel_docs_heldout, data/python_docs_eval   the commands in config/kernel_docs_regime.py
#   .gpu/nanoGPT/model.py                             model.py of github.com/karpathy/nanoGPT, for bench.py's row (n)
# Parts, in this order:
#   1. bench (<= 240 s): bench.py at GPT-2 124M shapes (batch 16 x 1024, bf16, compile), the GPU to itself:
#      (a) baseline, (b) compression with the fused compiled MBE, (e) with the eager MBE, (c) whole-sequence MBE,
#      (d) memorization, (n) nanoGPT; MFU against the bf16 matmul peak measured in the same run; the MBE alone eager
#      and compiled; then the paper-era default's steps as train.py runs them, 4 micro-batches of 16: (A) baseline,
#      (M) memorization, (C1)/(C2) the two alternating compression steps (MBE-alone micro-batches stop at their block).
#   2. tests: the train-level tests on CUDA (GAPT_TEST_DEVICE=cuda), test_exact_resume with deterministic=True among
#      them; beside them, wave 1 of the sweep (<= 250 s).
#   3. sweep: the paper's regime in miniature (config/kernel_docs_regime.py, docs/regime_miniature.md), seeds 0-2,
#      bf16 and compile, all runs sharing the GPU. Wave 1 (18 runs at once): baseline, dropout 0.1 (the rate chosen on
#      validation in docs/text_lm_overfit.md), GAPT paper_era, GAPT algorithm1, this project's cycling variant
#      (gapt_ema=0.9, mbe_floor=0.5), always (paper_era's update). Wave 2 (<= 100 s): the random gate (paper_era's
#      update) at the paper_era row's mean share of compressing steps (a count of its training logs). A run its
#      deadline cuts short is missing from the table (its log keeps an evaluation every 50 steps).
#   4. big: if 150 s or more are left, the 51M model of config/kernel_docs_gpu.py for 4 passes (baseline and
#      paper_era, seeds 0-1) until the deadline.
# GPU_PARTS="bench tests sweep big" picks parts. The logs come back in RESULTS_DIR/logs.tar.gz, the tables as text.
# The deadlines are the GPU's budget: GPU_CHECKS_TINY=1 runs every part to its end, however slow the machine.
set -u
RESULTS=${1:-out-gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=${GPU_CHECKS_SECONDS:-570}
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(date +%s) + START )); }
PARTS=" ${GPU_PARTS:-bench tests sweep big} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
TINY=${GPU_CHECKS_TINY:-0}
SWEEP=${SWEEP_ROOT:-runs/regime-miniature}
BIG=${BIG_ROOT:-runs/regime-51m}
SEEDS="0 1 2"
BIG_SEEDS="0 1"
BASE="config/kernel_docs_baseline.py,config/kernel_docs_regime.py"
SWEEP_ARGS=()
BIG_ARGS=(--set max_iters=1840 eval_interval=80 --train_args --data_dir=data/kernel_docs_heldout)  # 4 passes
BENCH=(config/fineweb_gapt.py --batch_size=16 --gradient_accumulation_steps=4 --steps=15 --nanogpt_dir=.gpu/nanoGPT)
TESTS=(tests/test_train.py tests/test_mult.py tests/test_mbe.py tests/test_gapt.py tests/test_gapt_versions.py)
TEST_DEVICE=cuda
JOBS=18
export TORCHINDUCTOR_COMPILE_THREADS=1  # 18 processes compiling at once: one compile worker each
if [[ "$TINY" == 1 ]]; then  # the same parts, at sizes a CPU runs in about a minute
  SEEDS="0"
  BIG_SEEDS="0"
  TOY=(device=cpu compile=False dtype=float32 n_layer=2 n_head=2 n_embd=16 block_size=16 batch_size=2 max_iters=8
       lr_decay_iters=8 warmup_iters=2 eval_interval=4 eval_iters=1 gapt_patience_memorize=2 gapt_patience_compress=2
       gapt_delta=1)  # gapt_delta=1: no step counts as CE progress, so every gate switches within 8 steps
  SWEEP_ARGS=(--train_args "${TOY[@]/#/--}" "--data_dir=${REGIME_DATA:-data/kernel_docs_heldout}"
              "--eval_data_dirs=[\"${REGIME_EVAL:-data/python_docs_eval}\"]")  # not in the run names
  BIG_ARGS=("${SWEEP_ARGS[@]}")
  BENCH=(config/kernel_docs_baseline.py --device=cpu --compile=True --n_layer=2 --n_head=2 --n_embd=16
         --block_size=16 --batch_size=2 --steps=1 --warmup=1 --alpha_shape=)  # compiled, as on the GPU
  TESTS=(tests/test_train.py -k exact_resume)
  TEST_DEVICE=cpu
  JOBS=2
fi

if [[ "$TINY" != 1 ]] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_checks: no CUDA device here (torch.cuda.is_available() is False): run it on the GPU machine, or" \
       "GPU_CHECKS_TINY=1 bash gpu_checks.sh DIR to run every part at toy sizes on the CPU" >&2
  exit 2
fi
deadline() {  # deadline SECONDS COMMAND...: SIGTERM at the deadline, SIGKILL 15 s later; no deadline when tiny
  local seconds=$1; shift
  if [[ "$TINY" == 1 ]]; then "$@"; else timeout -k 15 "$seconds" "$@"; fi
}

if [[ "$TINY" != 1 ]]; then  # what must travel with the tree: say so in one line and run the parts that can run
  for d in data/kernel_docs_heldout data/python_docs_eval; do
    [[ -f $d/meta.json ]] || { echo "gpu_checks: $d is missing (prepare it with the command in" \
      "config/kernel_docs_regime.py and name it in carry): skipping the sweeps"
      PARTS=${PARTS/ sweep / }; PARTS=${PARTS/ big / }; }
  done
  [[ -f .gpu/nanoGPT/model.py ]] || { echo "gpu_checks: .gpu/nanoGPT/model.py is missing: bench.py without row (n)"
    BENCH=("${BENCH[@]:0:3}"); }
fi

{ nvidia-smi 2>&1 | head -15; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  date -u; git log -1 --format='commit %H' 2>/dev/null; } > "$RESULTS/env.txt" 2>&1
tail -3 "$RESULTS/env.txt"

# 1. bench.py with the GPU to itself
if want bench; then
  deadline 240 $PY bench.py "${BENCH[@]}" > "$RESULTS/bench.txt" 2>&1
  echo "bench exit $? at $(elapsed) s"
fi

# 2 and 3 (wave 1), side by side
sweep() {  # experiment.py over the regime sweep, stopped (with its runs) after $1 seconds; then its arguments
  local deadline=$1; shift
  deadline "$deadline" $PY experiment.py --out_root "$SWEEP" --jobs $JOBS --threads 1 "$@" "${SWEEP_ARGS[@]}"
}
WAVE1=("$BASE" "$BASE+dropout=0.1" "$BASE,config/gapt_paper_era.py"
       "$BASE,config/gapt_algorithm1.py" "$BASE+gapt_mode=gapt+gapt_ema=0.9+mbe_floor=0.5"
       "$BASE,config/gapt_paper_era.py+gapt_mode=always")
if want tests; then
  XDIST=$($PY -c "import xdist" 2>/dev/null && [[ "$TINY" != 1 ]] && echo "-n 4")
  GAPT_TEST_DEVICE=$TEST_DEVICE deadline 250 $PY -m pytest -q $XDIST -p no:cacheprovider "${TESTS[@]}" \
      > "$RESULTS/tests.txt" 2>&1 &
  TESTS_PID=$!
fi
if want sweep; then
  sweep 250 --seeds $SEEDS --configs "${WAVE1[@]}" > "$RESULTS/sweep.txt" 2>&1
  echo "sweep wave 1 exit $? at $(elapsed) s"
fi
if want tests; then
  wait $TESTS_PID; echo "tests exit $? at $(elapsed) s"
fi

if want sweep; then  # wave 2: what it needs is read off wave 1's training logs (a count of compressing steps)
  SHARE=$($PY - "$SWEEP" <<'PYTHON'
import glob, os, sys
from checkpoint import read_log
shares = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "gapt_paper_era-s*", "log.jsonl"))):
    trains = [r for r in read_log(path) if r.get("kind") == "train"]
    if trains:
        shares.append(trains[-1]["compress_steps"] / trains[-1]["iter"])
print(f"{sum(shares) / len(shares):.2f}" if shares else "0.25")
PYTHON
)
  echo "wave 2: the random gate at share $SHARE (the paper_era row's mean)" | tee -a "$RESULTS/sweep.txt"
  RANDOM_ROW="$BASE,config/gapt_paper_era.py+gapt_mode=random+gapt_random_share=$SHARE"
  WAVE2=$(( $(left) - 30 < 100 ? $(left) - 30 : 100 ))  # 30 s kept for the table and the archive
  if (( WAVE2 >= 30 )) || [[ "$TINY" == 1 ]]; then
    sweep $WAVE2 --seeds $SEEDS --configs "$RANDOM_ROW" >> "$RESULTS/sweep.txt" 2>&1
    echo "sweep wave 2 exit $? at $(elapsed) s"
  else
    echo "sweep wave 2 skipped: $(left) s left"
  fi
  $PY experiment.py --table_only --out_root "$SWEEP" --seeds $SEEDS --configs "${WAVE1[@]}" "$RANDOM_ROW" \
      "${SWEEP_ARGS[@]}" > "$RESULTS/sweep_table.txt" 2>&1
fi

# 4. the 51M model for 4 passes, if time is left
if want big && { (( $(left) >= 150 )) || [[ "$TINY" == 1 ]]; }; then
  deadline $(( $(left) - 30 )) $PY experiment.py --out_root "$BIG" --jobs 4 --threads 1 --seeds $BIG_SEEDS \
      --configs config/kernel_docs_gpu.py+gapt_mode=off config/kernel_docs_gpu.py,config/gapt_paper_era.py \
      "${BIG_ARGS[@]}" > "$RESULTS/big.txt" 2>&1
  echo "big exit $? at $(elapsed) s"
fi

tar czf "$RESULTS/logs.tar.gz" $(ls "$SWEEP"/*/{log.jsonl,run.json,done} "$BIG"/*/{log.jsonl,run.json,done} 2>/dev/null) \
    2>/dev/null  # unpacked into the tree on the CPU, a later call skips the finished runs
want bench && grep -E "^\||x its time|MBE " "$RESULTS/bench.txt"
want tests && tail -3 "$RESULTS/tests.txt"
want sweep && head -14 "$RESULTS/sweep_table.txt"
echo "all done at $(elapsed) s"
