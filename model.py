"""
One GPT-2, in the shape of nanoGPT's model.py, that also returns the residual stream of every block.

References: OpenAI's GPT-2 (TensorFlow) release and karpathy/nanoGPT. The module names (wte, wpe, h, ln_1, attn,
c_attn, c_proj, ln_2, mlp, c_fc, ln_f, lm_head) match GPT-2's, so its state dicts map one to one.
"""

import inspect
import math
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

    def forward(self, idx, targets=None, return_hidden=False, n_blocks=None):
        """
        idx: (B, T) token ids; targets: (B, T) ids or None (-1 = ignored position).
        Returns (logits, loss, hidden), hidden None unless return_hidden=True (stacking them costs a copy):
          logits (B, T, vocab) when targets are given, else (B, 1, vocab) for the last position only;
          loss   the mean cross-entropy, or None;
          hidden (n_layer, B, T, n_embd): the residual stream after every block, before ln_f
                 (the representations R_l whose matrix-based entropy GAPT measures; hidden[l] depends on the
                 embeddings and blocks 0 ... l only).
        n_blocks: run blocks 0 ... n_blocks-1 only and stop (no ln_f, no head): returns (None, None, hidden) with
          hidden (n_blocks, B, T, n_embd), for a micro-batch that backpropagates one block's MBE alone.
        """
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} is longer than block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        hidden = []
        for block in self.transformer.h[:n_blocks]:
            x = block(x)
            if return_hidden or n_blocks is not None:
                hidden.append(x)
        hidden = torch.stack(hidden) if hidden else None  # (n_layer or n_blocks, B, T, C)
        if n_blocks is not None:
            return None, None, hidden
        logits, loss = self.head(x, targets)
        return logits, loss, hidden

    def head(self, x, targets=None):
        """ln_f and the tied head on the last residual stream x (B, T, C); the CE against targets if given."""
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, vocab): generation needs the last position only
            loss = None
        return logits, loss

    def compile_parts(self):
        """torch.compile every block and the head apart (torchtitan's way) instead of the whole forward: the blocks
        share one compiled graph, so a forward that stops after any block reuses it (no recompilation per depth),
        and compiling takes a block's time, not the model's."""
        for block in self.transformer.h:
            block.compile()
        self.head = torch.compile(self.head)
        return self

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon=False):
        """[AdamW] with weight decay on every parameter of 2 or more dimensions (matmul weights, embeddings) only; or,
        with muon, [Muon on the blocks' 2-D weights, AdamW on embeddings, head, norms and biases] (torch >= 2.9)."""
        params = [p for p in self.parameters() if p.requires_grad]
        in_blocks = [p for n, p in self.named_parameters() if n.startswith("transformer.h.") and p.dim() > 1]
        muon_ids = {id(p) for p in in_blocks} if muon else set()
        muon_params = [p for p in params if id(p) in muon_ids]
        rest = [p for p in params if id(p) not in muon_ids]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))
        if not muon:
            return [adamw]
        # adjust_lr_fn="match_rms_adamw" lets Muon share AdamW's learning rate
        return [torch.optim.Muon(muon_params, lr=learning_rate, weight_decay=weight_decay,
                                 adjust_lr_fn="match_rms_adamw"), adamw]

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
