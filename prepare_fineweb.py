"""
Tokenize FineWeb (or any text in its schema) with GPT-2's BPE into train.py's token shards.

    python prepare_fineweb.py                                      # HuggingFaceFW/fineweb, sample-10BT -> data/fineweb
    python prepare_fineweb.py --num_tokens=2100000000              # stop after ~2.1B tokens (config/fineweb_*.py)
    python prepare_fineweb.py --local_files ../shared/corpora/python_docs.jsonl --out_dir=data/python_docs \\
        --shard_size=1000000 --val_tokens=200000                   # local parquet/jsonl files with a `text` column
    python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs \
        --shard_size=10000000 --val_tokens=400000 --shuffle_seed=0  # a random set of whole documents held out

Each document is prefixed by <|endoftext|> (50256) and tokenized with tiktoken's r50k_base (exactly GPT-2's BPE), in
parallel over all cores. The first documents go to val_000000.bin, whole (at least --val_tokens tokens, up to the end
of the document that crosses that count), so validation text is held out by document; the rest go to
train_000001.bin, ... of --shard_size tokens each (the last one may be shorter). tiktoken downloads the BPE on first
use: offline, set TIKTOKEN_CACHE_DIR to a folder that holds it. --shuffle_seed shuffles the documents first (a fixed
permutation, so a restart sees the same order): the validation documents are then a random sample, not the first
files of a corpus sorted by path. Every shard is written to a temporary name and renamed, with
a small sidecar that says where in the document stream it ended, so an interrupted run restarts after its last
complete shard and writes byte-identical output. The ready-made GPT-2-tokenized FineWeb shards of modded-nanogpt /
llm.c (fineweb_train_*.bin, fineweb_val_*.bin) use the same format: rename them to train_*.bin / val_*.bin (or link
them) and they load unchanged.
"""

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from shards import write_shard

EOT = 50256  # <|endoftext|> in GPT-2's vocabulary
ENCODING = "r50k_base"  # GPT-2's BPE (same ranks, pattern and special token as tiktoken's "gpt2")

_encoder = None  # set in the main process before the pool forks; workers started by spawn load it themselves
_worker_error = None


def load_encoder():
    """GPT-2's BPE through tiktoken, which downloads it on first use; None and a message if that fails."""
    import socket
    import tiktoken
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a network that drops packets must not hang the download for ever
    try:
        return tiktoken.get_encoding(ENCODING), None
    except Exception as e:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        return None, (f"cannot load GPT-2's BPE ({ENCODING}) through tiktoken ({where}; the download failed: "
                      f"{type(e).__name__}). Run once with network access, or set TIKTOKEN_CACHE_DIR to a folder "
                      f"that holds the cached BPE file (e.g. ../shared/tiktoken_cache)")
    finally:
        socket.setdefaulttimeout(old_timeout)


def _init_worker():
    """Pool initializer. It never raises (a raising initializer makes multiprocessing respawn workers for ever): a
    failure is kept and reported by tokenize, whose exception reaches the main process."""
    global _encoder, _worker_error
    if _encoder is None:
        _encoder, _worker_error = load_encoder()


def tokenize(text):
    """<|endoftext|> followed by the document's tokens, as uint16."""
    if _encoder is None:
        _init_worker()
        if _encoder is None:
            raise RuntimeError(_worker_error)
    tokens = np.array([EOT] + _encoder.encode_ordinary(text), dtype=np.int64)
    if tokens.max() >= 2 ** 16:
        raise ValueError("a token id does not fit uint16")
    return tokens.astype(np.uint16)


def load_documents(args):
    """An iterable of documents (dicts with a 'text' field), from local files or from the Hugging Face hub."""
    import datasets
    if args.local_files:
        files = sorted(f for pattern in args.local_files for f in (glob.glob(pattern) or [pattern]))
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            sys.exit(f"error: --local_files: {', '.join(missing)} not found")
        kinds = {os.path.splitext(f)[1] for f in files}
        builder = "parquet" if kinds <= {".parquet"} else "json" if kinds <= {".jsonl", ".json"} else None
        if builder is None:
            sys.exit(f"error: --local_files must all be .parquet or all .jsonl/.json, got {sorted(kinds)}")
        ds = datasets.load_dataset(builder, data_files=files, split="train")
        if "text" not in ds.column_names:
            sys.exit(f"error: the local files have no 'text' column (columns: {ds.column_names})")
        return ds if args.shuffle_seed < 0 else ds.shuffle(seed=args.shuffle_seed)
    try:
        ds = datasets.load_dataset(args.dataset, name=args.name, split="train", streaming=args.streaming)
    except Exception as e:  # no network, no such dataset, hub outage: say what to do instead of a traceback
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: could not load {args.dataset} ({args.name}) from the Hugging Face hub: {first_line}\n"
                 f"Without network access, pass local parquet/jsonl files with a `text` column: --local_files ...")
    if args.shuffle_seed < 0:
        return ds
    return ds.shuffle(seed=args.shuffle_seed, **({"buffer_size": 10_000} if args.streaming else {}))


def shard_name(index):
    return f"val_{index:06d}.bin" if index == 0 else f"train_{index:06d}.bin"


def completed_shards(out_dir):
    """The shards already written (consecutive from 0, each with its sidecar), and where the last one ended."""
    done, resume = 0, {"docs": 0, "offset": 0, "tokens": 0}
    while True:
        sidecar = os.path.join(out_dir, shard_name(done) + ".json")
        if not (os.path.exists(sidecar) and os.path.exists(os.path.join(out_dir, shard_name(done)))):
            return done, resume
        with open(sidecar) as f:
            resume = json.load(f)
        done += 1


def write_shard_with_sidecar(out_dir, index, tokens, position):
    path = os.path.join(out_dir, shard_name(index))
    write_shard(path, tokens)
    tmp = path + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(position, f)
    os.replace(tmp, path + ".json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb")
    parser.add_argument("--name", default="sample-10BT", help="the dataset config (sample-10BT, sample-100BT, ...)")
    parser.add_argument("--streaming", action="store_true", help="stream from the hub instead of downloading first")
    parser.add_argument("--local_files", nargs="+", help="local .parquet or .jsonl files (or globs) with a text column")
    parser.add_argument("--out_dir", default="data/fineweb")
    parser.add_argument("--num_tokens", type=int, default=0, help="stop after about this many tokens (0: all)")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per train shard")
    parser.add_argument("--val_tokens", type=int, default=0,
                        help="at least this many tokens of whole documents in val_000000.bin (0: --shard_size)")
    parser.add_argument("--shuffle_seed", type=int, default=-1,
                        help="shuffle the documents with this seed before sharding (-1: keep their order)")
    parser.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.shard_size <= 0 or args.val_tokens < 0 or args.num_tokens < 0:
        parser.error("--shard_size must be positive, --val_tokens and --num_tokens non-negative")
    val_tokens = args.val_tokens or args.shard_size
    os.makedirs(args.out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(args.out_dir, "*.tmp*")):  # left by an interrupted write
        os.remove(stale)

    global _encoder
    _encoder, error = load_encoder()  # once, here, before any worker starts
    if _encoder is None:
        sys.exit(f"error: {error}")
    documents = load_documents(args)
    done, position = completed_shards(args.out_dir)
    if done:
        print(f"{done} complete shard(s) found in {args.out_dir}; continuing after document {position['docs']}")
    total = position["tokens"]
    docs = itertools.islice(iter(documents), position["docs"], None)
    texts = (doc["text"] for doc in docs)
    skip_first = position["offset"]  # tokens of the next document that the last shard already holds

    from tqdm import tqdm
    progress = tqdm(total=args.num_tokens or None, initial=total, unit="tok", unit_scale=True, desc="tokens")
    index, capacity = done, (val_tokens if done == 0 else args.shard_size)
    buffer, filled = np.empty(capacity, dtype=np.uint16), 0
    doc_index = position["docs"]
    pool = mp.Pool(args.num_proc, initializer=_init_worker) if args.num_proc > 1 else None
    tokens_iter = pool.imap(tokenize, texts, chunksize=16) if pool else map(tokenize, texts)
    try:
        for tokens in tokens_iter:  # a worker's exception is raised here; the finally below ends the pool
            tokens, offset = tokens[skip_first:], skip_first
            skip_first = 0
            while len(tokens):
                if args.num_tokens and total >= args.num_tokens:
                    break
                if index == 0 and len(tokens) > capacity - filled:  # the val shard holds whole documents
                    capacity = filled + len(tokens)
                    buffer = np.concatenate([buffer[:filled], np.empty(len(tokens), dtype=np.uint16)])
                take = min(len(tokens), capacity - filled)
                if args.num_tokens:
                    take = min(take, args.num_tokens - total)
                buffer[filled:filled + take] = tokens[:take]
                filled, total, offset, tokens = filled + take, total + take, offset + take, tokens[take:]
                progress.update(take)
                if filled == capacity:
                    # the next shard starts in this document at `offset`, or at the next document
                    ends_doc = len(tokens) == 0
                    write_shard_with_sidecar(args.out_dir, index, buffer, {
                        "docs": doc_index + 1 if ends_doc else doc_index, "offset": 0 if ends_doc else offset,
                        "tokens": total})
                    index, capacity, filled = index + 1, args.shard_size, 0
                    buffer = np.empty(capacity, dtype=np.uint16)
            doc_index += 1
            if args.num_tokens and total >= args.num_tokens:
                break
        if filled:
            write_shard_with_sidecar(args.out_dir, index, buffer[:filled],
                                     {"docs": doc_index, "offset": 0, "tokens": total})
            index += 1
    finally:
        if pool:
            pool.terminate()
        progress.close()
    if index < 2:
        print(f"warning: only {index} shard written ({total:,} tokens): training needs a val and a train shard "
              f"(lower --val_tokens); an evaluation-only directory (train.py's eval_data_dirs) needs just this one",
              file=sys.stderr)
    meta = {"vocab_size": EOT + 1, "tokenizer": ENCODING, "eot_token": EOT, "tokens": total, "shards": index,
            "source": args.local_files or f"{args.dataset}/{args.name}", "shuffle_seed": args.shuffle_seed}
    tmp = os.path.join(args.out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(args.out_dir, "meta.json"))
    print(f"{args.out_dir}: {index} shards, {total:,} tokens ({index - done} shard(s) written by this run)")


if __name__ == "__main__":
    main()
