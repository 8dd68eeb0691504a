"""
OpenAI's GPT-2 weights in the Hugging Face Hub's layout (a folder with config.json and model.safetensors), both ways:
into model.py's GPT (init_from=gpt2 in train.py, sample.py) and out of it (export_hf.py). Not on the reading path of
the algorithm: model.py's module names match GPT-2's, so this is a key-by-key mapping.
"""

import json
import os

import torch
import torch.nn as nn

from model import GPT, GPTConfig, LayerNorm

# The Hub's GPT-2 keeps its Linear layers as Conv1D, whose weight is stored (in, out): those four are transposed.

PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class PretrainedError(RuntimeError):
    pass


def pretrained_folder(source):
    """A local folder in the Hub's layout as it is, or "gpt2"... downloaded (config.json and model.safetensors only)
    into the Hugging Face cache. Offline, a PretrainedError that says how to use a local copy."""
    if os.path.isdir(source):
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.exists(os.path.join(source, f))]
        if missing:
            raise PretrainedError(f"{source} is not a GPT-2 folder in the Hugging Face layout: it lacks "
                                  f"{', '.join(missing)}")
        return source
    if source not in PRETRAINED:
        raise PretrainedError(f"init_from={source!r}: expected scratch, resume, one of {', '.join(PRETRAINED)}, or a "
                              f"folder holding config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(PRETRAINED[source], allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise PretrainedError(
            f"could not download {PRETRAINED[source]} from the Hugging Face Hub ({type(e).__name__}). Without network "
            f"access, copy that repository's config.json and model.safetensors to a folder (e.g. with `hf download "
            f"{PRETRAINED[source]} config.json model.safetensors --local-dir gpt2-local` where there is network) and "
            f"pass the folder: --init_from=gpt2-local") from None


def pretrained_config(folder):
    """The model arguments of a Hub GPT-2 folder (block_size is its full context, n_positions)."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{folder}/config.json describes a {hf['model_type']!r} model, not GPT-2")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"], bias=True)


def load_pretrained_state(folder, block_size):
    """The state dict of this file's GPT from a Hub GPT-2 folder, position embeddings cropped to block_size."""
    from safetensors.torch import load_file
    hf = load_file(os.path.join(folder, "model.safetensors"))
    state = {}
    for key, value in hf.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # the causal-mask buffers of old checkpoints; the head is tied to wte
        state["transformer." + key] = value.t() if key.endswith(CONV1D) else value
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def save_hf_folder(model, folder):
    """Write a model as a Hub GPT-2 folder that transformers.GPT2LMHeadModel.from_pretrained opens with the same
    logits (config.json + model.safetensors). bias=False models are written with zero biases, which is the same."""
    from safetensors.torch import save_file
    c = model.config
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte (tie_word_embeddings)
        value = value.t() if key.endswith(CONV1D) else value
        tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
    if not c.bias:  # GPT-2 has biases everywhere: zeros change nothing
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, LayerNorm)) and name != "lm_head":
                width = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.numel()
                tensors[f"{name}.bias"] = torch.zeros(width)
    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": c.dropout,
              "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "layer_norm_epsilon": 1e-5,
              "initializer_range": 0.02, "tie_word_embeddings": True}
    if c.vocab_size > 50256:  # GPT-2's <|endoftext|>, where the vocabulary has it
        config.update(bos_token_id=50256, eos_token_id=50256)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def from_pretrained(source, block_size=0, dropout=0.0):
    """A GPT with OpenAI's GPT-2 weights: source is "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or a local folder
    in the Hub's layout; block_size 0 keeps the full context (1024), a smaller one crops it."""
    folder = pretrained_folder(source)
    args = pretrained_config(folder)
    if block_size > args["block_size"]:
        raise PretrainedError(f"block_size {block_size} is longer than the pretrained context ({args['block_size']})")
    args["block_size"] = block_size or args["block_size"]
    model = GPT(GPTConfig(**args, dropout=dropout))
    model.load_state_dict(load_pretrained_state(folder, args["block_size"]))
    return model
