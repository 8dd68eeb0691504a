"""What a user can do wrong, or what can go wrong around a run, each through the command line where a user meets it:
one clear line, nothing lost, nothing hanging (issue 30). The one-writer lock is tested in test_train.py."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from configurator import ConfigError
from conftest import REPO, TINY, read_log, run_train
from shards import write_shard


def one_line_error(result, *needles):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


# a full disk --------------------------------------------------------------------------------------------------------

def test_a_checkpoint_write_that_fails_is_one_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from checkpoint import CheckpointError, save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": 1})

    def full_disk(obj, f):  # what torch.save does on a full disk: part of the file, then this
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not write .*MB free on its disk.*--init_from=resume"):
        save_checkpoint(path, {"model": 2})
    assert not os.path.exists(path + ".tmp") and torch.load(path, weights_only=False) == {"model": 1}


def test_no_space_left_is_one_line(monkeypatch, capsys):
    from system import run_main

    def main(c):
        raise OSError(errno.ENOSPC, "No space left on device", "out/log.jsonl")
    with pytest.raises(SystemExit) as stop:
        run_main(main, lambda argv: None, [])
    assert "no space left on the disk (out/log.jsonl)" in str(stop.value.code)


def test_a_finished_process_under_torchrun_skips_the_interpreter_teardown(monkeypatch):
    """gloo can abort a finished process while the interpreter shuts down (system.run_main): under torchrun a run
    that ended well leaves with os._exit(0); one that failed still raises its one-line SystemExit."""
    import system
    exits = []
    monkeypatch.setattr(system.os, "_exit", exits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    system.run_main(lambda c: None, lambda argv: None, [])
    assert exits == [0]

    def bad_config(argv):
        raise ConfigError("unknown key")
    with pytest.raises(SystemExit, match="error: unknown key"):
        system.run_main(lambda c: None, bad_config, [])
    assert exits == [0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    system.run_main(lambda c: None, lambda argv: None, [])
    assert exits == [0]


def test_a_log_line_cut_short_is_dropped_on_resume_and_read_by_plot(token_data, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--eval_interval=2", "--log_interval=1"]
    run_train(*common, "--max_iters=2")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 3, "kind": "tra')  # the disk filled up in the middle of a line
    plotted = subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), str(out), "-o", str(tmp_path / "f.png")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0 and "was cut short" in plotted.stderr and (tmp_path / "f.png").exists()
    result = run_train(*common, "--max_iters=4", "--init_from=resume")
    assert "was cut short" in result.stderr
    assert [r["iter"] for r in read_log(str(out), "train")] == [1, 2, 3, 4]  # one run, every line JSON


# a stalled process under torchrun -----------------------------------------------------------------------------------

def test_a_stalled_rank_ends_every_rank_with_one_line_naming_the_timeout(token_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *TINY, f"--data_dir={token_data}", f"--out_dir={out}",
           "--max_iters=100000", "--eval_interval=100000", "--log_interval=1", "--gradient_accumulation_steps=2",
           "--ddp_timeout=10"]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: (out / "log.jsonl").exists() and read_log(str(out), "train"))
        rank0 = int(open(out / "lock").read().split()[1])
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                   open(f"/proc/{p}/stat").read().split(")")[-1].split()[1] == str(launcher.pid)]
        stalled = [p for p in workers if p != rank0]
        assert len(stalled) == 1
        os.kill(stalled[0], signal.SIGSTOP)
        started = time.time()
        _, err = launcher.communicate(timeout=120)
        assert time.time() - started < 100
        assert launcher.returncode != 0
        assert "another process stalled or died (no answer within ddp_timeout=10 s" in err, err[-3000:]
    finally:
        launcher.kill()
        for p in os.listdir("/proc"):
            if p.isdigit() and p != str(os.getpid()):
                try:
                    if f"--out_dir={out}" in open(f"/proc/{p}/cmdline").read().replace("\0", " "):
                        os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass


# bad data, bad settings, Ctrl-C -------------------------------------------------------------------------------------

def test_a_token_id_beyond_the_vocabulary_is_one_line_and_leaves_the_out_dir_usable(token_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(str(bad / "train_000000.bin"), [1, 2, 70] * 100)
    write_shard(str(bad / "val_000000.bin"), [1, 2, 3] * 100)
    (bad / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    out = tmp_path / "run"
    one_line_error(run_train(*TINY, f"--data_dir={bad}", f"--out_dir={out}", check=False),
                   "train_000000.bin holds token id 70, but vocab_size is 64")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2")  # no "resume it" dead end


def test_meta_json_that_is_not_json_is_one_line_naming_it(token_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    (data / "meta.json").write_text("{vocab_size: 64")
    one_line_error(run_train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", check=False),
                   f"{data / 'meta.json'} is not valid JSON")


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_the_machine_lacks_is_one_line(token_data, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this machine has that device")
    result = run_train(*[a for a in TINY if not a.startswith("--device")], f"--device={device}",
                       f"--data_dir={token_data}", f"--out_dir={tmp_path / 'o'}", check=False)
    one_line_error(result, f"device={device!r}" if device != "mps" else "device='mps'", "--device=cpu")


def test_float16_on_a_cpu_says_it_is_slow(token_data, tmp_path):
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={tmp_path / 'o'}", "--dtype=float16",
                       "--max_iters=1")
    assert "float16 on a CPU is about 10x slower than float32" in result.stdout


def test_ddp_with_too_few_micro_batches_says_what_to_pass(token_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={tmp_path / 'o'}", "--gapt_mode=off",
                       "--gradient_accumulation_steps=3", check=False, launcher=torchrun)
    assert "must be divisible by the number of processes (2): pass --gradient_accumulation_steps=2" in result.stderr


def test_ctrl_c_says_where_the_last_checkpoint_is(token_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *TINY, f"--data_dir={token_data}",
                             f"--out_dir={out}", "--max_iters=100000", "--eval_interval=3", "--log_interval=1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a shell's background job inherits SIGINT ignored (and Python then keeps it so): as a
                            # terminal would, give the run the default disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (out / "ckpt.pt").exists())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [f"interrupted; the last checkpoint is {out / 'ckpt.pt'}: continue with the "
                                        f"same command and --init_from=resume"]


# sample.py and export_hf.py -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign"])
def test_sample_on_a_damaged_checkpoint_is_one_line(token_data, tmp_path, damage):
    out = tmp_path / "run"
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    ckpt = out / "ckpt.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(b"\x80\x04garbage")
    else:
        torch.save({"state_dict": {}}, ckpt)
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={out}", "--device=cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    one_line_error(result, str(ckpt))


def test_sample_on_an_exported_model_of_another_vocabulary_and_export_onto_a_file(token_data, tmp_path):
    out, hf = tmp_path / "run", tmp_path / "hf"
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    export = [sys.executable, os.path.join(REPO, "export_hf.py"), f"--out_dir={out}"]
    subprocess.run([*export, f"--hf_dir={hf}"], cwd=REPO, check=True, capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--init_from={hf}", "--device=cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    one_line_error(result, "has a vocabulary of 64 tokens, not GPT-2's 50257", "--data_dir=")
    (tmp_path / "a_file").write_text("x")
    result = subprocess.run([*export, f"--hf_dir={tmp_path / 'a_file'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    one_line_error(result, "is a file, not a folder")
