"""
The multiplication task of the paper's OOD experiment: train on 1-3-digit operands, test on 4-6-digit operands.

    python prepare_mult.py                       # writes data/mult: train/val shards + meta.json
    python prepare_mult.py --reverse_answer      # answers least-significant digit first

Character-level: the ten digits, '*', '=' and an end-of-example token ('\\n'). Examples "a*b=c\\n" are concatenated
into token shards (shards.py's format). meta.json holds the vocabulary, the settings and the fixed evaluation problems.
This file owns the format: it also provides encode/decode and the task evaluation that train.py runs at every eval
(answer-token cross-entropy and exact match, on in-distribution and out-of-distribution problems).
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from shards import DataError, claim_folder, remove_quietly, write_error, write_shard

VOCAB = "0123456789*=\n"
STOI = {ch: i for i, ch in enumerate(VOCAB)}
TIMES, EQUALS, END = STOI["*"], STOI["="], STOI["\n"]
MAX_DIGITS = 9  # products of up to 18 digits still fit int64


def encode(text):
    try:
        return [STOI[ch] for ch in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the multiplication vocabulary {VOCAB!r}") from None


def decode(ids):
    return "".join(VOCAB[int(i)] for i in ids)


def sample_problems(n, digits, rng):
    """n operand pairs (a, b), each operand's digit count uniform in digits=(lo, hi), leading digit non-zero."""
    lo, hi = digits
    if not (1 <= lo <= hi <= MAX_DIGITS):
        raise ValueError(f"digit range {lo}-{hi} is invalid: need 1 <= lo <= hi <= {MAX_DIGITS}")
    lengths = rng.integers(lo, hi + 1, size=(2, n))
    low, high = 10 ** (lengths - 1), 10 ** lengths
    operands = low + (rng.random((2, n)) * (high - low)).astype(np.int64)  # uniform in [10^(L-1), 10^L)
    return operands[0], operands[1]


def num_digits(x):
    x = np.asarray(x, dtype=np.int64)
    return 1 + (x[..., None] >= 10 ** np.arange(1, 19, dtype=np.int64)).sum(-1)


def _digit_matrix(x, width, reverse=False):
    """(n, width) digits of x, most significant first and left-aligned to the right (or reversed), and a mask."""
    length = num_digits(x)
    powers = 10 ** (np.arange(width) if reverse else np.arange(width - 1, -1, -1))
    digits = (x[:, None] // powers) % 10
    column = np.arange(width)[None, :]
    mask = column < length[:, None] if reverse else column >= width - length[:, None]
    return digits, mask


def problems_to_tokens(a, b, reverse_answer=False):
    """Flat token array of the examples "a*b=c<end>" one after another (vectorised: no Python loop per example)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = len(a)
    wa, wb = int(num_digits(a).max()), int(num_digits(b).max())
    parts = [_digit_matrix(a, wa), (np.full((n, 1), TIMES), np.ones((n, 1), bool)),
             _digit_matrix(b, wb), (np.full((n, 1), EQUALS), np.ones((n, 1), bool)),
             _digit_matrix(a * b, wa + wb, reverse_answer), (np.full((n, 1), END), np.ones((n, 1), bool))]
    tokens = np.concatenate([p[0] for p in parts], axis=1)
    mask = np.concatenate([p[1] for p in parts], axis=1)
    return tokens[mask].astype(np.uint16)  # row-major: example after example


def answer_text(a, b, reverse_answer=False):
    c = str(int(a) * int(b))
    return c[::-1] if reverse_answer else c


def _pair_keys(a, b):
    """Order-free key of a problem, so that b*a counts as the same problem as a*b."""
    return np.minimum(a, b) * 10 ** MAX_DIGITS + np.maximum(a, b)


def _within_holdout_quota(a, b, max_fraction):
    """Mask of the problems that may be held out: per operand-length stratum, the first distinct problems up to
    max_fraction of the stratum. Without a cap, a validation sample would hold out every 1x1-digit problem (there are
    only 45) and the model would never see one in training."""
    keys = _pair_keys(a, b)
    short, long_ = num_digits(np.minimum(a, b)), num_digits(np.maximum(a, b))
    keep = np.zeros(len(a), dtype=bool)
    for la, lb in set(zip(short.tolist(), long_.tolist())):
        in_stratum = (short == la) & (long_ == lb)
        size = 81 * 10 ** (la + lb - 2) // (2 if la == lb else 1)  # distinct unordered problems in the stratum
        uniq, first = np.unique(keys[in_stratum], return_index=True)
        allowed = uniq[np.argsort(first)][:max(1, int(max_fraction * size))]
        keep |= in_stratum & np.isin(keys, allowed)
    return keep


def near_ood_problems(n, train_digits, ood_digits, seed):
    """The near out-of-distribution split: one operand of the shortest OOD length (4 digits by default), the other of
    a training length (1-3), in either order. Drawn from a generator of its own, so that adding it changed no other
    byte of the data. Harder than ID, nearer than 4-6 x 4-6 digits, which every model here gets wrong."""
    rng = np.random.default_rng([seed, 1])
    long, _ = sample_problems(n, (ood_digits[0], ood_digits[0]), rng)
    short, _ = sample_problems(n, train_digits, rng)
    swap = rng.random(n) < 0.5
    return np.where(swap, short, long), np.where(swap, long, short)


def make_dataset(train_examples=1_000_000, val_examples=10_000, eval_examples=1000, train_digits=(1, 3),
                 ood_digits=(4, 6), seed=0, reverse_answer=False, holdout_fraction=0.1):
    """Returns (train_tokens, val_tokens, meta). No validation problem (in either order) is in the training set,
    and at most holdout_fraction of each operand-length stratum is held out."""
    rng = np.random.default_rng(seed)
    need = eval_examples + val_examples
    pool_a, pool_b = sample_problems(4 * need, train_digits, rng)
    keep = _within_holdout_quota(pool_a, pool_b, holdout_fraction)
    pool_a, pool_b = pool_a[keep], pool_b[keep]
    _, first = np.unique(_pair_keys(pool_a, pool_b), return_index=True)
    eval_index = np.sort(first)[:eval_examples]  # the fixed ID eval set: distinct problems
    stream_index = np.setdiff1d(np.arange(len(pool_a)), eval_index)[:val_examples]  # the val_*.bin stream
    if len(eval_index) < eval_examples or len(stream_index) < val_examples:
        raise ValueError(f"cannot hold out {need} validation problems of {train_digits[0]}-{train_digits[1]} digits "
                         f"within --holdout_fraction {holdout_fraction}; lower --val_examples/--eval_examples")
    val_a, val_b = pool_a[stream_index], pool_b[stream_index]
    id_a, id_b = pool_a[eval_index], pool_b[eval_index]
    held_out = _pair_keys(pool_a, pool_b)
    train_a, train_b = [], []
    need = train_examples
    while need > 0:
        a, b = sample_problems(int(need * 1.2) + 100, train_digits, rng)
        keep = ~np.isin(_pair_keys(a, b), held_out)
        train_a.append(a[keep][:need])
        train_b.append(b[keep][:need])
        need -= len(train_a[-1])
    train_a, train_b = np.concatenate(train_a), np.concatenate(train_b)
    ood_a, ood_b = sample_problems(eval_examples, ood_digits, rng)
    near_a, near_b = near_ood_problems(eval_examples, train_digits, ood_digits, seed)
    meta = {
        "task": "multiplication", "vocab": VOCAB, "vocab_size": len(VOCAB), "end_token": END,
        "reverse_answer": reverse_answer, "seed": seed, "train_digits": list(train_digits),
        "ood_digits": list(ood_digits), "train_examples": train_examples, "val_examples": val_examples,
        # the fixed problems that the task evaluation scores (ID ones are held out of the training set too)
        "holdout_fraction": holdout_fraction,
        "eval_id": np.stack([id_a, id_b], 1).tolist(),
        "eval_ood": np.stack([ood_a, ood_b], 1).tolist(),
        "eval_near": np.stack([near_a, near_b], 1).tolist(),
    }
    # the longest evaluation input ("<end>a*b=" + answer): train.py checks that block_size covers it
    ea, eb = np.array(meta["eval_id"] + meta["eval_ood"] + meta["eval_near"]).T
    meta["eval_block_size"] = int((3 + num_digits(ea) + num_digits(eb) + num_digits(ea * eb)).max())
    val_tokens = problems_to_tokens(val_a, val_b, reverse_answer)
    return problems_to_tokens(train_a, train_b, reverse_answer), val_tokens, meta


# -----------------------------------------------------------------------------
# Task evaluation

def eval_batch(problems, reverse_answer=False):
    """Inputs and targets for scoring answers with the prompt as context.

    Each row is "<end>a*b=" followed by the answer and <end> (the leading <end> looks like the end of a previous
    example, as in training). Targets are -1 except at the positions that predict an answer token or the final <end>.
    """
    rows, answer_start = [], []
    for a, b in problems:
        prompt = encode(f"\n{a}*{b}=")
        rows.append(prompt + encode(answer_text(a, b, reverse_answer) + "\n"))
        answer_start.append(len(prompt))
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), END, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, answer_start)):
        row = torch.tensor(row)
        x[i, :len(row) - 1] = row[:-1]
        y[i, start - 1:len(row) - 1] = row[start:]  # the answer digits and <end>
    return x, y


@torch.no_grad()
def answer_metrics(model, problems, reverse_answer=False, device="cpu", batch_size=500):
    """Answer-token CE (mean over answer tokens, <end> included) and exact match of greedy decoding.

    Exact match is computed in one teacher-forced pass: greedy decoding reproduces the answer exactly when, at every
    answer position, the argmax given the correct prefix is the correct token (at the first wrong argmax greedy
    decoding would diverge). model(x, y) must return logits first, like GPT.forward.
    """
    total_nll, total_tokens, correct = 0.0, 0, []
    for start in range(0, len(problems), batch_size):
        x, y = eval_batch(problems[start:start + batch_size], reverse_answer)
        x, y = x.to(device), y.to(device)
        logits = model(x, y)[0].float()
        scored = y >= 0
        nll = F.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none")
        total_nll += nll[scored].sum().item()
        total_tokens += int(scored.sum())
        right = (logits.argmax(-1) == y) | ~scored
        correct.append(right.all(dim=1).cpu())
    correct = torch.cat(correct).numpy()
    a, b = np.array(problems).T
    by_digits = {}
    for la, lb in sorted(set(zip(num_digits(a).tolist(), num_digits(b).tolist()))):
        sel = (num_digits(a) == la) & (num_digits(b) == lb)
        by_digits[f"{la}x{lb}"] = float(correct[sel].mean())
    return {"answer_ce": total_nll / total_tokens, "exact": float(correct.mean()), "exact_by_digits": by_digits}


def make_evaluator(data_dir, meta, device, block_size):
    """The task evaluation train.py runs at every eval: ID, OOD and near-OOD answer CE and exact match (never used to
    steer training: model selection uses the ID validation CE)."""
    if block_size < meta["eval_block_size"]:
        raise DataError(f"block_size {block_size} is shorter than the longest evaluation problem of {data_dir} "
                        f"({meta['eval_block_size']} tokens); raise block_size")
    def evaluate(model):
        out = {}
        for split in (s for s in ("id", "ood", "near") if f"eval_{s}" in meta):  # near: data prepared since 2026-12-01
            m = answer_metrics(model, meta[f"eval_{split}"], meta["reverse_answer"], device)
            out.update({f"{split}_answer_ce": m["answer_ce"], f"{split}_exact": m["exact"],
                        f"{split}_exact_by_digits": m["exact_by_digits"]})
        return out
    return evaluate


def write_json(path, obj):
    """obj as JSON at path, atomically: a temporary file renamed into place, removed if the write fails."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="data/mult")
    parser.add_argument("--train_examples", type=int, default=1_000_000)
    parser.add_argument("--val_examples", type=int, default=10_000, help="ID validation stream (val_*.bin)")
    parser.add_argument("--eval_examples", type=int, default=1000, help="fixed problems per split for the task eval")
    parser.add_argument("--train_digits", default="1-3", help="operand digit range for train and ID validation")
    parser.add_argument("--ood_digits", default="4-6", help="operand digit range for OOD evaluation")
    parser.add_argument("--holdout_fraction", type=float, default=0.1,
                        help="at most this fraction of each operand-length stratum is held out for validation")
    parser.add_argument("--reverse_answer", action="store_true", help="write answers least-significant digit first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def digit_range(text, name):
        try:
            lo, hi = (int(v) for v in text.split("-"))
        except ValueError:
            parser.error(f"--{name} must look like LO-HI, e.g. 1-3; got {text!r}")
        if not 1 <= lo <= hi <= MAX_DIGITS:
            parser.error(f"--{name} {text}: need 1 <= LO <= HI <= {MAX_DIGITS}")
        return lo, hi

    train_digits, ood_digits = digit_range(args.train_digits, "train_digits"), digit_range(args.ood_digits, "ood_digits")
    if min(args.train_examples, args.val_examples, args.eval_examples) <= 0:
        parser.error("--train_examples, --val_examples and --eval_examples must be positive")
    if not 0 < args.holdout_fraction < 1:
        parser.error("--holdout_fraction must be between 0 and 1")
    try:
        train, val, meta = make_dataset(args.train_examples, args.val_examples, args.eval_examples, train_digits,
                                        ood_digits, args.seed, args.reverse_answer, args.holdout_fraction)
    except ValueError as e:
        parser.error(str(e))
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    try:
        claim_folder(args.out_dir, "prepare_mult.py", settings)  # one writer; never into a run or another's data
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    path = None
    try:  # a full disk is one line, and leaves no temporary file behind (meta.json, written last, stays missing)
        for name, tokens in (("train_000000.bin", train), ("val_000000.bin", val)):
            path = os.path.join(args.out_dir, name)
            write_shard(path, tokens)
        path = os.path.join(args.out_dir, "meta.json")
        write_json(path, meta)
    except OSError as e:
        parser.exit(1, f"error: {write_error(path, e)}\n")
    longest = meta["eval_block_size"]
    print(f"wrote {args.out_dir}: {len(train):,} train tokens ({args.train_examples:,} examples), {len(val):,} val "
          f"tokens, {args.eval_examples} ID + {args.eval_examples} OOD + {args.eval_examples} near-OOD evaluation "
          f"problems; "
          f"the longest OOD example needs block_size >= {longest}")
    print("example:", decode(train[:40]).replace("\n", "⏎"))


if __name__ == "__main__":
    main()
