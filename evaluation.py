"""
What a run reads, measures and prints, beside train.py's loop: its data (training windows, evaluation splits, the
task's own evaluation), the evaluation of every split, and its stdout lines. Not part of the algorithm.
"""

import glob
import os
import sys

import torch
import torch.distributed as dist

from configurator import ConfigError
from mbe import patched_mbe
from shards import DataError, TokenWindows, check_same_tokens, read_meta
from system import to_device


def load_data(c):
    """The training windows; every split an evaluation measures (train, val, test where prepared, and the val split of
    each eval_data_dirs corpus, named after its folder); the task's own evaluation, if the data has one."""
    if not os.path.isdir(c.data_dir):
        command = preparation_command(c.data_dir, [a for a in sys.argv[1:] if not a.startswith("--")])
        raise DataError(f"data directory {c.data_dir!r} does not exist; " + (
            f"prepare it with: {command}" if command else "create it with `python prepare_mult.py` (the "
            "multiplication task) or `python prepare_fineweb.py` (text), or set --data_dir"))
    meta = read_meta(c.data_dir)
    c.vocab_size = c.vocab_size or int(meta.get("vocab_size", 0))
    if not c.vocab_size:
        raise ConfigError(f"vocab_size=0 means 'read it from {c.data_dir}/meta.json', which has none; set --vocab_size")
    splits = {split: TokenWindows(c.data_dir, split, c.block_size, vocab_size=c.vocab_size) for split in
              ("train", "val", "test") if split != "test" or glob.glob(os.path.join(c.data_dir, "test_*.bin"))}
    for d in c.eval_data_dirs:
        check_same_tokens(c.data_dir, d)  # before the vocabulary check, whose advice would not apply
        splits[os.path.basename(os.path.normpath(d))] = TokenWindows(d, "val", c.block_size, vocab_size=c.vocab_size)
    task_eval = None
    if meta.get("task") == "multiplication":
        import prepare_mult
        task_eval = prepare_mult.make_evaluator(c.data_dir, meta, c.device, c.block_size)
    return splits["train"], splits, task_eval


def preparation_command(data_dir, config_files):
    """The command that prepares data_dir, as the config files' header comments give it (a `python prepare_...`
    line, with its continuation lines, that names --out_dir=data_dir), or None."""
    for path in config_files:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if "python prepare_" not in line:
                continue
            command = line.lstrip("# ").strip()
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].lstrip("# ").strip()
            if f"--out_dir={os.path.normpath(data_dir)}" in command.replace("--out_dir ", "--out_dir="):
                return command
    return None


@torch.no_grad()
def evaluate(model, splits, task_eval, mbe_layers, c, rank, world):
    """Mean CE and per-layer MBE of every split on fixed windows (the same at every eval, shared among processes),
    as SPLIT_ce, SPLIT_mbe (mean over the regularised layers) and SPLIT_mbe_layers; then the task's metrics."""
    model.eval()
    out = {}
    for name, windows in splits.items():
        positions = windows.draw(c.eval_iters * c.batch_size, torch.Generator().manual_seed(c.seed + 1))[rank::world]
        ce_sum, mbe_sum = torch.zeros(1, device=c.device), torch.zeros(c.n_layer, device=c.device)
        for start in range(0, len(positions), c.batch_size):
            x, y = to_device(*windows.windows(positions[start:start + c.batch_size]), c.device)
            _, ce, hidden = model(x, y, return_hidden=True)
            ce_sum += ce.float() * len(x)
            mbe_sum += patched_mbe(hidden, c.mbe_patch_size, c.mbe_alpha, c.mbe_center).float() * len(x)
        rows = torch.tensor([float(len(positions))], device=c.device)
        for t in (ce_sum, mbe_sum, rows) if world > 1 else ():
            dist.all_reduce(t)
        mbe_all = (mbe_sum / rows).tolist()
        out.update({f"{name}_ce": (ce_sum / rows).item(), f"{name}_mbe_layers": mbe_all,
                    f"{name}_mbe": sum(mbe_all[i] for i in mbe_layers) / len(mbe_layers)})
    if task_eval is not None and rank == 0:
        out.update(task_eval(model))
    model.train()
    return out


def setup_line(c, model, mbe_layers, world, micro_steps, device_type):  # the run's shape, printed at its start
    return (f"{model.get_num_params() / 1e6:.2f}M parameters, gapt_mode={c.gapt_mode}, MBE on layers {mbe_layers} "
            f"(patch {c.mbe_patch_size}, alpha {c.mbe_alpha}); tokens per step "
            f"{c.gradient_accumulation_steps * c.batch_size * c.block_size:,} ({world} process(es) x {micro_steps} "
            f"micro-steps x {c.batch_size} x {c.block_size}), device {c.device}, dtype {c.dtype}"
            + (" (float16 on a CPU is about 10x slower than float32)" if device_type == "cpu" and c.dtype == "float16"
               else ""))


def summary_lines(c, metrics, iter_num):  # the end of a run: its final metrics and where to look next
    return ("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            + f"\ncheckpoint: {c.out_dir}/ckpt.pt{'' if iter_num else ' (none: no step was trained)'}\n"
            f"log: {c.out_dir}/log.jsonl\nplot it: python plot.py {c.out_dir} -o {c.out_dir}/gapt.png")


def train_line(r, align):  # the stdout line of a train record
    return (f"iter {r['iter']}: loss {r['loss']:.4f} | CE {r['ce']:.4f} | MBE {r['mbe']:.4f} | phase {r['phase']} | "
            f"lr {r['lr']:.2e} | {r['ms_per_iter']:.1f} ms/iter | {r['tokens_per_s']:,.0f} tok/s"
            + (f" | MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "")
            + (f" | grad cos {align:+.3f}" if align is not None else ""))
