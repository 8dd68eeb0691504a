"""
Token shards, the one data format of this project: a 256 x int32 header (magic, version, token count, zeros) then the
tokens as uint16 (the llm.c / modded-nanogpt format, so their FineWeb shards load unchanged), plus the random
training/evaluation windows train.py draws from them. prepare_mult.py and prepare_fineweb.py write shards with
write_shard; train.py reads them.
"""

import errno
import fcntl
import glob
import json
import os
import shlex
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
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary file is left behind
        remove_quietly(tmp)
        raise


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def write_error(path, error):
    """One line for an OSError met while writing path: a full disk says so and where."""
    folder = os.path.dirname(os.path.abspath(path))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk holding {folder} is full (writing {os.path.basename(path)} failed: {error.strerror}); "
                f"free space there (or choose another --out_dir) and run the same command again")
    return f"cannot write {path} ({error.strerror}); make {folder} writable (or choose another --out_dir) and run again"


def read_shard(path, hint=None):
    """Memory-map a shard's tokens after checking its header; a clear DataError says what is wrong."""
    hint = hint or (f"prepare the data again into an empty folder: move {os.path.dirname(path) or '.'} aside first "
                    f"(the prepare scripts keep the shards they find, so a rerun into it changes nothing)")
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(f"{path} is a broken symbolic link: it points to {os.readlink(path)}, which does not exist; "
                        f"link it to the shard again (ln -sfn SHARD {path}, e.g. an llm.c fineweb_*.bin shard) or "
                        f"remove it")
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); make it a readable token shard, or remove it") from None
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
                    raise DataError(vocabulary_error(data_dir, path, largest, vocab_size))
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


def vocabulary_error(data_dir, path, largest, vocab_size):
    """What to say of a token id at or beyond the model's vocabulary. Where the folder's meta.json gives another
    vocabulary, the folder was prepared with another tokenizer (a resumed run's or an evaluation corpus's data):
    raising vocab_size would not help; prepare it again."""
    meta = read_meta(data_dir)
    theirs = meta.get("vocab_size")
    if isinstance(theirs, int) and theirs != vocab_size:
        what = tokens_of(meta) or f"a vocabulary of {theirs} ids"
        return (f"{data_dir} was prepared with another tokenizer than the model's: {what} ({path} holds token id "
                f"{largest}), but the model's vocabulary has {vocab_size} ids; prepare {data_dir} again with the "
                f"tokenizer of the model's training data (its script and settings), or use data prepared with it "
                f"(in a new run, vocab_size=0 takes {theirs} from {data_dir}/meta.json)")
    return (f"{path} holds token id {largest}, but vocab_size is {vocab_size}: {data_dir} was prepared with another "
            f"tokenizer than the model's, or is damaged; prepare the data again with the model's tokenizer (at most "
            f"{vocab_size} ids), or, in a new run that sets vocab_size, set it to at least {largest + 1}")


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
    """An eval_data_dirs corpus is scored by a model trained on data_dir: their token ids must mean the same. What
    the two meta.json say is compared (tokenizer or task, else vocab_size); where the corpus has no meta.json, its
    val shards' largest id is checked against data_dir's vocab_size."""
    our_meta, their_meta = read_meta(data_dir), read_meta(other_dir)
    ours, theirs = tokens_of(our_meta), tokens_of(their_meta)
    our_size, their_size = our_meta.get("vocab_size"), their_meta.get("vocab_size")
    fix = (f"scoring it would mean nothing; prepare {other_dir} again with the same script and tokenizer as "
           f"{data_dir}, or drop it from eval_data_dirs")
    if ours != theirs and ours is not None and theirs is not None:
        raise DataError(f"eval_data_dirs {other_dir} holds tokens of {theirs}, but the model trains on {data_dir}, "
                        f"tokens of {ours}: it was prepared with another tokenizer; {fix}")
    if isinstance(our_size, int) and isinstance(their_size, int) and our_size != their_size:
        raise DataError(f"eval_data_dirs {other_dir} was prepared with another tokenizer than {data_dir}, which the "
                        f"model trains on (its meta.json says vocab_size {their_size}, {data_dir}'s {our_size}); "
                        f"{fix}")
    if isinstance(our_size, int) and their_size is None and theirs is None:
        for path in sorted(glob.glob(os.path.join(other_dir, "val_*.bin"))):
            shard = read_shard(path)
            largest = int(shard.max()) if len(shard) else 0
            if largest >= our_size:
                raise DataError(f"eval_data_dirs {other_dir} was prepared with another tokenizer than {data_dir}, "
                                f"which the model trains on: {path} holds token id {largest}, beyond its vocabulary "
                                f"of {our_size} ids; {fix}")


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
        recorded = read_prepare_record(out_dir)
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
        try:
            with open(tmp, "w") as f:
                json.dump({"script": script, **settings}, f)
            os.replace(tmp, record)
        except OSError as e:
            remove_quietly(tmp)
            raise DataError(write_error(record, e)) from None
        except BaseException:
            remove_quietly(tmp)
            raise
    return None


def read_prepare_record(out_dir):
    """out_dir/prepare.json, the record of what a prepare script made the folder from: a JSON object (whose "script",
    where there is one, names the script); a damaged one is one DataError that says to delete it and prepare again."""
    path = os.path.join(out_dir, "prepare.json")
    has_shards = bool(glob.glob(os.path.join(out_dir, "*.bin")))
    fix = (f"delete {out_dir} (its shards cannot be continued without that record) and prepare the data again"
           if has_shards else f"delete it (or the folder {out_dir}) and prepare the data again")
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except UnicodeDecodeError:
        raise DataError(f"{path} is damaged (not UTF-8 text): nothing says what {out_dir} was prepared from; {fix}") \
            from None
    except ValueError as e:
        raise DataError(f"{path} is damaged (not JSON: {e}): nothing says what {out_dir} was prepared from; {fix}") \
            from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("script", ""), str):
        raise DataError(f"{path} is damaged (not the JSON object a prepare script writes): nothing says what "
                        f"{out_dir} was prepared from; {fix}")
    return recorded


def read_meta(data_dir):
    """data_dir/meta.json, or {} where there is none (shards from elsewhere, e.g. llm.c's). A folder with a
    prepare.json but no meta.json holds a preparation that has not finished (prepare scripts write meta.json last):
    one DataError that says to wait for it, or to run the same prepare command again."""
    check_data_dir(data_dir)
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(data_dir, "prepare.json")):
            raise DataError(unfinished_preparation(data_dir))
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


def unfinished_preparation(data_dir):
    """What to say of a folder whose preparation has not finished: the process still at it, or the command to run
    again (prepare_mult.py writes the folder afresh, prepare_fineweb.py continues after its last complete shard)."""
    holder = preparation_in_progress(data_dir)
    if holder:
        return (f"{data_dir} is still being prepared (by {holder}): it has a prepare.json but no meta.json yet; wait "
                f"for that preparation to finish")
    try:
        recorded = read_prepare_record(data_dir)
    except DataError:
        recorded = {}
    script = recorded.get("script", "prepare_fineweb.py")
    settings = {k: v for k, v in recorded.items() if k not in ("script", "source", "tokenizer")}
    source = recorded.get("source")
    if script == "prepare_fineweb.py" and isinstance(source, dict):
        if source.get("local_files"):
            settings = {"local_files": " ".join(shlex.quote(str(f[0])) for f in source["local_files"]), **settings}
        else:
            settings = {"dataset": source.get("dataset"), "name": source.get("name"),
                        "streaming": bool(source.get("streaming")), **settings}
    if script in ("prepare_mult.py", "prepare_fineweb.py") and (script == "prepare_mult.py" or source):
        options = "".join(f" --{k}" if v is True else f" --{k} {v}" if k == "local_files" else
                          f" --{k}={shlex.quote(str(v))}" for k, v in settings.items() if v is not False)
        command = f"`python {script} --out_dir={shlex.quote(data_dir)}{options}`"
    else:
        command = f"the {script} command that made it (with --out_dir={data_dir})"
    again = ("it writes the data afresh" if script == "prepare_mult.py" else
             "it continues after the last complete shard")
    return (f"the preparation of {data_dir} was interrupted: it has a prepare.json but no meta.json, which a "
            f"preparation writes last; run {command} again ({again})")


def preparation_in_progress(data_dir):
    """The holder of data_dir's lock, where another process holds it (a preparation at work), else None."""
    path = os.path.join(data_dir, "lock")
    if os.path.realpath(data_dir) in _held_locks or not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 2000, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # (closing it releases a lock taken here)
    return None
