"""The conformance suite: every GAPT version in the registry (train.VERSIONS, filled by @register) through the face
the training loop sees, with no list to edit, so that a version a fork adds is tested as it lands: exact resume of
every log record and of the weights, valid switch records, the state round trip, 2 processes equal to 1 in eager mode
and compiled, and every micro-batch kind fit for DDP's gradient reduction."""

import json
import math
import os
import sys

import pytest
import torch

from conftest import LOSS_TOL, ON_CUDA, TINY, read_log, run_train
from model import GPT, GPTConfig
from gapt_versions import SWITCH_REASONS, VERSIONS, Step
from train import load_config, micro_batch_loss, phase_of_step, regularised_layers

NAMES = sorted(VERSIONS)
# values of a version's own keys that make progress rare, so that a 10-step run switches both ways (a key not named
# here keeps its default)
RARE_PROGRESS = {"gapt_delta_mbe": 0.5}
TIMING = ("ms_per_iter", "tokens_per_s", "mfu")


def version_args(version, token_data):
    own = [f"--{k}={v}" for k, v in RARE_PROGRESS.items() if k in VERSIONS[version].own_keys]
    return [*TINY, f"--data_dir={token_data}", f"--gapt_version={version}", "--gapt_mode=gapt",
            "--gapt_patience_memorize=3", "--gapt_patience_compress=2", "--gapt_tau=10.0", "--gapt_delta=0.5", *own,
            "--log_interval=1", "--eval_interval=4", "--lr_decay_iters=10"]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def check_switch_records(records):
    switches = [r for r in records if r["kind"] == "switch"]
    assert switches, "no switch in the run: the test's settings no longer make this version switch"
    for r in switches:
        assert r.get("reason") in SWITCH_REASONS, r
        assert all(k in r for k in SWITCH_REASONS[r["reason"]]), (r["reason"], sorted(r))
        assert r["phase"] == 3 - r["from_phase"]


@pytest.mark.parametrize("version", NAMES)
def test_resume_repeats_every_log_record_and_the_weights(token_data, tmp_path, version):
    common = version_args(version, token_data) + ["--dropout=0.1", "--deterministic=True"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(*common, f"--out_dir={straight}", "--max_iters=10")
    run_train(*common, f"--out_dir={resumed}", "--max_iters=4")  # stops at an eval step: no extra final eval
    run_train(*common, f"--out_dir={resumed}", "--max_iters=10", "--init_from=resume")
    a, b = read_log(straight), read_log(resumed)
    assert {r["kind"] for r in a} == {"train", "eval", "switch"} and {r["phase"] for r in a} == {1, 2}
    check_switch_records(a)
    weights = [torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["model"] for d in (straight, resumed)]
    if not ON_CUDA:
        assert comparable(a) == comparable(b)
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    else:
        assert [(r["kind"], r["iter"], r["phase"]) for r in a] == [(r["kind"], r["iter"], r["phase"]) for r in b]


def two_process_args(version, token_data):
    return version_args(version, token_data) + ["--max_iters=10", "--eval_interval=100"]


@pytest.fixture(scope="module")
def one_process_run(token_data, tmp_path_factory):
    """The 1-process run both 2-process tests compare against, trained once per version (per pytest-xdist worker)."""
    runs = {}

    def get(version):
        if version not in runs:
            out = str(tmp_path_factory.mktemp(f"one-{version}"))
            run_train(*two_process_args(version, token_data), f"--out_dir={out}", "--overwrite_out_dir=True")
            runs[version] = out  # only once it trained: a failed run fails each test that asks for it, itself
        return runs[version]
    return get


def two_processes(token_data, tmp_path, version, compile_, one_process_run):
    nproc = min(2, torch.cuda.device_count()) if ON_CUDA else 2
    common = two_process_args(version, token_data)
    one, two = one_process_run(version), str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    run_train(*common, f"--out_dir={two}", f"--compile={compile_}", launcher=torchrun)
    a, b = read_log(one), read_log(two)
    assert [(r["kind"], r["iter"], r["phase"], r.get("reason")) for r in a] == \
           [(r["kind"], r["iter"], r["phase"], r.get("reason")) for r in b]
    assert {r["phase"] for r in a} == {1, 2}
    tol = max(1e-4, LOSS_TOL)
    for ra, rb in zip(read_log(one, "train"), read_log(two, "train")):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=tol) and ra["mbe"] == pytest.approx(rb["mbe"], abs=tol)


@pytest.mark.parametrize("version", NAMES)
def test_two_processes_match_one(token_data, tmp_path, version, one_process_run):
    """With 2 micro-batches over 2 processes each process holds one; paper_era's compression then has one process
    backpropagate an MBE alone while the other backpropagates CE (DDP's reduction must still finish)."""
    two_processes(token_data, tmp_path, version, False, one_process_run)


@pytest.mark.skipif(ON_CUDA, reason="the compiled runs are timed on the GPU by gpu_checks.sh")
@pytest.mark.parametrize("version", NAMES)
def test_two_compiled_processes_match_one_eager(token_data, tmp_path, version, one_process_run):
    """torch.compile and DDP together against one eager process: compile equals eager to rounding, and DDP's
    reduction finishes under compile (where a parameter missing from a micro-batch's graph would go unnoticed)."""
    two_processes(token_data, tmp_path, version, True, one_process_run)


# --- the face, in process: a tiny model driven step by step as the loop drives it ---------------------------------

def drive(version, steps, mode, check_micro_batch=None, as_ddp=False, N=4):
    """Train a 3-block model for `steps` optimizer steps through the version's face (begin_step, micro_batch_loss,
    end_step), one process, N micro-batches per step. check_micro_batch(model, step, j) runs after each backward."""
    own = [f"--{k}={v}" for k, v in RARE_PROGRESS.items() if k in VERSIONS[version].own_keys]
    c = load_config(["--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu", "--vocab_size=64",
                     f"--gradient_accumulation_steps={N}", f"--gapt_version={version}", f"--gapt_mode={mode}",
                     "--gapt_patience_memorize=3", "--gapt_patience_compress=2", "--gapt_tau=10.0",
                     "--gapt_delta=0.5", *own])  # patience 3 against 4 micro-batches: counters mid-way at a step's end
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, bias=True))
    gate = VERSIONS[version].from_config(c, regularised_layers(c.mbe_layers, c.n_layer, version))
    settings = {k: getattr(gate, k) for k in gate.settings}
    switches = []
    for it in range(steps):
        step = Step(c, phase_of_step(c, gate, it), True, it, 0, 1, lambda v: None, model if as_ddp else None)
        gate.begin_step(step)
        for j in range(N):
            x = torch.randint(0, 64, (2, 16))
            loss = micro_batch_loss(model, gate, step, j, x, torch.roll(x, -1, 1))
            loss.backward()
            if check_micro_batch:
                check_micro_batch(model, step, j)
            model.zero_grad(set_to_none=True)
        switches += gate.end_step(step)
        moved = [k for k in gate.settings if getattr(gate, k) != settings[k]]
        assert not moved, f"{version}: settings {moved} changed at step {it}: they are state (keep them out of settings)"
    return gate, switches, c


@pytest.mark.parametrize("version", NAMES)
def test_every_micro_batch_kind_leaves_every_parameter_a_gradient_under_ddp(version):
    """DDP reduces every parameter of the model after the synchronising backward, so every kind of micro-batch a
    version has (memorization; each compressing kind: CE + MBE, or one block's MBE alone) must put every parameter in
    the graph (Step.with_every_parameter); eager DDP would stop a step later with a confusing error, compiled DDP
    would go silent (its backward gives every parameter a zero gradient)."""
    def every_parameter_has_a_gradient(model, step, j):
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{version}: micro-batch {j} of a phase-{step.phase} step leaves out {missing[:3]}"
    for mode in ("off", "always"):  # every memorization and every compressing micro-batch (counters cycle in 12)
        drive(version, 12, mode, every_parameter_has_a_gradient, as_ddp=True)


@pytest.mark.parametrize("version", NAMES)
def test_state_round_trip(version):
    """Settings never change while a gate trains (drive checks it on every step: they come from the config, and a
    checkpoint does not keep them), and state_dict -> JSON -> load_state_dict into a fresh gate gives the same gate: every attribute that is not a
    setting is state, and survives (a checkpoint keeps the state the way a log record does)."""
    gate, switches, c = drive(version, 12, "gapt")
    assert switches, f"{version} never switched in 12 steps: the round trip would test a fresh gate"
    fresh = type(gate).from_config(c, gate.layers)
    fresh.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert {k: v for k, v in vars(fresh).items() if k not in fresh.settings and k != "last_switch"} == \
           {k: v for k, v in vars(gate).items() if k not in gate.settings and k != "last_switch"}
    assert set(gate.settings) <= set(vars(gate)), "a setting that the gate does not hold"


@pytest.mark.parametrize("version", NAMES)
def test_keys_of_other_versions_are_refused(version):
    others = {k for v in VERSIONS.values() for k in v.own_keys} - set(VERSIONS[version].own_keys)
    for key in others:
        default = load_config([])
        value = getattr(default, key)
        changed = (not value) if isinstance(value, bool) else value + 0.5
        with pytest.raises(Exception, match=f"{key}.*is read by gapt_version"):
            load_config([f"--gapt_version={version}", f"--{key}={changed}", "--gradient_accumulation_steps=2"])


def test_a_switch_without_its_reason_or_values_is_an_error():
    from gapt_versions import record_switch
    gate = VERSIONS["algorithm1"]()
    with pytest.raises(ValueError, match="a switch needs a reason"):
        record_switch(gate, 2, "plateau", ce=1.0, ce_min=1.0, steps_without_progress=3)
    with pytest.raises(ValueError, match="missing"):
        record_switch(gate, 2, "ce_plateau", ce=1.0)
    assert gate.phase == 1 and gate.switches == 0 and math.isfinite(gate.ce_min) is False
