"""experiment.py: the early-stopping columns of a run with a test split, the paired tests, its thread default, and
stopping it (SIGTERM stops and waits for its train.py children)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, read_log

import experiment as me
from gapt_versions import SWITCH_REASONS


def write_run(root, name, seed, evals, compress_steps=0, switches=()):
    d = root / f"{name}-s{seed}"
    d.mkdir(parents=True)
    records = [{"kind": "switch", "iter": 1 + i, "phase": 1, "reason": r} for i, r in enumerate(switches)]
    records += [{"kind": "eval", "iter": it, "phase": 1, "val_mbe": 0.5, "val_mbe_layers": [0.5], **e}
                for it, e in evals]
    records.append({"kind": "train", "iter": evals[-1][0], "phase": 1, "compress_steps": compress_steps,
                    "gapt": None})
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "done").write_text("")


def test_a_test_split_adds_early_stopping_columns_chosen_on_validation_only(tmp_path, capsys):
    base, gapt = (os.path.join(REPO, "config", f"kernel_docs_{n}.py") for n in ("baseline", "gapt"))
    for seed in (0, 1):
        # the baseline overfits: its best val CE is at step 100, where test is 4.0; at the end val and test rise
        write_run(tmp_path, "kernel_docs_baseline", seed, [
            (100, {"train_ce": 3.9, "val_ce": 4.1, "test_ce": 4.0, "py_ce": 6.0}),
            (200, {"train_ce": 3.0, "val_ce": 4.5, "test_ce": 4.4, "py_ce": 6.6})])
        # GAPT: its best val is at the end; test there is 3.8 (and its best *test* at 100 must not be chosen)
        write_run(tmp_path, "kernel_docs_gapt", seed, [
            (100, {"train_ce": 3.95, "val_ce": 4.2, "test_ce": 3.0, "py_ce": 6.1}),
            (200, {"train_ce": 3.8, "val_ce": 4.0, "test_ce": 3.8, "py_ce": 5.7})], compress_steps=50,
            switches=["ce_plateau", "ce_spike"])
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "--configs", base, gapt])
    out = capsys.readouterr().out
    assert ("| run | seeds | val CE | best val CE (step) | test CE at best val | test CE at end | py CE at best val | "
            "py CE at end | val − train CE at end |") in out
    assert "| kernel_docs_baseline | 2 | 4.500 ± 0.000 | 4.100 ± 0.000 (100) | 4.000 ± 0.000 | 4.400 ± 0.000 | " \
           "6.000 ± 0.000 | 6.600 ± 0.000 | 1.500 ± 0.000 |" in out
    assert "| kernel_docs_gapt | 2 | 4.000 ± 0.000 | 4.000 ± 0.000 (200) | 3.800 ± 0.000 | 3.800 ± 0.000 |" in out
    assert "| 25% | 0.0 | 1.0 / 1.0 / 0.0 |" in out  # compress_steps / iter, and switches by reason
    assert f"switches by reason ({' / '.join(SWITCH_REASONS)})" in out  # the reasons gapt_versions.py defines
    assert "| kernel_docs_gapt | 0 | -5.0% | -13.6% | -5.0% | +0.0% |" in out  # test at best val: 3.8 vs 4.0


def test_paired_tests():
    sign_p, perm_p = me.paired_tests([-1.0] * 8)
    assert sign_p == pytest.approx(2 / 256) and perm_p == pytest.approx(2 / 256)
    sign_p, perm_p = me.paired_tests([-5.0, -3.0, 2.0, -1.0])
    assert sign_p == pytest.approx(10 / 16) and 0.1 < perm_p < 1
    assert me.paired_tests([1.0, -1.0]) == (1.0, 1.0)


def test_paired_summary_line(tmp_path, capsys):
    base, gapt = (os.path.join(REPO, "config", f"mult_{n}.py") for n in ("baseline", "gapt"))
    for seed, change in enumerate((-0.1, -0.2, 0.05)):
        for name, ood in (("mult_baseline", 5.0), ("mult_gapt", 5.0 * (1 + change))):
            write_run(tmp_path, name, seed, [(10, {"val_ce": 1.0, "id_answer_ce": 0.5, "ood_answer_ce": ood,
                                                   "id_exact": 0.5, "ood_exact": 0.0})])
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "2", "--configs", base, gapt])
    out = capsys.readouterr().out
    assert "OOD answer-CE: mean -8.33% (standard error 7.26%), lower on 2 of 3 seeds; sign test p = 1.000, " \
           "sign-flip permutation test p = 0.500 (two-sided)" in out
    # every other metric gets its own line (ID answer-CE is unchanged here: 0 of 3 lower)
    assert "ID answer-CE: mean +0.00% (standard error 0.00%), lower on 0 of 3 seeds; sign test p = 1.000" in out


def test_threads_default_to_the_machines_cores_over_jobs(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert me.default_threads(2) == 8 and me.default_threads(32) == 1


def test_sigterm_stops_the_runs_and_waits_for_them(token_data, tmp_path):
    config = tmp_path / "long.py"
    config.write_text(f"data_dir = {token_data!r}\nmax_iters = 100000\neval_interval = 1000\nn_layer = 2\n"
                      f"n_embd = 32\nn_head = 2\nblock_size = 16\nbatch_size = 4\noptimizer = 'adamw'\n")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "experiment.py"), "--out_root", str(tmp_path / "r"),
                             "--seeds", "0", "--threads", "1", "--configs", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "r" / "long-s0" / "log.jsonl"
    for _ in range(600):
        if log.exists() and log.read_text():
            break
        time.sleep(0.1)
    child = int(open(tmp_path / "r" / "long-s0" / "lock").read().split()[1])  # the train.py holding its out_dir
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped (SIGTERM)" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, not left running as a second writer


def test_a_row_may_be_several_config_files_applied_in_order():
    spec = "config/kernel_docs_baseline.py,config/kernel_docs_overfit.py+gapt_mode=gapt"
    config, overrides = me.parse_spec(spec)
    assert me.run_name(config, overrides) == "kernel_docs_overfit+gapt_mode_gapt"
    base, overfit = (os.path.join(REPO, "config", f"kernel_docs_{n}.py") for n in ("baseline", "overfit"))
    from train import load_config
    assert me.settings_of(f"{base},{overfit}", overrides, [])["max_iters"] == load_config([overfit]).max_iters != \
        load_config([base]).max_iters  # the second file's value, over the first's


def test_a_sweeps_runs_are_its_own(tmp_path, token_data):
    """--train_args may not set what experiment.py sets per run; a run's identity covers its settings, so a config
    file edited between two calls is refused rather than tabulated as the old run; a damaged run.json or log.jsonl is
    one line; is_finished counts --train_args' max_iters."""
    def call(*args):
        return subprocess.run([sys.executable, os.path.join(REPO, "experiment.py"), "--out_root", str(tmp_path / "sweep"),
                               *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    config = tmp_path / "row.py"
    config.write_text(f"data_dir = {token_data!r}\ngapt_mode = 'off'\nn_layer = 2\nn_head = 2\nn_embd = 16\n"
                      f"block_size = 16\nbatch_size = 2\nmax_iters = 4\neval_interval = 2\neval_iters = 1\n"
                      f"optimizer = 'adamw'\nlog_interval = 1\n")
    for key in ("seed=5", "out_dir=x", "overwrite_out_dir=True"):
        with pytest.raises(SystemExit) as stop:
            me.main(["--out_root", str(tmp_path / "sweep"), "--configs", str(config), "--seeds", "0", "--train_args",
                     f"--{key}"])
        assert stop.value.code == 2 and not (tmp_path / "sweep").exists()
    result = call("--configs", str(config), "--seeds", "0", "--train_args", "--max_iters=2")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "sweep" / "row-s0"
    os.remove(run / "done")  # killed after the run finished, before `done`: finished by its own max_iters (2)
    result = call("--configs", str(config), "--seeds", "0", "--train_args", "--max_iters=2")
    assert result.returncode == 0 and "[skip]" in result.stdout, result.stdout + result.stderr
    config.write_text(config.read_text().replace("n_layer = 2", "n_layer = 3"))  # edited between two calls
    result = call("--configs", str(config), "--seeds", "0", "--train_args", "--max_iters=2")
    assert result.returncode == 1 and "settings.n_layer=2" in result.stderr and "settings.n_layer=3" in result.stderr
    config.write_text(config.read_text().replace("n_layer = 3", "n_layer = 2"))
    (run / "log.jsonl").write_text('{"iter": 1, "kind": "train"}\n[1, 2]\n{"iter": 2, "kind": "eval"}\n')
    result = call("--configs", str(config), "--seeds", "0", "--table_only", "--train_args", "--max_iters=2")
    assert result.returncode == 1 and "line 2" in result.stderr and "Traceback" not in result.stderr
    (run / "run.json").write_text("{broken")
    result = call("--configs", str(config), "--seeds", "0", "--train_args", "--max_iters=2")
    assert result.returncode == 1 and "run.json is damaged" in result.stderr and "Traceback" not in result.stderr


def test_a_sweep_killed_at_random_moments_finishes_when_started_again(tmp_path, token_data):
    """kill -9 of experiment.py at random moments (its runs get SIGTERM as it dies), then the same call again: every
    run finishes, marked done, with the log records of a sweep that was never killed."""
    import random
    config = tmp_path / "row.py"
    config.write_text(f"data_dir = {token_data!r}\ngapt_mode = 'off'\nn_layer = 2\nn_head = 2\nn_embd = 16\n"
                      f"block_size = 16\nbatch_size = 2\nmax_iters = 9\neval_interval = 3\neval_iters = 1\n"
                      f"optimizer = 'adamw'\nlog_interval = 1\nlr_decay_iters = 9\n")
    def command(root):
        return [sys.executable, os.path.join(REPO, "experiment.py"), "--out_root", str(root), "--jobs", "2",
                "--threads", "1", "--seeds", "0", "1", "--configs", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        proc.kill()
        proc.wait()
    for root in ("killed", "straight"):
        result = subprocess.run(command(tmp_path / root), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    timing = ("ms_per_iter", "tokens_per_s", "mfu")
    for seed in (0, 1):
        logs = [[{k: v for k, v in r.items() if k not in timing} for r in read_log(str(tmp_path / root / f"row-s{seed}"))]
                for root in ("killed", "straight")]
        assert logs[0] == logs[1] and os.path.exists(tmp_path / "killed" / f"row-s{seed}" / "done")


def test_a_figure_draws_a_metric_against_a_setting_rows_that_differ_in_it_alone_joined(tmp_path, capsys):
    base, gapt = (os.path.join(REPO, "config", f"kernel_docs_{n}.py") for n in ("baseline", "gapt"))
    for seed in (0, 1):
        for name, wd_test in (("kernel_docs_baseline+weight_decay_0.1", 4.0), ("kernel_docs_baseline+weight_decay_3.0",
                                                                               3.5), ("kernel_docs_gapt+weight_decay_3.0", 3.4)):
            # the early-stopping step (best validation CE) is 100; test there is the figure's value, not test at 200
            write_run(tmp_path, name, seed, [(100, {"val_ce": 4.0, "test_ce": wd_test + seed}),
                                             (200, {"val_ce": 4.5, "test_ce": 9.0})])
    configs = [f"{base}+weight_decay=0.1", f"{base}+weight_decay=3.0", f"{gapt}+weight_decay=3.0"]
    figure = tmp_path / "wd.png"
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "--configs", *configs,
             "--figure", str(figure), "--against", "weight_decay"])
    assert f"wrote {figure}" in capsys.readouterr().out and figure.read_bytes()[:4] == b"\x89PNG"
    results = {n: {s: me.final_metrics(str(tmp_path / f"{n}-s{s}")) for s in (0, 1)}
               for n in ("kernel_docs_baseline+weight_decay_0.1", "kernel_docs_baseline+weight_decay_3.0",
                         "kernel_docs_gapt+weight_decay_3.0")}
    rows = [(base, ["weight_decay=0.1"], {"weight_decay": 0.1, "gapt_mode": "off"}),
            (base, ["weight_decay=3.0"], {"weight_decay": 3.0, "gapt_mode": "off"}),
            (gapt, ["weight_decay=3.0"], {"weight_decay": 3.0, "gapt_mode": "gapt"})]
    assert me.figure_series(rows, results, "weight_decay", "test_ce_best") == {
        "kernel_docs_baseline": {0.1: {0: 4.0, 1: 5.0}, 3.0: {0: 3.5, 1: 4.5}}, "kernel_docs_gapt": {3.0: {0: 3.4, 1: 4.4}}}
    # a row whose value comes from a config file joins the rows with its other settings; the same settings twice stop
    results["wd1"] = {0: {"test_ce_best": 3.9}}
    from_a_file = (f"{base},wd1.py", [], {"weight_decay": 1.0, "gapt_mode": "off"})
    assert me.figure_series(rows + [from_a_file], results, "weight_decay", "test_ce_best")["kernel_docs_baseline"] == \
        {0.1: {0: 4.0, 1: 5.0}, 1.0: {0: 3.9}, 3.0: {0: 3.5, 1: 4.5}}
    with pytest.raises(SystemExit, match="has the settings of another row"):
        me.figure_series(rows + [(base, [], {"weight_decay": 0.1, "gapt_mode": "off"})], {}, "weight_decay", "test_ce")
    for bad, says in ((["--figure", str(figure)], "--figure and --against go together"),
                      (["--figure", str(figure), "--against", "gapt_version"], "not a numeric setting"),
                      (["--figure", str(figure), "--against", "wd"], "no setting of that name"),
                      (["--figure", str(tmp_path / "wd.xyz"), "--against", "dropout"], "--figure " + str(tmp_path / "wd.xyz")),
                      (["--figure", str(tmp_path / "no" / "wd.png"), "--against", "dropout"], "does not exist"),
                      (["--figure", str(figure), "--against", "dropout", "--figure_metric", "ood_ce"], "nothing drawn")):
        with pytest.raises(SystemExit) as stop:
            me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "--configs", *configs, *bad])
        captured = capsys.readouterr()
        assert says in f"{stop.value.code} {captured.err}"
