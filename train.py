"""
Train a GPT-2 with or without GAPT (Gated Phase Transition, arXiv 2505.08727), on one process or under torchrun.

    python train.py                                   # the built-in default: GAPT on the multiplication task
    python train.py config/mult_baseline.py --max_iters=500 --device=cpu
    torchrun --standalone --nproc_per_node=8 train.py config/fineweb_gapt.py

Arguments are config files (plain Python assignments, applied in order) and --key=value overrides (configurator.py).
Read top to bottom: the defaults, the GAPT state machine, the compression loss, then main(): setup, data, model,
optimizer, and the training loop with its evaluations, logs and checkpoints.
"""

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from alignment import gradient_alignment
from checkpoint import MODEL_KEYS, absolute_paths, clear_run, finite_json, open_run, restore, rng_states, save_checkpoint
from configurator import ConfigError, explicit_keys, load_config as parse_config
from gapt_versions import (VERSIONS, Step, common_settings, gate_state_dict, layers_mbe, load_gate_state, middle_blocks,
                           record_switch, register, step_means)
from hub import load_pretrained_state
from model import GPT, GPTConfig
from evaluation import evaluate, load_data, setup_line, summary_lines, train_line
from system import (all_reduce_mean, micro_steps_per_process, run_main, setup_compute, setup_processes, start_wandb,
                    step_optimizers, to_device)

# -----------------------------------------------------------------------------
# Defaults: GAPT on the multiplication task (python prepare_mult.py first), small enough for a laptop CPU.
DEFAULTS = dict(
    # I/O
    out_dir="out-mult-gapt",
    eval_interval=250,  # evaluate (and checkpoint) every this many optimizer steps, and at the end
    log_interval=50,  # one stdout line and one log.jsonl record every this many steps
    eval_iters=20,  # batches (of batch_size sequences) per split and evaluation
    eval_only=False,  # evaluate the run in out_dir (or the init_from model) once, print, and exit; writes nothing
    always_save_checkpoint=True,  # False: write ckpt.pt only when the validation CE improved
    init_from="scratch",  # "scratch", "resume" (out_dir/ckpt.pt), "gpt2" ... "gpt2-xl", or a Hub-layout folder
    overwrite_out_dir=False,  # True: a scratch run may replace the run already in out_dir (its ckpt.pt and log)
    seed=1337,
    wandb_log=False,
    wandb_project="gapt",
    wandb_run_name="run",
    # data
    data_dir="data/mult",  # train_*.bin / val_*.bin (and optionally test_*.bin) token shards and meta.json
    eval_data_dirs=[],  # more prepared directories whose val split every eval measures too (logged as NAME_ce)
    vocab_size=0,  # 0: read it from data_dir/meta.json
    batch_size=16,  # sequences per micro-batch, per process
    block_size=32,
    gradient_accumulation_steps=4,  # micro-batches per optimizer step over all processes (divided by the world size)
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
    warmup_iters=100,  # a run shorter than this warms up over all of it
    lr_decay_iters=0,  # 0: decay over all max_iters
    min_lr=3e-4,
    # GAPT (docs/gapt_versions.md: each version's rules, where the author's code has them, and which keys it reads)
    gapt_mode="gapt",  # "off" (CE only), "gapt" (the gate), "always" (compress every step), "random"
    gapt_version="paper_era",  # a registered version (gapt_versions.py): "paper_era" (train_pcgrad.py), "algorithm1", ...
    gapt_random_share=0.3,  # gapt_mode="random": the share of steps, drawn at random, that compress
    mbe_weight=1.0,  # w: paper_era w·MBE of one layer; algorithm1 CE + w·mean MBE; later CE + max(w·mean MBE, 1e-5)
    mbe_alpha=2.0,  # Rényi order α of the matrix-based entropy
    mbe_patch_size=8,  # tokens per MBE matrix (0: the whole sequence)
    mbe_layers="auto",  # "auto" (the version's regularised blocks), "rotate" (project only), or a list of indices
    mbe_center=False,  # subtract each patch's mean token before the MBE
    gapt_delta=0.01,  # CE progress: a drop of more than this (absolute: paper_era, algorithm1; relative: the others)
    gapt_delta_mbe=0.002,  # MBE progress, likewise (paper_era, later; algorithm1 uses gapt_delta, project below)
    gapt_tau=0.1,  # a CE above (1 + tau) x the best CE ends compression (ce_spike; each version's own best)
    gapt_patience_memorize=125,  # steps without CE progress before compression (later: micro-batches)
    gapt_patience_compress=125,  # steps without MBE progress before memorization (later: micro-batches)
    gapt_count_mbe_progress=True,  # paper_era: False never counts MBE progress (the later RRScheduler copies)
    mbe_floor=0.0,  # project: the compression loss is CE + w · relu(MBE − floor)
    gapt_delta_mbe_abs=0.0,  # project: > 0 makes MBE progress an absolute drop of more than this
    gapt_ema=0.0,  # project: > 0, the gate sees running means of CE and MBE (new value weighted 1 - gapt_ema)
    # system
    device="auto",  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype="auto",  # "auto" (bfloat16 on CUDA where supported, else float16 on CUDA, float32 on CPU), or explicit
    compile=False,  # torch.compile the model
    num_threads=0,  # torch CPU threads per process; 0 keeps torch's default
    deterministic=False,  # True: deterministic kernels (slower on CUDA), so that reruns and resumes repeat bit for bit
    ddp_timeout=600,  # seconds a process waits for the others (torchrun) before every process stops with an error
    peak_flops=0.0,  # the hardware's peak FLOP/s for the MFU column; 0 leaves MFU out (bench.py measures one)
    align_interval=0,  # every this many steps, log the cosine between the CE and MBE gradients (0 = off)
)


def load_config(args):
    return parse_config(args, DEFAULTS, __doc__)


# -----------------------------------------------------------------------------
# GAPT as the author's training code of the paper's time ran it (gapt_version="paper_era"). The other versions, and
# the face every version shows the loop: gapt_versions.py; where each rule was read: docs/gapt_versions.md

@register
class GAPT:
    """RRScheduler (fangyuan-ksgk/mod_gpt src/utils.py) as train_pcgrad.py --switch_phase drives it. Memorization
    (phase 1) backpropagates CE; in compression (phase 2) each micro-batch backpropagates either CE alone or one
    regularised layer's MBE alone (times mbe_weight), by a counter over the step's micro-batches (compressed_layer).

    step(ce, mbe) runs once per optimizer step, on the step's last micro-batch before its backward, with that
    micro-batch's CE and the MBE of every layer. It advances the counter (which wraps at micro_batches; at each wrap
    the compressed layer moves on to the next regularised one), then:
    - updates the best CE and each layer's MBE minimum, and counts both counters, on every step in both phases:
      s_m restarts when the best CE minus CE exceeds delta, s_c when some layer's MBE is more than delta_mbe below
      its own minimum (absolute; a best of +inf is no progress; a non-finite MBE leaves its minimum as it was, as the
      author's min(best, mbe) does);
    - phase 2 -> 1 when CE >= (1 + tau) * the best CE, tested before it is updated (ce_spike: the best restarted
      when compression began), or when s_c reaches patience_compress (mbe_patience); s_m and the MBE minima restart;
    - phase 1 -> 2 when s_m reaches patience_memorize (ce_plateau); s_c and the best CE restart.
    count_mbe_progress=False: the later copies of RRScheduler, which train_pcgrad.py's arguments select, never count
    MBE progress, so a compression phase lasts patience_compress steps unless CE spikes."""
    name, description = "paper_era", "the author's training code of the paper's time (mod_gpt train_pcgrad.py + " \
                                     "RRScheduler)"
    own_keys, layer_words = ("gapt_delta_mbe", "gapt_count_mbe_progress"), ("auto",)
    settings = ("micro_batches", "n_regularised", "count_mbe_progress", "delta", "delta_mbe", "tau",
                "patience_memorize", "patience_compress", "mbe_weight", "layers")  # from the config; the rest: state
    state_dict, load_state_dict = gate_state_dict, load_gate_state

    def __init__(self, *, micro_batches, n_regularised, delta=0.01, delta_mbe=0.002, tau=0.1, patience_memorize=125,
                 patience_compress=125, count_mbe_progress=True, mbe_weight=1.0, layers=()):
        self.micro_batches, self.n_regularised, self.count_mbe_progress = micro_batches, n_regularised, \
            count_mbe_progress
        self.delta, self.delta_mbe, self.tau = delta, delta_mbe, tau
        self.patience_memorize, self.patience_compress = patience_memorize, patience_compress
        self.mbe_weight, self.layers = mbe_weight, list(layers)
        # the state: everything below (every attribute that is not a setting) is saved by state_dict
        self.phase = 1
        self.ce_min = math.inf  # the best CE since compression last began
        self.mbe_min = None  # per-layer MBE minima since memorization last began (+inf after a reset)
        self.s_m, self.s_c, self.switches = 0, 0, 0  # steps without CE progress, without MBE progress; switches
        self.micro = 0  # the author's current_accumulation_step
        self.layer = 0  # which regularised layer compression backpropagates (an index into them)
        self.last_switch = None  # why the latest step switched phase (None if it did not)

    def compressed_layer(self, phase):
        """The regularised layer (an index into them) whose MBE alone a micro-batch backpropagates, or None: CE."""
        return self.layer % self.n_regularised if phase == 2 and self.micro % 2 == 1 else None  # (a resume may
        # regularise other layers)

    def advance(self):  # the counter alone: what every step does, whether or not the gate switches
        self.micro = (self.micro + 1) % self.micro_batches
        if self.micro == 0:
            self.layer = (self.layer + 1) % self.n_regularised

    def step(self, ce, mbe):
        self.last_switch = None
        self.advance()
        ce, mbe = float(ce), [float(m) for m in mbe]
        ce_min_before, ce_gain = self.ce_min, max(0.0, self.ce_min - ce)
        spike = ce >= self.ce_min * (1 + self.tau)
        self.ce_min = min(self.ce_min, ce)
        self.mbe_min = self.mbe_min or [math.inf] * len(mbe)
        mbe_gain = max([0.0] + [best - m for m, best in zip(mbe, self.mbe_min)]) if self.count_mbe_progress else 0.0
        if self.count_mbe_progress:
            self.mbe_min = [min(best, m) for m, best in zip(mbe, self.mbe_min)]
        self.s_m = 0 if self.delta < ce_gain < math.inf else self.s_m + 1
        self.s_c = 0 if self.delta_mbe < mbe_gain < math.inf else self.s_c + 1
        if self.phase == 2 and (spike or self.s_c >= self.patience_compress):
            record_switch(self, 1, "ce_spike" if spike else "mbe_patience", ce=ce, ce_min=ce_min_before,
                          ce_limit=ce_min_before * (1 + self.tau), mbe=mbe, mbe_min=self.mbe_min,
                          steps_without_progress=self.s_c)
            self.s_m, self.mbe_min = 0, None
        elif self.phase == 1 and self.s_m >= self.patience_memorize:
            record_switch(self, 2, "ce_plateau", ce=ce, ce_min=self.ce_min, steps_without_progress=self.s_m)
            self.s_c, self.ce_min = 0, math.inf
        return self.phase

    # the face the loop sees (gapt_versions.py) ------------------------------------------------------------------
    @staticmethod
    def auto_layers(n_layer):  # blocks 2 ... L-3: the author's start_layer=2, end_layer=n_layer-2
        return list(range(2, n_layer - 2)) if n_layer >= 5 else middle_blocks(n_layer)

    @staticmethod
    def check(c):
        if c["gapt_mode"] != "off" and c["gradient_accumulation_steps"] < 2:
            raise ConfigError("gapt_version='paper_era' compresses on odd micro-batches of a step, so with "
                              "gradient_accumulation_steps=1 it never compresses: give it 2 or more (the author ran "
                              "4-8; divide batch_size to keep the tokens per step), or choose another gapt_version")

    @classmethod
    def from_config(cls, c, layers):
        return cls(**common_settings(c), micro_batches=c.gradient_accumulation_steps, n_regularised=len(layers),
                   delta_mbe=c.gapt_delta_mbe, count_mbe_progress=c.gapt_count_mbe_progress, layers=layers)

    def begin_step(self, step):  # micro-batches 0 ... N-2 use the counter as the step begins
        step.layer_before = self.compressed_layer(step.phase)

    def depth(self, step, j):  # micro-batches 0 ... N-2 that backpropagate one block's MBE alone stop at that block
        return None if j == step.N - 1 or step.layer_before is None else self.layers[step.layer_before] + 1

    def micro_batch(self, step, j, ce, hidden):
        """The step's last micro-batch shows the gate its CE and every layer's MBE (without gradients); the gate steps
        (or, when not gated, only its counter advances) on each process's last micro-batch, before its backward: the
        signal, which one process holds, summed over all. Then CE alone, or one layer's MBE alone."""
        last = j == step.N - 1
        step.measure(hidden, list(range(step.n_layer)) if last and (step.gated or step.log_step) else [], grad=False)
        if step.last_here(j) and step.gated:
            mine = torch.cat([ce.detach().float().view(1), step.mbe_sum]) if last else torch.zeros(1 + step.n_layer,
                                                                                                  device=hidden.device)
            signal = step.sum_over_processes(mine)
            step.check_finite(signal[0].item())
            self.step(signal[0].item(), signal[1:].tolist())
        elif step.last_here(j):
            self.advance()
        layer = step.layer_before if not last else self.compressed_layer(self.phase if step.gated else step.phase)
        if layer is None:
            return ce
        return step.with_every_parameter(self.mbe_weight * step.measure(hidden, [self.layers[layer]], grad=True,
                                                                        count=False).sum())

    def end_step(self, step):  # the gate stepped within the step
        return [(step.phase, self.last_switch)] if step.gated and self.last_switch else []


def phase_of_step(c, gapt, iter_num):
    """1 = memorization (loss = CE), 2 = compression, by gapt_mode. "random" compresses on a random share of the
    steps, drawn per step from (seed, step): the same on every process and after a resume."""
    if c.gapt_mode == "gapt":
        return gapt.phase
    if c.gapt_mode == "random":
        return 2 if random.Random(f"{c.seed}:{iter_num}").random() < c.gapt_random_share else 1
    return 2 if c.gapt_mode == "always" else 1


def regularised_layers(mbe_layers, n_layer, version):
    """The blocks whose residual stream compression sees, as a sorted list of indices: a word ("auto", "rotate")
    gives the version's own (auto_layers), a list is checked against the model's depth."""
    if isinstance(mbe_layers, str):
        return VERSIONS[version].auto_layers(n_layer)
    if not all(0 <= i < n_layer for i in mbe_layers):
        raise ConfigError(f"mbe_layers {list(mbe_layers)} must be indices in [0, n_layer={n_layer})")
    return sorted(set(mbe_layers))


def micro_batch_loss(model, gapt, step, j, x, y):
    """Micro-batch j of the step as its GAPT version asks: the forward pass it needs (the whole model, or blocks
    0 ... l alone for block l's MBE alone), then the loss it backpropagates (the version measures the MBE it needs on
    the way); its loss, and its CE where it computed one, added to the step's."""
    depth = gapt.depth(step, j)
    _, ce, hidden = model(x, y if depth is None else None, return_hidden=True, n_blocks=depth)
    loss = gapt.micro_batch(step, j, ce, hidden)
    ce_and_share = torch.stack([ce.detach().float(), torch.ones_like(ce, dtype=torch.float)]) if ce is not None \
        else torch.zeros(2, device=loss.device)
    step.loss += torch.cat([loss.detach().float().view(1), ce_and_share]) / step.micro_steps
    return loss


def compile_every_variant(model, gapt, c, autocast):
    """Run, forward and backward, every kind of micro-batch the version will ask for (both phases, both ends of a
    step, two steps in a row for counters that alternate) and the evaluation's forward once on a dummy batch, so
    that each process compiles them all before the first step rather than when a kind first comes up, while the
    other processes wait inside a collective. Changes nothing: the gate is a copy, the RNG streams are put back and
    the gradients dropped."""
    rng = torch.get_rng_state(), torch.cuda.get_rng_state() if c.device.startswith("cuda") else None
    x = torch.zeros(c.batch_size, c.block_size, dtype=torch.long, device=c.device)
    for phase in (1, 2):
        gate = copy.deepcopy(gapt)
        for it in range(2):
            step = Step(c, phase, True, it, 0, 1, lambda value: None)
            gate.begin_step(step)
            for j in sorted({0, step.N - 1}):
                with autocast:
                    loss = micro_batch_loss(model, gate, step, j, x, x)
                loss.backward()
    with torch.no_grad(), autocast:
        _, ce, hidden = model(x, x, return_hidden=True)
        layers_mbe(hidden, list(range(c.n_layer)), c)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1])


def get_lr(it, c):
    """Linear warm-up (over warmup_iters, or the whole run if shorter), then cosine decay to min_lr at lr_decay_iters
    (max_iters if 0), then min_lr."""
    if not c.decay_lr:
        return c.learning_rate
    warmup = min(c.warmup_iters, c.max_iters)
    if it < warmup:
        return c.learning_rate * (it + 1) / (warmup + 1)
    decay_iters = c.lr_decay_iters or c.max_iters
    if it > decay_iters:
        return c.min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


# -----------------------------------------------------------------------------

def main(c):  # setup_processes, setup_compute, open_run and load_data complete c: device, dtype, model shape, vocab
    ddp, rank, local_rank, world = setup_processes(c)
    master = rank == 0
    device_type = "cuda" if c.device.startswith("cuda") else c.device.split(":")[0]
    # out_dir: the run to resume or evaluate, or a fresh one; the model's shape from a checkpoint or OpenAI's GPT-2.
    # From here on c is complete: nothing above reads a setting a resume may bring back
    checkpoint, pretrained_dir = open_run(c, DEFAULTS, explicit_keys(sys.argv[1:]))
    N = c.gradient_accumulation_steps  # micro-batches per optimizer step, over all processes
    micro_steps = micro_steps_per_process(c, world)
    tokens_per_step = N * c.batch_size * c.block_size
    ptdtype, autocast = setup_compute(c, device_type)
    torch.manual_seed(c.seed + rank)  # dropout differs per rank; the data order does not (data_rng below)
    if master:  # (a resume has named what this command changes first)
        print(f"gapt_mode={c.gapt_mode}: " + ("CE only" if c.gapt_mode == "off" else
                                             f"gapt_version={c.gapt_version}, {VERSIONS[c.gapt_version].description}"))
    mbe_layers = regularised_layers(c.mbe_layers, c.n_layer, c.gapt_version)  # now that the model's depth is known

    train_data, eval_splits, task_eval = load_data(c)
    data_rng = torch.Generator().manual_seed(c.seed)  # the same on every rank: each takes its slice of the batch

    # model, optimizer, GAPT; everything else a checkpoint holds
    gptconf = GPTConfig(**{k: getattr(c, k) for k in MODEL_KEYS})
    model = GPT(gptconf)
    if checkpoint is not None or pretrained_dir is not None:
        model.load_state_dict(checkpoint["model"] if checkpoint else
                              load_pretrained_state(pretrained_dir, c.block_size))
    model.to(c.device)
    optimizers = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type,
                                            muon=c.optimizer == "muon")
    scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    gapt = VERSIONS[c.gapt_version].from_config(c, mbe_layers)  # the version's gate: the loop asks it
    iter_num, best_val_loss, compress_steps, interval = 0, math.inf, 0, [0.0, 0.0, 0.0, 0]
    if checkpoint is not None and not c.eval_only:
        iter_num, best_val_loss = restore(checkpoint, optimizers, scaler, gapt, data_rng, rank, world, device_type)
        compress_steps, interval = checkpoint.get("compress_steps", 0), checkpoint.get("interval", interval)
        if len(interval) == 3:  # a checkpoint from before the CE's share: every micro-batch computed its CE
            interval = interval[:2] + [float(interval[2]), interval[2]]
        if master:
            print(f"resumed from {c.out_dir}/ckpt.pt at iter {iter_num} (phase {gapt.phase})")
    resumed_at, checkpoint = (iter_num if checkpoint is not None else None), None  # free the checkpoint

    raw_model = model
    if c.compile:  # every block and the head apart, each variant compiled now on every process (not mid-run)
        compile_every_variant(model.compile_parts(), gapt, c, autocast)
    eval_model = model  # never the DDP wrapper: rank 0 alone runs the task evaluation with it
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    def log(record):  # one JSON object per line in log.jsonl (and wandb)
        record = {"iter": iter_num, "phase": phase_of_step(c, gapt, iter_num), **record}
        if log_file:
            log_file.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
            log_file.flush()
        if wandb_run is not None:
            wandb_run.log(record, step=iter_num)

    if c.eval_only:
        with autocast:
            metrics = evaluate(eval_model, eval_splits, task_eval, mbe_layers, c, rank, world)
        if master:
            print(json.dumps(metrics))
        return
    if master and resumed_at is None and c.overwrite_out_dir:
        clear_run(c.out_dir)  # only now that every setting, the data and the model have been checked
    log_file = open(os.path.join(c.out_dir, "log.jsonl"), "a") if master else None
    wandb_run = start_wandb(c) if c.wandb_log and master else None
    if master:
        print(setup_line(c, raw_model, mbe_layers, world, micro_steps, device_type))

    # the training loop ----------------------------------------------------------------------------------------
    interval_loss = torch.tensor(interval[:3], device=c.device)  # Step.loss summed over this log interval's steps
    interval_steps, t_last, t_start, last_align = interval[3], time.perf_counter(), time.perf_counter(), None

    def stop_if_not_finite(value):  # at each log line, eval, and (gapt_mode="gapt") step
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at iter {iter_num} (or since the log line before it); " + (
                f"the last good checkpoint in {c.out_dir} is left as it was" if os.path.exists(
                    os.path.join(c.out_dir, "ckpt.pt")) else "no checkpoint was written yet (lower the learning rate)"))

    while True:
        # one log, one step axis: evaluate, log and checkpoint (with the open log interval) every eval_interval steps
        # and at the end, but not again at the step a resume starts from (the log holds its eval)
        if (iter_num % c.eval_interval == 0 or iter_num >= c.max_iters) and iter_num != resumed_at:
            t_eval = time.perf_counter()
            with autocast:
                metrics = evaluate(eval_model, eval_splits, task_eval, mbe_layers, c, rank, world)
            stop_if_not_finite(metrics["val_ce"])
            if master:
                print(f"eval iter {iter_num}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                             if isinstance(v, float)))
                log({"kind": "eval", **metrics})
            improved, best_val_loss = metrics["val_ce"] < best_val_loss, min(best_val_loss, metrics["val_ce"])
            rngs = rng_states(ddp, world, device_type)  # collectives: every process joins them
            interval = all_reduce_mean(interval_loss.clone(), world).tolist() + [interval_steps]
            if master and iter_num > 0 and (improved or c.always_save_checkpoint):
                save_checkpoint(os.path.join(c.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                    "scaler": scaler.state_dict(), "model_args": asdict(gptconf),
                    "config": {**vars(c), **absolute_paths(c)},
                    "iter_num": iter_num, "best_val_loss": best_val_loss, "gapt": gapt.state_dict(),
                    "compress_steps": compress_steps, "data_rng": data_rng.get_state(), "rng": rngs,
                    "interval": interval})
            t_last += time.perf_counter() - t_eval  # the step timing leaves evaluation out
        if iter_num >= c.max_iters:
            break

        lr = get_lr(iter_num, c)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        phase = phase_of_step(c, gapt, iter_num)
        compress_steps += phase == 2
        log_step = (iter_num + 1) % c.log_interval == 0 or iter_num + 1 == c.max_iters  # log after this step

        # one optimizer step of N micro-batches over all processes (micro-batch j = rank * micro_steps + micro): the
        # whole global batch's windows come from data_rng; this rank takes its slices
        positions = train_data.draw(N * c.batch_size, data_rng)
        my_positions = positions[rank * micro_steps * c.batch_size:][:micro_steps * c.batch_size]
        x, y = to_device(*train_data.windows(my_positions[:c.batch_size]), c.device)
        if c.align_interval and iter_num % c.align_interval == 0 and master:
            # rank 0 alone, on the plain module (no DDP hooks, so no collective): the others wait at the all-reduce
            with autocast:
                record = gradient_alignment(raw_model, x, y, lambda h: layers_mbe(h, mbe_layers, c).mean())
            log({"kind": "align", **record})
            last_align = record["align_cos"]
        step = Step(c, phase, log_step, iter_num, rank, world, stop_if_not_finite, raw_model if ddp else None)
        gapt.begin_step(step)
        for micro in range(micro_steps):
            j = rank * micro_steps + micro  # the micro-batch's place in the step, over all processes
            if ddp:
                model.require_backward_grad_sync = micro == micro_steps - 1  # what no_sync() does
            with autocast:
                loss = micro_batch_loss(model, gapt, step, j, x, y)
            if micro + 1 < micro_steps:  # fetch the next micro-batch while this one computes
                x, y = to_device(*train_data.windows(my_positions[(micro + 1) * c.batch_size:][:c.batch_size]),
                                 c.device)
            scaler.scale(loss / micro_steps).backward()
        step_optimizers(optimizers, scaler, raw_model, c.grad_clip)
        for from_phase, switch in gapt.end_step(step):  # the gates fed after the step; every switch, for plots
            log({"kind": "switch", "iter": iter_num + 1, "phase": 3 - from_phase, "from_phase": from_phase, **switch})
        interval_loss += step.loss
        iter_num, interval_steps = iter_num + 1, interval_steps + 1

        if log_step:
            loss_mean, ce_mean, mbe_now = step_means(interval_loss / interval_steps, step.mbe_sum,
                                                     step.mbe_count, world)
            stop_if_not_finite(loss_mean)
            dt = (time.perf_counter() - t_last) / interval_steps
            record = {"iter": iter_num, "kind": "train", "loss": loss_mean, "ce": ce_mean,
                      "mbe": sum(mbe_now[i] or 0.0 for i in mbe_layers) / len(mbe_layers),
                      "mbe_layers": mbe_now,  # None: a layer this step did not measure
                      "lr": lr, "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_step / dt,
                      "mfu": raw_model.estimate_mfu(tokens_per_step / dt, c.peak_flops), "phase": phase,
                      "next_phase": phase_of_step(c, gapt, iter_num), "compress_steps": compress_steps,
                      "gapt": gapt.state_dict() if c.gapt_mode == "gapt" else None}
            if master:
                print(train_line(record, last_align))
                log(record)
            if iter_num % c.log_interval == 0:  # a last line off the grid leaves the interval open (for a resume)
                interval_loss.zero_()
                t_last, interval_steps = time.perf_counter(), 0

    if master:  # where to look next
        log_file.close()
        if wandb_run is not None:
            wandb_run.finish()
        print(f"\ndone: {iter_num} steps in {time.perf_counter() - t_start:.0f} s; compressing on {compress_steps} of "
              f"{iter_num} steps" + (f", {gapt.switches} phase switches" if c.gapt_mode == "gapt" else "") + "\n"
              + summary_lines(c, metrics, iter_num))
    if ddp:
        dist.barrier()  # every rank done (rank 0 may still be writing the checkpoint) before gloo/NCCL shut down


if __name__ == "__main__":
    run_main(main, load_config, sys.argv[1:])  # a bad input, a stalled process or Ctrl-C: one line that says what to do
