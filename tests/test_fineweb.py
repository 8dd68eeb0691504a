"""prepare_fineweb.py on local parquet/jsonl files in FineWeb's schema, then training and sampling on the result."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, read_log, run_train
from shards import TokenWindows, read_shard, write_shard

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache"))
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
import prepare_fineweb as pf  # noqa: E402

_, BPE_ERROR = pf.load_encoder()
if BPE_ERROR and os.environ.get("REQUIRE_BPE") == "1":  # CI has the BPE: a skip there is a failure
    raise RuntimeError(f"REQUIRE_BPE=1 but {BPE_ERROR}")
needs_bpe = pytest.mark.skipif(BPE_ERROR is not None, reason=f"GPT-2's BPE is not available offline: {BPE_ERROR}")

WORDS = ("the model learns to compress its representations while it memorizes the data and then generalizes "
         "better on problems it has never seen, which is what the paper claims for gated phase transitions").split()



def listing(folder):
    """What a preparation left in folder, but for the lock file every writer holds (shards.lock_folder)."""
    return sorted(f for f in os.listdir(folder) if f != "lock")

def make_documents(n, seed):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(5, 400))
        words = rng.choice(WORDS, size=length)
        docs.append(f"Document {i}. " + " ".join(words).capitalize() + ".\n\nÜnïcödé ✓ and numbers 12345.")
    return docs


def write_fineweb_parquet(directory, docs, files=3):
    os.makedirs(directory, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(len(docs)), files)):
        rows = [docs[i] for i in part]
        table = pa.table({
            "text": rows, "id": [f"<urn:uuid:{i}>" for i in part], "dump": ["CC-MAIN-2024-10"] * len(rows),
            "url": [f"https://example.com/{i}" for i in part], "date": ["2024-02-20T00:00:00Z"] * len(rows),
            "file_path": ["s3://commoncrawl/x.warc.gz"] * len(rows), "language": ["en"] * len(rows),
            "language_score": [0.95] * len(rows), "token_count": [len(r.split()) for r in rows]})
        pq.write_table(table, os.path.join(directory, f"part_{f:02d}.parquet"))
    return sorted(glob.glob(os.path.join(directory, "*.parquet")))


def prepare(files, out_dir, *extra):
    cmd = [sys.executable, os.path.join(REPO, "prepare_fineweb.py"), "--local_files", *files, f"--out_dir={out_dir}",
           "--shard_size=3000", "--val_tokens=1500", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_jsonl(path, docs):
    with open(path, "w") as f:
        f.write("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def shard_tokens(out_dir):
    """Every shard's tokens in document order: val, test (if any), train."""
    return [np.array(read_shard(p)) for split in ("val", "test", "train")
            for p in sorted(glob.glob(os.path.join(out_dir, f"{split}_*.bin")))]


def digests(out_dir):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out_dir, "*.bin")))}


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory):
    if BPE_ERROR:
        pytest.skip(f"GPT-2's BPE is not available offline: {BPE_ERROR}")
    root = tmp_path_factory.mktemp("fineweb")
    docs = make_documents(120, seed=0)
    files = write_fineweb_parquet(str(root / "parquet"), docs)
    out = str(root / "shards")
    result = prepare(files, out, "--num_proc=2")
    assert result.returncode == 0, result.stderr
    return docs, files, out


@pytest.fixture(scope="module")
def fineweb_test_split(fineweb, tmp_path_factory):
    _, files, _ = fineweb
    out = str(tmp_path_factory.mktemp("fineweb_test_split") / "shards")
    result = prepare(files, out, "--num_proc=1", "--test_tokens=1500")
    assert result.returncode == 0, result.stderr
    return out


def test_shards_hold_every_document_after_an_eot(fineweb):
    import tiktoken
    docs, _, out = fineweb
    shards = shard_tokens(out)
    assert all(len(s) == 3000 for s in shards[1:-1]) and 0 < len(shards[-1]) <= 3000
    # the val shard holds whole documents: at least --val_tokens, ending where the first train shard starts a document
    last_doc = len(shards[0]) - np.flatnonzero(shards[0] == 50256)[-1]
    assert 1500 <= len(shards[0]) < 1500 + last_doc and shards[1][0] == 50256
    assert os.path.exists(os.path.join(out, "val_000000.bin")) and os.path.exists(os.path.join(out, "train_000001.bin"))
    tokens = np.concatenate(shards)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["tokens"] == len(tokens) and meta["vocab_size"] == 50257 and meta["tokenizer"] == "r50k_base"
    enc = tiktoken.get_encoding("r50k_base")
    assert len(tokens) == sum(1 + len(enc.encode_ordinary(d)) for d in docs)
    starts = np.flatnonzero(tokens == 50256)
    assert starts[0] == 0 and len(starts) == len(docs)
    decoded = [enc.decode(seg.tolist()) for seg in np.split(tokens, starts[1:])]
    assert decoded == ["<|endoftext|>" + d for d in docs]


def test_test_split_holds_the_next_whole_documents(fineweb, fineweb_test_split):
    _, _, out = fineweb
    split_out = fineweb_test_split
    val, test, *train = shard_tokens(split_out)
    assert digests(split_out)["val_000000.bin"] == digests(out)["val_000000.bin"]  # the test split leaves val alone
    # test_000000.bin: the documents after val's, whole, at least --test_tokens, up to the end of the one crossing it
    last_doc = len(test) - np.flatnonzero(test == 50256)[-1]
    assert test[0] == 50256 and 1500 <= len(test) < 1500 + last_doc and train[0][0] == 50256
    assert all(len(s) == 3000 for s in train[:-1]) and os.path.exists(os.path.join(split_out, "train_000001.bin"))
    # val, test and train are disjoint and together the same document stream as without a test split
    assert np.array_equal(np.concatenate([val, test, *train]), np.concatenate(shard_tokens(out)))
    meta = json.load(open(os.path.join(split_out, "meta.json")))
    assert (meta["val_tokens"], meta["test_tokens"], meta["train_tokens"]) == (len(val), len(test),
                                                                              sum(map(len, train)))
    assert TokenWindows(split_out, "test", 32, vocab_size=meta["vocab_size"]).cum_starts[-1] == len(test) - 32


def test_jsonl_gives_the_same_tokens(fineweb, tmp_path):
    docs, _, out = fineweb
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    result = prepare([path], str(tmp_path / "shards"), "--num_proc=1")
    assert result.returncode == 0, result.stderr
    assert digests(str(tmp_path / "shards")) == digests(out)


def test_restart_after_interruption_is_byte_identical(fineweb, fineweb_test_split, tmp_path, monkeypatch):
    _, files, _ = fineweb
    target = str(tmp_path / "interrupted")
    real_write = pf.write_shard_with_sidecar
    written = []

    def crash_after_three(path, tokens, position):
        if len(written) == 3:
            with open(path + ".tmp123", "wb") as f:
                f.write(b"half a shard")  # what a kill in the middle of a write leaves
            raise KeyboardInterrupt
        real_write(path, tokens, position)
        written.append(path)

    args = ["--local_files", *files, f"--out_dir={target}", "--shard_size=3000", "--val_tokens=1500",
            "--test_tokens=1500", "--num_proc=1"]
    monkeypatch.setattr(pf, "write_shard_with_sidecar", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        pf.main(args)
    assert listing(target) == ["prepare.json", "test_000000.bin", "test_000000.bin.json",
                                          "train_000001.bin", "train_000001.bin.json", "train_000002.bin.tmp123",
                                          "val_000000.bin", "val_000000.bin.json"]
    monkeypatch.setattr(pf, "write_shard_with_sidecar", real_write)
    pf.main(args)
    assert not glob.glob(os.path.join(target, "*.tmp*"))
    assert digests(target) == digests(fineweb_test_split)
    assert json.load(open(os.path.join(target, "meta.json"))) == json.load(open(os.path.join(fineweb_test_split,
                                                                                              "meta.json")))


def test_num_tokens_cap(fineweb, tmp_path):
    _, files, _ = fineweb
    result = prepare(files, str(tmp_path / "cap"), "--num_proc=1", "--num_tokens=4000")
    assert result.returncode == 0, result.stderr
    assert sum(len(s) for s in shard_tokens(str(tmp_path / "cap"))) == 4000


def test_shuffle_seed_permutes_documents_reproducibly(fineweb, tmp_path):
    """The same permutation on every run, with a test split, and for jsonl (read by this script) as for parquet
    (read through Hugging Face datasets)."""
    docs, files, out = fineweb
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert prepare(files, a, "--num_proc=1", "--shuffle_seed=3", "--test_tokens=1500").returncode == 0
    jsonl = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert prepare([jsonl], b, "--num_proc=1", "--shuffle_seed=3", "--test_tokens=1500").returncode == 0
    assert digests(a) == digests(b) and digests(a) != digests(out)
    assert sorted(map(len, np.split(np.concatenate(shard_tokens(a)), np.flatnonzero(
        np.concatenate(shard_tokens(a)) == 50256)[1:]))) == sorted(map(len, np.split(np.concatenate(
            shard_tokens(out)), np.flatnonzero(np.concatenate(shard_tokens(out)) == 50256)[1:])))


def exit_message(argv):
    """main(argv)'s one-line error: what `python prepare_fineweb.py ARGV` prints before exiting with status 1."""
    with pytest.raises(SystemExit) as e:
        pf.main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


@needs_bpe
def test_a_rerun_continues_only_the_inputs_and_settings_it_was_prepared_from(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", make_documents(40, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_documents(40, seed=2))
    out = str(tmp_path / "out")
    settings = [f"--out_dir={out}", "--shard_size=3000", "--val_tokens=1500", "--num_proc=1"]
    pf.main(["--local_files", a, *settings])
    complete = digests(out)
    assert len(complete) >= 3 and json.load(open(os.path.join(out, "prepare.json")))["source"] == {
        "local_files": [[os.path.abspath(a), os.path.getsize(a)]]}
    last = max(name for name in complete if name.startswith("train_"))
    for name in ("meta.json", last, last + ".json"):  # as an interrupted run leaves it
        os.remove(os.path.join(out, name))
    for argv in (["--local_files", b, *settings], ["--local_files", a, *settings, "--shard_size=2000"],
                 ["--local_files", a, b, *settings], ["--local_files", a, *settings, "--test_tokens=1000"]):
        message = exit_message(argv)
        assert "mix two datasets" in message and f"delete {out} or choose another --out_dir" in message
    assert "shard_size=2000 (was 3000)" in exit_message(["--local_files", a, *settings, "--shard_size=2000"])
    with open(a, "a") as f:  # the same file, grown: another corpus
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert "the input: local files and their sizes" in exit_message(["--local_files", a, *settings])
    with open(a, "r+") as f:
        f.truncate(os.path.getsize(a) - len(json.dumps({"text": "one more document"}) + "\n"))
    capsys.readouterr()
    pf.main(["--local_files", a, *settings])  # the same inputs: it continues, byte-identical
    assert "continuing after document" in capsys.readouterr().out and digests(out) == complete
    pf.main(["--local_files", a, *settings])  # complete: nothing to do
    assert "is complete" in capsys.readouterr().out and digests(out) == complete


def test_shards_without_a_record_of_their_inputs_are_not_continued(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", ["a document"])
    out = tmp_path / "out"
    out.mkdir()
    write_shard(str(out / "val_000000.bin"), np.arange(10))  # e.g. prepared by an older prepare_fineweb.py
    message = exit_message(["--local_files", docs, f"--out_dir={out}", "--num_proc=1"])
    assert "nothing says which script made them" in message and f"move {out} aside" in message
    assert listing(out) == ["val_000000.bin"]


@needs_bpe
@pytest.mark.parametrize("content, where, problem", [
    (b"", "", "holds no documents"),
    (b'{"text": "fine"}\n{"text": "broken\n', " line 2", "is not JSON"),
    (b'{"text": "fine"}\n{"body": "no text"}\n', " line 2", 'has no "text" field'),
    (b'{"text": "fine"}\n\n{"text": null}\n', " line 3", 'has "text": null, not a string'),
    (b'{"text": "fine"}\n["text"]\n', " line 2", "is not a JSON object"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', " line 2", "byte 0xe9 at column 14 is not UTF-8"),
])
def test_a_bad_jsonl_line_is_one_error_naming_the_file_and_line_before_any_shard(tmp_path, content, where, problem):
    good = write_jsonl(tmp_path / "a.jsonl", make_documents(30, seed=1))  # enough for shards before the bad file
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "out"
    message = exit_message(["--local_files", good, str(bad), f"--out_dir={out}", "--shard_size=500",
                            "--val_tokens=500", "--num_proc=1"])
    assert message.startswith(f"error: {bad}{where}") and problem in message
    assert "remove" in message  # and says what to do
    assert listing(out) == []  # nothing written that a rerun could continue


@needs_bpe
def test_a_bad_jsonl_line_exits_cleanly_from_the_command_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    result = prepare([str(bad)], str(tmp_path / "out"), "--num_proc=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad} line 2 is not JSON")


@needs_bpe
@pytest.mark.parametrize("column, problem", [
    ({"text": ["fine", None, "fine"]}, "row 1 has no text (null)"),
    ({"body": ["no text"]}, 'has no "text" column (columns: body)'),
    ({"text": [1, 2]}, 'column holds int64, not strings'),
])
def test_a_bad_parquet_file_is_one_error_naming_it_before_any_shard(tmp_path, column, problem):
    good = write_fineweb_parquet(str(tmp_path / "good"), make_documents(30, seed=1), files=1)
    bad = str(tmp_path / "part_99.parquet")
    pq.write_table(pa.table(column), bad)
    result = prepare(good + [bad], str(tmp_path / "out"), "--num_proc=2")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}") and problem in result.stderr
    assert not os.path.exists(tmp_path / "out") or listing(tmp_path / "out") == []


def test_missing_bpe_stops_at_once_with_advice(tmp_path):
    """Offline with an empty tiktoken cache: a non-zero exit within seconds that names TIKTOKEN_CACHE_DIR, no hang."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(50, seed=1)))
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, os.path.join(REPO, "prepare_fineweb.py"), "--local_files", str(path),
           f"--out_dir={tmp_path / 'out'}", "--num_proc=2"]
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "TIKTOKEN_CACHE_DIR" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_worker_without_the_bpe_raises_instead_of_hanging_the_pool(monkeypatch):
    monkeypatch.setattr(pf, "_encoder", None)
    monkeypatch.setattr(pf, "load_encoder", lambda: (None, "no BPE here"))
    pf._init_worker()  # a raising pool initializer would make multiprocessing respawn workers for ever
    with pytest.raises(RuntimeError, match="no BPE here"):
        pf.tokenize("some text")


@needs_bpe
def test_unreachable_hub_gives_a_clear_error(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "prepare_fineweb.py"), f"--out_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "--local_files" in result.stderr and "Traceback" not in result.stderr


def test_train_and_sample_on_the_shards(fineweb, tmp_path):
    _, _, data = fineweb
    out = str(tmp_path / "run")
    run_train(os.path.join(REPO, "config", "fineweb_cpu.py"), f"--data_dir={data}", f"--out_dir={out}",
              "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2", "--max_iters=4",
              "--warmup_iters=1", "--eval_interval=2", "--eval_iters=2", "--log_interval=2", "--num_threads=1")
    assert read_log(out, "eval")[-1]["iter"] == 4
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={out}", "--start=The model",
                             "--num_samples=2", "--max_new_tokens=8"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("The model") == 2
