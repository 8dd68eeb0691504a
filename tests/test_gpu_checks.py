"""gpu_checks.sh end to end on the CPU at toy sizes (GPU_CHECKS_TINY=1), so that the one command prepared for a GPU
cannot rot before a GPU is lent: every part runs, the sweep's two waves and its table, the logs' archive."""

import json
import os
import subprocess
import tarfile

import numpy as np

from conftest import REPO


def test_gpu_checks_runs_every_part_at_toy_sizes(tmp_path):
    from shards import write_shard
    data, python_docs = tmp_path / "kernel", tmp_path / "python"
    rng = np.random.default_rng(0)
    for folder, splits in ((data, ("train_000001", "val_000000", "test_000000")), (python_docs, ("val_000000",))):
        folder.mkdir()
        for split in splits:
            write_shard(str(folder / f"{split}.bin"), rng.integers(0, 64, size=3000))
        (folder / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECKS_TINY": "1", "REGIME_DATA": str(data), "REGIME_EVAL": str(python_docs),
           "SWEEP_ROOT": str(tmp_path / "sweep"), "BIG_ROOT": str(tmp_path / "big"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "gpu_checks.sh", str(results)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for part in ("bench exit 0", "sweep wave 1 exit 0", "tests exit 0", "sweep wave 2 exit 0", "big exit 0"):
        assert part in out, out
    bench = (results / "bench.txt").read_text()  # compiled as on a GPU: (b) with the fused MBE, (e) with the eager one
    assert "| (b) compress |" in bench and "| (e) compress_eager |" in bench and "MBE alone compiled, fused" in bench
    assert "| (C1) compress_mbe_first |" in bench and "compression (mean of C1 and C2) / memorization" in bench
    assert "1 passed" in (results / "tests.txt").read_text()  # test_exact_resume
    share = float(out.split("random gate at share ")[1].split()[0])
    assert 0 < share < 1  # the paper_era row compressed on some steps, not all (patience 2 in 8 steps)
    table = (results / "sweep_table.txt").read_text()
    for row in ("kernel_docs_regime ", "dropout_0.1", "gapt_paper_era ", "gapt_algorithm1",
                "gapt_ema_0.9+mbe_floor_0.5", "gapt_mode_always", f"gapt_random_share_{share:.2f}"):
        assert row in table, table
    runs = sorted(os.listdir(tmp_path / "sweep"))
    assert len(runs) == 7 and all(os.path.exists(tmp_path / "sweep" / r / "done") for r in runs)
    with tarfile.open(results / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert len([n for n in names if n.endswith("log.jsonl")]) == 7 + 2  # the sweep and the big model
    assert len([n for n in names if n.endswith("/done")]) == 7 + 2  # what makes a later call skip them


def test_gpu_checks_without_a_gpu_stops_at_once_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECKS_TINY"}
    result = subprocess.run(["bash", "gpu_checks.sh", str(tmp_path / "r")], cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device here" in result.stderr and "GPU_CHECKS_TINY=1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r" / "bench.txt").exists()
