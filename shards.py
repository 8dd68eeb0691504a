"""
Token shards, the one data format of this project: a 256 x int32 header (magic, version, token count, zeros) then the
tokens as uint16 (the llm.c / modded-nanogpt format, so their FineWeb shards load unchanged), plus the random
training/evaluation windows train.py draws from them. prepare_mult.py and prepare_fineweb.py write shards with
write_shard; train.py reads them.
"""

import fcntl
import glob
import json
import os
import socket
import sys
import time

import numpy as np
import torch

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


class DataError(RuntimeError):
    pass


def write_shard(path, tokens):
    """Write tokens (ids < 65536) as a shard, atomically: a temporary file renamed into place."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"{path}: token ids must fit uint16 (0..65535), got {tokens.min()}..{tokens.max()}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path, hint=None):
    """Memory-map a shard's tokens after checking its header; a clear DataError says what is wrong."""
    hint = hint or (f"prepare the data again into an empty folder: move {os.path.dirname(path) or '.'} aside first "
                    f"(the prepare scripts keep the shards they find, so a rerun into it changes nothing)")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if size < HEADER_INTS * 4 and (len(header) == 0 or header[0] == SHARD_MAGIC):
        promised = (f" and 2 bytes for each of the {header[2]} tokens its header promises "
                    f"({HEADER_INTS * 4 + 2 * int(header[2])} bytes in all)" if len(header) >= 3 else "")
        raise DataError(f"{path} is truncated: it has {size} bytes, but a shard needs a {HEADER_INTS * 4}-byte header"
                        f"{promised}; {hint}")
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad header magic {header[0] if len(header) else None}, "
                        f"expected {SHARD_MAGIC}); {hint}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]} is not supported (expected {SHARD_VERSION}); {hint}")
    n_tokens = int(header[2])
    expected = HEADER_INTS * 4 + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise DataError(f"{path} is truncated or corrupt: its header says {n_tokens} tokens ({expected} bytes) "
                        f"but the file has {size} bytes; {hint}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))


class TokenWindows:
    """Random windows of block_size + 1 tokens from every shard of one split (train_*.bin, val_*.bin or test_*.bin).
    With vocab_size, every token id must be below it (one np.max per shard)."""

    def __init__(self, data_dir, split, block_size, vocab_size=None):
        paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
        check_data_dir(data_dir)
        if not paths:
            how = " --test_tokens=N" if split == "test" else ""
            raise DataError(f"no {split}_*.bin shards in {data_dir!r}; run `python prepare_mult.py` or "
                            f"`python prepare_fineweb.py{how}` for it, or point --data_dir at a prepared directory")
        self.block_size = block_size
        self.shards = [read_shard(p) for p in paths]
        if vocab_size:  # an id >= vocab_size would be an IndexError deep in the embedding
            for path, shard in zip(paths, self.shards):
                largest = int(shard.max()) if len(shard) else 0
                if largest >= vocab_size:
                    raise DataError(f"{path} holds token id {largest}, but vocab_size is {vocab_size}; prepare the "
                                    f"data again with a tokenizer of at most {vocab_size} ids, or raise vocab_size to "
                                    f"at least {largest + 1}")
        self.starts = np.array([max(len(s) - block_size, 0) for s in self.shards])  # valid window starts per shard
        self.cum_starts = np.cumsum(self.starts)
        if self.cum_starts[-1] == 0:
            raise DataError(f"the {split} shards in {data_dir!r} hold fewer than block_size + 1 = {block_size + 1} "
                            f"tokens; prepare more data or lower block_size")

    def draw(self, n, generator):
        """n random window positions (global indices into all shards' window starts)."""
        return torch.randint(int(self.cum_starts[-1]), (n,), generator=generator)

    def windows(self, positions):
        """(x, y) int64 tensors of shape (len(positions), block_size): inputs and next-token targets."""
        positions = positions.numpy()
        shard = np.searchsorted(self.cum_starts, positions, side="right")
        offset = positions - (self.cum_starts[shard] - self.starts[shard])
        rows = np.stack([self.shards[s][o:o + self.block_size + 1] for s, o in zip(shard, offset)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def check_data_dir(data_dir):
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist; create it with `python prepare_mult.py` "
                        f"or `python prepare_fineweb.py`, or set --data_dir")


def tokens_of(meta):
    """What a prepared folder's token ids mean: its tokenizer (prepare_fineweb.py), its task's vocabulary
    (prepare_mult.py), or None where meta.json does not say."""
    if meta.get("tokenizer"):
        return f"the {meta['tokenizer']} tokenizer"
    return f"the {meta['task']} task's vocabulary {meta.get('vocab', '')!r}" if meta.get("task") else None


def check_same_tokens(data_dir, other_dir):
    """An eval_data_dirs corpus is scored by a model trained on data_dir: their token ids must mean the same."""
    ours, theirs = tokens_of(read_meta(data_dir)), tokens_of(read_meta(other_dir))
    if ours != theirs and ours is not None and theirs is not None:
        raise DataError(f"eval_data_dirs {other_dir} holds tokens of {theirs}, but the model trains on {data_dir}, "
                        f"tokens of {ours}: scoring it would mean nothing; prepare {other_dir} with the same script "
                        f"and tokenizer as {data_dir}, or drop it from eval_data_dirs")


_held_locks = {}  # folder -> the open lock file this process holds on it (closing it would release the lock)


def lock_folder(out_dir):
    """One writer per folder, runs and data alike: an exclusive lock on out_dir/lock for the life of this process (the
    OS releases it when the process ends, however it ends). A second writer (train.py, or a prepare script) on the
    same folder stops at once, naming the holder. A process that holds the lock already keeps it."""
    if os.path.realpath(out_dir) in _held_locks:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"{out_dir!r} cannot be used as a folder to write into ({e.strerror}): give a folder path "
                        f"that is not a file and that you may write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 2000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataError(f"{out_dir} is in use by {holder}; wait for that run to end (or stop it), or pick "
                        f"another --out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"({' '.join(sys.argv)})".encode(), 0)
    _held_locks[os.path.realpath(out_dir)] = fd


def claim_folder(out_dir, script, settings):
    """A preparation's folder: locked (lock_folder), and refused if it holds a training run, data another script (or
    other settings) prepared, or shards of unknown origin; then out_dir/prepare.json records script and settings
    (prepare_fineweb.py records its own request there; a record without "script" is one of its older ones)."""
    lock_folder(out_dir)
    afresh = f"move {out_dir} aside or choose another --out_dir to start afresh"
    if any(os.path.exists(os.path.join(out_dir, n)) for n in ("ckpt.pt", "log.jsonl")):
        raise DataError(f"{out_dir} holds a training run (ckpt.pt / log.jsonl), not data; {afresh}")
    record, recorded = os.path.join(out_dir, "prepare.json"), None
    if os.path.exists(record):
        with open(record) as f:
            recorded = json.load(f)
        maker = recorded.get("script", "prepare_fineweb.py")
    else:  # data from before prepare.json named its script: its meta.json says whose it is
        meta = read_meta(out_dir)
        maker = ("prepare_mult.py" if meta.get("task") == "multiplication" else
                 "prepare_fineweb.py" if meta.get("tokenizer") else None)
        if maker is None and (meta or glob.glob(os.path.join(out_dir, "*.bin"))):
            raise DataError(f"{out_dir} holds token shards or a meta.json, but nothing says which script made them; "
                            f"{afresh}")
    if maker not in (None, script):
        raise DataError(f"{out_dir} holds data that {maker} prepared, not {script}'s; {afresh}")
    if recorded is not None and settings is not None and {"script": script, **settings} != recorded:
        changed = ", ".join(f"{k}={settings[k]!r} (was {recorded.get(k)!r})" for k in settings
                            if recorded.get(k) != settings[k])
        raise DataError(f"{out_dir} was prepared with other settings ({changed}); {afresh}, or rerun with the "
                        f"settings it was prepared with")
    if settings is not None:
        tmp = f"{record}.tmp"
        with open(tmp, "w") as f:
            json.dump({"script": script, **settings}, f)
        os.replace(tmp, record)
    return None


def read_meta(data_dir):
    check_data_dir(data_dir)
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            meta = json.load(f)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); run the prepare script for this data again "
                            f"(prepare_mult.py or prepare_fineweb.py)")
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a JSON object; run the prepare script for this data again "
                        f"(prepare_mult.py or prepare_fineweb.py)")
    return meta
