"""
The machine side of a run: processes (torchrun), device, threads, precision, memory, and how a run ends when
something goes wrong. Not part of the algorithm: train.py calls these.
"""

import ctypes
import errno
import os
import sys
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from checkpoint import CheckpointError
from configurator import ConfigError
from hub import PretrainedError
from shards import DataError


def setup_processes(c):
    """(ddp, rank, local_rank, world): torchrun's environment, or a single process. Picks the device."""
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = c.device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {c.device!r}")
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={c.device!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) (torch "
                          f"{torch.__version__}); use --device=cpu, or --device=auto to take what there is")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps', but this machine or torch build has no MPS; use --device=cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {c.device!r}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        c.device = f"cuda:{local_rank}"
        torch.cuda.set_device(c.device)
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=c.ddp_timeout))
    return True, rank, local_rank, world


def micro_steps_per_process(c, world):
    """gradient_accumulation_steps is the global count of micro-batches per step: each process runs its share."""
    if c.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} (the global count) must be "
                          f"divisible by the number of processes ({world}): pass --gradient_accumulation_steps="
                          f"{world * max(1, c.gradient_accumulation_steps // world)}")
    return c.gradient_accumulation_steps // world


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
    if sys.platform.startswith("linux"):
        # glibc maps every large buffer afresh and unmaps it when freed; on a CPU the full logits of a small text
        # model make that close to half of a step (docs/performance.md). Take every buffer from the heap and never
        # give it back, so each step reuses the last one's memory.
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap
            libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: no trimming
        except (OSError, AttributeError):
            pass  # not glibc
    return ptdtype, autocast


def to_device(x, y, device):
    """A batch onto the device; on CUDA through pinned memory, without waiting."""
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def all_reduce_mean(t, world):
    """The mean of t over the processes (in place), or t itself in a single process."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def start_wandb(c):
    """The Weights & Biases run that train.py also logs to (wandb_log=True); imported only then."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True needs the wandb package: pip install wandb (and log in), or leave "
                          "wandb_log off; log.jsonl holds every record either way") from None
    return wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=vars(c))


def step_optimizers(optimizers, scaler, model, grad_clip):
    """Clip the global gradient norm (grad_clip > 0), step every optimizer through the (fp16) grad scaler, zero."""
    if grad_clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def where_to_continue(config):  # the advice after a stop: resume if there is a checkpoint to resume
    ckpt = os.path.join(config.out_dir, "ckpt.pt") if config else None
    if ckpt and os.path.exists(ckpt):
        return f"the last checkpoint is in {config.out_dir}: continue with --init_from=resume"
    return "no checkpoint was written yet: start the run again with the same command"


def run_main(main, load_config, argv):
    """main(load_config(argv)); a bad input or setting, a stalled or dead process under torchrun, or Ctrl-C ends it
    with one line on stderr that says what happened and what to do (exit status 1; 130 for Ctrl-C)."""
    config, under_torchrun = None, int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        config = load_config(argv)
        main(config)
    except (ConfigError, DataError, CheckpointError, PretrainedError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # NCCL raises DistError; gloo plain RuntimeErrors, for a timeout or a vanished peer
        lost = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
        if not under_torchrun or not (isinstance(e, dist.DistError) or any(w in str(e).lower() for w in lost)):
            raise
        sys.exit(f"error: another process stalled or died (no answer within ddp_timeout={config.ddp_timeout} s; "
                 f"{type(e).__name__}), so every process stops; {where_to_continue(config)} (if no process died: "
                 f"rank 0 alone runs the task's evaluation and writes the checkpoint, which can take longer than "
                 f"ddp_timeout: raise --ddp_timeout)")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: no space left on the disk ({e.filename or e}); free some space, then "
                 f"{where_to_continue(config)}")
    except KeyboardInterrupt:
        ckpt = os.path.join(config.out_dir, "ckpt.pt") if config else None
        print("\ninterrupted; " + (f"the last checkpoint is {ckpt}: continue with the same command and "
                                   f"--init_from=resume" if ckpt and os.path.exists(ckpt) else "no checkpoint was "
                                   "written"), file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if under_torchrun:
        # Under torchrun a finished process ends here, without the interpreter's teardown: there gloo (torch 2.13) can
        # abort the process ("terminate called without an active exception", SIGABRT, with no Python frame left) after
        # every rank has finished and written everything, and torchrun then reports the whole run as failed (seen in
        # 3 of 15 two-process CPU runs on a loaded machine, 0 of 30 since; docs/running.md).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
