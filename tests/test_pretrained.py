"""OpenAI's GPT-2 weights in the Hugging Face layout: loading (tiny GPT-2s written by the test in the Hub's own key
names and Conv1D orientation), export and re-import, transformers' logits, the offline error, and a fine-tune run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, read_log, run_train
from hub import PretrainedError, from_pretrained, load_pretrained_state, save_hf_folder
from model import GPT, GPTConfig

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True, dropout=0.0)


def random_gpt(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SHAPE, **kw}))
    with torch.no_grad():  # every parameter random, biases and LayerNorms too, so that no mapping error hides
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def write_hub_folder(model, folder):
    """The layout of openai-community/gpt2's model.safetensors, spelled out here independently of model.py: keys
    without the transformer. prefix, Conv1D weights stored (in, out), the causal-mask buffers, no lm_head."""
    from safetensors.torch import save_file
    sd, c = model.state_dict(), model.config
    tensors = {"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
               "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                     "mlp.c_fc.bias", "mlp.c_proj.bias"):
            tensors[f"h.{i}.{name}"] = sd[p + name]
        for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            tensors[f"h.{i}.{name}"] = sd[p + name].t()  # nn.Linear (out, in) -> Conv1D (in, out)
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(c.block_size, c.block_size)).view(1, 1, c.block_size,
                                                                                                c.block_size)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
                   "n_layer": c.n_layer, "n_head": c.n_head, "activation_function": "gelu_new"}, f)


def logits_of(model, idx):
    """Logits at every position (B, T, vocab): with targets the model computes them all."""
    with torch.no_grad():
        return model(idx, idx)[0]


def test_hub_layout_loads_with_the_same_logits_and_crops_the_context(tmp_path):
    model = random_gpt()
    write_hub_folder(model, str(tmp_path / "hub"))
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    loaded = from_pretrained(str(tmp_path / "hub")).eval()
    assert loaded.config.block_size == 16 and loaded.config.vocab_size == 64
    assert torch.allclose(logits_of(loaded, idx), logits_of(model, idx), atol=1e-6)
    cropped = from_pretrained(str(tmp_path / "hub"), block_size=8).eval()
    assert cropped.transformer.wpe.weight.shape == (8, 32)
    assert torch.allclose(logits_of(cropped, idx[:, :8]), logits_of(model, idx[:, :8]), atol=1e-6)
    with pytest.raises(PretrainedError, match="longer than the pretrained context"):
        from_pretrained(str(tmp_path / "hub"), block_size=32)


@pytest.mark.parametrize("bias", [True, False])
def test_export_then_import_round_trips_and_transformers_agrees(tmp_path, bias):
    model = random_gpt(bias=bias)
    save_hf_folder(model, str(tmp_path / "hf"))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    again = from_pretrained(str(tmp_path / "hf")).eval()
    assert torch.allclose(logits_of(again, idx), logits_of(model, idx), atol=1e-6)
    transformers = pytest.importorskip("transformers")  # CI installs it
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        hf_logits = hf_model(idx).logits
    assert torch.allclose(hf_logits, logits_of(model, idx), atol=1e-4)


def test_export_script_writes_a_folder_from_a_checkpoint(token_data, tmp_path):
    out = str(tmp_path / "run")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    result = subprocess.run([sys.executable, os.path.join(REPO, "export_hf.py"), f"--out_dir={out}",
                             f"--hf_dir={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(logits_of(from_pretrained(str(tmp_path / "hf")).eval(), idx), logits_of(model.eval(), idx),
                          atol=1e-6)


def test_without_network_the_error_says_how_to_use_a_local_copy(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = run_train("--init_from=gpt2", f"--out_dir={tmp_path / 'run'}", "--device=cpu", check=False, env=env,
                       timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "openai-community/gpt2" in lines[0] and "--init_from=" in lines[0]
    result = run_train("--init_from=no/such/folder", check=False)
    assert result.returncode == 1 and "init_from must be scratch, resume, one of gpt2" in result.stderr


def test_fine_tune_from_a_local_gpt2_through_the_command_line(token_data, tmp_path):
    model = random_gpt()
    folder = str(tmp_path / "hub")
    write_hub_folder(model, folder)
    out = str(tmp_path / "ft")
    common = [f"--init_from={folder}", f"--data_dir={token_data}", "--device=cpu", "--num_threads=1",
              "--batch_size=4", "--eval_iters=2", "--warmup_iters=0", "--optimizer=adamw", "--eval_interval=2"]
    # learning rate 0: the weights after a step are exactly the pretrained ones, cropped to block_size 8
    run_train(*common, f"--out_dir={out}", "--block_size=8", "--max_iters=1", "--learning_rate=0.0",
              "--min_lr=0.0", "--gapt_mode=gapt")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["model_args"]["block_size"] == 8
    expected = load_pretrained_state(folder, 8)
    assert all(torch.equal(ckpt["model"][k], expected[k]) for k in expected)
    run_train(*common, f"--out_dir={tmp_path / 'ft2'}", "--block_size=16", "--max_iters=2", "--learning_rate=1e-3",
              "--min_lr=1e-4", "--gapt_mode=gapt", "--dropout=0.1")
    assert read_log(str(tmp_path / "ft2"), "eval")[-1]["iter"] == 2
    result = run_train(*common, f"--out_dir={tmp_path / 'ft3'}", "--n_layer=5", "--max_iters=1", check=False)
    assert result.returncode == 1 and "n_layer=2" in result.stderr and "only block_size" in result.stderr
    result = run_train(*common, f"--out_dir={tmp_path / 'ft4'}", "--block_size=32", "--max_iters=1", check=False)
    assert result.returncode == 1 and "longer than" in result.stderr


def test_sample_from_a_pretrained_folder(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    try:
        tiktoken.get_encoding("r50k_base")
    except Exception as e:
        if os.environ.get("REQUIRE_BPE") == "1":
            raise
        pytest.skip(f"GPT-2's BPE is not available offline: {type(e).__name__}")
    write_hub_folder(random_gpt(vocab_size=50257), str(tmp_path / "hub"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--init_from={tmp_path / 'hub'}",
                             "--start=The kernel", "--num_samples=2", "--max_new_tokens=5", "--device=cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("The kernel") == 2


def test_mbe_layers_are_checked_against_the_pretrained_models_depth(token_data, tmp_path):
    """A 6-layer GPT-2 folder: --mbe_layers=[5] is valid for it although the default n_layer is 4."""
    folder = str(tmp_path / "hub6")
    write_hub_folder(random_gpt(n_layer=6), folder)
    out = str(tmp_path / "ft")
    run_train(f"--init_from={folder}", f"--data_dir={token_data}", "--device=cpu", "--num_threads=1",
              "--batch_size=4", "--eval_iters=2", "--optimizer=adamw", f"--out_dir={out}", "--max_iters=1",
              "--mbe_layers=[5]", "--gapt_mode=always", "--log_interval=1", "--block_size=16")
    assert read_log(out, "train")[-1]["mbe_layers"][5] is not None
