"""
Tokenize FineWeb (or any text in its schema) with GPT-2's BPE into train.py's token shards.

    python prepare_fineweb.py                                      # HuggingFaceFW/fineweb, sample-10BT -> data/fineweb
    python prepare_fineweb.py --num_tokens=2100000000              # stop after ~2.1B tokens (config/fineweb_*.py)
    python prepare_fineweb.py --local_files ../shared/corpora/python_docs.jsonl --out_dir=data/python_docs \\
        --shard_size=1000000 --val_tokens=200000                   # local parquet/jsonl files with a `text` column
    python prepare_fineweb.py --local_files ../shared/corpora/kernel_docs.jsonl --out_dir=data/kernel_docs \\
        --shard_size=10000000 --val_tokens=400000 --test_tokens=400000 --shuffle_seed=0  # random held-out documents

Each document is prefixed by <|endoftext|> (50256) and tokenized with tiktoken's r50k_base (exactly GPT-2's BPE), in
parallel over all cores. The first documents go to val_000000.bin, whole (at least --val_tokens tokens, up to the end
of the document that crosses that count), so validation text is held out by document; with --test_tokens the next
whole documents go to test_000000.bin the same way; the rest go to train_000001.bin, ... of --shard_size tokens each
(the last one may be shorter). meta.json gives the vocabulary and each split's token count. tiktoken downloads the
BPE on first use: offline, set TIKTOKEN_CACHE_DIR to a folder that holds it. --shuffle_seed shuffles the documents
first (a fixed permutation, so a restart sees the same order): the held-out documents are then a random sample, not
the first files of a corpus sorted by path. Local .jsonl files hold one JSON object with a "text" string per line;
every line is checked before anything is written. Every shard is written to a temporary name and renamed, with a
small sidecar that says where in the document stream it ended, so an interrupted run restarts after its last complete
shard and writes byte-identical output. prepare.json, written before the first shard, records the inputs (files and
their sizes, or the hub dataset) and settings: a rerun with other ones stops rather than mix two datasets in out_dir.
The ready-made GPT-2-tokenized FineWeb shards of modded-nanogpt / llm.c (fineweb_train_*.bin, fineweb_val_*.bin) use
the same format: rename them to train_*.bin / val_*.bin (or link them) and they load unchanged.
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

from shards import DataError, claim_folder, read_prepare_record, read_shard, remove_quietly, write_error, write_shard

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


def local_paths(args):
    """The --local_files (globs expanded), sorted; exits if one is missing or they mix formats."""
    files = sorted(f for pattern in args.local_files for f in (glob.glob(pattern) or [pattern]))
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        sys.exit(f"error: --local_files: {', '.join(missing)} not found")
    kinds = {os.path.splitext(f)[1] for f in files}
    if not (kinds <= {".parquet"} or kinds <= {".jsonl", ".json"}):
        sys.exit(f"error: --local_files must all be .parquet or all .jsonl/.json, got {sorted(kinds)}")
    return files


def jsonl_text(path, number, line):
    """The "text" of one line of a .jsonl file; exits with the file and line if the line has none."""
    where = f"{path} line {number}"
    fix = "fix or remove that line (each line must be one JSON object with a \"text\" string)"
    try:
        doc = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        sys.exit(f"error: {where}: byte 0x{line[e.start]:02x} at column {e.start + 1} is not UTF-8; save the file "
                 f"as UTF-8, or remove that line")
    except json.JSONDecodeError as e:
        sys.exit(f"error: {where} is not JSON ({e.msg} at column {e.colno}); {fix}")
    if not isinstance(doc, dict):
        sys.exit(f"error: {where} is not a JSON object; {fix}")
    if "text" not in doc:
        sys.exit(f"error: {where} has no \"text\" field (fields: {', '.join(doc)[:100]}); {fix}")
    if not isinstance(doc["text"], str):
        sys.exit(f"error: {where} has \"text\": {json.dumps(doc['text'])[:40]}, not a string; {fix}")
    return doc["text"]


def index_jsonl(files):
    """Checks every line of the .jsonl files before anything is written; returns each document's file number and
    byte offset. Blank lines are skipped, as Hugging Face's json loader did."""
    file_of_doc, offset_of_doc = [], []
    for i, path in enumerate(files):
        count, offset = len(offset_of_doc), 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    jsonl_text(path, number, line)
                    file_of_doc.append(i)
                    offset_of_doc.append(offset)
                offset += len(line)
        if len(offset_of_doc) == count:
            sys.exit(f"error: {path} holds no documents; remove it from --local_files or write one JSON object with "
                     f"a \"text\" string per line into it")
    return np.array(file_of_doc), np.array(offset_of_doc)


def read_jsonl(files, file_of_doc, offset_of_doc, order):
    """The texts of the documents in `order`, read again at the byte offsets index_jsonl found."""
    handles = [open(path, "rb") for path in files]
    for i in order:
        f = handles[file_of_doc[i]]
        f.seek(offset_of_doc[i])
        yield json.loads(f.readline().decode("utf-8"))["text"]


def check_parquet(files):
    """Exits naming the file and row of the first row without a "text" string, before anything is written."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    for path in files:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            sys.exit(f"error: {path} has no \"text\" column (columns: {', '.join(schema.names)[:100]}); "
                     f"pass files in FineWeb's schema")
        if schema.field("text").type not in ("string", "large_string"):
            sys.exit(f"error: {path}'s \"text\" column holds {schema.field('text').type}, not strings; "
                     f"pass files in FineWeb's schema")
        column = pq.read_table(path, columns=["text"]).column("text")
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            sys.exit(f"error: {path} row {row} has no text (null); drop the rows with null text from that file")


def load_texts(args, files, skip):
    """The documents' texts in the order they are sharded, from document `skip` on (those before are done)."""
    if files and not files[0].endswith(".parquet"):
        file_of_doc, offset_of_doc = index_jsonl(files)
        order = np.arange(len(offset_of_doc))
        if args.shuffle_seed >= 0:  # the permutation of datasets' Dataset.shuffle(seed=...), as for parquet
            order = np.random.default_rng(args.shuffle_seed).permutation(len(order))
        return read_jsonl(files, file_of_doc, offset_of_doc, order[skip:])
    import datasets
    if files:
        check_parquet(files)
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        if args.shuffle_seed >= 0:
            ds = ds.shuffle(seed=args.shuffle_seed)
    else:
        try:
            ds = datasets.load_dataset(args.dataset, name=args.name, split="train", streaming=args.streaming)
        except Exception as e:  # no network, no such dataset, hub outage: say what to do instead of a traceback
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sys.exit(f"error: could not load {args.dataset} ({args.name}) from the Hugging Face hub: {first_line}\n"
                     f"Without network access, pass local parquet/jsonl files with a `text` column: --local_files ...")
        if args.shuffle_seed >= 0:
            ds = ds.shuffle(seed=args.shuffle_seed, **({"buffer_size": 10_000} if args.streaming else {}))
    return (doc["text"] for doc in itertools.islice(iter(ds), skip, None))


def shard_name(index, test_split=False):
    """val_000000.bin, then test_000000.bin if there is a test split, then train_000001.bin, train_000002.bin, ..."""
    if index == 0:
        return "val_000000.bin"
    if test_split:
        return "test_000000.bin" if index == 1 else f"train_{index - 1:06d}.bin"
    return f"train_{index:06d}.bin"


def completed_shards(out_dir, test_split):
    """The shards already written (consecutive from 0, each with its sidecar), and where the last one ended."""
    done, resume = 0, {"docs": 0, "offset": 0, "tokens": 0}
    while True:
        path = os.path.join(out_dir, shard_name(done, test_split))
        if not (os.path.exists(path + ".json") and os.path.exists(path)):
            return done, resume
        try:
            with open(path + ".json") as f:
                position = json.load(f)
        except ValueError:  # a damaged sidecar: that shard is written again
            return done, resume
        if not (isinstance(position, dict) and {"docs", "offset", "tokens"} <= set(position)):
            return done, resume
        resume = position
        done += 1


def split_tokens(out_dir, split):
    return sum(len(read_shard(path)) for path in glob.glob(os.path.join(out_dir, f"{split}_*.bin")))


def write_json(path, obj):
    """obj as JSON at path, atomically (a temporary file renamed into place); a failed write (a full disk) removes
    the temporary file and exits with one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        sys.exit(f"error: {write_error(path, e)}")
    except BaseException:
        remove_quietly(tmp)
        raise


def write_shard_with_sidecar(path, tokens, position):
    """A shard, then the sidecar that marks it complete; a failed write (a full disk) exits with one line: the rerun
    continues after the last complete shard (write_shard leaves no temporary file)."""
    try:
        write_shard(path, tokens)
    except OSError as e:
        sys.exit(f"error: {write_error(path, e)}")
    write_json(path + ".json", position)


def check_request(out_dir, request):
    """Exits if out_dir holds shards prepared from other inputs or settings: continuing them would mix two datasets."""
    path = os.path.join(out_dir, "prepare.json")
    has_shards = bool(glob.glob(os.path.join(out_dir, "*.bin")))
    afresh = f"delete {out_dir} or choose another --out_dir to start afresh"
    if not os.path.exists(path):
        if has_shards:
            sys.exit(f"error: {out_dir} holds token shards but no prepare.json saying what they were prepared from "
                     f"(an older prepare_fineweb.py or another script wrote them), so this run cannot continue them; "
                     f"{afresh}")
        return
    try:
        recorded = read_prepare_record(out_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    changed = [f"{key}={request[key]} (was {recorded.get(key)})" if key != "source" else
               "the input: local files and their sizes, or the hub dataset" for key in request
               if recorded.get(key) != request[key]]
    if changed and has_shards:
        sys.exit(f"error: {out_dir} was prepared from other inputs or settings ({', '.join(changed)}; see {path}), and "
                 f"continuing it would mix two datasets; {afresh}, or rerun with the arguments it was prepared with")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb")
    parser.add_argument("--name", default="sample-10BT", help="the dataset config (sample-10BT, sample-100BT, ...)")
    parser.add_argument("--streaming", action="store_true", help="stream from the hub instead of downloading first")
    parser.add_argument("--local_files", nargs="+",
                        help="local .parquet files with a text column, or .jsonl files with one JSON object with a "
                             "\"text\" string per line (or globs)")
    parser.add_argument("--out_dir", default="data/fineweb")
    parser.add_argument("--num_tokens", type=int, default=0, help="stop after about this many tokens (0: all)")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per train shard")
    parser.add_argument("--val_tokens", type=int, default=0,
                        help="at least this many tokens of whole documents in val_000000.bin (0: --shard_size)")
    parser.add_argument("--test_tokens", type=int, default=0,
                        help="at least this many tokens of whole documents in test_000000.bin (0: no test split)")
    parser.add_argument("--shuffle_seed", type=int, default=-1,
                        help="shuffle the documents with this seed before sharding (-1: keep their order)")
    parser.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.shard_size <= 0 or min(args.val_tokens, args.test_tokens, args.num_tokens) < 0:
        parser.error("--shard_size must be positive, --val_tokens, --test_tokens and --num_tokens non-negative")
    held_out = [args.val_tokens or args.shard_size] + ([args.test_tokens] if args.test_tokens else [])
    test_split = args.test_tokens > 0
    files = local_paths(args) if args.local_files else None
    source = ({"local_files": [[os.path.abspath(f), os.path.getsize(f)] for f in files]} if files else
              {"dataset": args.dataset, "name": args.name, "streaming": args.streaming})
    request = {"source": source, "tokenizer": ENCODING, "num_tokens": args.num_tokens, "shard_size": args.shard_size,
               "val_tokens": held_out[0], "test_tokens": args.test_tokens, "shuffle_seed": args.shuffle_seed}
    try:
        claim_folder(args.out_dir, "prepare_fineweb.py", None)  # one writer; never into a run or another's data
    except DataError as e:
        sys.exit(f"error: {e}")
    check_request(args.out_dir, request)
    for stale in glob.glob(os.path.join(args.out_dir, "*.tmp*")):  # left by an interrupted write
        os.remove(stale)
    done, position = completed_shards(args.out_dir, test_split)
    meta_path = os.path.join(args.out_dir, "meta.json")
    if done and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except ValueError:  # damaged: it is written again at the end
            meta = {}
        if isinstance(meta, dict) and meta.get("shards") == done and "tokens" in meta:
            print(f"{args.out_dir} is complete: {done} shards, {meta['tokens']:,} tokens; nothing to do")
            return

    global _encoder
    _encoder, error = load_encoder()  # once, here, before any worker starts
    if _encoder is None:
        sys.exit(f"error: {error}")
    texts = load_texts(args, files, position["docs"])  # local .jsonl files are checked line by line here
    write_json(os.path.join(args.out_dir, "prepare.json"), {"script": "prepare_fineweb.py", **request})  # first
    if done:
        print(f"{done} complete shard(s) found in {args.out_dir}; continuing after document {position['docs']}")
    total = position["tokens"]
    skip_first = position["offset"]  # tokens of the next document that the last shard already holds

    from tqdm import tqdm
    progress = tqdm(total=args.num_tokens or None, initial=total, unit="tok", unit_scale=True, desc="tokens")
    index = done
    capacity = held_out[index] if index < len(held_out) else args.shard_size
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
                if index < len(held_out) and len(tokens) > capacity - filled:  # val and test hold whole documents
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
                    write_shard_with_sidecar(os.path.join(args.out_dir, shard_name(index, test_split)), buffer, {
                        "docs": doc_index + 1 if ends_doc else doc_index, "offset": 0 if ends_doc else offset,
                        "tokens": total})
                    index, filled = index + 1, 0
                    capacity = held_out[index] if index < len(held_out) else args.shard_size
                    buffer = np.empty(capacity, dtype=np.uint16)
            doc_index += 1
            if args.num_tokens and total >= args.num_tokens:
                break
        if filled:
            write_shard_with_sidecar(os.path.join(args.out_dir, shard_name(index, test_split)), buffer[:filled],
                                     {"docs": doc_index, "offset": 0, "tokens": total})
            index += 1
    finally:
        if pool:
            pool.terminate()
        progress.close()
    if index <= len(held_out):
        print(f"warning: only {index} shard(s) written ({total:,} tokens), no train shard: training needs one (lower "
              f"--val_tokens or --test_tokens); an evaluation-only directory (train.py's eval_data_dirs) needs just "
              f"val_000000.bin", file=sys.stderr)
    meta = {"vocab_size": EOT + 1, "tokenizer": ENCODING, "eot_token": EOT, "tokens": total, "shards": index,
            **{f"{split}_tokens": split_tokens(args.out_dir, split) for split in ("train", "val", "test")},
            "source": args.local_files or f"{args.dataset}/{args.name}", "shuffle_seed": args.shuffle_seed}
    write_json(meta_path, meta)
    print(f"{args.out_dir}: {index} shards, {total:,} tokens ({index - done} shard(s) written by this run)")


if __name__ == "__main__":
    main()
