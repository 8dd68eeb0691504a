"""Shared helpers: tiny token shards written by the tests, and running train.py through its real command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
torch.set_num_threads(1)  # LAPACK kernels (eigvalsh) can be 100x slower with 2 threads on small machines

# The device of the train-level tests: cpu, or GAPT_TEST_DEVICE=cuda to run the same tests on a GPU (bf16 autocast
# there, as dtype="auto" chooses; tests that cannot apply on CUDA skip with the reason).
DEVICE = os.environ.get("GAPT_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE.startswith("cuda")
if ON_CUDA and not torch.cuda.is_available():
    raise RuntimeError(f"GAPT_TEST_DEVICE={DEVICE} but torch sees no CUDA device; unset it to test on the CPU")
# Losses that two runs should reproduce: bit for bit on the CPU; on CUDA to within the rounding that atomic adds in
# the backward pass (embedding gradients) leave in a different order on every run.
LOSS_TOL = 0.0 if not ON_CUDA else 2e-3

# a tiny GPT that trains in well under a second per step on one CPU thread
TINY = ["--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", f"--device={DEVICE}",
        "--num_threads=1", "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--optimizer=adamw", "--gradient_accumulation_steps=2"]  # 2 micro-batches: the least paper_era compresses with


def run_train(*args, check=True, env=None, timeout=600, launcher=None):
    """Run `python train.py ARGS` (or a launcher such as torchrun) in the repo; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + [os.path.join(REPO, "train.py"), *args]
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_log(out_dir, kind=None):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if kind is None or r.get("kind") == kind]


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """A data directory of two train shards and one val shard of structured random tokens (vocab 64)."""
    from shards import write_shard
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for name, n in (("train_000000.bin", 6000), ("train_000001.bin", 4000), ("val_000000.bin", 3000)):
        base = rng.integers(0, 64, size=n)
        base[1::2] = (base[::2][: len(base[1::2])] * 7 + 3) % 64  # every odd token is predictable from the previous
        write_shard(str(d / name), base)
    with open(d / "meta.json", "w") as f:
        json.dump({"vocab_size": 64}, f)
    return str(d)
