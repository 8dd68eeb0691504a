"""Bad input is one line that says what to do, and nothing is lost: plot.py's arguments and logs, broken shard links,
damaged prepare.json, a full disk while preparing, an interrupted preparation, a corpus of another tokenizer."""

import errno
import json
import os
import shlex
import subprocess
import sys
import types

import numpy as np
import pytest

import plot
import prepare_fineweb as pf
import prepare_mult
import shards
from conftest import REPO
from shards import DataError, TokenWindows, write_shard

SMALL_MULT = ["--train_examples=300", "--val_examples=50", "--eval_examples=10"]


def one_line(excinfo, capsys=None):
    """The one-line message of a SystemExit: sys.exit("error: ...") carries it; parser.exit(1, ...) printed it."""
    code = excinfo.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code == 1 or isinstance(code, str), code
    assert message.startswith("error: ") and "\n" not in message.strip() and "Traceback" not in message, message
    return message


def listing(folder):
    return sorted(f for f in os.listdir(folder) if f != "lock")


# plot.py ---------------------------------------------------------------------------------------------------------

def a_run(path):
    path.mkdir()
    records = [{"kind": "train", "iter": i, "phase": 1, "ce": 3 - i / 10, "mbe": 1.0} for i in (1, 2, 3)]
    records.append({"kind": "eval", "iter": 3, "val_ce": 2.0, "val_mbe": 1.0, "val_mbe_layers": [1.0, 0.9]})
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def plot_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(argv)
    return one_line(e, capsys)


def test_plot_into_a_missing_folder_is_one_line_with_exit_code_1(tmp_path):
    run = a_run(tmp_path / "run")
    result = subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), run, "-o", "nodir/x.png"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nodir does not exist" in result.stderr
    assert "mkdir -p nodir" in result.stderr and listing(tmp_path) == ["run"]


def test_plot_with_an_unknown_image_format_or_a_csv_in_a_missing_folder_is_one_line(tmp_path, capsys):
    run = a_run(tmp_path / "run")
    message = plot_error([run, "-o", str(tmp_path / "x.pgn")], capsys)
    assert "'pgn' is not an image format" in message and ".png" in message
    message = plot_error([run, "-o", str(tmp_path / "x.png"), "--csv", str(tmp_path / "nodir" / "x.csv")], capsys)
    assert f"{tmp_path / 'nodir'} does not exist" in message
    assert listing(tmp_path) == ["run"]  # checked before anything was drawn: no image, no temporary file


@pytest.mark.parametrize("lines, problem", [
    (["[1, 2]", "[3]"], "JSON but not a record of train.py's log"),
    (['{"a": 1}'], "JSON but not a record of train.py's log"),
    (['{"iter": 1, "kind": "eval"}', '{"iter": 2, "kind": "train", "ce": 1.0}'], "has no usable 'val_ce'"),
    (['{"iter": 1, "kind": "train", "ce": "low", "mbe": 1, "phase": 1}'], "has no usable 'ce'"),
])
def test_plot_of_a_log_that_is_not_train_pys_is_one_line(tmp_path, capsys, lines, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    message = plot_error([str(run), "-o", str(tmp_path / "x.png")], capsys)
    assert problem in message and str(run / "log.jsonl") in message
    assert not (tmp_path / "x.png").exists()


def test_plot_of_a_run_the_user_may_only_read_writes_nothing_into_it(tmp_path, capsys):
    run = a_run(tmp_path / "run")
    before = sorted(os.listdir(run))
    out = tmp_path / "figures"
    out.mkdir()
    os.chmod(run, 0o555)
    try:
        plot.main([run, "-o", str(out / "x.png"), "--csv", str(out / "x.csv")])
        assert sorted(os.listdir(run)) == before  # no lock file, no temporary file: it only reads the run
    finally:
        os.chmod(run, 0o755)
    assert sorted(os.listdir(out)) == ["x.csv", "x.png"] and (out / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    run = a_run(tmp_path / "run")
    table = tmp_path / "out" / "x.csv"
    table.parent.mkdir()
    table.write_text("the old table\n")

    def half_written(runs, path):
        with open(path, "w") as f:
            f.write("run,iter")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "write_csv", half_written)
    message = plot_error([run, "-o", str(tmp_path / "out" / "x.png"), "--csv", str(table)], capsys)
    assert f"the disk holding {table.parent} is full" in message
    assert table.read_text() == "the old table\n" and sorted(os.listdir(table.parent)) == ["x.csv", "x.png"]


# a shard that is a broken link -----------------------------------------------------------------------------------

def test_a_shard_that_is_a_broken_link_is_one_line_naming_it(tmp_path):
    write_shard(str(tmp_path / "val_000000.bin"), np.arange(100) % 50)
    link = tmp_path / "train_000000.bin"
    os.symlink("/nonexistent/fineweb_train_000001.bin", link)
    with pytest.raises(DataError) as e:
        TokenWindows(str(tmp_path), "train", 8)
    message = str(e.value)
    assert f"{link} is a broken symbolic link" in message and "/nonexistent/fineweb_train_000001.bin" in message
    assert "ln -sfn" in message and "\n" not in message


# a damaged prepare.json ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [("{not json", "not JSON"), ("[1, 2]", "not the JSON object"),
                                              ('{"script": 5}', "not the JSON object")])
def test_a_damaged_prepare_json_is_one_line_for_prepare_mult(tmp_path, capsys, content, problem):
    out = tmp_path / "mult"
    out.mkdir()
    (out / "prepare.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        prepare_mult.main([f"--out_dir={out}", *SMALL_MULT])
    message = one_line(e, capsys)
    assert f"{out / 'prepare.json'} is damaged ({problem}" in message and "delete it (or the folder" in message
    assert listing(out) == ["prepare.json"] and (out / "prepare.json").read_text() == content  # nothing touched


@pytest.mark.parametrize("content, problem", [("{not json", "not JSON"), ('"text"', "not the JSON object")])
def test_a_damaged_prepare_json_is_one_line_for_prepare_fineweb(tmp_path, content, problem):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n')
    out = tmp_path / "text"
    out.mkdir()
    (out / "prepare.json").write_text(content)
    write_shard(str(out / "val_000000.bin"), np.arange(10))
    with pytest.raises(SystemExit) as e:
        pf.main(["--local_files", str(docs), f"--out_dir={out}", "--num_proc=1"])
    message = one_line(e)
    assert f"{out / 'prepare.json'} is damaged ({problem}" in message and f"delete {out}" in message
    assert listing(out) == ["prepare.json", "val_000000.bin"]


# a full disk -----------------------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(monkeypatch):
    """Writing a shard's bytes fails with ENOSPC after its temporary file was created (as on a full disk)."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if ".bin.tmp" in str(path) and "w" in mode else f

    monkeypatch.setattr(shards, "open", fake_open, raising=False)


def test_a_full_disk_during_prepare_mult_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, full_disk):
    out = tmp_path / "mult"
    with pytest.raises(SystemExit) as e:
        prepare_mult.main([f"--out_dir={out}", *SMALL_MULT])
    message = one_line(e, capsys)
    assert f"the disk holding {out} is full" in message and "run the same command again" in message
    assert listing(out) == ["prepare.json"]  # no *.tmp* file left behind, no meta.json


class FakeEncoder:
    """Stands in for GPT-2's BPE (not needed to write shards): one token per character."""
    def encode_ordinary(self, text):
        return [ord(ch) % 50000 for ch in text]


def test_a_full_disk_during_prepare_fineweb_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                      full_disk):
    monkeypatch.setattr(pf, "_encoder", None)  # restored afterwards: the fake encoder goes with the test
    monkeypatch.setattr(pf, "load_encoder", lambda: (FakeEncoder(), None))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    out = tmp_path / "text"
    with pytest.raises(SystemExit) as e:
        pf.main(["--local_files", str(docs), f"--out_dir={out}", "--num_proc=1", "--shard_size=500",
                 "--val_tokens=300"])
    message = one_line(e)
    assert f"the disk holding {out} is full" in message and "val_000000.bin" in message
    assert listing(out) == ["prepare.json"]


# an interrupted preparation --------------------------------------------------------------------------------------

def data_config(data_dir, vocab_size=0, eval_data_dirs=(), block_size=8):
    return types.SimpleNamespace(data_dir=str(data_dir), vocab_size=vocab_size, block_size=block_size, device="cpu",
                                 eval_data_dirs=[str(d) for d in eval_data_dirs])


def test_training_on_an_interrupted_prepare_mult_says_to_run_it_again(tmp_path, capsys):
    from evaluation import load_data
    out = tmp_path / "mult"
    prepare_mult.main([f"--out_dir={out}", *SMALL_MULT, "--seed=3", "--reverse_answer"])
    os.remove(out / "meta.json")  # as a preparation stopped before its last write leaves it
    with pytest.raises(DataError) as e:
        load_data(data_config(out))
    message = str(e.value)
    assert "was interrupted" in message and "set --vocab_size" not in message and "\n" not in message
    command = message[message.index("`") + 1:message.rindex("`")]
    assert command.startswith(f"python prepare_mult.py --out_dir={out}") and "--seed=3" in command
    prepare_mult.main(shlex.split(command)[2:])  # the command it gives completes the folder
    assert (out / "meta.json").exists()
    assert load_data(data_config(out, block_size=32))[0].block_size == 32


def test_a_preparation_still_at_work_says_to_wait(tmp_path):
    import fcntl
    out = tmp_path / "text"
    out.mkdir()
    (out / "prepare.json").write_text(json.dumps({"script": "prepare_fineweb.py"}))
    with open(out / "lock", "w") as held:
        held.write("pid 12345 on host")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="still being prepared .by pid 12345 on host.*wait"):
            shards.read_meta(str(out))
    with pytest.raises(DataError, match="was interrupted.*the prepare_fineweb.py command that made it"):
        shards.read_meta(str(out))


def test_an_interrupted_run_from_the_command_line_is_one_line(tmp_path):
    out = tmp_path / "mult"  # prepared by another process, which held the folder's lock until it ended
    subprocess.run([sys.executable, os.path.join(REPO, "prepare_mult.py"), f"--out_dir={out}", *SMALL_MULT], cwd=REPO,
                   capture_output=True, check=True, timeout=300)
    os.remove(out / "meta.json")
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={out}",
                             f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--max_iters=1"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "was interrupted" in result.stderr and "set --vocab_size" not in result.stderr


# a corpus of another tokenizer -----------------------------------------------------------------------------------

def corpus(folder, ids, meta=None, splits=("val",)):
    folder.mkdir()
    for split in splits:
        write_shard(str(folder / f"{split}_000000.bin"), ids)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def small_data(tmp_path):
    return corpus(tmp_path / "small", np.arange(400) % 64, {"vocab_size": 64}, splits=("train", "val"))


@pytest.mark.parametrize("meta", [{"vocab_size": 50257, "tokenizer": "r50k_base"}, {"vocab_size": 50257}, None])
def test_an_eval_corpus_of_another_tokenizer_says_to_prepare_it_again(tmp_path, meta):
    from evaluation import load_data
    data = small_data(tmp_path)
    other = corpus(tmp_path / "text", np.arange(400) * 100, meta)
    with pytest.raises(DataError) as e:
        load_data(data_config(data, eval_data_dirs=[other]))
    message = str(e.value)
    assert f"eval_data_dirs {other} was prepared with another tokenizer than {data}" in message
    assert f"prepare {other} again with the same script and tokenizer as {data}" in message
    assert "raise vocab_size" not in message and "at least" not in message
    load_data(data_config(data, eval_data_dirs=[corpus(tmp_path / "same", np.arange(400) % 64)]))  # ids fit: fine


@pytest.mark.parametrize("meta", [{"vocab_size": 50257, "tokenizer": "r50k_base"}, None])
def test_a_resumed_data_dir_of_another_tokenizer_says_it_was_prepared_with_another(tmp_path, meta):
    from evaluation import load_data
    text = corpus(tmp_path / "text", np.arange(400) * 100, meta, splits=("train", "val"))
    with pytest.raises(DataError) as e:  # vocab_size 64: the checkpoint's model
        load_data(data_config(text, vocab_size=64))
    message = str(e.value)
    assert "was prepared with another tokenizer than the model's" in message and "\n" not in message
    if meta:
        assert "the r50k_base tokenizer" in message and "raise vocab_size" not in message
