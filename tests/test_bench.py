import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_runs_end_to_end_and_emits_json(token_data):
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "--n_layer=3", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--batch_size=2", "--num_threads=1", f"--data_dir={token_data}", "--steps=2",
           "--warmup=1", "--alpha_shape=2,64,16"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "| (a) baseline |" in result.stdout and "| (c) compress_whole |" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["variants"]) == {"baseline", "compress", "compress_whole", "memorize"}
    for row in report["variants"].values():
        assert {"ms_median", "ms_min", "ms_max", "tokens_per_s", "ratio", "memory_mb", "memory_ratio", "mfu"} <= set(row)
        assert row["ms_median"] > 0 and 0 < row["mfu"] < 1
    assert report["variants"]["baseline"]["ratio"] == 1.0
    # the compression step keeps the MBE graph for backward: more saved activations than the baseline
    assert report["variants"]["compress"]["memory_mb"] > report["variants"]["baseline"]["memory_mb"]
    assert report["shape"]["vocab_size"] == 64 and report["threads"] == 1 and report["peak_flops"] > 0
    assert report["alpha_shape"] == [2, 64, 16] and report["alpha2_ms"] > 0 and report["eig_ms"] > 0


def test_bench_rejects_unknown_keys():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--stpes=3"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "unknown config key 'stpes'" in result.stderr and "--steps" in result.stderr
    assert "Traceback" not in result.stderr
