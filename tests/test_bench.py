import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_runs_end_to_end_and_emits_json(token_data):
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "--n_layer=3", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--batch_size=2", "--num_threads=1", f"--data_dir={token_data}", "--steps=2",
           "--warmup=1", "--alpha_shape=2,64,16", "--optimizer=adamw"]
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
    assert report["optimizer"] == "adamw"
    assert report["mbe_only_compiled_ms"] is None  # not asked for, and the config does not compile


def test_bench_times_the_mbe_under_torch_compile(token_data):
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "--n_layer=3", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--batch_size=2", "--num_threads=1", f"--data_dir={token_data}", "--steps=2",
           "--warmup=1", "--alpha_shape=", "--optimizer=adamw", "--mbe_compiled=1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "MBE alone compiled, fused:" in result.stdout and "MBE memory-traffic floor" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # the trainer's compiled path (fused reductions) against the eager batched matmuls: the same value and gradient
    assert report["mbe_only_compiled_ms"] > 0 and report["mbe_compiled_max_abs_diff"] < 1e-4
    assert report["mbe_compiled_grad_rel_diff"] < 1e-4 and report["mbe_floor_ms"] > 0


def test_bench_steps_the_configs_optimizer(token_data, monkeypatch):
    """With optimizer="muon" every timed step runs Muon on the blocks' matrices and AdamW on the rest."""
    import bench
    from model import GPT
    calls, configure = [], GPT.configure_optimizers

    def recording(model, *args, **kwargs):
        optimizers = configure(model, *args, **kwargs)
        calls.append([type(o).__name__ for o in optimizers])
        return optimizers
    monkeypatch.setattr(GPT, "configure_optimizers", recording)
    bench.main(["--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--num_threads=1",
                f"--data_dir={token_data}", "--steps=1", "--warmup=1", "--alpha_shape=", "--optimizer=muon"])
    assert calls == [["Muon", "AdamW"]]


def test_bench_rejects_unknown_keys():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--stpes=3"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "unknown config key 'stpes'" in result.stderr and "--steps" in result.stderr
    assert "Traceback" not in result.stderr


FAKE_NANOGPT = '''
from dataclasses import dataclass
import torch
from torch.nn import functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(torch.nn.Module):  # nanoGPT's interface, not its model: enough to check bench.py's plumbing
    def __init__(self, config):
        super().__init__()
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.wte(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
'''


def test_bench_times_a_nanogpt_checkout_side_by_side(token_data, tmp_path):
    (tmp_path / "model.py").write_text(FAKE_NANOGPT)
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "--n_layer=2", "--n_head=2", "--n_embd=32",
           "--block_size=16", "--batch_size=2", "--num_threads=1", f"--data_dir={token_data}", "--steps=2",
           "--warmup=1", "--alpha_shape=", f"--nanogpt_dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "| (n) nanogpt |" in result.stdout and "nanoGPT (" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["variants"]["nanogpt"]["ms_median"] > 0 and "alpha2_ms" not in report
    missing = subprocess.run(cmd[:-1] + [f"--nanogpt_dir={tmp_path / 'nowhere'}"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 1 and "has no model.py" in missing.stderr and "Traceback" not in missing.stderr
