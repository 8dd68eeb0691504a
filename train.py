"""
Train a GPT-2 with or without GAPT (Gated Phase Transition, arXiv 2505.08727), on one process or under torchrun.

    python train.py                                   # the built-in default: GAPT on the multiplication task
    python train.py config/mult_baseline.py --max_iters=500 --device=cpu
    torchrun --standalone --nproc_per_node=8 train.py config/fineweb_gapt.py

Arguments are config files (plain Python assignments, applied in order) and --key=value overrides. An unknown key or
a value of the wrong type is an error. The layout follows nanoGPT: defaults, config, the GAPT state machine, data,
checkpoints, then main(): DDP/device setup, data, model init/resume, optimizer, compile, DDP wrap, eval/lr helpers,
and the training loop.
"""

import os
import sys

if __name__ == "__main__" and sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # glibc hands every freed buffer above its mmap threshold (32 MB at most when adjusted at run time) back to the OS
    # and maps it again on the next step; on a CPU the full fp32 logits (tokens x 50k vocabulary) of a small text
    # model make that close to half of each step (docs/performance.md). The threshold can only be raised above 32 MB
    # from the environment before the process starts: set it and restart once, before torch is imported (cheap).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2 ** 32)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import ast
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

from mbe import patched_mbe
from model import (GPT, PRETRAINED, GPTConfig, PretrainedError, load_pretrained_state, pretrained_config,
                   pretrained_folder)
from shards import DataError, TokenWindows, read_meta

# -----------------------------------------------------------------------------
# Defaults: GAPT on the multiplication task (python prepare_mult.py first), small enough for a laptop CPU.
DEFAULTS = dict(
    # I/O
    out_dir="out-mult-gapt",
    eval_interval=250,  # evaluate (and checkpoint) every this many optimizer steps, and at the end
    log_interval=50,  # one stdout line and one log.jsonl record every this many steps
    eval_iters=20,  # validation batches (of batch_size sequences) per evaluation
    eval_only=False,  # evaluate once and exit
    always_save_checkpoint=True,  # False: write ckpt.pt only when the validation CE improved
    init_from="scratch",  # "scratch", "resume" (out_dir/ckpt.pt), "gpt2" ... "gpt2-xl", or a Hub-layout folder
    overwrite_out_dir=False,  # True: a scratch run may replace the run already in out_dir (its ckpt.pt and log)
    seed=1337,
    wandb_log=False,
    wandb_project="gapt",
    wandb_run_name="run",
    # data
    data_dir="data/mult",  # train_*.bin / val_*.bin token shards and meta.json
    eval_data_dirs=[],  # more prepared directories whose val split every eval measures too (logged as NAME_ce)
    vocab_size=0,  # 0: read it from data_dir/meta.json
    batch_size=64,  # sequences per micro-batch, per process
    block_size=32,
    gradient_accumulation_steps=1,  # micro-batches per optimizer step over all processes (divided by the world size)
    # model
    n_layer=4,
    n_head=4,
    n_embd=128,
    dropout=0.0,
    bias=True,
    # optimizer
    optimizer="muon",  # "muon" (Muon on the blocks' 2-D weights, AdamW on the rest), or "adamw"
    learning_rate=3e-3,
    max_iters=5000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,  # 0 disables clipping
    decay_lr=True,
    warmup_iters=100,
    lr_decay_iters=0,  # 0: decay over all max_iters
    min_lr=3e-4,
    # GAPT
    gapt_mode="gapt",  # "off" (CE only), "gapt" (the state machine), "always" (CE + mbe_weight * MBE every step)
    mbe_weight=0.1,  # λ in loss = CE + λ · mean MBE over mbe_layers (compression phase)
    mbe_alpha=2.0,  # Rényi order α of the matrix-based entropy
    mbe_patch_size=8,  # tokens per MBE matrix (0: the whole sequence)
    mbe_layers="auto",  # "auto" (every block but the first and last), "rotate" (one of those per step), or a list
    mbe_center=False,  # subtract each patch's mean token before the MBE
    mbe_floor=0.0,  # the compression loss stops rewarding MBE below this value: λ · relu(MBE − floor)
    gapt_delta=0.01,  # relative improvement that counts as progress
    gapt_delta_mbe_abs=0.0,  # > 0: MBE progress is an absolute drop of more than this instead
    gapt_tau=0.1,  # a CE above ce_min · (1 + tau) during compression ends it
    gapt_patience_memorize=125,
    gapt_patience_compress=75,
    gapt_ema=0.0,  # > 0: the state machine sees running means of CE and MBE (new value weighted 1 - gapt_ema)
    # system
    device="auto",  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype="auto",  # "auto" (bfloat16 on CUDA where supported, else float16 on CUDA, float32 on CPU), or explicit
    compile=False,  # torch.compile the model
    num_threads=0,  # torch CPU threads per process; 0 keeps torch's default
    deterministic=False,  # True: deterministic kernels (slower on CUDA), so that reruns and resumes repeat bit for bit
    peak_flops=0.0,  # the hardware's peak FLOP/s for the MFU column; 0 leaves MFU out (bench.py measures one)
    align_interval=0,  # every this many steps, log the cosine between the CE and MBE gradients (0 = off)
)

# keys whose value may have another type than their default's
_KEY_TYPES = {"mbe_layers": (str, list, tuple), "eval_data_dirs": (str, list, tuple)}


class ConfigError(ValueError):
    pass


def _check_type(key, value):
    default = DEFAULTS[key]
    allowed = _KEY_TYPES.get(key, (type(default),))
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --learning_rate=1 means 1.0
    if isinstance(value, bool) != isinstance(default, bool) and key not in _KEY_TYPES:
        raise ConfigError(f"config key {key!r}: expected {type(default).__name__}, got {value!r}")
    if not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"config key {key!r}: expected {names}, got {type(value).__name__} {value!r}")
    if key == "eval_data_dirs":  # one directory may be given as a plain string
        value = [value] if isinstance(value, str) else list(value)
        if not all(isinstance(d, str) for d in value):
            raise ConfigError(f"config key 'eval_data_dirs': expected a list of directory names, got {value!r}")
    return value


def _set(config, key, value, source):
    if key not in DEFAULTS:
        close = [k for k in DEFAULTS if k.split("_")[0] == key.split("_")[0]] or sorted(DEFAULTS)
        raise ConfigError(f"unknown config key {key!r} in {source}; known keys like it: {', '.join(close)}")
    config[key] = _check_type(key, value)


def load_config(args):
    """Defaults, then each config file and --key=value override in the order given. Returns a SimpleNamespace."""
    config = dict(DEFAULTS)
    for arg in args:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            if isinstance(DEFAULTS.get(key), str) and key not in _KEY_TYPES:
                value = text  # strings need no quotes: --device=cpu
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text
            _set(config, key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            names = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), {}, names)
            for key, value in names.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    _set(config, key, value, arg)
    validate_config(config)
    return SimpleNamespace(**config)


def validate_config(c):
    if c["init_from"] not in ("scratch", "resume", *PRETRAINED) and not os.path.isdir(c["init_from"]):
        raise ConfigError(f"init_from must be scratch, resume, one of {', '.join(PRETRAINED)}, or a folder holding a "
                          f"GPT-2 in the Hugging Face layout (config.json + model.safetensors); got {c['init_from']!r}")
    choices = {"gapt_mode": ("off", "gapt", "always"),
               "optimizer": ("adamw", "muon"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {c[key]!r}")
    if c["mbe_patch_size"] < 0 or (c["mbe_patch_size"] and c["block_size"] % c["mbe_patch_size"]):
        raise ConfigError(f"block_size {c['block_size']} is not divisible by mbe_patch_size {c['mbe_patch_size']}; "
                          f"pick a patch size that divides it (or 0 for the whole sequence)")
    if isinstance(c["mbe_layers"], str) and c["mbe_layers"] not in ("auto", "rotate"):
        raise ConfigError(f"mbe_layers must be 'auto', 'rotate' or a list of layer indices, got {c['mbe_layers']!r}")
    if not isinstance(c["mbe_layers"], str) and not all(0 <= i < c["n_layer"] for i in c["mbe_layers"]):
        raise ConfigError(f"mbe_layers {c['mbe_layers']} must be indices in [0, n_layer={c['n_layer']})")
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                "eval_interval", "log_interval", "eval_iters", "gapt_tau", "gapt_patience_memorize",
                "gapt_patience_compress", "mbe_alpha"):
        if c[key] <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {c[key]}")
    for key in ("learning_rate", "max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                "mbe_weight", "mbe_floor", "gapt_delta_mbe_abs", "num_threads", "peak_flops", "align_interval",
                "vocab_size"):
        if c[key] < 0:
            raise ConfigError(f"config key {key!r} must not be negative, got {c[key]}")
    for key in ("dropout", "beta1", "beta2", "gapt_delta", "gapt_ema"):
        if not 0 <= c[key] < 1:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {c[key]}")
    if c["min_lr"] > c["learning_rate"]:
        raise ConfigError(f"config key 'min_lr' ({c['min_lr']}) must not exceed learning_rate ({c['learning_rate']})")
    if c["warmup_iters"] > c["max_iters"]:
        raise ConfigError(f"config key 'warmup_iters' ({c['warmup_iters']}) must not exceed max_iters "
                          f"({c['max_iters']})")
    if c["n_embd"] % c["n_head"]:
        raise ConfigError(f"config key 'n_embd' ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")


def resolve_mbe_layers(mbe_layers, n_layer):
    """The regularised layers: every block but the first and the last, all of them when there are fewer than 3."""
    if isinstance(mbe_layers, str):  # "auto" or "rotate"
        return list(range(1, n_layer - 1)) if n_layer >= 3 else list(range(n_layer))
    return sorted(set(mbe_layers))


# -----------------------------------------------------------------------------
# GAPT: the paper's Algorithm 1, with scale-free (relative) thresholds.

class GAPT:
    """Gated phase transition between memorization (phase 1, loss = CE) and compression (phase 2, loss = CE + λ·MBE).

    Call step(ce, mbe) once per optimizer step with that step's CE and per-layer MBE (ignored in phase 1); it returns
    the phase for the next step. "x improved on best" means best is +inf or x < best·(1 − delta); with delta_mbe_abs
    > 0, an MBE improves only if it drops by more than that absolute amount. After a step that switched, last_switch
    says why ("ce_plateau": memorization → compression; "ce_spike" or "mbe_patience": compression →
    memorization) and the values the rule compared.

    ema > 0 is an option beyond the paper: the rules see exponential moving averages (weight 1 − ema on the new
    value) of CE and of each layer's MBE instead of the raw step values, so that batch noise in a small step's CE can
    neither fake progress nor a spike. The MBE average restarts with each compression phase.
    """

    def __init__(self, delta=0.01, tau=0.1, patience_memorize=125, patience_compress=75, delta_mbe_abs=0.0, ema=0.0):
        self.delta, self.tau, self.delta_mbe_abs, self.ema = delta, tau, delta_mbe_abs, ema
        self.patience_memorize, self.patience_compress = patience_memorize, patience_compress
        self.phase = 1
        self.ce_min = math.inf
        self.mbe_min = None  # per-layer minima, set to +inf at the start of each compression phase
        self.s_m = 0  # steps without CE progress (memorization)
        self.s_c = 0  # steps without MBE progress (compression)
        self.switches = 0  # phase changes so far
        self.compress_steps = 0  # steps trained in the compression phase so far
        self.ce_avg, self.mbe_avg = None, None  # the running means the rules see when ema > 0
        self.last_switch = None  # why the latest step switched phase (None if it did not)

    def _smooth(self, avg, x):
        return x if avg is None or self.ema == 0 else self.ema * avg + (1 - self.ema) * x

    def _improved(self, x, best, absolute=0.0):
        if math.isinf(best):
            return True
        return x < best - absolute if absolute > 0 else x < best * (1 - self.delta)

    def _enter(self, phase, reason, **values):
        self.last_switch = {"reason": reason, **values}
        self.phase = phase
        self.switches += 1
        if phase == 1:
            self.s_m = 0
        else:
            self.s_c = 0
            self.mbe_min, self.mbe_avg = None, None

    def step(self, ce, mbe=None):
        self.last_switch = None
        ce = self.ce_avg = self._smooth(self.ce_avg, float(ce))
        self.compress_steps += self.phase == 2
        if self.phase == 1:
            self.s_m = 0 if self._improved(ce, self.ce_min) else self.s_m + 1
            self.ce_min = min(self.ce_min, ce)
            if self.s_m >= self.patience_memorize:
                self._enter(2, "ce_plateau", ce=ce, ce_min=self.ce_min, steps_without_progress=self.s_m)
        else:
            if ce > self.ce_min * (1 + self.tau):  # a CE spike against the best so far: back to memorizing
                self._enter(1, "ce_spike", ce=ce, ce_min=self.ce_min, ce_limit=self.ce_min * (1 + self.tau))
                return self.phase
            if mbe is None:
                raise ValueError("GAPT.step: the compression phase needs this step's per-layer MBE")
            mbe = [float(m) for m in (mbe if isinstance(mbe, (list, tuple)) else [mbe])]
            mbe = self.mbe_avg = [self._smooth(a, m) for a, m in zip(self.mbe_avg or [None] * len(mbe), mbe)]
            if self.mbe_min is None:
                self.mbe_min = [math.inf] * len(mbe)
            progress = any(self._improved(m, best, self.delta_mbe_abs) for m, best in zip(mbe, self.mbe_min))
            self.s_c = 0 if progress else self.s_c + 1
            self.mbe_min = [min(m, best) for m, best in zip(mbe, self.mbe_min)]
            self.ce_min = min(self.ce_min, ce)
            if self.s_c >= self.patience_compress:
                self._enter(1, "mbe_patience", mbe=mbe, mbe_min=self.mbe_min, steps_without_progress=self.s_c,
                            ce=ce, ce_min=self.ce_min)
        return self.phase

    def state_dict(self):
        return {k: getattr(self, k) for k in ("phase", "ce_min", "mbe_min", "s_m", "s_c", "switches", "compress_steps",
                                              "ce_avg", "mbe_avg")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)


# -----------------------------------------------------------------------------
# Checkpoints

class CheckpointError(RuntimeError):
    pass


CHECKPOINT_KEYS = ("model", "optimizers", "scaler", "model_args", "config", "iter_num", "best_val_loss", "gapt",
                   "data_rng", "rng")


def load_checkpoint(path):
    """torch.load a checkpoint written by save_checkpoint; one clear CheckpointError if it is missing, damaged,
    truncated or not one of ours."""
    advice = "resume from an intact copy, or start again with --init_from=scratch --overwrite_out_dir=True"
    if not os.path.exists(path):
        raise CheckpointError(f"init_from='resume' but {path} does not exist; train from scratch first, or point "
                              f"--out_dir at the run to resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be read, it is damaged or truncated ({type(e).__name__}: "
                              f"{first_line}); {advice}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint written by this train.py (it lacks {', '.join(missing)}); "
                              f"{advice}")
    return checkpoint


def truncate_log(path, iter_num):
    """On resume, drop the log records written after the checkpoint (a run stopped between checkpoints wrote them,
    and the resumed run writes them again), so that log.jsonl holds one run on one step axis."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in records if r["iter"] < iter_num or (r["iter"] == iter_num and r.get("kind") in ("train",
                                                                                                      "switch"))]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def adopt_model_shape(c, shape, source, advice):
    """Set the model-shape keys of c from a checkpoint's or a pretrained model's (shape: key -> value). A key this run
    set explicitly to another value (anything but its default) is an error: the weights would not fit."""
    for k, value in shape.items():
        if getattr(c, k) not in (value, DEFAULTS[k]):
            raise ConfigError(f"{source} has {k}={value!r}, but this run sets {k}={getattr(c, k)!r}; {advice}")
        setattr(c, k, value)


def save_checkpoint(path, checkpoint):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written ckpt.pt."""
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def get_lr(it, c):
    """Linear warm-up for warmup_iters, then cosine decay to min_lr at lr_decay_iters (max_iters if 0), then min_lr."""
    if not c.decay_lr:
        return c.learning_rate
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    decay_iters = c.lr_decay_iters or c.max_iters
    if it > decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / max(1, decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def build_optimizers(model, c, device_type):
    """AdamW on everything, or Muon on the blocks' 2-D weights plus AdamW on embeddings, head, norms and biases."""
    if c.optimizer == "adamw":
        return [model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type)]
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optimizer='muon' needs torch.optim.Muon (PyTorch 2.9 or newer; this is "
                          f"{torch.__version__}): upgrade torch (pip install -r requirements.txt) or pass "
                          f"--optimizer=adamw")
    muon_params = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    muon_ids = {id(p) for p in muon_params}
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    muon = torch.optim.Muon(muon_params, lr=c.learning_rate, weight_decay=c.weight_decay,
                            adjust_lr_fn="match_rms_adamw")  # lets Muon share AdamW's learning rate
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": c.weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=c.learning_rate, betas=(c.beta1, c.beta2))
    return [muon, adamw]


# -----------------------------------------------------------------------------

def compression_loss(ce, hidden, c, layer_select, step):
    """The compression-phase loss: CE + λ · mean over the regularised layers of relu(S_α(R_l) − floor).

    hidden is the stacked residual stream (n_layer, B, T, D); layer_select picks the regularised layers. With
    mbe_layers="rotate" only one of them (cycling with step) is in the loss. Returns (loss, their per-layer MBE).
    """
    layer_mbe = patched_mbe(hidden[layer_select], c.mbe_patch_size, c.mbe_alpha, c.mbe_center)
    penalty = (layer_mbe - c.mbe_floor).clamp_min(0)  # floor 0 changes nothing: MBE >= 0
    penalty = penalty[step % len(penalty)] if c.mbe_layers == "rotate" else penalty.mean()
    return ce + c.mbe_weight * penalty, layer_mbe


def layer_selection(mbe_layers, n_layer, device):
    """(index for the stacked hidden states, the layer list as a tensor): a slice when the layers are contiguous,
    which is a view of the hidden states, where an index list would copy them."""
    layers = resolve_mbe_layers(mbe_layers, n_layer)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    index = torch.tensor(layers, device=device)
    return (slice(layers[0], layers[-1] + 1) if contiguous else index), index


def gradient_cosines(loss_a, loss_b, blocks):
    """Cosine between the gradients of two losses over the parameters of `blocks` (a list of modules): over all of
    them together, and per block (None where a gradient is zero). Uses autograd.grad: no .grad is touched."""
    per_block_params = [list(block.parameters()) for block in blocks]
    params = [p for ps in per_block_params for p in ps]
    grads_a = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(loss_b, params, allow_unused=True)
    zero = torch.zeros((), dtype=torch.float64, device=params[0].device)

    def dot(g, h):  # a parameter a loss does not reach has a zero gradient (None from autograd)
        return zero if g is None or h is None else (g.double() * h.double()).sum()
    # per parameter: (a·b, a·a, b·b), summed per block
    terms = torch.stack([torch.stack([dot(ga, gb), dot(ga, ga), dot(gb, gb)]) for ga, gb in zip(grads_a, grads_b)])
    per_block = torch.stack([t.sum(0) for t in terms.split([len(ps) for ps in per_block_params])])

    def cosine(ab, aa, bb):
        return float(ab / (aa.sqrt() * bb.sqrt())) if aa > 0 and bb > 0 else None
    return cosine(*per_block.sum(0)), [cosine(*row) for row in per_block]


def gradient_alignment(model, x, y, c, layer_select):
    """The paper's memorization-compression signal: the cosine between the gradients of CE and of the mean MBE over
    the regularised layers, on one batch, over the transformer blocks' parameters. Leaves the RNG streams as they were
    (fork_rng), so training is not changed."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _, ce, hidden = model(x, y)
        layer_mbe = patched_mbe(hidden[layer_select], c.mbe_patch_size, c.mbe_alpha, c.mbe_center)
        return gradient_cosines(ce, layer_mbe.mean(), list(model.transformer.h))


def setup_compute(c, device_type):
    """Threads, precision and autocast from the config: dtype "auto" becomes bfloat16 on CUDA where supported, else
    float16 (with a GradScaler in the trainer), and float32 elsewhere. Returns (torch dtype, autocast context)."""
    if c.num_threads:
        torch.set_num_threads(c.num_threads)
    if c.dtype == "auto":
        c.dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    if c.deterministic:  # cuBLAS reads this when it creates its handle, so it must be set before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ptdtype, autocast


def main(c):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP / device setup --------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if c.device.startswith("cuda"):
            c.device = f"cuda:{local_rank}"
            torch.cuda.set_device(c.device)
        dist.init_process_group(backend="nccl" if c.device.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device_type = "cuda" if c.device.startswith("cuda") else c.device.split(":")[0]
    if c.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} (the global count) must be "
                          f"divisible by the number of processes ({world})")
    micro_steps = c.gradient_accumulation_steps // world
    tokens_per_step = c.gradient_accumulation_steps * c.batch_size * c.block_size
    ptdtype, autocast = setup_compute(c, device_type)
    torch.manual_seed(c.seed + rank)  # dropout differs per rank; the data order does not (data_rng below)
    if master:
        os.makedirs(c.out_dir, exist_ok=True)
        print(f"tokens per optimizer step: {tokens_per_step:,} ({world} process(es) x {micro_steps} micro-steps x "
              f"{c.batch_size} x {c.block_size}), device {c.device}, dtype {c.dtype}")

    # out_dir: resume the run in it, or start one where none is (or overwrite one when told to) ----------------
    model_keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
    checkpoint = None
    ckpt_path, log_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "log.jsonl")
    if c.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path)
        adopt_model_shape(c, {k: checkpoint["model_args"][k] for k in model_keys}, f"the model in {ckpt_path}",
                          "drop that setting to resume, or train it from scratch in another out_dir")
        if master:
            truncate_log(log_path, checkpoint["iter_num"])
    elif not c.eval_only and any(os.path.exists(p) for p in (ckpt_path, log_path)):
        if not c.overwrite_out_dir:
            raise ConfigError(f"{c.out_dir} already holds a run (ckpt.pt / log.jsonl); resume it with "
                              f"--init_from=resume, pick another --out_dir, or start it again with "
                              f"--overwrite_out_dir=True (which deletes its checkpoint and log)")
        if master:
            for path in (ckpt_path, log_path):
                if os.path.exists(path):
                    os.remove(path)
    pretrained_dir = None
    if c.init_from not in ("scratch", "resume"):  # OpenAI's GPT-2 (downloaded once) or a local Hub-layout folder
        pretrained_dir = pretrained_folder(c.init_from)
        shape = pretrained_config(pretrained_dir)
        adopt_model_shape(c, {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")},
                          f"the GPT-2 of init_from={c.init_from!r}", f"only block_size (up to {shape['block_size']}) "
                          f"and dropout may differ from the pretrained model; drop that setting")
        if c.block_size > shape["block_size"]:
            raise ConfigError(f"block_size {c.block_size} is longer than {c.init_from}'s context "
                              f"({shape['block_size']}); use at most that")

    # data ----------------------------------------------------------------------
    train_data = TokenWindows(c.data_dir, "train", c.block_size)
    val_data = TokenWindows(c.data_dir, "val", c.block_size)
    meta = read_meta(c.data_dir)
    if c.vocab_size == 0:
        if "vocab_size" not in meta:
            raise ConfigError(f"vocab_size=0 means 'read it from {c.data_dir}/meta.json', which has none; "
                              f"set --vocab_size")
        c.vocab_size = int(meta["vocab_size"])
    if meta.get("vocab_size", 0) > c.vocab_size:
        raise ConfigError(f"vocab_size {c.vocab_size} is smaller than the data's ({meta['vocab_size']}, from "
                          f"{c.data_dir}/meta.json); raise vocab_size or set it to 0")
    extra_val_data = {}  # evaluation-only corpora: name -> their val windows
    for d in c.eval_data_dirs:
        name = os.path.basename(os.path.normpath(d))
        if name in extra_val_data or name == "val":  # its metrics are logged as NAME_ce, ...
            raise ConfigError(f"eval_data_dirs: the folder names must differ from each other and from 'val' (got "
                              f"{name!r} twice or as 'val'); rename or link the folder")
        extra_val_data[name] = TokenWindows(d, "val", c.block_size)
        if read_meta(d).get("vocab_size", 0) > c.vocab_size:
            raise ConfigError(f"eval_data_dirs: {d} has a larger vocabulary than the model ({c.vocab_size})")
    data_rng = torch.Generator().manual_seed(c.seed)  # the same on every rank: each takes its slice of the batch

    def fetch(x, y):
        if device_type == "cuda":
            return x.pin_memory().to(c.device, non_blocking=True), y.pin_memory().to(c.device, non_blocking=True)
        return x.to(c.device), y.to(c.device)

    # model init / resume ---------------------------------------------------------
    gptconf = GPTConfig(**{k: getattr(c, k) for k in model_keys})
    model = GPT(gptconf)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif pretrained_dir is not None:
        model.load_state_dict(load_pretrained_state(pretrained_dir, c.block_size))
    model.to(c.device)
    mbe_layers = resolve_mbe_layers(c.mbe_layers, c.n_layer)
    layer_select, layer_index = layer_selection(c.mbe_layers, c.n_layer, c.device)

    gapt = GAPT(c.gapt_delta, c.gapt_tau, c.gapt_patience_memorize, c.gapt_patience_compress, c.gapt_delta_mbe_abs,
                c.gapt_ema)
    iter_num, best_val_loss = 0, math.inf

    # optimizer -------------------------------------------------------------------
    optimizers = build_optimizers(model, c, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    if checkpoint is not None:
        for opt, state in zip(optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(state)
        scaler.load_state_dict(checkpoint["scaler"])
        gapt.load_state_dict(checkpoint["gapt"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        data_rng.set_state(checkpoint["data_rng"])
        if len(checkpoint["rng"]) == world:
            torch.set_rng_state(checkpoint["rng"][rank]["cpu"])
            if device_type == "cuda" and checkpoint["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(checkpoint["rng"][rank]["cuda"])
        if master:
            print(f"resumed from {ckpt_path} at iter {iter_num} (phase {gapt.phase})")
    checkpoint = None  # free it

    # compile, DDP wrap -----------------------------------------------------------
    raw_model = model
    if c.compile:
        if master:
            print("compiling the model...")
        model = torch.compile(model)
    eval_model = model  # never the DDP wrapper: rank 0 alone may run task evaluations with it
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    def all_reduce_mean(t):
        if ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= world
        return t

    # eval / lr helpers -----------------------------------------------------------
    task_eval = None
    if meta.get("task") == "multiplication":
        import prepare_mult
        task_eval = prepare_mult.make_evaluator(c.data_dir, meta, c.device)
        if c.block_size < meta["eval_block_size"]:
            raise ConfigError(f"block_size {c.block_size} is shorter than the longest evaluation problem of "
                              f"{c.data_dir} ({meta['eval_block_size']} tokens); raise block_size")

    @torch.no_grad()
    def measure(windows):
        """CE and per-layer MBE on fixed windows of one val split (the same every eval, split over ranks)."""
        rng = torch.Generator().manual_seed(c.seed + 1)
        positions = windows.draw(c.eval_iters * c.batch_size, rng)[rank::world]
        sums = torch.zeros(2 + c.n_layer, device=c.device)  # rows, CE·rows, MBE·rows per layer
        for start in range(0, len(positions), c.batch_size):
            x, y = fetch(*windows.windows(positions[start:start + c.batch_size]))
            with autocast:
                _, ce, hidden = eval_model(x, y)
            layer_mbe = patched_mbe(hidden, c.mbe_patch_size, c.mbe_alpha, c.mbe_center)
            sums += torch.cat([torch.ones(1, device=c.device), ce.float().view(1), layer_mbe.float()]) * len(x)
        if ddp:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        mbe_all = (sums[2:] / sums[0]).tolist()
        return (sums[1] / sums[0]).item(), mbe_all, sum(mbe_all[i] for i in mbe_layers) / len(mbe_layers)

    def evaluate():
        """Validation CE and MBE (mean over the regularised layers, and per layer), the same on every
        eval_data_dirs corpus (as NAME_ce, NAME_mbe, NAME_mbe_layers), and the task's metrics if it has any."""
        raw_model.eval()
        val_ce, val_mbe_layers, val_mbe = measure(val_data)
        out = {"val_ce": val_ce, "val_mbe_layers": val_mbe_layers, "val_mbe": val_mbe}
        for name, windows in extra_val_data.items():
            ce, mbe_all, mbe_mean = measure(windows)
            out.update({f"{name}_ce": ce, f"{name}_mbe": mbe_mean, f"{name}_mbe_layers": mbe_all})
        raw_model.train()
        if task_eval is not None and master:
            raw_model.eval()
            with autocast:
                out.update(task_eval(eval_model))
            raw_model.train()
        return out

    def gather_rng_states():
        state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        if not ddp:
            return [state]
        states = [None] * world
        dist.all_gather_object(states, state)
        return states

    log_file = open(log_path, "a") if master else None

    def current_phase():
        return gapt.phase if c.gapt_mode == "gapt" else (2 if c.gapt_mode == "always" else 1)

    def log(record):
        record = {"iter": iter_num, "phase": current_phase(), **record}
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if wandb_run is not None:
            wandb_run.log(record, step=iter_num)

    wandb_run = None
    if c.wandb_log and master:
        import wandb
        wandb_run = wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=vars(c))

    # the loop --------------------------------------------------------------------
    if master:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, gapt_mode={c.gapt_mode}, "
              f"MBE on layers {mbe_layers} (patch {c.mbe_patch_size}, alpha {c.mbe_alpha})")
    first_bad_iter = torch.full((), -1, dtype=torch.long, device=c.device)  # first step with a non-finite loss
    log_sums = torch.zeros(3, device=c.device)  # steps, loss and CE summed over the log interval
    t_last, timed_steps = time.perf_counter(), 0
    last_align = None  # the latest CE/MBE gradient cosine, shown on the stdout line
    t_start = time.perf_counter()
    while True:
        if iter_num % c.eval_interval == 0 or iter_num >= c.max_iters or c.eval_only:
            metrics = evaluate()
            bad = int(first_bad_iter.item())
            if bad >= 0 or not math.isfinite(metrics["val_ce"]):
                raise FloatingPointError(f"non-finite loss at iter {bad if bad >= 0 else iter_num}; the last good "
                                         f"checkpoint in {c.out_dir} is left as it was")
            if master:
                extra = "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k not in
                                ("val_ce", "val_mbe"))
                print(f"eval iter {iter_num}: val CE {metrics['val_ce']:.4f} | val MBE {metrics['val_mbe']:.4f}{extra}")
                log({"kind": "eval", **metrics})
            improved = metrics["val_ce"] < best_val_loss
            best_val_loss = min(best_val_loss, metrics["val_ce"])
            rng_states = gather_rng_states()
            if master and iter_num > 0 and not c.eval_only and (improved or c.always_save_checkpoint):
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                    "scaler": scaler.state_dict(), "model_args": asdict(gptconf), "config": vars(c),
                    "iter_num": iter_num, "best_val_loss": best_val_loss, "gapt": gapt.state_dict(),
                    "data_rng": data_rng.get_state(), "rng": rng_states})
            t_last, timed_steps = time.perf_counter(), 0  # timing leaves evaluation out
        if iter_num >= c.max_iters or c.eval_only:
            break

        lr = get_lr(iter_num, c)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        phase = current_phase()
        regularise = phase == 2
        log_step = (iter_num + 1) % c.log_interval == 0 or iter_num + 1 == c.max_iters

        # one optimizer step: the whole global batch's windows come from data_rng; this rank takes its slices
        positions = train_data.draw(c.gradient_accumulation_steps * c.batch_size, data_rng)
        step_sums = torch.zeros(2 + c.n_layer, device=c.device)  # loss, CE, per-layer MBE summed over micro-steps
        x, y = fetch(*train_data.windows(positions[rank * micro_steps * c.batch_size:][:c.batch_size]))
        if c.align_interval and iter_num % c.align_interval == 0 and master:
            # rank 0 alone, on the plain module (no DDP hooks, so no collective): the others wait at the all-reduce
            t0 = time.perf_counter()
            with autocast:
                cos_all, cos_blocks = gradient_alignment(raw_model, x, y, c, layer_select)
            align_ms = (time.perf_counter() - t0) * 1000
            log({"kind": "align", "align_cos": cos_all, "align_cos_blocks": cos_blocks, "align_ms": align_ms})
            last_align = cos_all
        for micro in range(micro_steps):
            if ddp:
                model.require_backward_grad_sync = micro == micro_steps - 1  # what no_sync() does
            with autocast:
                _, ce, hidden = model(x, y, return_hidden=regularise or log_step)
            loss = ce
            if regularise:
                loss, layer_mbe = compression_loss(ce, hidden, c, layer_select, iter_num)
                step_sums[2:].index_add_(0, layer_index, layer_mbe.detach().float())
            elif log_step:  # memorization or baseline: MBE is only measured, on log steps, without gradients
                with torch.no_grad():
                    step_sums[2:] += patched_mbe(hidden.detach(), c.mbe_patch_size, c.mbe_alpha, c.mbe_center)
            step_sums[:2] += torch.stack([loss.detach(), ce.detach()]).float()
            if micro + 1 < micro_steps:  # prefetch the next micro-batch while this one computes
                start = (rank * micro_steps + micro + 1) * c.batch_size
                x, y = fetch(*train_data.windows(positions[start:start + c.batch_size]))
            scaler.scale(loss / micro_steps).backward()
        if c.grad_clip > 0:
            for opt in optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step_sums /= micro_steps
        first_bad_iter = torch.where((first_bad_iter < 0) & ~torch.isfinite(step_sums[0]),
                                     torch.full_like(first_bad_iter, iter_num), first_bad_iter)
        if c.gapt_mode == "gapt":  # the state machine sees the step's mean over micro-steps and ranks
            stats = all_reduce_mean(step_sums.clone() if regularise else step_sums[:2].clone()).tolist()
            if not math.isfinite(stats[0]):
                raise FloatingPointError(f"non-finite loss at iter {iter_num}; the last good checkpoint in "
                                         f"{c.out_dir} is left as it was")
            gapt.step(stats[1], [stats[2 + i] for i in mbe_layers] if regularise else None)
            if gapt.phase != phase:  # an exact record of every switch, for plots
                log({"kind": "switch", "iter": iter_num + 1, "phase": gapt.phase, "from_phase": phase,
                     **gapt.last_switch})
        log_sums += torch.cat([torch.ones(1, device=c.device), step_sums[:2]])
        iter_num += 1
        timed_steps += 1

        if log_step:
            totals = all_reduce_mean(torch.cat([log_sums, step_sums[2:]])).tolist()
            dt = (time.perf_counter() - t_last) / timed_steps
            loss_mean, ce_mean = totals[1] / totals[0], totals[2] / totals[0]  # means over the log interval
            mbe_all = totals[3:]  # measured on this step; in phase 1, for every layer; in phase 2, mbe_layers only
            mbe_mean = sum(mbe_all[i] for i in mbe_layers) / len(mbe_layers)
            tok_s = tokens_per_step / dt
            mfu = raw_model.estimate_mfu(tok_s, c.peak_flops)
            if not math.isfinite(loss_mean):
                raise FloatingPointError(f"non-finite loss at iter {int(first_bad_iter.item())}; the last good "
                                         f"checkpoint in {c.out_dir} is left as it was")
            if master:
                print(f"iter {iter_num}: loss {loss_mean:.4f} | CE {ce_mean:.4f} | MBE {mbe_mean:.4f} | phase "
                      f"{phase} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | {tok_s:,.0f} tok/s"
                      + (f" | MFU {mfu * 100:.1f}%" if mfu is not None else "")
                      + (f" | grad cos {last_align:+.3f}" if last_align is not None else ""))
                log({"kind": "train", "loss": loss_mean, "ce": ce_mean, "mbe": mbe_mean, "mbe_layers": mbe_all,
                     "lr": lr, "ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": mfu,
                     "phase": phase, "next_phase": gapt.phase,  # the phase this step trained in, and the next's
                     "gapt": gapt.state_dict() if c.gapt_mode == "gapt" else None})
            log_sums.zero_()
            t_last, timed_steps = time.perf_counter(), 0

    if log_file:
        log_file.close()
    if master and not c.eval_only:  # where to look next
        extra = "".join(f", {k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k not in
                        ("val_ce", "val_mbe"))
        phases = (f"; compressing on {gapt.compress_steps} of {iter_num} steps, {gapt.switches} phase switches"
                  if c.gapt_mode == "gapt" else "")
        print(f"\ndone: {iter_num} steps in {time.perf_counter() - t_start:.0f} s{phases}\n"
              f"final: val CE {metrics['val_ce']:.4f}, val MBE {metrics['val_mbe']:.4f}{extra}\n"
              f"checkpoint: {ckpt_path if os.path.exists(ckpt_path) else '(none written)'}\n"
              f"log: {log_path}\n"
              f"plot it: python plot.py {c.out_dir} -o {os.path.join(c.out_dir, 'gapt.png')}")
    if ddp:
        dist.barrier()  # every rank done (rank 0 may still be writing the checkpoint) before gloo/NCCL shut down
        dist.destroy_process_group()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        print("config keys and their defaults (README.md explains each):")
        print("\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        sys.exit(0)
    try:
        main(load_config(sys.argv[1:]))
    except (ConfigError, DataError, CheckpointError, PretrainedError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
