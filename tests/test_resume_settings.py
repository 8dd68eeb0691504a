"""What a resume takes from the checkpoint and what it may change (docs/running.md): the settings are complete
before anything reads them, every change the first line names is made or refused, a longer run keeps its
learning-rate schedule, a checkpoint from before gapt_version is read as this project's rules, the data is the run's
wherever the resume starts, and nothing in the log or the run folder is lost to a setting checked too late."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, read_log, run_train

TIMING = ("ms_per_iter", "tokens_per_s", "mfu")


def without(args, *keys):  # TINY without the given keys (so that a resume does not set them explicitly)
    return [a for a in args if a[2:].partition("=")[0] not in keys]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_a_resume_keeps_the_runs_micro_batches(token_data, tmp_path):
    """gradient_accumulation_steps=1 (trained so), resumed without naming it: the run's 1, not the default 4."""
    common = [*without(TINY, "gradient_accumulation_steps"), f"--data_dir={token_data}", "--gapt_mode=off",
              "--log_interval=1", "--eval_interval=3", "--lr_decay_iters=6"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(*common, "--gradient_accumulation_steps=1", f"--out_dir={straight}", "--max_iters=6")
    run_train(*common, "--gradient_accumulation_steps=1", f"--out_dir={resumed}", "--max_iters=3")
    result = run_train(*common, f"--out_dir={resumed}", "--max_iters=6", "--init_from=resume")
    assert "1 micro-steps" in result.stdout and "gradient_accumulation_steps" not in result.stdout
    assert comparable(read_log(straight)) == comparable(read_log(resumed))


def test_a_longer_run_keeps_its_learning_rate_schedule_and_says_so(token_data, tmp_path):
    common = [*TINY, f"--data_dir={token_data}", "--gapt_mode=off", "--log_interval=1", "--eval_interval=3"]
    out = str(tmp_path / "run")
    run_train(*common, f"--out_dir={out}", "--max_iters=6")
    result = run_train(*common, f"--out_dir={out}", "--max_iters=12", "--init_from=resume")
    assert "changes max_iters 6 -> 12, the learning rate keeps the run's schedule" in result.stdout
    lrs = [r["lr"] for r in read_log(out, "train")]
    assert lrs[6:] == [pytest.approx(3e-4)] * 6  # the cosine ended at step 6: min_lr from there, no jump back up
    stretched = str(tmp_path / "stretched")
    run_train(*common, f"--out_dir={stretched}", "--max_iters=6")
    run_train(*common, f"--out_dir={stretched}", "--max_iters=12", "--lr_decay_iters=12", "--init_from=resume")
    assert read_log(stretched, "train")[6]["lr"] > 3e-4 * 2  # asked for: the cosine over the new length


def test_a_dropout_change_on_resume_is_made(token_data, tmp_path):
    out = str(tmp_path / "run")
    common = [*TINY, f"--data_dir={token_data}", "--gapt_mode=off", "--eval_interval=3"]
    run_train(*common, f"--out_dir={out}", "--max_iters=3", "--dropout=0.1")
    result = run_train(*common, f"--out_dir={out}", "--max_iters=6", "--dropout=0.0", "--init_from=resume")
    assert "dropout 0.1 -> 0.0" in result.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["model_args"]["dropout"] == 0.0 and ckpt["config"]["dropout"] == 0.0


def test_a_checkpoint_from_before_gapt_version_continues_this_projects_rules(token_data, tmp_path):
    out = str(tmp_path / "run")
    common = [*without(TINY, "gradient_accumulation_steps"), f"--data_dir={token_data}", "--eval_interval=3"]
    run_train(*common, f"--out_dir={out}", "--max_iters=3", "--gapt_version=project",
              "--gradient_accumulation_steps=1")
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["gapt_version"]  # as written before the key existed
    torch.save(ckpt, path)
    result = run_train(*common, f"--out_dir={out}", "--max_iters=6", "--init_from=resume")
    assert "gapt_mode=gapt: gapt_version=project" in result.stdout
    result = run_train(*common, f"--out_dir={out}", "--max_iters=9", "--init_from=resume",
                       "--gapt_version=paper_era", "--gradient_accumulation_steps=2", check=False)
    assert result.returncode == 1 and "cannot continue as another version" in result.stderr


def test_a_resume_from_another_folder_reads_the_runs_data(token_data, tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    shutil.copytree(token_data, here / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, os.path.join(REPO, "train.py"), *TINY, "--gapt_mode=off", f"--out_dir={tmp_path / 'run'}",
             "--eval_interval=3"]
    subprocess.run([*train, "--data_dir=data", "--max_iters=3"], cwd=here, env=env, check=True, capture_output=True)
    result = subprocess.run([*train, "--max_iters=6", "--init_from=resume"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)  # no data/ here: the run's own data_dir
    assert result.returncode == 0, result.stderr
    assert [r["iter"] for r in read_log(str(tmp_path / "run"), "train")][-1] == 6


def test_a_resume_never_deletes_records_it_will_not_write_again(token_data, tmp_path):
    """always_save_checkpoint=False keeps the best checkpoint; a resume to fewer steps than the log holds would drop
    the records after it for good: refused, the log as it was."""
    out = str(tmp_path / "run")
    common = [*TINY, f"--data_dir={token_data}", "--gapt_mode=off", "--eval_interval=2", "--log_interval=1"]
    run_train(*common, f"--out_dir={out}", "--max_iters=4")
    run_train(*common, f"--out_dir={out}", "--max_iters=12", "--init_from=resume", "--always_save_checkpoint=False",
              "--learning_rate=0.0", "--min_lr=0.0")  # the weights stand still: no better evaluation, no checkpoint
    before = open(os.path.join(out, "log.jsonl")).read()
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["iter_num"] == 4
    result = run_train(*common, f"--out_dir={out}", "--max_iters=6", "--init_from=resume", check=False)
    assert result.returncode == 1 and "would delete the records of steps 7-12" in result.stderr
    assert open(os.path.join(out, "log.jsonl")).read() == before


@pytest.mark.parametrize("arg, message", [("--device=cpu:abc", "device must be auto, cpu, cuda, cuda:N or mps"),
                                          ("--mbe_patch_size=1", "mbe_patch_size=1 makes every MBE matrix one token"),
                                          ("--mbe_weight=0", "compression would train nothing but CE")])
def test_settings_that_do_nothing_or_cannot_run_are_one_line(token_data, tmp_path, arg, message):
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={tmp_path / 'run'}", arg, "--max_iters=1",
                       check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_overwrite_checks_the_wandb_package_before_deleting_anything(token_data, tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = str(tmp_path / "run")
    run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("ckpt.pt", "log.jsonl")}
    result = run_train(*TINY, f"--data_dir={token_data}", f"--out_dir={out}", "--max_iters=2",
                       "--overwrite_out_dir=True", "--wandb_log=True", check=False)
    assert result.returncode == 1 and "needs the wandb package" in result.stderr
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before
