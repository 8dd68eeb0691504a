"""Nothing lost, nothing silently wrong (issue 39): overwrite deletes last, a resume continues the run it resumes,
the log is exactly one run whatever the resume's intervals, and log.jsonl is strict JSON. Each through the command
line, each failing on the code before the issue."""

import json
import os

import pytest

from conftest import TINY, read_log, run_train

TIMING = ("ms_per_iter", "tokens_per_s", "mfu")


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_overwrite_checks_the_new_run_before_it_deletes_the_old_one(token_data, tmp_path):
    out = str(tmp_path / "run")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    before = open(os.path.join(out, "log.jsonl")).read()
    for bad in (f"--data_dir={tmp_path / 'typo'}", "--mbe_layers=[7]", "--vocab_size=10", "--n_embd=33"):
        result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2",
                           "--overwrite_out_dir=True", bad, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (bad, result.stderr)
        assert os.path.exists(os.path.join(out, "ckpt.pt")), bad
        assert open(os.path.join(out, "log.jsonl")).read() == before, bad
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3",
              "--overwrite_out_dir=True")
    assert [r["iter"] for r in read_log(out, "eval")] == [0, 3]  # a good overwrite replaces it


def test_a_resume_without_the_config_continues_the_run_it_resumes(token_data, tmp_path):
    out = str(tmp_path / "baseline")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--gapt_mode=off", "--max_iters=2",
              "--eval_interval=2", "--mbe_patch_size=4")
    result = run_train(f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--device=cpu", "--num_threads=1")
    assert "gapt_mode=off: CE only" in result.stdout  # the checkpoint's mode, not train.py's default
    assert {r["phase"] for r in read_log(out, "train")} == {1}
    result = run_train(f"--out_dir={out}", "--init_from=resume", "--max_iters=6", "--device=cpu",
                       "--num_threads=1", "--gapt_mode=always")
    assert "resume: the run's own settings, but this command changes max_iters 4 -> 6, gapt_mode 'off' -> " \
           "'always'" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--max_iters=2"], "nothing to train; raise --max_iters"),
    (["--max_iters=6", "--gapt_version=later"], "cannot continue as another version"),
    (["--max_iters=6", "--seed=5"], "a new seed would only move the evaluation windows"),
    (["--max_iters=6", "--n_layer=4"], "has n_layer=3: the weights would not fit"),
    (["--max_iters=6", "--optimizer=muon"], "its optimizer state belongs to that optimizer"),
])
def test_a_resume_that_cannot_continue_the_run_is_one_line(token_data, tmp_path, args, message):
    out = str(tmp_path / "run")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    before = open(os.path.join(out, "log.jsonl")).read()
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--init_from=resume", *args,
                       check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert open(os.path.join(out, "log.jsonl")).read() == before


def test_the_log_is_one_run_whatever_the_resumes_intervals(token_data, tmp_path):
    """Stopped between log lines (log_interval 3, stop at 4) and resumed with a larger eval_interval: every train
    record equals the straight run's (the open interval's mean spans the resume), the checkpoint step's eval stays,
    and no eval is repeated."""
    common = [*TINY, f"--data_dir={token_data}", "--gapt_mode=off", "--lr_decay_iters=9", "--log_interval=3"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(*common, f"--out_dir={straight}", "--max_iters=9", "--eval_interval=2")
    run_train(*common, f"--out_dir={resumed}", "--max_iters=4", "--eval_interval=2")
    run_train(*common, f"--out_dir={resumed}", "--max_iters=9", "--eval_interval=5", "--init_from=resume")
    assert comparable(read_log(straight, "train")) == comparable(read_log(resumed, "train"))
    assert [r["iter"] for r in read_log(resumed, "eval")] == [0, 2, 4, 5, 9]


def test_the_log_is_strict_json_even_where_a_gate_holds_infinity(token_data, tmp_path):
    out = str(tmp_path / "run")  # paper_era resets its best CE to +inf on entering compression
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=8", "--log_interval=1",
              "--gapt_patience_memorize=2", "--gapt_delta=0.5", "--eval_interval=8")
    lines = open(os.path.join(out, "log.jsonl")).read().splitlines()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert any(r.get("gapt") and r["gapt"]["ce_min"] is None for r in records)


# experiment.py ------------------------------------------------------------------------------------------------------

def experiment(*args, check=True, timeout=600):
    import subprocess
    import sys
    from conftest import REPO
    result = subprocess.run([sys.executable, os.path.join(REPO, "experiment.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def tiny_config(tmp_path, token_data, **extra):
    values = {a[2:].split("=")[0]: a.split("=", 1)[1] for a in TINY}
    values.update({"data_dir": token_data, "max_iters": "4", "eval_interval": "4", "log_interval": "2", **extra})
    text = "".join(f"{k} = {v!r}\n" if k in ("device", "optimizer", "data_dir") else f"{k} = {v}\n"
                   for k, v in values.items())
    path = tmp_path / "tiny.py"
    path.write_text(text)
    return str(path)


def test_experiment_runs_are_their_arguments(token_data, tmp_path):
    config, root = tiny_config(tmp_path, token_data), str(tmp_path / "sweep")
    experiment("--out_root", root, "--seeds", "0", "--threads", "1", "--configs", config)
    assert json.load(open(os.path.join(root, "tiny-s0", "run.json")))["train_args"] == []
    changed = experiment("--out_root", root, "--seeds", "0", "--threads", "1", "--configs", config,
                         "--train_args", "--dropout=0.1", check=False)
    assert changed.returncode == 1 and "tiny-s0 was started with train_args=[]" in changed.stderr
    assert "'--dropout=0.1'" in changed.stderr and "Traceback" not in changed.stderr


@pytest.mark.parametrize("args, message", [(["--jobs", "0"], "--jobs 0: give 1 or more"),
                                           (["--seeds", "0", "1", "0"], "--seeds lists 0 more than once"),
                                           (["--set", "data_dir=/tmp/x"], "holds a '/': pass such settings with"),
                                           (["--set", *[f"n_embd={4 * i}" for i in range(1, 40)]], "is too long for a")])
def test_experiment_bad_counts_are_one_line(args, message):
    result = experiment(*args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_killed_experiment_leaves_no_run_behind_and_its_rerun_keeps_the_output(token_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    config, root = tiny_config(tmp_path, token_data, max_iters="100000", eval_interval="100000"), tmp_path / "sw"
    parent = subprocess.Popen([sys.executable, os.path.join(REPO, "experiment.py"), "--out_root", str(root),
                               "--seeds", "0", "--threads", "1", "--configs", config], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = root / "tiny-s0" / "log.jsonl"
    try:
        deadline = time.time() + 120
        while not (log.exists() and '"train"' in log.read_text()):
            assert time.time() < deadline, "the run never started"
            time.sleep(0.2)
        child = int(open(root / "tiny-s0" / "lock").read().split()[1])
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
            assert time.time() < deadline, "the run outlived its experiment.py"
            time.sleep(0.2)
    finally:
        parent.kill()
    written = (root / "tiny-s0" / "stdout.txt").read_text()
    assert "iter 2: loss" in written
    rerun = subprocess.Popen([sys.executable, os.path.join(REPO, "experiment.py"), "--out_root", str(root),
                              "--seeds", "0", "--threads", "1", "--configs", config], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    rerun.send_signal(signal.SIGTERM)
    rerun.wait(timeout=60)
    assert (root / "tiny-s0" / "stdout.txt").read_text().startswith(written)  # appended to, never cut


# sample.py ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, message", [("--temperature=-1", "is negative"), ("--max_new_tokens=0", "at least 1"),
                                          ("--top_k=0", "at least 1"), ("--start=FILE:/nonexistent", "not found")])
def test_sample_settings_that_would_mislead_are_one_line(arg, message):
    import subprocess
    import sys
    from conftest import REPO
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), arg], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_eval_corpus_of_another_tokenizer_is_one_line(tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    mult = str(tmp_path / "mult")
    subprocess.run([sys.executable, os.path.join(REPO, "prepare_mult.py"), f"--out_dir={mult}",
                    "--train_examples=2000", "--val_examples=200", "--eval_examples=20"], check=True, cwd=REPO,
                   capture_output=True)
    text = tmp_path / "text"
    text.mkdir()
    from shards import write_shard
    import numpy as np
    for split in ("train", "val"):
        write_shard(str(text / f"{split}_000000.bin"), np.arange(5000) % 12)
    (text / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "r50k_base"}))
    result = run_train(*TINY, f"--data_dir={text}", f"--eval_data_dirs=['{mult}']", f"--out_dir={tmp_path / 'o'}",
                       "--vocab_size=50304", "--max_iters=1", check=False)
    assert result.returncode == 1 and "holds tokens of the multiplication task's vocabulary" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_truncated_middle_shard_says_to_prepare_into_an_empty_folder(token_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    shard = data / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run_train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", check=False)
    assert result.returncode == 1 and "into an empty folder: move" in result.stderr


def test_a_non_finite_loss_before_any_checkpoint_says_so(token_data, tmp_path):
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={tmp_path / 'o'}", "--max_iters=4",
                       "--learning_rate=1e30", "--min_lr=0.0", "--grad_clip=0.0", "--warmup_iters=0",
                       "--eval_interval=100", "--log_interval=1", check=False)
    assert result.returncode == 1 and "no checkpoint was written yet" in result.stderr, result.stderr[-500:]


# preparations: one writer, and never into a run or another script's data ------------------------------------------

def prepare(script, *args):
    import subprocess
    import sys
    from conftest import REPO
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


SMALL_MULT = ["--train_examples=2000", "--val_examples=200", "--eval_examples=20"]


def test_a_preparation_refuses_a_run_and_another_scripts_data(token_data, tmp_path):
    run = str(tmp_path / "run")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={run}", "--max_iters=2", "--eval_interval=2")
    before = sorted(os.listdir(run))
    result = prepare("prepare_mult.py", f"--out_dir={run}", *SMALL_MULT)
    assert result.returncode == 1 and "holds a training run" in result.stderr and sorted(os.listdir(run)) == before
    text = tmp_path / "text"  # a folder prepare_fineweb.py made
    text.mkdir()
    (text / "prepare.json").write_text(json.dumps({"tokenizer": "r50k_base"}))
    (text / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "r50k_base"}))
    result = prepare("prepare_mult.py", f"--out_dir={text}", *SMALL_MULT)
    assert result.returncode == 1 and "holds data that prepare_fineweb.py prepared" in result.stderr
    assert not (text / "val_000000.bin").exists()
    mult = str(tmp_path / "mult")
    assert prepare("prepare_mult.py", f"--out_dir={mult}", *SMALL_MULT).returncode == 0
    assert prepare("prepare_mult.py", f"--out_dir={mult}", *SMALL_MULT).returncode == 0  # the same settings again
    result = prepare("prepare_mult.py", f"--out_dir={mult}", *SMALL_MULT, "--seed=1")
    assert result.returncode == 1 and "prepared with other settings (seed=1 (was 0))" in result.stderr
    result = prepare("prepare_fineweb.py", "--local_files", str(tmp_path / "x.jsonl"), f"--out_dir={mult}")
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_two_writers_on_one_data_folder_the_second_stops_naming_the_first(tmp_path):
    import subprocess
    import sys
    import time
    from conftest import REPO
    folder = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import shards, time; "
                               f"shards.lock_folder({str(folder)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = prepare("prepare_mult.py", f"--out_dir={folder}", *SMALL_MULT)
        assert result.returncode == 1 and f"{folder} is in use by pid {holder.pid}" in result.stderr
        assert not (folder / "train_000000.bin").exists()
    finally:
        holder.kill()


@pytest.mark.parametrize("arg, message", [("--out_dir={file}", "cannot be used as a folder to write into"),
                                          ("--out_dir=", "config key 'out_dir' is empty"),
                                          ("--wandb_log=True --out_dir={tmp}/run",
                                           "wandb_log=True needs the wandb package")])
def test_file_system_and_package_errors_are_one_line(token_data, tmp_path, arg, message):
    import importlib.util
    if "wandb" in arg and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    afile = tmp_path / "afile"
    afile.write_text("")
    result = run_train(*TINY, f"--data_dir={token_data}", *arg.format(file=afile, tmp=tmp_path).split(),
                       "--max_iters=1", check=False, env={"PWD": str(tmp_path)})  # every out_dir a temporary one
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_prepare_onto_a_file_and_experiment_with_a_broken_override_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    result = prepare("prepare_mult.py", f"--out_dir={afile}", *SMALL_MULT)
    assert result.returncode == 1 and "cannot be used as a folder" in result.stderr and "Traceback" not in result.stderr
    result = experiment("--table_only", "--configs", "config/mult_gapt.py+max_iters", check=False)
    assert result.returncode == 2 and "must look like --key=value" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_data_folder_names_the_configs_own_preparation(tmp_path):
    config = tmp_path / "text.py"
    config.write_text("# Prepare the data once:\n#   python prepare_fineweb.py --local_files corpus.jsonl \\\n"
                      f"#       --out_dir={tmp_path}/nodata --val_tokens=100\n"
                      f"data_dir = '{tmp_path}/nodata'\n")
    result = run_train(str(config), "--max_iters=1", f"--out_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"prepare it with: python prepare_fineweb.py --local_files corpus.jsonl --out_dir={tmp_path}/nodata " \
           f"--val_tokens=100" in result.stderr


def test_an_interrupted_preparation_says_to_run_it_again(token_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    os.remove(data / "meta.json")
    (data / "prepare.json").write_text("{}")
    result = run_train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1", check=False)
    assert result.returncode == 1 and "was interrupted" in result.stderr and "--vocab_size" not in result.stderr


def test_a_config_files_helper_names_are_named_private(tmp_path):
    config = tmp_path / "helpers.py"
    config.write_text("steps = 10\nmax_iters = steps\n")
    result = run_train(str(config), f"--out_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and "unknown config key 'steps'" in result.stderr
    assert "start with _" in result.stderr and "Traceback" not in result.stderr
    config.write_text("_steps = 10\nmax_iters = _steps\nfrom math import pi as _pi\n")
    from train import load_config
    assert load_config([str(config)]).max_iters == 10


def test_eval_only_reads_a_run_the_user_may_only_read(token_data, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: a read-only folder cannot be made here")
    out = tmp_path / "run"
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    os.chmod(out, 0o555)
    try:
        result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--eval_only=True", check=False)
        assert result.returncode == 0, result.stderr
    finally:
        os.chmod(out, 0o755)


def test_advice_after_a_stop_resumes_only_where_there_is_a_checkpoint(tmp_path):
    from types import SimpleNamespace
    from system import where_to_continue
    c = SimpleNamespace(out_dir=str(tmp_path))
    assert "start the run again" in where_to_continue(c) and "--init_from=resume" not in where_to_continue(c)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert "--init_from=resume" in where_to_continue(c)
