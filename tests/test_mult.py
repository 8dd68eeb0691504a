"""The multiplication task: data format, hold-out, the answer metrics, and a tiny end-to-end run."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare_mult as pm
from conftest import LOSS_TOL, REPO, TINY, read_log, run_train
from shards import read_shard


def test_encode_decode_round_trip():
    text = "12*34=408\n7*8=56\n"
    assert pm.decode(pm.encode(text)) == text
    assert pm.encode("0123456789*=\n") == list(range(13))
    with pytest.raises(ValueError, match="not in the multiplication vocabulary"):
        pm.encode("1+2")


def test_sampled_operands_respect_digit_range():
    a, b = pm.sample_problems(20000, (2, 4), np.random.default_rng(0))
    for x in (a, b):
        digits = pm.num_digits(x)
        assert digits.min() == 2 and digits.max() == 4
        assert abs((digits == 3).mean() - 1 / 3) < 0.02  # lengths uniform
        assert (x >= 10).all()  # leading digit non-zero
    with pytest.raises(ValueError, match="digit range"):
        pm.sample_problems(10, (3, 1), np.random.default_rng(0))


@pytest.mark.parametrize("reverse", [False, True])
def test_tokens_spell_the_examples(reverse):
    a, b = np.array([3, 45, 999, 100]), np.array([7, 12, 999, 1000])
    text = pm.decode(pm.problems_to_tokens(a, b, reverse))
    expected = "".join(f"{x}*{y}={str(x * y)[::-1] if reverse else x * y}\n" for x, y in zip(a, b))
    assert text == expected


def parse_examples(tokens):
    return [tuple(int(v) for v in line.replace("=", "*").split("*")[:2])
            for line in pm.decode(tokens).split("\n") if line]


def test_dataset_holds_out_validation_problems_and_is_deterministic():
    kw = dict(train_examples=30000, val_examples=500, eval_examples=200, train_digits=(1, 2), ood_digits=(3, 4))
    train, val, meta = pm.make_dataset(seed=1, **kw)
    train_pairs = {frozenset((x, y)) for x, y in parse_examples(train)}
    held_out = [tuple(p) for p in meta["eval_id"]] + parse_examples(val)
    assert not any(frozenset(p) in train_pairs for p in held_out)
    assert len(parse_examples(train)) == 30000 and len(parse_examples(val)) == 500
    assert len({frozenset(p) for p in meta["eval_id"]}) == 200  # distinct evaluation problems
    # at most 10% of a stratum is held out: 4 of the 45 one-digit problems, the other 41 are all trained on
    one_digit = {frozenset(p) for p in held_out if max(p) < 10}
    assert 1 <= len(one_digit) <= 4
    assert len({p for p in train_pairs if max(p) < 10}) == 45 - len(one_digit)
    with pytest.raises(ValueError, match="cannot hold out"):
        pm.make_dataset(seed=1, **{**kw, "val_examples": 5000})
    assert all(1 <= pm.num_digits(x) <= 2 for p in meta["eval_id"] for x in p)
    assert all(3 <= pm.num_digits(x) <= 4 for p in meta["eval_ood"] for x in p)
    again, _, meta_again = pm.make_dataset(seed=1, **kw)
    assert np.array_equal(train, again) and meta == meta_again
    other, _, _ = pm.make_dataset(seed=2, **kw)
    assert not np.array_equal(train[:1000], other[:1000])


class OracleModel:
    """Answers a*b correctly when a is in `knows`, else always predicts '7'. Reads the prompt from the input ids,
    so it works both teacher-forced (answer_metrics) and autoregressively (greedy decoding below)."""

    def __init__(self, knows, reverse=False):
        self.knows, self.reverse = knows, reverse

    def __call__(self, x, y=None):
        logits = torch.zeros(*x.shape, 13)
        for i, row in enumerate(x.tolist()):
            text = pm.decode(row)
            for t in range(len(row)):
                prefix = text[:t + 1].lstrip("\n")
                if "=" not in prefix:
                    continue
                lhs, partial = prefix.split("=")
                a, b = (int(v) for v in lhs.split("*"))
                answer = pm.answer_text(a, b, self.reverse) + "\n"
                if a in self.knows:
                    nxt = answer[len(partial)] if len(partial) < len(answer) else "\n"
                else:
                    nxt = "7"
                logits[i, t, pm.STOI[nxt]] = 10.0
        return logits, None, None


def greedy_exact(model, problems, reverse=False):
    correct = []
    for a, b in problems:
        ids = pm.encode(f"\n{a}*{b}=")
        target = pm.answer_text(a, b, reverse) + "\n"
        out = ""
        while len(out) < len(target) and not out.endswith("\n"):
            logits = model(torch.tensor([ids]))[0]
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            out += pm.VOCAB[nxt]
        correct.append(out == target)
    return correct


@pytest.mark.parametrize("reverse", [False, True])
def test_exact_match_equals_greedy_decoding(reverse):
    problems = [[3, 4], [12, 34], [99, 9], [7, 123], [45, 67], [8, 8]]
    model = OracleModel(knows={3, 12, 8}, reverse=reverse)
    metrics = pm.answer_metrics(model, problems, reverse)
    greedy = greedy_exact(model, problems, reverse)
    assert greedy == [True, True, False, False, False, True]
    assert metrics["exact"] == pytest.approx(np.mean(greedy))
    assert metrics["exact_by_digits"] == {"1x1": 1.0, "1x3": 0.0, "2x1": 0.0, "2x2": 0.5}


def test_answer_ce_of_oracle_and_uniform_models():
    problems = [[3, 4], [12, 34], [999, 999]]
    oracle = pm.answer_metrics(OracleModel(knows={3, 12, 999}), problems)
    assert oracle["answer_ce"] < 1e-3 and oracle["exact"] == 1.0

    def uniform(x, y=None):
        return torch.zeros(*x.shape, 13), None, None
    flat = pm.answer_metrics(uniform, problems)
    assert flat["answer_ce"] == pytest.approx(math.log(13), abs=1e-5) and flat["exact"] == 0.0


def test_answer_ce_counts_only_answer_tokens():
    x, y = pm.eval_batch([[12, 34]])
    assert pm.decode(x[0].tolist()) == "\n12*34=408"
    scored = [pm.VOCAB[t] for t in y[0].tolist() if t >= 0]
    assert scored == list("408\n")


def test_prepare_and_train_end_to_end(tmp_path):
    data = str(tmp_path / "mult")
    subprocess.run([sys.executable, os.path.join(REPO, "prepare_mult.py"), f"--out_dir={data}",
                    "--train_examples=20000", "--val_examples=500", "--eval_examples=50"], check=True, cwd=REPO,
                   capture_output=True)
    assert len(read_shard(os.path.join(data, "train_000000.bin"))) > 20000 * 5
    out = str(tmp_path / "run")
    tiny = [a for a in TINY if not a.startswith("--block_size")]
    run_train(*tiny, "--block_size=32", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=6",
              "--eval_interval=3", "--log_interval=3")
    evals = read_log(out, "eval")
    assert [e["iter"] for e in evals] == [0, 3, 6]
    for key in ("id_answer_ce", "ood_answer_ce", "id_exact", "ood_exact", "near_answer_ce", "near_exact"):
        assert math.isfinite(evals[-1][key])
    assert set(evals[-1]["near_exact_by_digits"]) <= {"4x1", "4x2", "4x3", "1x4", "2x4", "3x4"}
    assert evals[0]["id_answer_ce"] == pytest.approx(math.log(13), abs=0.3)  # untrained: near uniform
    assert set(evals[-1]["ood_exact_by_digits"]) <= {f"{a}x{b}" for a in range(4, 7) for b in range(4, 7)}
    sampled = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={out}", "--start=12*34="],
                             cwd=REPO, capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("12*34=") and ("(correct)" in sampled.stdout or "(wrong: 408)" in sampled.stdout)
    short = run_train(*tiny, "--block_size=16", f"--data_dir={data}", f"--out_dir={out}x", check=False)
    assert short.returncode == 1 and "raise block_size" in short.stderr


def test_near_ood_split_is_one_4_digit_and_one_training_length_operand_and_changes_nothing_else():
    train, val, meta = pm.make_dataset(train_examples=3000, val_examples=200, eval_examples=400)
    a, b = np.array(meta["eval_near"]).T
    lengths = np.sort(np.stack([pm.num_digits(a), pm.num_digits(b)]), axis=0)
    assert (lengths[1] == 4).all() and set(lengths[0]) == {1, 2, 3}
    assert 0.4 < (pm.num_digits(a) == 4).mean() < 0.6  # either order
    meta.pop("eval_near")  # a dataset as prepared before the split existed: the evaluator scores ID and OOD only
    evaluate = pm.make_evaluator("d", meta, "cpu", 32)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=32, vocab_size=13, n_layer=1, n_head=1, n_embd=8))
    assert not any(k.startswith("near") for k in evaluate(model))


def test_prepare_rejects_bad_ranges(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare_mult.py"), "--train_digits=3-1",
                             f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--train_digits" in result.stderr


def test_experiment_table_reads_finished_runs_only(tmp_path, capsys):
    import json as _json

    import experiment as me

    def fake_run(name, seed, ood_ce, mode, finished=True):
        d = tmp_path / f"{name}-s{seed}"
        d.mkdir()
        gapt = {"compress_steps": 30, "switches": 4} if mode == "gapt" else None
        records = [{"kind": "eval", "iter": 100, "phase": 1, "id_answer_ce": 0.5, "ood_answer_ce": ood_ce,
                    "id_exact": 0.5, "ood_exact": 0.0, "val_ce": 1.0, "val_mbe": 0.3, "val_mbe_layers": [0.3],
                    "id_exact_by_digits": {"1x1": 1.0, "3x3": 0.1 * seed}},
                   {"kind": "train", "iter": 100, "phase": 2 if mode == "always" else 1, "gapt": gapt}]
        (d / "log.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in records))
        if finished:
            (d / "done").write_text("")

    for seed, ood in ((0, 4.0), (1, 6.0)):
        fake_run("mult_baseline", seed, ood, "off")
        fake_run("mult_gapt", seed, ood * 0.5, "gapt")
    fake_run("mult_gapt", 2, 100.0, "gapt", finished=False)  # still running: left out
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "2",
             "--configs", os.path.join(REPO, "config", "mult_baseline.py"), os.path.join(REPO, "config", "mult_gapt.py")])
    out = capsys.readouterr().out
    assert "| mult_baseline | 2 | 0.500 ± 0.000 | 5.000 ± 1.414 | 50.0 ± 0.0% |" in out
    assert "| mult_gapt | 2 | 0.500 ± 0.000 | 2.500 ± 0.707 |" in out and "| 30% | 4.0 |" in out
    assert "mult_gapt: OOD answer-CE 50.0% lower (better) than mult_baseline" in out
    assert "| mult_gapt | 0 | -50.0% |" in out and "| mult_gapt | 1 | -50.0% |" in out  # paired, seed by seed
    assert "- mult_gapt (2 seeds): OOD answer-CE -50.0% ± 0.0% (beyond the spread)" in out
    assert "| run | 1x1 | 3x3 |" in out and "| mult_baseline | 100% | 5% |" in out  # per stratum, mean of seeds
    fake_run("mult_baseline", 2, 100.0, "off")  # a seed only the baseline has does not enter the comparison
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "2",
             "--configs", os.path.join(REPO, "config", "mult_baseline.py"), os.path.join(REPO, "config", "mult_gapt.py")])
    out = capsys.readouterr().out
    assert "| mult_baseline | 3 |" in out
    assert "mult_gapt: OOD answer-CE 50.0% lower (better) than mult_baseline (means over the seeds both have: 0 1)" in out


def test_experiment_rows_with_own_overrides_and_text_runs(tmp_path, capsys):
    import json as _json

    import experiment as me

    assert me.parse_spec("config/mult_gapt.py+mbe_center=True+mbe_floor=0.5") == \
        ("config/mult_gapt.py", ["mbe_center=True", "mbe_floor=0.5"])
    config = os.path.join(REPO, "config", "fineweb_cpu.py")
    for name, val_ce in (("fineweb_cpu", 4.0), ("fineweb_cpu+mbe_center_True", 3.0)):
        d = tmp_path / f"{name}-s0"
        d.mkdir()
        records = [{"kind": "eval", "iter": 10, "phase": 1, "val_ce": val_ce, "val_mbe": 0.5,
                    "val_mbe_layers": [0.25, 0.75]},
                   {"kind": "train", "iter": 10, "phase": 1, "gapt": {"compress_steps": 5, "switches": 2}}]
        (d / "log.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in records))
        (d / "done").write_text("")
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0",
             "--configs", config, config + "+mbe_center=True"])
    out = capsys.readouterr().out
    assert "| run | seeds | val CE | final MBE (regularised) |" in out
    assert "| fineweb_cpu+mbe_center_True | 1 | 3.000 ± 0.000 | 0.500 ± 0.000 | 50% | 2.0 | 0.0 / 0.0 / 0.0 | — | " \
           "— | 0.25 0.75 |" in out
    assert "fineweb_cpu+mbe_center_True: validation CE 25.0% lower (better) than fineweb_cpu" in out
    # --set overrides go into every run's directory name, not into the row names; the table says what they were
    for name in ("fineweb_cpu", "fineweb_cpu+mbe_center_True"):
        (tmp_path / f"{name}-s0").rename(tmp_path / f"{name}+max_iters_50-s0")
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "--set", "max_iters=50",
             "--configs", config, config + "+mbe_center=True"])
    out = capsys.readouterr().out
    assert "every run: --max_iters=50" in out and "| fineweb_cpu+mbe_center_True | 1 | 3.000 ± 0.000 |" in out


def test_experiment_text_table_has_second_corpus_switch_reasons_and_paired_differences(tmp_path, capsys):
    import json as _json

    import experiment as me

    config = os.path.join(REPO, "config", "kernel_docs_gapt.py")
    base = os.path.join(REPO, "config", "kernel_docs_baseline.py")
    for seed in (0, 1):
        for name, val_ce, ood_ce, reasons in (("kernel_docs_baseline", 5.0, 7.0, []),
                                              ("kernel_docs_gapt", 5.0 - 0.5 * seed, 7.7, ["ce_plateau", "ce_spike",
                                                                                           "ce_plateau"])):
            d = tmp_path / f"{name}-s{seed}"
            d.mkdir()
            records = [{"kind": "switch", "iter": 3 + 2 * i, "phase": 2 if r == "ce_plateau" else 1, "reason": r}
                       for i, r in enumerate(reasons)]  # into compression at 3, out at 5, in again at 7
            records += [{"kind": "train", "iter": i, "phase": 1, "ce": 4.0 + 0.1 * (i % 2), "gapt": None}
                        for i in range(1, 600)]  # a CE that alternates by 0.1: its step noise is 0.1 / sqrt(2)
            records += [{"kind": "eval", "iter": 600, "phase": 1, "val_ce": val_ce, "val_mbe": 0.5,
                         "val_mbe_layers": [0.5, 0.5], "python_docs_eval_ce": ood_ce, "python_docs_eval_mbe": 0.4},
                        {"kind": "train", "iter": 600, "phase": 1, "ce": 4.0,
                         "gapt": {"compress_steps": 150, "switches": 3}}]
            (d / "log.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in records))  # no `done`: max_iters
    me.main(["--table_only", "--out_root", str(tmp_path), "--seeds", "0", "1", "--configs", base, config])
    out = capsys.readouterr().out
    assert "| run | seeds | val CE | python_docs_eval CE | final MBE (regularised) |" in out
    assert "| kernel_docs_gapt | 2 | 4.750 ± 0.354 | 7.700 ± 0.000 | 0.500 ± 0.000 | 25% | 3.0 | " \
           "2.0 / 1.0 / 0.0 | 297.5 | 0.071 |" in out  # phases of 2 steps and of 593 (open until the end at 600)
    assert "| kernel_docs_gapt | 1 | -10.0% | +10.0% | +0.0% |" in out
    assert "- kernel_docs_gapt (2 seeds): val CE -5.0% ± 7.1%, python_docs_eval CE +10.0% ± 0.0% (beyond" in out
    assert "MBE -50% and CE -4.8%" in out


def test_experiment_resumes_a_stopped_run_and_skips_finished_ones(token_data, tmp_path):
    """A run stopped after its checkpoint at iter 4 (its log runs on past it) resumes there and ends as the same run
    trained without a stop; a finished run is not trained again."""
    import json as _json

    import experiment as me

    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{a[2:].split('=')[0]} = {a.split('=', 1)[1]!r}\n" if a.split('=', 1)[1] in
                              ("cpu", "cuda", "adamw") else f"{a[2:]}\n" for a in TINY)
                      + f"data_dir = {token_data!r}\nmax_iters = 8\neval_interval = 2\nlog_interval = 1\n"
                        f"decay_lr = False\ngapt_mode = 'gapt'\ngapt_patience_memorize = 2\n"
                        f"gapt_patience_compress = 2\n")
    root = tmp_path / "sweep"
    stopped, whole = root / "tiny-s0", tmp_path / "whole"
    run_train(str(config), "--seed=0", f"--out_dir={stopped}", "--max_iters=4")
    with open(stopped / "log.jsonl", "a") as f:  # what a run killed between checkpoints had logged after iter 4
        f.write(_json.dumps({"kind": "train", "iter": 5, "phase": 1}) + "\n")
    run_train(str(config), "--seed=0", f"--out_dir={whole}")
    me.main(["--out_root", str(root), "--seeds", "0", "--threads", "1", "--configs", str(config)])  # as the whole run
    evals = read_log(str(stopped), "eval")
    assert [r["iter"] for r in evals] == [0, 2, 4, 6, 8]
    assert evals[-1]["val_ce"] == pytest.approx(read_log(str(whole), "eval")[-1]["val_ce"], abs=LOSS_TOL, rel=0)
    assert [r["iter"] for r in read_log(str(stopped), "train")] == list(range(1, 9))
    log_mtime = os.path.getmtime(stopped / "log.jsonl")
    me.main(["--out_root", str(root), "--seeds", "0", "--threads", "1", "--configs", str(config)])
    assert os.path.getmtime(stopped / "log.jsonl") == log_mtime
