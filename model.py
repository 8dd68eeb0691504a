"""
One GPT-2, in the shape of nanoGPT's model.py, that also returns the residual stream of every block.

References: OpenAI's GPT-2 (TensorFlow) release and karpathy/nanoGPT. The module names (wte, wpe, h, ln_1, attn,
c_attn, c_proj, ln_2, mlp, c_fc, ln_f, lm_head) match GPT-2's, so its state dicts map one to one.
"""

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit faster and often as good


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (bias=False drops it, as in nanoGPT)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings

        self.apply(self._init_weights)
        # GPT-2 init: the projections that write into the residual stream are scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token ones are tied to lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, return_hidden=True):
        """
        idx: (B, T) token ids; targets: (B, T) ids or None (-1 = ignored position).
        Returns (logits, loss, hidden), hidden None when return_hidden=False (saves a copy of the residual streams):
          logits (B, T, vocab) when targets are given, else (B, 1, vocab) for the last position only;
          loss   the mean cross-entropy, or None;
          hidden (n_layer, B, T, n_embd): the residual stream after every block, before ln_f
                 (the representations R_l whose matrix-based entropy GAPT measures).
        """
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} is longer than block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        hidden = []
        for block in self.transformer.h:
            x = block(x)
            if return_hidden:
                hidden.append(x)
        hidden = torch.stack(hidden) if return_hidden else None  # (n_layer, B, T, C)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, vocab): generation needs the last position only
            loss = None
        return logits, loss, hidden

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on every parameter of 2 or more dimensions (matmul weights, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over peak_flops (FLOP/s of the hardware, measured or
        from its datasheet; there is no fixed peak on a CPU, so the caller must say)."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None):
        """Sample max_new_tokens continuations of idx (B, T); temperature 0 means greedy. Stops early when every
        row has produced stop_token."""
        prompt_len = idx.size(1)
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _, _ = self(idx_cond)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None and bool((idx[:, prompt_len:] == stop_token).any(dim=1).all()):
                break
        return idx


# -----------------------------------------------------------------------------
# OpenAI's GPT-2 weights in the Hugging Face Hub's layout (a folder with config.json and model.safetensors), both ways.
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
