"""
What does GAPT cost per step? Times full training steps of the model a config describes, on random tokens.

    python bench.py                                         # the default (multiplication) model, ~1 minute on CPU
    python bench.py config/fineweb_gapt.py --batch_size=1 --device=cpu --compile=False --steps=5
    python bench.py config/fineweb_gapt.py --batch_size=16  # on a GPU: bf16 and compile as the config says

Variants, alternated step by step in one process so that machine drift affects them equally:
  (a) baseline           CE only
  (b) compress           CE + w·mean MBE over the regularised layers, patches of mbe_patch_size tokens (the
                         compressing micro-batch of algorithm1, later and project; paper_era's backpropagates one
                         layer's MBE alone, which costs less than (a)), the MBE as train.py computes it: with
                         compile=True compiled, its Gram products fused into reductions (mbe.py's fused=True)
  (e) compress_eager     (b) with the MBE eager, batched Gram matmuls (the path before fused; compile=False's)
  (c) compress_whole     the same with mbe_patch_size=0 (one matrix per sequence)
  (d) memorize           a paper_era memorization step of one micro-batch: CE, plus what its gate watches on a
                         step's last micro-batch: every layer's MBE without gradients, and the host sync of both
  (n) nanogpt            only with --nanogpt_dir=PATH (a checkout of github.com/karpathy/nanoGPT): a step of
                         ITS model.py and configure_optimizers at the same shapes, batch, dtype and compile, so the
                         baseline's throughput can be compared with nanoGPT's on the same machine
Every variant steps the config's optimizer (AdamW, or Muon + AdamW with optimizer="muon").

Then the paper-era default as train.py runs it (Step, micro_batch_loss and the GAPT gate, gradient_accumulation_steps
= N micro-batches per step, compiled per block with compile=True), interleaved the same way:
  (A) layout_baseline    N micro-batches of CE (gapt_mode="off")
  (M) layout_memorize    memorization: N of CE, the last also every layer's MBE without gradients, fed to the gate
  (C1) compress_mbe_first  compression, the counter odd: N-1 micro-batches of one block's MBE alone (each stops at its
                         block), then one of CE (the first of the two alternating kinds of compression step)
  (C2) compress_ce_first   compression, the counter even: N-1 of CE, then one of MBE alone (after a whole forward)
The compressed block rotates over the regularised ones from step to step, as in training. Memory on the CPU: the most
saved activations of any micro-batch of the step.
It also times the MBE of the stacked hidden states alone (forward + backward), the α=2 closed form against the
eigenvalue path (α=1) at --alpha_shape, and this machine's peak matmul FLOP/s, for the MFU column.
With --mbe_compiled=1 (the default when the config compiles) it also times that MBE as train.py runs it under
compile=True (compiled, fused reductions) and checks that value and gradient equal the eager path's; beside it, the
MBE's memory-traffic floor: on a GPU the eager MBE was 10% of a GPT-2 124M step (docs/performance.md).
--micro_batches=N makes every timed step N micro-batches of batch_size (then one optimizer step), as
gradient_accumulation_steps does in train.py (default 1: the worst case for (d)).
Bench flags: --steps, --warmup, --micro_batches, --alpha_shape=B,N,D (empty to skip), --alpha_threads, --nanogpt_dir,
--mbe_compiled (0, 1, or -1: as the config's compile), --layout_steps (timed rounds of (A)-(C2); 0: --steps); the
rest are train.py config.
"""

import importlib.util
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from mbe import compiled_patched_mbe, mbe, patched_mbe
from model import GPT, GPTConfig
from shards import read_meta
from configurator import ConfigError
from system import setup_compute
from gapt_versions import Step, layers_mbe
from train import GAPT, compile_every_variant, load_config, micro_batch_loss, regularised_layers

BENCH_FLAGS = {"steps": 20, "warmup": 3, "micro_batches": 1, "alpha_shape": "8,1024,768", "alpha_threads": 1,
               "nanogpt_dir": "", "mbe_compiled": -1, "layout_steps": 0}
STRING_FLAGS = ("alpha_shape", "nanogpt_dir")


def parse_args(argv):
    flags, rest = dict(BENCH_FLAGS), []
    for arg in argv:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if key in flags:
            value = arg.partition("=")[2]
            flags[key] = value if key in STRING_FLAGS else int(value)
        else:
            rest.append(arg)
    return SimpleNamespace(**flags), load_config(rest)


def sync(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device_type):
    sync(device_type)
    t0 = time.perf_counter()
    fn()
    sync(device_type)
    return time.perf_counter() - t0


def peak_matmul_flops(device, dtype, device_type, n=None, reps=10):
    """Best achieved FLOP/s of an n x n matmul in the run's dtype: the 'peak' that MFU is measured against."""
    n = n or (8192 if device_type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = min(timed(lambda: a @ b, device_type) for _ in range(reps))
    return 2 * n ** 3 / best


def activation_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn runs (CPU has no allocator statistics)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def load_nanogpt(nanogpt_dir, c, vocab_size, device_type):
    """nanoGPT's own GPT and AdamW from nanogpt_dir/model.py at our config's shapes (imported apart from ours)."""
    path = os.path.join(nanogpt_dir, "model.py")
    if not os.path.isfile(path):
        raise ConfigError(f"--nanogpt_dir={nanogpt_dir!r} has no model.py; point it at a checkout of "
                          f"https://github.com/karpathy/nanoGPT")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.GPT(module.GPTConfig(block_size=c.block_size, vocab_size=vocab_size, n_layer=c.n_layer,
                                        n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias))
    model = model.to(c.device)
    optimizer = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type)
    return model, optimizer


def warm_up_and_peak_memory(kinds, one_step, cpu_memory, warmup, device_type):
    """Warm-up (and compilation) first, then each kind's peak memory, one kind at a time: CUDA's allocator over one
    step, or cpu_memory(kind) on the CPU."""
    memory = {}
    for kind in kinds:
        for _ in range(warmup):
            one_step(kind)
        if device_type == "cuda":
            sync(device_type)
            torch.cuda.reset_peak_memory_stats()
            one_step(kind)
            memory[kind] = torch.cuda.max_memory_allocated()
        else:
            memory[kind] = cpu_memory(kind)
    return memory


def layout_rows(c, model, optimizers, autocast, device_type, vocab_size, bench):
    """The paper-era default's steps as train.py runs them: (A), (M), (C1), (C2) of the docstring, interleaved."""
    import copy
    c = SimpleNamespace(**{**vars(c), "gapt_version": "paper_era", "gapt_mode": "always"})
    N = max(2, c.gradient_accumulation_steps)
    c.gradient_accumulation_steps = N
    layers = regularised_layers(c.mbe_layers, c.n_layer, "paper_era")
    gate = GAPT.from_config(c, layers)
    gate.patience_memorize = 10 ** 9  # memorization never ends on its own
    if c.compile:
        compile_every_variant(model, gate, c, autocast)  # train.py's: blocks and head compiled apart, up front
    data = [torch.randint(vocab_size, (c.batch_size, c.block_size), device=c.device) for _ in range(N)]
    kinds = {"layout_baseline": ("off", 1, 0), "layout_memorize": ("gapt", 1, 0), "compress_mbe_first": ("always", 2, 1),
             "compress_ce_first": ("always", 2, 0)}  # gapt_mode, phase, the counter as the step begins
    rounds = [0]

    def one_step(kind, measure_memory=False):
        mode, phase, counter = kinds[kind]
        g = copy.deepcopy(gate)
        g.micro, g.layer = counter, rounds[0] % len(layers)
        step = Step(SimpleNamespace(**{**vars(c), "gapt_mode": mode}), phase, False, 0, 0, 1, lambda v: None)
        g.begin_step(step)
        most = 0
        for j in range(N):
            def micro():
                with autocast:
                    loss = micro_batch_loss(model, g, step, j, data[j], data[j])
                (loss / N).backward()
            most = max(most, activation_bytes(micro)) if measure_memory else micro() or 0
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return most

    times = {k: [] for k in kinds}
    memory = warm_up_and_peak_memory(kinds, one_step, lambda kind: one_step(kind, measure_memory=True), bench.warmup,
                                     device_type)
    for r in range(bench.layout_steps or bench.steps):
        rounds[0] = r
        for kind in kinds:
            times[kind].append(timed(lambda: one_step(kind), device_type))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"ms_median": med[k] * 1000, "ms_min": min(times[k]) * 1000, "ms_max": max(times[k]) * 1000,
                "ratio_to_baseline": med[k] / med["layout_baseline"],
                "memory_mb": memory[k] / 2 ** 20, "memory_ratio": memory[k] / memory["layout_baseline"]}
            for k in kinds}
    compress = (med["compress_mbe_first"] + med["compress_ce_first"]) / 2
    summary = {"micro_batches": N, "rows": rows, "compress_to_memorize": compress / med["layout_memorize"],
               "memorize_to_baseline": med["layout_memorize"] / med["layout_baseline"]}
    print(f"\nThe paper-era default as train.py runs it: {N} micro-batches per step, regularised blocks {layers}")
    print("| step | ms/step (median) | spread (min–max) | ratio to (A) | memory MB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for label, kind in zip(("A", "M", "C1", "C2"), kinds):
        row = rows[kind]
        print(f"| ({label}) {kind} | {row['ms_median']:.1f} | {row['ms_min']:.1f}–{row['ms_max']:.1f} | "
              f"{row['ratio_to_baseline']:.3f} | {row['memory_mb']:.1f} | {row['memory_ratio']:.3f} |")
    print(f"compression (mean of C1 and C2) / memorization (M): {summary['compress_to_memorize']:.3f}; "
          f"memorization / baseline: {summary['memorize_to_baseline']:.3f}")
    return summary


def main(argv):
    bench, c = parse_args(argv)
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if c.device.startswith("cuda") else c.device.split(":")[0]
    ptdtype, autocast = setup_compute(c, device_type)
    meta = read_meta(c.data_dir) if os.path.isdir(c.data_dir) else {}
    vocab_size = c.vocab_size or meta.get("vocab_size", 50304)
    torch.manual_seed(c.seed)
    model = GPT(GPTConfig(block_size=c.block_size, vocab_size=vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                          n_embd=c.n_embd, dropout=c.dropout, bias=c.bias)).to(c.device)
    optimizers = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type,
                                            muon=c.optimizer == "muon")  # the config's: AdamW, or Muon + AdamW
    forward = model.compile_parts() if c.compile else model  # compiled as train.py compiles it: block by block
    layers = regularised_layers(c.mbe_layers, c.n_layer, c.gapt_version)
    whole = SimpleNamespace(**{**vars(c), "mbe_patch_size": 0})
    eager_mbe = SimpleNamespace(**{**vars(c), "compile": False})  # layers_mbe's eager path
    gapt = GAPT(micro_batches=2, n_regularised=len(layers), patience_memorize=10 ** 9)  # never leaves memorization
    x = torch.randint(vocab_size, (c.batch_size, c.block_size), device=c.device)
    y = torch.randint(vocab_size, (c.batch_size, c.block_size), device=c.device)
    tokens = bench.micro_batches * c.batch_size * c.block_size  # per timed step
    variants = ["baseline", "compress"] + ["compress_eager"] * c.compile + ["compress_whole", "memorize"]
    labels = {"baseline": "a", "compress": "b", "compress_eager": "e", "compress_whole": "c", "memorize": "d",
              "nanogpt": "n"}
    if bench.nanogpt_dir:
        nano_model, nano_optimizer = load_nanogpt(bench.nanogpt_dir, c, vocab_size, device_type)
        nano_forward = torch.compile(nano_model) if c.compile else nano_model
        variants.append("nanogpt")

    def forward_loss(variant):
        if variant == "nanogpt":
            with autocast:
                return nano_forward(x, y)[1], None
        with autocast:
            _, ce, hidden = forward(x, y, return_hidden=variant != "baseline")
        if variant.startswith("compress"):
            settings = {"compress": c, "compress_eager": eager_mbe, "compress_whole": whole}[variant]
            return ce + c.mbe_weight * layers_mbe(hidden, layers, settings).mean(), ce
        if variant == "memorize":
            with torch.no_grad():
                return ce, (ce, layers_mbe(hidden, list(range(c.n_layer)), c))
        return ce, ce

    def train_step(variant):
        opts = [nano_optimizer] if variant == "nanogpt" else optimizers
        for micro in range(bench.micro_batches):  # (d) watches the step's last micro-batch only, as the trainer does
            last = micro == bench.micro_batches - 1
            loss, ce = forward_loss(variant if last or variant != "memorize" else "baseline")
            loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if variant == "memorize":
            watched = torch.cat([ce[0].detach().float().view(1), ce[1].float()]).tolist()  # one host sync
            gapt.step(watched[0], watched[1:])

    def cpu_memory(v):
        most = activation_bytes(lambda: forward_loss(v)[0].backward())
        for opt in [nano_optimizer] if v == "nanogpt" else optimizers:
            opt.zero_grad(set_to_none=True)
        return most

    times = {v: [] for v in variants}
    memory = warm_up_and_peak_memory(variants, train_step, cpu_memory, bench.warmup, device_type)
    for _ in range(bench.steps):  # the timed rounds: every variant once per round
        for v in variants:
            times[v].append(timed(lambda: train_step(v), device_type))

    # MBE alone: forward + backward of the regularised layers' patched MBE, as in a compression step
    with torch.no_grad(), autocast:
        hidden = forward(x, y, return_hidden=True)[2][layers[0]:layers[-1] + 1].detach()
    hidden.requires_grad_(True)

    def mbe_only(mbe_fn=patched_mbe):
        mbe_fn(hidden, c.mbe_patch_size, c.mbe_alpha, c.mbe_center).sum().backward()
    mbe_ms = statistics.median(timed(mbe_only, device_type) for _ in range(max(3, bench.steps))) * 1000
    mbe_compiled_ms = None
    if bench.mbe_compiled == 1 or (bench.mbe_compiled == -1 and c.compile):
        compiled_mbe = compiled_patched_mbe()  # the trainer's path with compile=True: fused reductions

        def value_and_grad(mbe_fn):
            hidden.grad = None
            value = mbe_fn(hidden, c.mbe_patch_size, c.mbe_alpha, c.mbe_center)
            value.sum().backward()
            return value.detach(), hidden.grad.clone()
        (eager_value, eager_grad), (compiled_value, compiled_grad) = map(value_and_grad, (patched_mbe, compiled_mbe))
        mbe_compiled_diff = (compiled_value - eager_value).abs().max().item()
        mbe_compiled_grad_diff = ((compiled_grad - eager_grad).abs().max() / eager_grad.abs().max()).item()
        for _ in range(2):  # compilation (forward and backward graphs)
            mbe_only(compiled_mbe)
        mbe_compiled_ms = statistics.median(timed(lambda: mbe_only(compiled_mbe), device_type)
                                            for _ in range(max(3, bench.steps))) * 1000
    # the memory-traffic floor of the MBE: forward reads the hidden states once, backward reads them and writes their
    # gradient: 1.5 x the time of one read and one write (an out-of-place multiply)
    floor_ms = 1.5 * statistics.median(timed(lambda: hidden.detach() * 2, device_type) for _ in range(5)) * 1000

    peak = peak_matmul_flops(c.device, ptdtype, device_type)
    flops_per_token = model.flops_per_token()
    base = statistics.median(times["baseline"])
    result = {"device": c.device, "device_name": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": c.dtype, "compile": c.compile, "optimizer": c.optimizer,
              "shape": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                        "batch_size": c.batch_size, "vocab_size": vocab_size, "params": model.get_num_params()},
              "mbe_patch_size": c.mbe_patch_size, "mbe_layers": str(c.mbe_layers), "steps": bench.steps,
              "peak_flops": peak, "memory_kind": "peak allocated" if device_type == "cuda" else "saved activations",
              "mbe_only_ms": mbe_ms, "mbe_only_compiled_ms": mbe_compiled_ms, "mbe_floor_ms": floor_ms,
              "variants": {}}
    print(f"{result['device_name']}, {result['threads']} threads, {c.dtype}, compile={c.compile}, {c.optimizer}; model "
          f"{c.n_layer}x{c.n_embd}, block {c.block_size}, batch {c.batch_size} ({model.get_num_params() / 1e6:.1f}M "
          f"params); {bench.steps} timed rounds; measured peak matmul {peak / 1e12:.3f} TFLOP/s\n")
    print(f"| variant | ms/step (median) | spread (min–max) | tokens/s | ratio to (a) | {result['memory_kind']} MB | "
          f"memory ratio | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        label = labels[v]
        med = statistics.median(times[v])
        mfu = flops_per_token * tokens / med / peak
        row = {"ms_median": med * 1000, "ms_min": min(times[v]) * 1000, "ms_max": max(times[v]) * 1000,
               "tokens_per_s": tokens / med, "ratio": med / base, "memory_mb": memory[v] / 2 ** 20,
               "memory_ratio": memory[v] / memory["baseline"], "mfu": mfu}
        result["variants"][v] = row
        print(f"| ({label}) {v} | {row['ms_median']:.1f} | {row['ms_min']:.1f}–{row['ms_max']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['ratio']:.3f} | {row['memory_mb']:.1f} | "
              f"{row['memory_ratio']:.3f} | {100 * mfu:.1f}% |")
    if "nanogpt" in times:
        print(f"\nnanoGPT ({bench.nanogpt_dir}) against our baseline: {result['variants']['nanogpt']['ratio']:.3f}x "
              f"its time per step (above 1: ours is faster)")
    print(f"\nMBE alone (forward + backward, {hidden.shape[0]} layers, patch {c.mbe_patch_size}): {mbe_ms:.2f} ms "
          f"= {mbe_ms / (base * 1000):.1%} of a baseline step")
    if mbe_compiled_ms is not None:
        result["mbe_compiled_max_abs_diff"] = mbe_compiled_diff
        result["mbe_compiled_grad_rel_diff"] = mbe_compiled_grad_diff
        print(f"MBE alone compiled, fused: {mbe_compiled_ms:.2f} ms = {mbe_compiled_ms / (base * 1000):.1%} of a "
              f"baseline step ({mbe_ms / mbe_compiled_ms:.2f}x faster than eager; values differ by at most "
              f"{mbe_compiled_diff:.1e}, gradients by {mbe_compiled_grad_diff:.1e} of their largest)")
    print(f"MBE memory-traffic floor (1.5 x one read and write of the hidden states): {floor_ms:.2f} ms")

    result["layout"] = layout_rows(c, model, optimizers, autocast, device_type, vocab_size, bench)

    if bench.alpha_shape:  # the α=2 closed form against the eigenvalue path, forward + backward
        B, N, D = (int(v) for v in bench.alpha_shape.split(","))
        threads = torch.get_num_threads()
        torch.set_num_threads(bench.alpha_threads)  # LAPACK's eigvalsh can be 100x slower with 2 threads here
        Z = torch.randn(B, N, D, device=c.device, requires_grad=True)
        path = {}
        for alpha in (2.0, 1.0):
            def fwd_bwd():
                mbe(Z, alpha).sum().backward()
            fwd_bwd()
            path[alpha] = statistics.median(timed(fwd_bwd, device_type) for _ in range(3)) * 1000
        torch.set_num_threads(threads)
        result["alpha_shape"] = [B, N, D]
        result["alpha_threads"] = bench.alpha_threads
        result["alpha2_ms"], result["eig_ms"] = path[2.0], path[1.0]
        print(f"MBE at (B={B}, N={N}, D={D}), forward + backward, {bench.alpha_threads} thread(s): α=2 closed form "
              f"{path[2.0]:.1f} ms, eigenvalue path (α=1) {path[1.0]:.1f} ms: {path[1.0] / path[2.0]:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e} (bench flags: {', '.join('--' + k for k in BENCH_FLAGS)})")
