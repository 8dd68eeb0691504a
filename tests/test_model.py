import math

import torch

from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"block_size": 16, "vocab_size": 32, "n_layer": 3, "n_head": 2, "n_embd": 16, **kw}))


def test_forward_returns_logits_loss_and_every_blocks_residual_stream():
    model = tiny()
    x = torch.randint(32, (2, 16))
    logits, loss, hidden = model(x, x, return_hidden=True)
    assert logits.shape == (2, 16, 32) and hidden.shape == (3, 2, 16, 16)
    # the hidden states are taken after each block and before the final LayerNorm
    assert torch.allclose(model.lm_head(model.transformer.ln_f(hidden[-1])), logits, atol=1e-5)
    manual = model.transformer.wte(x) + model.transformer.wpe(torch.arange(16))
    for layer, block in enumerate(model.transformer.h):
        manual = block(manual)
        assert torch.allclose(manual, hidden[layer], atol=1e-5)
    assert abs(loss.item() - math.log(32)) < 0.5  # near uniform at init
    logits_only, no_loss, none = model(x)  # the default: no residual streams stacked (generate, sample.py, eval)
    assert logits_only.shape == (2, 1, 32) and no_loss is None and none is None
    assert model(x, x)[2] is None


def test_gpt2_init_and_tied_embeddings():
    model = tiny(n_layer=8, n_embd=64, n_head=4, vocab_size=512)
    assert model.transformer.wte.weight is model.lm_head.weight
    c_proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(c_proj_std - 0.02 / math.sqrt(2 * 8)) < 0.002
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_weight_decay_groups_and_generate():
    model = tiny()
    opt, = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")  # AdamW alone without muon=True
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0.0)
    assert out.shape == (1, 8)
    assert model.estimate_mfu(1000.0, 0.0) is None
    assert model.estimate_mfu(1000.0, 1e12) == model.flops_per_token() * 1000.0 / 1e12
