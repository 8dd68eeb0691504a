"""
A run's out_dir: its checkpoint (ckpt.pt) and its log (log.jsonl). Reading, writing and resuming them, so that a run
killed at any moment resumes exactly and a damaged file is one clear error. Not part of the algorithm: train.py
calls these.
"""

import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from configurator import ConfigError, validate
from hub import pretrained_config, pretrained_folder
from shards import lock_folder


class CheckpointError(RuntimeError):
    pass


CHECKPOINT_KEYS = ("model", "optimizers", "scaler", "model_args", "config", "iter_num", "best_val_loss", "gapt",
                   "data_rng", "rng")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
SHAPE_KEYS = tuple(k for k in MODEL_KEYS if k != "dropout")  # what the weights fix (dropout may change on resume)


# what a resume takes from this command, not from the checkpoint: how and where this process runs
RUNTIME_KEYS = ("init_from", "eval_only", "overwrite_out_dir", "out_dir", "device", "dtype", "compile", "num_threads",
                "ddp_timeout", "wandb_log", "wandb_project", "wandb_run_name", "peak_flops", "deterministic")


def open_run(c, defaults, explicit=()):
    """What train.py starts from, given c.init_from and c.out_dir: (the checkpoint to resume or evaluate, or None;
    the folder of a pretrained GPT-2, or None), the model-shape keys of c set from either. The out_dir is locked for
    this process first (one writer per run). A resume continues the run it resumes: every setting not in explicit
    (the keys this command set) comes from the checkpoint's config, and each explicit one that differs is named;
    it drops the log records written after the checkpoint. A scratch run into an out_dir that holds a run stops
    unless told to overwrite it (clear_run deletes the old run once everything else has been checked); eval_only
    reads the run and writes nothing."""
    ckpt_path, log_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "log.jsonl")
    if int(os.environ.get("RANK", 0)) == 0 and (not c.eval_only or os.access(c.out_dir, os.W_OK)):
        lock_folder(c.out_dir)  # (eval_only writes nothing: a run the user may only read is read without the lock)
    if c.init_from == "resume" or (c.eval_only and c.init_from == "scratch"):
        if c.eval_only and not os.path.exists(ckpt_path):
            raise CheckpointError(f"eval_only evaluates the run in out_dir, but {ckpt_path} does not exist; point "
                                  f"--out_dir at a run (or evaluate OpenAI's GPT-2 with --init_from=gpt2)")
        checkpoint = load_checkpoint(ckpt_path)
        if not c.eval_only:
            continue_settings(c, checkpoint, defaults, set(explicit))
        adopt_model_shape(c, {**{k: checkpoint["model_args"][k] for k in SHAPE_KEYS},
                              "optimizer": checkpoint["config"].get("optimizer", c.optimizer)}, defaults,
                          f"the run in {ckpt_path}", "drop that setting to resume, or train it from scratch in "
                          f"another out_dir")
        validate(vars(c), defaults)  # the settings again, with the shape of the model in the checkpoint
        if not c.eval_only:
            check_log_kept(log_path, checkpoint["iter_num"], c)
        if not c.eval_only and int(os.environ.get("RANK", 0)) == 0:
            truncate_log(log_path, checkpoint["iter_num"], c.log_interval)
        return checkpoint, None
    master = int(os.environ.get("RANK", 0)) == 0
    if not c.eval_only and os.path.exists(log_path) and not os.path.exists(ckpt_path):
        if master:  # a run that stopped before its first checkpoint: nothing to resume, so nothing to protect
            print(f"note: {c.out_dir} holds a log but no checkpoint: starting afresh")
            os.remove(log_path)
    elif not c.eval_only and any(os.path.exists(p) for p in (ckpt_path, log_path)) and not c.overwrite_out_dir:
        raise ConfigError(f"{c.out_dir} already holds a run (ckpt.pt / log.jsonl); resume it with "
                          f"--init_from=resume, pick another --out_dir, or start it again with "
                          f"--overwrite_out_dir=True (which deletes its checkpoint and log)")
    if dist.is_initialized():
        dist.barrier()  # every process has seen the out_dir as it was before rank 0 writes into it
    if c.init_from == "scratch":
        return None, None
    folder = pretrained_folder(c.init_from)  # OpenAI's GPT-2 (downloaded once) or a local Hub-layout folder
    shape = pretrained_config(folder)
    adopt_model_shape(c, {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")}, defaults,
                      f"the GPT-2 of init_from={c.init_from!r}", f"only block_size (up to {shape['block_size']}) and "
                      f"dropout may differ from the pretrained model; drop that setting")
    if c.block_size > shape["block_size"]:
        raise ConfigError(f"block_size {c.block_size} is longer than {c.init_from}'s context ({shape['block_size']}); "
                          f"use at most that")
    validate(vars(c), defaults)
    return None, folder


def continue_settings(c, checkpoint, defaults, explicit):
    """A resume's settings: the checkpoint's, but for the runtime keys and the keys this command set explicitly;
    one line names every change it makes, and a change the run cannot honour is a ConfigError. A checkpoint from
    before gapt_version existed ran this project's rules ("project"). A longer max_iters keeps the run's learning-rate
    schedule (its warm-up and its cosine end where they were) unless this command sets warmup_iters/lr_decay_iters."""
    saved = {"gapt_version": "project", **checkpoint["config"]}
    changed = []
    for k in defaults:
        if k not in saved or k in RUNTIME_KEYS:
            continue
        if k not in explicit:
            setattr(c, k, saved[k])
        elif getattr(c, k) != saved[k] and not same_path(k, getattr(c, k), saved[k]):
            changed.append(f"{k} {saved[k]!r} -> {getattr(c, k)!r}")
    refuse = {k: getattr(c, k) for k in (*SHAPE_KEYS, "optimizer", "gapt_version", "seed") if k in saved and
              getattr(c, k) != saved[k]}
    for k, value in refuse.items():
        why = {"gapt_version": "its gate's state cannot continue as another version",
               "seed": "its data order and random streams came from its seed (a new seed would only move the "
                       "evaluation windows)",
               "optimizer": "its optimizer state belongs to that optimizer"}.get(k, "the weights would not fit")
        raise ConfigError(f"the run in {c.out_dir} has {k}={saved[k]!r}: {why}; drop --{k} to resume it, or train "
                          f"{k}={value!r} from scratch in another out_dir")
    if c.max_iters <= checkpoint["iter_num"]:
        raise ConfigError(f"the checkpoint in {c.out_dir} is at step {checkpoint['iter_num']} and max_iters is "
                          f"{c.max_iters}: nothing to train; raise --max_iters to continue the run")
    old = saved["max_iters"]
    pin_decay = c.max_iters != old and "lr_decay_iters" not in explicit and saved["lr_decay_iters"] == 0
    pin_warmup = c.max_iters != old and "warmup_iters" not in explicit and saved["warmup_iters"] > old
    if pin_decay or pin_warmup:  # the schedule would have followed max_iters: keep the one the run had
        c.lr_decay_iters = old if pin_decay else c.lr_decay_iters  # the cosine ends where it ended
        c.warmup_iters = old if pin_warmup else c.warmup_iters  # a run shorter than its warm-up warmed up over all
        changed.append(f"the learning rate keeps the run's schedule (cosine to min_lr at step "
                       f"{c.lr_decay_iters or c.max_iters}, min_lr after; --lr_decay_iters={c.max_iters} stretches "
                       f"it over the new length instead)")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resume: the run's own settings, but this command changes {', '.join(changed)}")


def same_path(key, a, b):  # a data folder named relatively here and absolutely in the checkpoint is the same one
    if key == "data_dir":
        return os.path.abspath(a) == os.path.abspath(b)
    if key == "eval_data_dirs":
        return [os.path.abspath(d) for d in a] == [os.path.abspath(d) for d in b]
    return False


def absolute_paths(c):
    """The data folders as absolute paths, as the checkpoint keeps them: a resume from another working directory
    reads the data the run read."""
    return {"data_dir": os.path.abspath(c.data_dir), "eval_data_dirs": [os.path.abspath(d) for d in c.eval_data_dirs]}


def clear_run(out_dir):
    """--overwrite_out_dir: delete the old run's checkpoint and log, called once the new run's settings, data and
    model have been checked, so that a mistyped setting leaves the old run where it was."""
    for name in ("ckpt.pt", "log.jsonl"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def finite_json(value):
    """value with every non-finite float as None, so that log.jsonl is strict JSON (json.dumps would write
    Infinity, which other readers refuse): a +inf minimum after a gate's reset is logged as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


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


def save_checkpoint(path, checkpoint):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written ckpt.pt. A write that fails (a
    full disk) removes the temporary file and is one CheckpointError; the previous checkpoint stays as it was."""
    tmp = f"{path}.tmp"
    try:
        torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise CheckpointError(f"could not write {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}; "
                              f"{free / 1e6:,.0f} MB free on its disk): free some space, then continue with "
                              f"--init_from=resume from the previous checkpoint, which is intact") from None
    os.replace(tmp, path)


def read_log(path):
    """The records of a log.jsonl. A last line cut short (a run killed while writing it, a full disk) is left out with
    a note on stderr; a damaged line before the last is one CheckpointError naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "iter" not in record or "kind" not in record:
                raise CheckpointError(f"{path} line {i} is JSON but not a record of train.py's log (no iter and kind):"
                                      f" is this a run's log.jsonl?")
            records.append(record)
        except ValueError:
            if i != lines[-1][0]:
                raise CheckpointError(f"{path} line {i} is not a JSON record; remove that line (or the log) and "
                                      f"try again") from None
            print(f"note: the last line of {path} (line {i}) was cut short while being written; it is left out",
                  file=sys.stderr)
    return records


def check_log_kept(path, iter_num, c):
    """A resume rewrites the log's records after its checkpoint by training those steps again; one that would stop
    before the log's last step (a checkpoint kept only at the best validation CE, then a shorter max_iters) would
    delete records it never writes again: refused."""
    last = max((r["iter"] for r in read_log(path)), default=0) if os.path.exists(path) else 0
    if last > c.max_iters:
        raise ConfigError(f"the log in {c.out_dir} reaches step {last}, but its checkpoint is at step {iter_num} and "
                          f"max_iters={c.max_iters}: resuming would delete the records of steps {c.max_iters + 1}-"
                          f"{last} without training them again; give --max_iters={last} or more, or copy the run "
                          f"folder and resume the copy")


def truncate_log(path, iter_num, log_interval=1):
    """On resume, drop the log records written after the checkpoint (a run stopped between checkpoints wrote them,
    and the resumed run writes them again), and a last line cut short, so that log.jsonl holds one run on one step
    axis."""
    if not os.path.exists(path):
        return
    records = read_log(path)
    # the checkpoint step's switch and eval records came before the checkpoint, its align record after it; its train
    # record is kept on the log_interval grid (off it, it was a run's last line, whose interval the resume continues)
    keep = [r for r in records if r["iter"] < iter_num or (r["iter"] == iter_num and r.get("kind") != "align" and
                                                           (r.get("kind") != "train" or iter_num % log_interval == 0))]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def adopt_model_shape(c, shape, defaults, source, advice):
    """Set the model-shape keys of c from a checkpoint's or a pretrained model's (shape: key -> value). A key this run
    set explicitly to another value (anything but its default) is an error: the weights would not fit."""
    for k, value in shape.items():
        if getattr(c, k) not in (value, defaults[k]):
            raise ConfigError(f"{source} has {k}={value!r}, but this run sets {k}={getattr(c, k)!r}; {advice}")
        setattr(c, k, value)


def rng_states(ddp, world, device_type):
    """Every process's torch RNG states (CPU, and CUDA where used), gathered for the checkpoint."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
    if not ddp:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore(checkpoint, optimizers, scaler, gapt, data_rng, rank, world, device_type):
    """Everything but the model weights back from a checkpoint: optimizers, scaler, GAPT, data order, RNG streams.
    Returns (iter_num, best_val_loss)."""
    for opt, state in zip(optimizers, checkpoint["optimizers"]):
        opt.load_state_dict(state)
    scaler.load_state_dict(checkpoint["scaler"])
    gapt.load_state_dict(checkpoint["gapt"])
    data_rng.set_state(checkpoint["data_rng"])
    if len(checkpoint["rng"]) == world:  # the same number of processes: every one continues its own streams
        torch.set_rng_state(checkpoint["rng"][rank]["cpu"])
        if device_type == "cuda" and checkpoint["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"][rank]["cuda"])
    return checkpoint["iter_num"], checkpoint["best_val_loss"]
