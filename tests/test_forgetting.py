import argparse
import math

import pytest
import torch

import forgetting as fg


def test_input_distributions():
    gen = torch.Generator().manual_seed(0)
    xa, xb = fg.sample_inputs("A", 20000, 10, gen), fg.sample_inputs("B", 20000, 10, gen)
    assert torch.allclose(xa.mean(0), torch.tensor([1.0] * 5 + [0.0] * 5), atol=0.02)
    assert torch.allclose(xb.mean(0), torch.tensor([0.0] * 5 + [1.0] * 5), atol=0.02)
    assert torch.allclose(xa.std(0), torch.full((10,), 0.25), atol=0.01)


def test_teachers_differ_by_a_scaled_low_rank_shift_and_are_deterministic():
    ta, tb = fg.make_teachers(10, 50, 1, 0.5, torch.Generator().manual_seed(1))
    for name in ("W1", "W2"):
        delta = (ta[name] - tb[name]) / 2
        theta0 = (ta[name] + tb[name]) / 2
        assert torch.linalg.matrix_rank(delta) <= 3
        assert delta.norm().item() == pytest.approx(0.5 * theta0.norm().item(), rel=1e-4)
    assert torch.equal(ta["b1"], tb["b1"])
    x = fg.sample_inputs("A", 100, 10, torch.Generator().manual_seed(2))
    assert not torch.allclose(fg.teacher_forward(ta, x), fg.teacher_forward(tb, x))
    again, _ = fg.make_teachers(10, 50, 1, 0.5, torch.Generator().manual_seed(1))
    assert all(torch.equal(ta[k], again[k]) for k in ta)


def test_separation_on_hand_made_points():
    h_a = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # mean (0, 0), mean squared distance 1
    h_b = torch.tensor([[4.0, 1.0], [4.0, -1.0]])  # mean (4, 0), mean squared distance 1
    assert fg.separation(h_a, h_b) == pytest.approx(4.0)
    assert fg.separation(h_a, h_a) == pytest.approx(0.0)
    assert fg.separation(2 * h_a, 2 * h_b) == pytest.approx(4.0)  # scale-free


@pytest.mark.parametrize("method", ["baseline", "always", "gapt"])
def test_tiny_run_of_each_method(method):
    ns = argparse.Namespace(d=10, hidden=16, teacher_hidden=16, out=1, steps=60, finetune_steps=20, batch_size=32,
                            eval_samples=64, lr=1e-3, mbe_weight=0.1, patch_size=8, patience_memorize=5,
                            patience_compress=5, delta_mbe_abs=0.0)
    result = fg.run(method, "mix->A", 0, 1.0, ns)
    assert all(math.isfinite(result[k]) for k in ("victim_before", "victim_after", "separation", "mbe"))
    assert result["separation"] > 0 and 0 <= result["mbe"] <= math.log(8)
    if method == "gapt":
        assert result["switches"] >= 1
    assert fg.run(method, "mix->A", 0, 1.0, ns) == result  # deterministic for a seed


def test_command_line_table(capsys):
    fg.main(["--seeds", "0", "--magnitudes", "1.0", "--steps", "40", "--finetune_steps", "10", "--schedules",
             "A->B", "--eval_samples", "32"])
    out = capsys.readouterr().out
    assert "| A->B | 1.0 | gapt |" in out and "the paper reports +97%" in out
